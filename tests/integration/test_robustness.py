"""Reloads, odd input and slow clients: the daemon keeps its rules right and keeps running."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import pytest

from tests.lab import COLLECTOR, OFFLINK_COLLECTOR, WAN_HOST, Lab, have_root_netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]


def spec(backend: str = "auto", collector: str = COLLECTOR, match: str = "",
         transport: str = "auto", name: str = "lan") -> str:
    return (f"backend: {backend}\ncollectors:\n  ids:\n    address: {collector}\n"
            f"    transport: {transport}\nmirrors:\n  - name: {name}\n    interfaces: [br-lan]\n"
            f"    direction: in\n    collector: ids\n{match}")


def copies_of_pings(lab: Lab, n: int = 10, timeout: float = 5.0) -> int:
    """Copies of `n` pings counted at the collector: waits for them (a deadline, not a
    fixed sleep); fewer after the deadline, or more, is the caller's failure to see."""
    lab.reset_collector_counts()
    lab.ping(lab.lan, WAN_HOST, n, interval=0.01)
    deadline = time.monotonic() + timeout
    got = lab.collector_counts()["req"]
    while got < n and time.monotonic() < deadline:
        time.sleep(0.05)
        got = lab.collector_counts()["req"]
    return got


def hup_and_wait(lab: Lab, daemon: Any, text: str, path: str) -> None:
    """Rewrite the spec, SIGHUP, and wait until the daemon logged the outcome."""
    before = lab.daemon_log().count("SIGHUP")
    with open(path, "w") as f:
        f.write(text)
    daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = lab.daemon_log()
        if log.count("SIGHUP") > before and ("reloaded:" in log.split("SIGHUP")[-1]
                                             or "rejected" in log.split("SIGHUP")[-1]):
            return
        time.sleep(0.05)
    raise AssertionError(f"no reload outcome logged:\n{lab.daemon_log()}")


def test_reload_to_auto_resolving_to_the_same_backend_keeps_the_rules() -> None:
    with Lab() as lab:
        path = lab.write_spec(spec("nftables"))
        d = lab.start_daemon(path)
        lab.count_at_collector({"req": "icmp type echo-request"})
        assert copies_of_pings(lab) == 10
        hup_and_wait(lab, d, spec("auto"), path)
        assert "reloaded:" in lab.daemon_log()
        assert copies_of_pings(lab) == 10
        assert lab.rtr.run("nft", "list", "table", "ip", "mirrord", check=False).returncode == 0
        assert lab.status()["backend"] == "nftables"  # type: ignore[index]


def test_reload_to_an_unusable_backend_is_rejected_and_the_rules_stay() -> None:
    with Lab() as lab:
        path = lab.write_spec(spec("nftables"))
        d = lab.start_daemon(path)
        lab.count_at_collector({"req": "icmp type echo-request"})
        hup_and_wait(lab, d, spec("route-tee"), path)  # no ROUTE target in this kernel
        assert "reload rejected" in lab.daemon_log()
        st = lab.status()
        assert st is not None and st["backend"] == "nftables"
        assert st["mirrors"][0]["state"] == "active"
        assert copies_of_pings(lab) == 10
        assert lab.stop_daemon(d) == 0
        assert lab.rtr.run("nft", "list", "ruleset").stdout.strip() == ""


def test_unreadable_values_on_reload_are_spec_errors_not_a_crash() -> None:
    with Lab() as lab:
        path = lab.write_spec(spec())
        d = lab.start_daemon(path)
        lab.count_at_collector({"req": "icmp type echo-request"})
        hup_and_wait(lab, d, spec(name="2024-02-30"), path)
        log = lab.daemon_log()
        assert "cannot read the value '2024-02-30'" in log and "reload rejected" in log
        assert d.poll() is None
        assert copies_of_pings(lab) == 10


def test_a_stalled_or_hostile_control_client_does_not_stop_the_daemon() -> None:
    with Lab() as lab:
        d = lab.start_daemon(lab.write_spec(spec()))
        lab.count_at_collector({"req": "icmp type echo-request"})
        # A client that connects and says nothing, one that sends a deep
        # nesting bomb: the daemon answers others and heals meanwhile.
        code = (
            "import socket,sys,time\n"
            "idle=socket.socket(socket.AF_UNIX); idle.connect(sys.argv[1])\n"
            "bomb=socket.socket(socket.AF_UNIX); bomb.connect(sys.argv[1])\n"
            "bomb.sendall(b'['*5000+b'\\n')\n"
            "print(bomb.recv(4096).decode().strip())\n"
            "time.sleep(1.5)\n"
        )
        p = lab.rtr.popen(sys.executable, "-c", code, lab.socket_path(), stdout=-1, text=True)
        time.sleep(0.2)
        lab.rtr.run("nft", "flush", "ruleset")
        t0 = time.monotonic()
        st = lab.wait_for_status(lambda s: s and s["reapplies"] >= 1, timeout=5)
        assert time.monotonic() - t0 < 3
        out, _ = p.communicate(timeout=10)
        assert json.loads(out)["error"].startswith("bad request")
        assert d.poll() is None and st["mirrors"][0]["state"] == "active"
        assert copies_of_pings(lab) == 10


def test_counts_survive_rules_going_away_and_coming_back() -> None:
    with Lab() as lab:
        # Only the pings: the daemon's total is compared with a count of them,
        # and the LAN host's own reports would join it at times no test controls.
        lab.start_daemon(lab.write_spec(spec(transport="clone",
                                             match="    match: {protocol: icmp}\n")))
        lab.count_at_collector({"req": "icmp type echo-request"})
        assert copies_of_pings(lab) == 10
        # No status query in between: the copies counted so far must still
        # be in the totals when the rules are removed (collector unreachable).
        assert copies_of_pings(lab) == 10
        lab.rtr.run("ip", "addr", "flush", "dev", "col")
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "waiting")
        lab.rtr.run("ip", "addr", "add", "203.0.113.1/24", "dev", "col")
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active")
        assert copies_of_pings(lab) == 10
        st = lab.status()
        assert st is not None and st["mirrors"][0]["packets"] == 30


def test_reload_changing_only_a_tzsp_match_replaces_the_worker() -> None:
    with Lab(offlink=True) as lab:
        match = "    match: {protocol: udp, dport: %d}\n"
        text = spec(collector=OFFLINK_COLLECTOR, match=match % 5000)
        # The collector's ring size reaches the worker (256 KiB blocks).
        path = lab.write_spec(text.replace("    transport: auto\n",
                                           "    transport: auto\n    ring_mib: 16\n"))
        d = lab.start_daemon(path)
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["tzsp"])
        deadline = time.monotonic() + 5
        while "64 x 256 KiB ring" not in lab.daemon_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "64 x 256 KiB ring" in lab.daemon_log()
        pid = st["mirrors"][0]["tzsp"][0]["pid"]
        hup_and_wait(lab, d, spec(collector=OFFLINK_COLLECTOR, match=match % 6000), path)
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["tzsp"]
                                 and s["mirrors"][0]["tzsp"][0]["pid"] != pid)
        lab.udp_send(lab.lan, WAN_HOST, 6000, 20, rate=500)
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["tzsp"][0]["captured"] >= 20)
        assert st["mirrors"][0]["match"] == "udp dport 6000"


def test_iptables_legacy_poll_starts_once_rules_exist() -> None:
    with Lab() as lab:
        lab.rtr.run("ip", "addr", "flush", "dev", "col")  # collector unreachable at start
        path = lab.write_spec("poll_interval: 0.3\n" + spec("iptables-legacy", transport="clone"))
        lab.start_daemon(path)
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "waiting")
        lab.rtr.run("ip", "addr", "add", "203.0.113.1/24", "dev", "col")
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active")
        before = lab.status()
        assert before is not None and before["reapplies"] == 0  # the first apply came with the route
        lab.rtr.run("iptables-legacy", "-t", "mangle", "-D", "PREROUTING", "-j", "MIRRORD_PRE")
        st = lab.wait_for_status(lambda s: s and s["reapplies"] >= 1, timeout=3)
        assert "poll" in (st["mirrors"][0]["last_heal"] or {}).get("why", "")
        saved = lab.rtr.run("iptables-legacy-save", "-t", "mangle").stdout
        assert "-A PREROUTING -j MIRRORD_PRE" in saved

