"""What a flush removes: a backend's own tables, never a running trace's.

Stopping the daemon flushes its backend; a `mirrord trace` running beside it
owns `inet mirrord_trace`, which must outlive the daemon (the trace ends when
its table goes). `mirrord flush` removes a trace table only when the trace
that made it is no longer running.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.harness.lab import COLLECTOR, WAN_HOST, Lab, have_root_netns
from tests.harness.trace import TRACE_TABLE, finish, has_table, start_trace

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

SPEC = f"""
backend: nftables
collectors:
  ids:
    address: {COLLECTOR}
    transport: clone
mirrors:
  - name: lan-icmp
    interfaces: br-lan
    direction: both
    collector: ids
    match:
      protocol: icmp
"""
TRACE = TRACE_TABLE


def start_icmp_trace(lab: Lab) -> subprocess.Popen[str]:
    """A trace of ICMP that ends by itself after 60 s at the latest."""
    return start_trace(lab, "--protocol", "icmp", "--timeout", "60")


def test_stopping_the_daemon_leaves_a_running_trace_alone() -> None:
    with Lab() as lab:
        daemon = lab.start_daemon(lab.write_spec(SPEC))
        lab.wait_for_status(lambda s: s is not None and s["mirrors"][0]["state"] == "active",
                            timeout=20)
        trace = start_icmp_trace(lab)
        try:
            assert lab.stop_daemon(daemon) == 0, lab.daemon_log()
            # The stop did flush (what the daemon owns is gone) ...
            assert not has_table(lab, "ip", "mirrord")
            assert not has_table(lab, "ip6", "mirrord")
            # ... and the trace's table and the trace itself are still there.
            assert has_table(lab, *TRACE)
            assert trace.poll() is None, finish(trace)
            lab.ping(lab.lan, WAN_HOST, 1)

            p = lab.mirrord("flush")
            assert p.returncode == 0, p.stdout + p.stderr
            assert f"its mirrord trace (pid {trace.pid}) is running" in p.stdout, p.stdout
            assert has_table(lab, *TRACE)
            assert trace.poll() is None, finish(trace)
        finally:
            if trace.poll() is None:
                trace.send_signal(signal.SIGINT)
            rc, out, err = finish(trace)
        assert rc == 0, err
        assert "echo-request" in out, out + err  # the ping sent after the daemon stopped
        assert not has_table(lab, *TRACE)


def test_flush_removes_the_table_of_a_trace_that_is_gone() -> None:
    with Lab() as lab:
        trace = start_icmp_trace(lab)
        trace.kill()
        finish(trace)
        assert has_table(lab, *TRACE)

        p = lab.mirrord("flush", "--dry-run")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "table inet mirrord_trace: would remove it" in p.stdout, p.stdout
        assert has_table(lab, *TRACE)

        p = lab.mirrord("flush")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "table inet mirrord_trace: removed" in p.stdout, p.stdout
        assert not has_table(lab, *TRACE)
