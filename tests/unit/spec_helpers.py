"""Specs shared by the spec tests."""

# Every key a spec takes, in most of the forms each value may be written in
# (scalar or list, block or flow, names and numbers, "a-b" and "a:b" ranges):
# test_spec checks the values read from it, test_spec_fuzz mutates it.
FULL = """\
# a comment
backend: iptables-legacy
poll_interval: 0.5
collectors:
  ids:
    address: 192.0.2.50
    interface: br-lan
    transport: clone
  far:
    address: 2001:db8::9
    transport: tzsp
    port: 4000
    snaplen: 1518
    ring_mib: 16
mirrors:
  - name: dns
    interfaces: br-lan
    direction: in
    collector: ids
    match:
      family: ipv4
      protocol: [UDP, 6]
      port: [53, "5353", 1000-2000, "1500:2500", 2501, 80]
      sport: 20:21
      dport: 443
      source: [192.0.2.0/25, 192.0.2.128/25, 198.51.100.7]
      destination: 203.0.113.0/24
  - name: all
    interfaces: [wan, wg0.100]
    direction: out
    collector: far
    match:
  - name: v6
    interfaces:
      - wan
      - lan
    collector: far
    match: {family: ipv6, protocol: icmpv6, destination: [2001:db8:1::/48]}
"""
