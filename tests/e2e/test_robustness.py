"""Reloads, odd input and slow clients: the daemon keeps its rules right and keeps running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.harness.lab import COLLECTOR, OFFLINK_COLLECTOR, WAN_HOST, Lab, have_root_netns

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
        # A plain 2024-02-30 is text now (nothing in a spec is a date); a tag
        # that asks for a date is a value mirrord cannot read.
        hup_and_wait(lab, d, spec(name="!!timestamp 2024-02-30"), path)
        log = lab.daemon_log()
        assert "the tag !!timestamp is not supported" in log and "reload rejected" in log
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
        # The tap, not the process: every tap shares the one capture process.
        tap_id = st["mirrors"][0]["tzsp"][0]["id"]
        hup_and_wait(lab, d, spec(collector=OFFLINK_COLLECTOR, match=match % 6000), path)
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["tzsp"]
                                 and s["mirrors"][0]["tzsp"][0]["id"] != tap_id
                                 and s["mirrors"][0]["tzsp"][0]["state"] == "running")
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



# -- issue 9, item 3: a spec that breaks the reader on SIGHUP --------------------
BAD_SPECS = {
    "invalid UTF-8": spec().encode().replace(b"name: lan", b"name: l\xffan"),
    "empty !!int port": spec().replace("    transport: auto\n",
                                       '    transport: auto\n    port: !!int ""\n').encode(),
    "superscript port": spec(match="    match: {protocol: udp, dport: '\u00b2'}\n").encode(),
    "1000-deep nesting": spec().encode() + b"x: " + b"[" * 1000 + b"]" * 1000 + b"\n",
}


def rules_of(lab: Lab) -> str:
    """The mirror table with its handles (unchanged unless replaced), without its counts."""
    text = lab.rtr.run("nft", "-a", "list", "table", "ip", "mirrord").stdout
    return re.sub(r"packets \d+ bytes \d+", "", text)


def test_a_spec_that_breaks_the_reader_on_reload_keeps_the_daemon_and_its_rules() -> None:
    with Lab() as lab:
        path = lab.write_spec(spec(transport="clone"))
        d = lab.start_daemon(path)
        lab.count_at_collector({"req": "icmp type echo-request"})
        rules = rules_of(lab)
        for what, text in BAD_SPECS.items():
            before = lab.daemon_log().count("reload rejected")
            with open(path, "wb") as f:
                f.write(text)
            d.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while lab.daemon_log().count("reload rejected") == before and d.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert d.poll() is None, f"{what}: the daemon died\n{lab.daemon_log()}"
            assert lab.daemon_log().count("reload rejected") > before, what
            st = lab.status()
            assert st is not None and st["mirrors"][0]["state"] == "active", what
            assert rules_of(lab) == rules, what
            assert copies_of_pings(lab) == 10, what
        # Every rejection is logged as bounded lines, not a traceback.
        tail = lab.daemon_log().split("SIGHUP", 1)[1]
        assert "Traceback" not in tail
        assert max(len(ln) for ln in tail.splitlines()) < 600
        # And a good spec is taken again afterwards.
        hup_and_wait(lab, d, spec(transport="clone", name="lan2"), path)
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["name"] == "lan2")


def test_the_daemon_reads_its_spec_in_a_child_and_holds_no_yaml_parser() -> None:
    """PyYAML stays out of the daemon's memory (service/spec_reader.py): through
    start and reloads, good and bad, libyaml's extension is never mapped."""
    with Lab() as lab:
        # Positive control: this interpreter maps the extension once yaml is imported.
        probe = "import yaml, yaml.cyaml, os; print('_yaml' in open('/proc/self/maps').read())"
        assert lab.rtr.python(probe).strip() == "True"
        path = lab.write_spec(spec(transport="clone"))
        d = lab.start_daemon(path)
        hup_and_wait(lab, d, spec(transport="clone", name="lan2"), path)
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["name"] == "lan2")
        hup_and_wait(lab, d, spec(transport="clone", name="!!timestamp 2024-02-30"), path)
        assert "the tag !!timestamp is not supported" in lab.daemon_log()
        with open(f"/proc/{d.pid}/cmdline", "rb") as f:
            assert b"mirrord" in f.read()  # the interpreter itself: `ip netns exec` execs it
        with open(f"/proc/{d.pid}/maps") as f:
            maps = f.read()
        assert "_yaml" not in maps and "python" in maps


# -- issue 9, item 4: one daemon per router ---------------------------------------
class Monitor:
    """`nft monitor` in the router: every nftables change (iptables-nft's too)
    from now on; `stop()` proves it was listening by making one of its own."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.p = lab.rtr.popen("nft", "monitor", stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # nft subscribes before it prints anything: give it the time

    def stop(self) -> list[str]:
        self.lab.rtr.run("nft", "add", "table", "ip", "monitor_probe")
        assert self.p.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ln = self.p.stdout.readline()
            if "monitor_probe" in ln:
                break
            lines.append(ln.rstrip())
        self.p.kill()
        self.p.wait()
        self.lab.rtr.run("nft", "delete", "table", "ip", "monitor_probe")
        assert deadline > time.monotonic(), "the monitor never saw its own probe"
        return [ln for ln in lines if ln and not ln.startswith("#")]


def second_instance(lab: Lab, path: str, socket: str) -> subprocess.CompletedProcess[str]:
    return lab.rtr.run(sys.executable, "-m", "mirrord", "run", "-c", path, "--socket", socket,
                       check=False, timeout=30)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
@pytest.mark.parametrize("same_socket", [True, False])
def test_a_second_instance_changes_nothing_and_names_the_first(backend: str,
                                                               same_socket: bool) -> None:
    with Lab() as lab:
        path = lab.write_spec(spec(backend, transport="clone"))
        d = lab.start_daemon(path)
        lab.count_at_collector({"req": "icmp type echo-request"})
        assert copies_of_pings(lab) == 10
        first = lab.status()
        assert first is not None and first["mirrors"][0]["packets"] == 10
        mon = Monitor(lab)
        sock = lab.socket_path() if same_socket else f"/tmp/{lab.tag}-second.sock"
        p = second_instance(lab, path, sock)
        changes = mon.stop()
        assert p.returncode == 1, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
        assert len(errors) == 1 and f"pid {d.pid}" in errors[0], p.stderr
        assert changes == [], changes
        assert not os.path.exists(f"/tmp/{lab.tag}-second.sock")
        # The first one goes on as if nothing happened: same rules, same counts.
        assert d.poll() is None
        st = lab.status()
        assert st is not None and st["reapplies"] == 0 and st["applies"] == first["applies"]
        assert copies_of_pings(lab) == 10
        st = lab.status()
        assert st is not None and st["mirrors"][0]["packets"] == 20
        if backend == "iptables":
            saved = lab.rtr.run("iptables-save", "-t", "mangle").stdout
            assert "-A PREROUTING -j MIRRORD_PRE" in saved
        assert lab.stop_daemon(d) == 0
        # Once the first is gone, a new one starts.
        lab.start_daemon(path)


@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_control_socket_path_that_cannot_be_served_changes_nothing(kind: str) -> None:
    with Lab() as lab:
        path = lab.write_spec(spec(transport="clone"))
        sock = f"/tmp/{lab.tag}-bad.sock"
        if kind == "directory":
            os.mkdir(sock)
        else:
            os.symlink(f"/tmp/{lab.tag}-nowhere/x", sock)
        try:
            mon = Monitor(lab)
            p = second_instance(lab, path, sock)
            changes = mon.stop()
        finally:
            if kind == "directory":
                os.rmdir(sock)
            else:
                os.unlink(sock)
        assert p.returncode == 1 and "control socket" in p.stderr, p.stderr
        assert changes == [], changes
