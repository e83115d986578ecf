"""The core path against the real kernel: spec -> rules -> copies at the collector.

Every test runs the real daemon (`python -m mirrord run`) in the lab's router
namespace and counts what arrives at the collector in the collector's own
kernel (a netdev ingress counter, or a capture), never what mirrord says it
did. Backends: nftables, iptables (here the nft variant) and iptables-legacy.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, TypeVar

import pytest

from tests.harness.lab import (
    COLLECTOR,
    COLLECTOR6,
    LAN_HOST,
    LAN_HOST6,
    ROOT,
    RTR_COL,
    WAN_HOST,
    WAN_HOST6,
    Lab,
    Netns,
    spec_text,
)
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

BACKENDS = ("nftables", "iptables", "iptables-legacy")
N = 20
T = TypeVar("T")


# -- helpers -------------------------------------------------------------------
def ping(src: Netns, dst: str, count: int = N) -> None:
    """`count` echo requests, every one answered (a lost one would skew every count)."""
    p = src.run("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "2", dst,
                check=False, timeout=30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", p.stdout)
    assert m is not None, p.stdout + p.stderr
    assert (int(m.group(1)), int(m.group(2))) == (count, count), p.stdout


def counts(lab: Lab, ns: Optional[Netns] = None) -> dict[str, int]:
    return lab.collector_counts(ns)


def collector_totals(lab: Lab, counter: str) -> tuple[int, int]:
    """(packets, bytes) of one collector counter, both from the same read."""
    import json

    out = lab.col.run("nft", "-j", "list", "counters", "table", "netdev", "lab").stdout
    for o in json.loads(out)["nftables"]:
        if o.get("counter", {}).get("name") == counter:
            return int(o["counter"]["packets"]), int(o["counter"]["bytes"])
    raise AssertionError(f"no collector counter {counter}: {out}")


def wait_counts(lab: Lab, want: dict[str, int], ns: Optional[Netns] = None,
                timeout: float = 10.0) -> dict[str, int]:
    """Wait until every named counter has reached its wanted value; return all counters.

    Counters wanted at 0 are not waited for: the caller asserts on them after
    the positive ones arrived (or checks the originals arrived elsewhere).
    """
    return wait_until(lambda: counts(lab, ns), timeout, what=f"counters {want}",
                      ok=lambda c: all(c[k] >= v for k, v in want.items()))


def status(lab: Lab) -> tuple[int, dict[str, Any]]:
    import json

    p = lab.mirrord("status", "--json", "--socket", lab.socket_path())
    assert p.stdout.strip(), f"status printed nothing (rc {p.returncode}): {p.stderr}"
    doc: dict[str, Any] = json.loads(p.stdout)
    return p.returncode, doc


def mirror(st: dict[str, Any], name: str = "m") -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in st["mirrors"] if m["name"] == name]
    assert len(found) == 1, st
    return found[0]


def copies_counter(v6: bool = False) -> str:
    """The copies of the two hosts' traffic.

    Nothing from the LAN or WAN host reaches the collector except a copy: the
    collector is not on the path between them.
    """
    if v6:
        return f"ip6 saddr {{ {LAN_HOST6}, {WAN_HOST6} }}"
    return f"ip saddr {{ {LAN_HOST}, {WAN_HOST} }}"


# Every copy, the router's own packets on a mirrored interface included (an
# IGMP report sent on br-lan is "out on br-lan" too): whatever reaches the
# collector and is neither addressed to it nor sent by the router's port.
ALL_COPIES = f"ip saddr != {RTR_COL} ip daddr != {COLLECTOR}"


def status_matches_collector(lab: Lab, name: str = "m", counter: str = "every") -> tuple[int, int]:
    """Wait until the daemon's (packets, bytes) for `name` equal the copies counted at the collector.

    Both sides are read again and again, packets and bytes together: a copy
    made between the two reads (an unsolicited IGMP/MLD report of the router,
    say) must not fail the comparison, a lasting difference must.
    """
    def both() -> tuple[tuple[int, int], tuple[int, int]]:
        m = mirror(status(lab)[1], name)
        return (m["packets"], m["bytes"]), collector_totals(lab, counter)

    daemon, _ = wait_until(both, what="status (packets, bytes) == copies at the collector",
                           ok=lambda t: t[0] == t[1])
    return daemon


DUMPS: dict[str, tuple[str, ...]] = {
    "nft": ("nft", "-s", "list", "ruleset"),
    "iptables": ("iptables-save",),
    "ip6tables": ("ip6tables-save",),
    "iptables-legacy": ("iptables-legacy-save",),
    "ip6tables-legacy": ("ip6tables-legacy-save",),
}


def _normalize(text: str) -> str:
    # Dates in comments and chain counters move without anyone changing a rule.
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in lines)


def rulesets(ns: Netns) -> dict[str, str]:
    """Every ruleset view of the namespace, without the parts that move by themselves."""
    return {name: _normalize(ns.run(*argv).stdout) for name, argv in DUMPS.items()}


def foreign_rules(ns: Netns) -> dict[str, str]:
    """What others own: the fw4 table, and every iptables rule that is not mirrord's."""
    out = {"fw4": ns.run("nft", "-s", "list", "table", "inet", "fw4").stdout}
    for name, argv in DUMPS.items():
        if name != "nft":
            text = _normalize(ns.run(*argv).stdout)
            out[name] = "\n".join(ln for ln in text.splitlines() if "MIRRORD" not in ln)
    return out


def mirrord_present(ns: Netns, backend: str) -> bool:
    if backend == "nftables":
        return ns.run("nft", "list", "table", "ip", "mirrord", check=False).returncode == 0
    tool = "iptables-save" if backend == "iptables" else "iptables-legacy-save"
    return "MIRRORD_PRE" in ns.run(tool, "-t", "mangle").stdout


def log_count(lab: Lab, needle: str) -> int:
    return lab.daemon_log().count(needle)


def sighup(lab: Lab, daemon: subprocess.Popen[str], new_spec: str, path: str) -> None:
    Path(path).write_text(new_spec)
    daemon.send_signal(signal.SIGHUP)


def forget_daemon(lab: Lab, daemon: subprocess.Popen[str]) -> None:
    """Stop tracking a daemon we killed ourselves (start_daemon treats dead ones as failures)."""
    if daemon in lab.daemons:
        lab.daemons.remove(daemon)


# -- 1. direction: each packet once per crossing --------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction,requests,replies", [
    ("both", N, N), ("in", N, 0), ("out", 0, N),
])
def test_ping_copies_once_per_crossing(lab: Lab, backend: str, direction: str, requests: int,
                                       replies: int) -> None:
    lab.count_at_collector({
        "req": f"ip saddr {LAN_HOST} ip daddr {WAN_HOST} icmp type echo-request",
        "rep": f"ip saddr {WAN_HOST} ip daddr {LAN_HOST} icmp type echo-reply",
        "copies": copies_counter(),
        "every": ALL_COPIES,
    })
    lab.start_daemon(lab.write_spec(spec_text(backend, direction=direction)))
    rc, st = status(lab)
    assert rc == 0 and mirror(st)["state"] == "active", st
    ping(lab.lan, WAN_HOST)
    got = wait_counts(lab, {"copies": requests + replies})
    got.pop("every")
    assert got == {"req": requests, "rep": replies, "copies": requests + replies}
    # Packets and bytes as the collector's kernel counts them (bytes: the IP
    # packet's length), the router's own reports on br-lan included.
    status_matches_collector(lab)
    m = mirror(status(lab)[1])
    assert set(m["directions"]) == ({"in", "out"} if direction == "both" else {direction})


# -- 2. a match on ports -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dport_match_copies_only_that_port(lab: Lab, backend: str) -> None:
    lab.count_at_collector({
        "d5000": f"ip saddr {LAN_HOST} udp dport 5000",
        "d6000": f"ip saddr {LAN_HOST} udp dport 6000",
        "copies": copies_counter(),
    })
    lab.count_at_collector({"w5000": "udp dport 5000", "w6000": "udp dport 6000"}, ns=lab.wan)
    lab.start_daemon(lab.write_spec(spec_text(backend, match="{protocol: udp, dport: 5000}")))
    lab.udp_send(lab.lan, WAN_HOST, 5000, N)
    lab.udp_send(lab.lan, WAN_HOST, 6000, N)
    # Both streams crossed the router; only then does "no copy of 6000" mean something.
    wait_counts(lab, {"w5000": N, "w6000": N}, ns=lab.wan)
    got = wait_counts(lab, {"d5000": N})
    assert got == {"d5000": N, "d6000": 0, "copies": N}
    assert mirror(status(lab)[1])["packets"] == N


@pytest.mark.parametrize("backend", BACKENDS)
def test_port_either_end_copies_each_packet_once(lab: Lab, backend: str) -> None:
    lab.count_at_collector({
        "to5000": f"ip saddr {LAN_HOST} udp sport 40000 udp dport 5000",
        "from5000": f"ip saddr {WAN_HOST} udp sport 5000 udp dport 40000",
        "both5000": f"ip saddr {LAN_HOST} udp sport 5000 udp dport 5000",
        "to6000": "udp dport 6000",
        "copies": copies_counter(),
    })
    lab.count_at_collector({"w6000": "udp dport 6000"}, ns=lab.wan)
    lab.start_daemon(lab.write_spec(spec_text(backend, match="{protocol: udp, port: 5000}")))
    lab.udp_send(lab.lan, WAN_HOST, 5000, N, sport=40000)
    lab.udp_send(lab.wan, LAN_HOST, 40000, N, sport=5000)  # the server's answers
    lab.udp_send(lab.lan, WAN_HOST, 5000, N, sport=5000)  # both ends 5000: one copy, not two
    lab.udp_send(lab.lan, WAN_HOST, 6000, N, sport=40001)
    wait_counts(lab, {"w6000": N}, ns=lab.wan)
    got = wait_counts(lab, {"to5000": N, "from5000": N, "both5000": N})
    assert got == {"to5000": N, "from5000": N, "both5000": N, "to6000": 0, "copies": 3 * N}
    m = mirror(status(lab)[1])
    assert m["packets"] == 3 * N
    assert m["directions"]["in"]["packets"] == 2 * N
    assert m["directions"]["out"]["packets"] == N


# -- 3. IPv6 -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_ping_copies_to_an_ipv6_collector(lab: Lab, backend: str) -> None:
    # Only the two hosts' traffic: neighbour discovery on br-lan would add
    # copies at times no test controls.
    hosts = f'["{LAN_HOST6}", "{WAN_HOST6}"]'
    lab.rtr.run("ping", "-n", "-c1", "-W2", COLLECTOR6)
    lab.count_at_collector({
        "req": f"ip6 saddr {LAN_HOST6} ip6 daddr {WAN_HOST6} icmpv6 type echo-request",
        "rep": f"ip6 saddr {WAN_HOST6} ip6 daddr {LAN_HOST6} icmpv6 type echo-reply",
        "copies": copies_counter(v6=True),
    })
    lab.start_daemon(lab.write_spec(spec_text(
        backend, collector=COLLECTOR6, match=f"{{source: {hosts}, destination: {hosts}}}")))
    rc, st = status(lab)
    assert rc == 0 and mirror(st)["state"] == "active", st
    ping(lab.lan, WAN_HOST6)
    got = wait_counts(lab, {"req": N, "rep": N})
    assert got == {"req": N, "rep": N, "copies": 2 * N}
    m = mirror(status(lab)[1])
    assert m["packets"] == 2 * N
    assert m["directions"]["in"]["packets"] == N and m["directions"]["out"]["packets"] == N


# -- 4. SIGHUP mid-stream: no packet left uncopied ----------------------------------
SENDER = r"""
import signal, socket, sys, time
dst, dport, rate, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 40000))
t0, i = time.monotonic(), 0
while not stop and i < limit:
    s.sendto(f"seq {i}".encode(), (dst, dport))
    i += 1
    d = t0 + i / rate - time.monotonic()
    if d > 0:
        time.sleep(d)
print(i, flush=True)
"""
STREAM_RATE = 500.0
STREAM_LIMIT = 15000  # 30 s at most, whatever happens to the test


def pcap_sequences(path: str, src: str, dport: int) -> list[int]:
    """Sequence numbers of the 'seq N' UDP payloads in an Ethernet pcap file."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    seqs: list[int] = []
    off = 24
    want_src = bytes(int(x) for x in src.split("."))
    while off + 16 <= len(data):
        caplen = struct.unpack(endian + "I", data[off + 8:off + 12])[0]
        if off + 16 + caplen > len(data):
            break  # tcpdump is still writing this record
        frame = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != 17 or frame[26:30] != want_src:
            continue
        udp = 14 + ihl
        if struct.unpack("!H", frame[udp + 2:udp + 4])[0] != dport:
            continue
        payload = frame[udp + 8:].decode(errors="replace")
        if payload.startswith("seq "):
            seqs.append(int(payload[4:]))
    return seqs


@pytest.mark.parametrize("backend", BACKENDS)
def test_sighup_switches_spec_without_a_gap(lab: Lab, backend: str, tmp_path: Path) -> None:
    spec_a = spec_text(backend, direction="in", name="stream",
                       match="{protocol: udp, dport: 5000}")
    spec_b = spec_text(backend, direction="in", name="stream", match="{protocol: udp}")
    path = lab.write_spec(spec_a)
    lab.count_at_collector({"s5000": f"ip saddr {LAN_HOST} udp dport 5000",
                            "s6000": f"ip saddr {LAN_HOST} udp dport 6000"})
    lab.count_at_collector({"w6000": "udp dport 6000"}, ns=lab.wan)
    pcap = str(tmp_path / "copies.pcap")
    dump = lab.col.popen("tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-B", "8192",
                         "-w", pcap, f"ip src {LAN_HOST} and udp dst port 5000",
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sender: Optional[subprocess.Popen[str]] = None
    try:
        # The pcap header is written once the capture is open.
        wait_until(lambda: Path(pcap).exists() and Path(pcap).stat().st_size >= 24,
                   what="tcpdump to open its capture")
        daemon = lab.start_daemon(path)
        # Spec A: port 6000 is not copied.
        lab.udp_send(lab.lan, WAN_HOST, 6000, N, sport=40001)
        wait_counts(lab, {"w6000": N}, ns=lab.wan)
        assert counts(lab)["s6000"] == 0

        sender = lab.lan.popen(sys.executable, "-c", SENDER, WAN_HOST, "5000", str(STREAM_RATE),
                               str(STREAM_LIMIT), stdout=subprocess.PIPE, text=True)
        wait_counts(lab, {"s5000": 200}, timeout=20)
        sighup(lab, daemon, spec_b, path)
        st = lab.wait_for_status(lambda s: s is not None and s["reapplies"] >= 1, timeout=20)
        assert "udp" in mirror(st, "stream")["match"] and "5000" not in mirror(st, "stream")["match"]
        at_reload = counts(lab)["s5000"]
        # The stream goes on under spec B's rules before it stops.
        wait_counts(lab, {"s5000": at_reload + 200}, timeout=20)
        assert sender.poll() is None, "the stream ended before the reload was done; nothing tested"
        sender.send_signal(signal.SIGTERM)
        out, _ = sender.communicate(timeout=10)
        sent = int(out.strip())

        got = wait_counts(lab, {"s5000": sent}, timeout=15)
        assert got["s5000"] == sent
        seqs = wait_until(lambda: pcap_sequences(pcap, LAN_HOST, 5000), 15,
                          what=f"{sent} copies in the capture", ok=lambda s: len(s) >= sent)
        per_seq = Counter(seqs)
        missing = sorted(set(range(sent)) - set(per_seq))
        twice = sorted(s for s, n in per_seq.items() if n > 1)
        assert not missing, f"{len(missing)} of {sent} never copied, e.g. {missing[:10]}"
        assert not twice, f"copied more than once: {twice[:10]}"
        assert set(per_seq) == set(range(sent))

        # Spec B: port 6000 is copied now.
        lab.udp_send(lab.lan, WAN_HOST, 6000, N, sport=40001)
        assert wait_counts(lab, {"s6000": N})["s6000"] == N
    finally:
        for p in (sender, dump):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_status_totals_survive_a_reload_under_traffic(lab: Lab, backend: str) -> None:
    # Same mirror, new rules: its totals must keep counting every copy made.
    spec_a = spec_text(backend, direction="in", name="stream", match="{protocol: udp, dport: 5000}")
    spec_b = spec_text(backend, direction="in", name="stream", match="{protocol: udp}")
    path = lab.write_spec(spec_a)
    lab.count_at_collector({"s5000": f"ip saddr {LAN_HOST} udp dport 5000",
                            "copies": copies_counter()})
    daemon = lab.start_daemon(path)
    # Faster than the gap test: a reload's apply takes milliseconds, and a
    # copy made in them must still be counted.
    sender = lab.lan.popen(sys.executable, "-c", SENDER, WAN_HOST, "5000", str(2 * STREAM_RATE),
                           str(STREAM_LIMIT), stdout=subprocess.PIPE, text=True)
    try:
        wait_counts(lab, {"s5000": 200}, timeout=20)
        sighup(lab, daemon, spec_b, path)
        lab.wait_for_status(lambda s: s is not None and s["reapplies"] >= 1, timeout=20)
        at_reload = counts(lab)["s5000"]
        wait_counts(lab, {"s5000": at_reload + 100}, timeout=20)
        sender.send_signal(signal.SIGTERM)
        sent = int(sender.communicate(timeout=10)[0].strip())
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.communicate()
    got = wait_counts(lab, {"copies": sent}, timeout=15)
    assert got["copies"] == sent
    assert mirror(status(lab)[1], "stream")["packets"] == got["copies"]


# -- 5. a broken spec on SIGHUP ----------------------------------------------------------
BROKEN_SYNTAX = """\
backend: {backend}
collectors:
  ids:
    address: "{collector}"
    transport: clone
mirrors:
  - name: m
    interfaces: [br-lan
    direction: both
    collector: ids
"""
BROKEN_SEMANTICS = """\
backend: {backend}
collectors:
  ids:
    address: "{collector}"
    transport: clone
mirrors:
  - name: m
    interfaces: [br-lan]
    direction: in
    collector: nosuch
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_spec_on_sighup_keeps_the_running_rules(lab: Lab, backend: str) -> None:
    path = lab.write_spec(spec_text(backend))
    lab.count_at_collector({"copies": copies_counter()})
    daemon = lab.start_daemon(path)
    ping(lab.lan, WAN_HOST)
    wait_counts(lab, {"copies": 2 * N})
    before = rulesets(lab.rtr)
    assert mirrord_present(lab.rtr, backend)
    copies = 2 * N
    for text, where, message in (
        (BROKEN_SYNTAX, f"{path}:9:14: ", "YAML syntax"),
        (BROKEN_SEMANTICS, f"{path}:10:16: ", "mirror 'm': collector 'nosuch' is not defined"),
    ):
        rejected = log_count(lab, "reload rejected") + 1
        sighup(lab, daemon, text.format(backend=backend, collector=COLLECTOR), path)
        wait_until(lambda: log_count(lab, "reload rejected"), what="the reload to be rejected",
                   ok=rejected.__le__)
        log = lab.daemon_log()
        assert where + message in log, log
        assert daemon.poll() is None, log
        assert rulesets(lab.rtr) == before
        rc, st = status(lab)
        assert rc == 0 and st["reapplies"] == 0 and mirror(st)["direction"] == "both", st
        # Still copying, both ways, under the old spec.
        ping(lab.lan, WAN_HOST)
        copies += 2 * N
        assert wait_counts(lab, {"copies": copies})["copies"] == copies
    # A good spec after the broken ones is taken.
    sighup(lab, daemon, spec_text(backend, direction="in"), path)
    st = lab.wait_for_status(lambda s: s is not None and s["reapplies"] == 1)
    assert mirror(st)["direction"] == "in"


# -- 6. SIGTERM restores the ruleset ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_leaves_the_ruleset_as_before(lab: Lab, backend: str) -> None:
    if backend == "iptables-legacy":
        # A legacy x_tables table, once used in a namespace, stays registered
        # (userspace cannot unregister it): a legacy router has it anyway.
        lab.rtr.run("iptables-legacy", "-t", "mangle", "-S")
        lab.rtr.run("ip6tables-legacy", "-t", "mangle", "-S")
    before = rulesets(lab.rtr)
    lab.count_at_collector({"copies": copies_counter()})
    daemon = lab.start_daemon(lab.write_spec(spec_text(backend)))
    ping(lab.lan, WAN_HOST)
    wait_counts(lab, {"copies": 2 * N})
    assert rulesets(lab.rtr) != before  # the comparison below can fail
    assert lab.stop_daemon(daemon) == 0
    after = rulesets(lab.rtr)
    diff = {k: after[k] for k in after if after[k] != before[k]}
    assert not diff, f"left behind: {diff}"


# -- 7. rules owned by others ------------------------------------------------------------
FW4 = """\
table inet fw4 {
    set lan_devices {
        type ifname
        elements = { "br-lan" }
    }
    chain input {
        type filter hook input priority filter; policy accept;
        ct state established,related accept comment "!fw4: Allow inbound established"
        iifname @lan_devices counter accept
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related counter accept
    }
    chain mangle_prerouting {
        type filter hook prerouting priority mangle; policy accept;
        iifname "wan" meta mark set 0x10
    }
    chain mangle_postrouting {
        type filter hook postrouting priority mangle; policy accept;
        oifname "wan" counter
    }
    chain mangle_forward {
        type filter hook forward priority mangle; policy accept;
        oifname "wan" tcp flags syn tcp option maxseg size set rt mtu
    }
}
"""


def install_foreign_rules(ns: Netns) -> None:
    ns.run("nft", "-f", "-", input=FW4)
    for tool in ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy"):
        ns.run(tool, "-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-mark", "1")
        ns.run(tool, "-t", "mangle", "-A", "POSTROUTING", "-o", "wan", "-m", "comment",
               "--comment", "user rule", "-j", "MARK", "--set-mark", "2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_of_others_are_never_touched(lab: Lab, backend: str) -> None:
    install_foreign_rules(lab.rtr)
    before_all = rulesets(lab.rtr)
    before = foreign_rules(lab.rtr)
    assert "meta mark set" in before["fw4"] and "MARK" in before["iptables"]
    path = lab.write_spec(spec_text(backend, direction="in"))
    lab.count_at_collector({"copies": copies_counter()})
    daemon = lab.start_daemon(path)
    assert mirrord_present(lab.rtr, backend)
    assert foreign_rules(lab.rtr) == before
    ping(lab.lan, WAN_HOST)
    wait_counts(lab, {"copies": N})

    sighup(lab, daemon, spec_text(backend, direction="both"), path)
    lab.wait_for_status(lambda s: s is not None and s["reapplies"] == 1)
    assert foreign_rules(lab.rtr) == before
    ping(lab.lan, WAN_HOST)
    assert wait_counts(lab, {"copies": 3 * N})["copies"] == 3 * N

    assert lab.stop_daemon(daemon) == 0
    assert rulesets(lab.rtr) == before_all

    # A crash leaves the rules; `mirrord flush` takes them, and only them.
    daemon = lab.start_daemon(path)
    daemon.kill()
    daemon.wait(timeout=10)
    forget_daemon(lab, daemon)
    assert mirrord_present(lab.rtr, backend)
    p = lab.mirrord("flush")
    assert p.returncode == 0, p.stdout + p.stderr
    assert not mirrord_present(lab.rtr, backend)
    after = rulesets(lab.rtr)
    diff = {k: after[k] for k in after if after[k] != before_all[k]}
    assert not diff, f"flush changed: {diff}"


def test_flush_on_a_clean_router_changes_nothing(lab: Lab) -> None:
    before = rulesets(lab.rtr)
    p = lab.mirrord("flush")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("nothing to remove: no mirrord rules in nftables"), p.stdout
    after = rulesets(lab.rtr)
    diff = {k: after[k] for k in after if after[k] != before[k]}
    assert not diff, f"flush changed: {diff}"


# -- 8. status and its exit status ----------------------------------------------------
def test_status_exit_follows_mirror_states(lab: Lab) -> None:
    waiting = """\
  - name: spare
    interfaces: [eth7]
    direction: in
    collector: ids
"""
    daemon = lab.start_daemon(lab.write_spec(spec_text("nftables", more_mirrors=waiting)))
    rc, st = status(lab)
    assert rc != 0
    assert isinstance(st["reapplies"], int)
    for m in st["mirrors"]:
        assert {"name", "state", "transport", "packets", "bytes"} <= set(m), m
    assert mirror(st)["state"] == "active" and mirror(st)["transport"] == "clone"
    spare = mirror(st, "spare")
    assert spare["state"] == "waiting" and "eth7" in spare["reason"], spare
    assert isinstance(spare["packets"], int) and isinstance(spare["bytes"], int)

    lab.rtr.sh("ip link add eth7 type veth peer name eth7p; ip link set eth7 up; "
               "ip link set eth7p up")
    lab.wait_for_status(lambda s: s is not None and mirror(s, "spare")["state"] == "active")
    rc, st = status(lab)
    assert rc == 0 and all(m["state"] == "active" for m in st["mirrors"]), st

    lab.rtr.run("ip", "link", "del", "eth7")
    lab.wait_for_status(lambda s: s is not None and mirror(s, "spare")["state"] == "waiting")
    assert status(lab)[0] != 0

    assert lab.stop_daemon(daemon) == 0
    p = lab.mirrord("status", "--json", "--socket", lab.socket_path())
    assert p.returncode not in (0, 1), "no daemon must not read as healthy or as a mirror state"


# -- 9. route-tee on a kernel without ROUTE ---------------------------------------------
def test_route_tee_reports_the_missing_target(lab: Lab) -> None:
    before = rulesets(lab.rtr)
    path = lab.write_spec(spec_text("route-tee"))
    daemon = lab.start_daemon(path)
    rc, st = status(lab)
    m = mirror(st)
    assert rc != 0
    assert m["state"] == "error" and "ROUTE" in m["reason"] and "no ROUTE target" in m["reason"], m
    assert daemon.poll() is None
    ping(lab.lan, WAN_HOST, 3)  # the router keeps forwarding
    assert daemon.poll() is None

    p = lab.mirrord("render", "-c", path, "--backend", "route-tee")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert (f'-A MIRRORD_PRE_A1 -i br-lan -m comment --comment "mirrord m in" '
            f"-j ROUTE --gw {COLLECTOR} --tee") in lines, p.stdout
    assert (f'-A MIRRORD_POST_A1 -o br-lan -m comment --comment "mirrord m out" '
            f"-j ROUTE --gw {COLLECTOR} --tee") in lines, p.stdout
    assert "*mangle" in lines and "TEE" not in p.stdout
    assert lab.stop_daemon(daemon) == 0
    after = rulesets(lab.rtr)
    diff = {k: after[k] for k in after if after[k] != before[k]}
    assert not diff, f"left behind: {diff}"


# -- 10. mirrord check -------------------------------------------------------------------
def _check(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirrord", "check", "-c", path],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=60)


def test_check_accepts_the_shipped_example() -> None:
    p = _check(str(ROOT / "etc" / "mirrord.yaml"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "OK"
    assert p.stdout.startswith("lan: br-lan in+out")


@pytest.mark.parametrize("text,where", [
    ("collectors:\n  ids:\n    address: 192.0.2.50\nmirrors:\n  - name: m\n"
     "    interfaces: [br-lan]\n    colector: ids\n",
     ":7:5: mirror: unknown key 'colector'; did you mean 'collector'?"),
    ("collectors:\n  ids:\n    address: 192.0.2.50\nmirrors:\n  - name: m\n"
     "    interfaces: [br-lan\n    collector: ids\n",
     ":7:14: YAML syntax"),
], ids=["unknown-key", "yaml-syntax"])
def test_check_rejects_a_broken_spec_with_its_position(tmp_path: Path, text: str,
                                                       where: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    p = _check(str(path))
    assert p.returncode == 1
    assert f"{path}{where}" in p.stderr, p.stderr
    assert "OK" not in p.stdout
