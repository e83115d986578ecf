# shellcheck shell=sh
# Test shim for /lib/functions/procd.sh: the procd API an init script calls,
# recording each call as one line of tab-separated words in $PROCD_SHIM_LOG
# ("procd_set_param<TAB>command<TAB>/usr/bin/mirrord<TAB>run...").
# Nothing is started: the record is what procd would have been asked to do.
# procd_running answers from $PROCD_SHIM_RUNNING (1 = the instance runs).

shim_record() {
	{
		printf '%s' "$1"
		shift
		for shim_arg in "$@"; do
			printf '\t%s' "$shim_arg"
		done
		printf '\n'
	} >>"$PROCD_SHIM_LOG"
}

procd_open_service() { shim_record procd_open_service "$@"; }
procd_close_service() {
	# Like the real one: the triggers are collected when the service closes.
	service_triggers
	shim_record procd_close_service "$@"
}
procd_open_instance() { shim_record procd_open_instance "$@"; }
procd_close_instance() { shim_record procd_close_instance "$@"; }
procd_set_param() { shim_record procd_set_param "$@"; }
procd_append_param() { shim_record procd_append_param "$@"; }
procd_add_reload_trigger() { shim_record procd_add_reload_trigger "$@"; }
procd_add_raw_trigger() { shim_record procd_add_raw_trigger "$@"; }
procd_add_config_trigger() { shim_record procd_add_config_trigger "$@"; }
procd_add_interface_trigger() { shim_record procd_add_interface_trigger "$@"; }
procd_add_reload_interface_trigger() { shim_record procd_add_reload_interface_trigger "$@"; }
procd_open_trigger() { shim_record procd_open_trigger "$@"; }
procd_close_trigger() { shim_record procd_close_trigger "$@"; }
procd_open_validate() { shim_record procd_open_validate "$@"; }
procd_close_validate() { shim_record procd_close_validate "$@"; }
procd_add_validation() { shim_record procd_add_validation "$@"; }
procd_kill() { shim_record procd_kill "$@"; }
procd_send_signal() { shim_record procd_send_signal "$@"; }
procd_running() {
	shim_record procd_running "$@"
	[ "${PROCD_SHIM_RUNNING:-0}" = 1 ]
}
