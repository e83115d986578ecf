# The flowtable of OpenWrt's firewall4, as its template declares it:
# openwrt/firewall4 root/usr/share/firewall4/templates/ruleset.uc
# (commit 04a06bd70b9808b14444cae81a2faba4708ee231), lines 20-29.
{% if (length(flowtable_devices) > 0): %}
	#
	# Flowtable
	#

	flowtable ft {
		hook ingress priority 0;
		devices = {{ fw4.set(flowtable_devices, true) }};
		counter;
{% if (fw4.default_option("flow_offloading_hw")): %}
		flags offload;
{% endif %}
	}
