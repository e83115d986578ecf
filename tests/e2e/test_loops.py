"""No copy mirrord sends is ever input to a mirror (issue 9, item 1).

Two TZSP mirrors whose copies cross the interface the other one captures used
to copy each other's datagrams for ever: each worker's filter excluded only
its own collector. One datagram then became hundreds of thousands per second
until the daemon was stopped. Here one datagram is sent and the frames that
reach the collectors are counted in their kernels for 5 s: exactly one copy
per mirror, and nothing more.

Bounded even when the code regresses: a token bucket on every interface the
copies leave through limits what can circulate (a tap sees a frame only when
the qdisc lets it out), the daemon is stopped after the count, a watchdog
kills it by PID if the test hangs, and its workers die with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness.lab import COLLECTOR, WAN_HOST, Lab, Netns, have_root_netns
from tests.harness.wait import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

# Extra addresses of the WAN host: two collectors and the test datagram's target.
WAN_COLLECTOR_A, WAN_COLLECTOR_B, TARGET = "198.51.100.11", "198.51.100.12", "198.51.100.20"
TARGET_PORT = 5555
# What circulates if copies are copied again: a few hundred frames per second.
RATE_LIMIT = "tbf rate 2mbit burst 16kb latency 100ms"
WATCH = 5.0  # seconds of counting after the datagram
WATCHDOG = 60.0  # the daemon is killed by PID after this, whatever happens


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(ipv6=False) as built:
        yield built


def rate_limit(ns: Netns, *devices: str) -> None:
    for dev in devices:
        ns.run("tc", "qdisc", "replace", "dev", dev, "root", *RATE_LIMIT.split())


def spec_text(a: tuple[str, str], b: tuple[str, str]) -> str:
    """Mirrors a and b: (captured interface, collector address), TZSP, outgoing UDP."""
    return f"""
collectors:
  ca:
    address: {a[1]}
    transport: tzsp
  cb:
    address: {b[1]}
    transport: tzsp
mirrors:
  - name: a
    interfaces: [{a[0]}]
    direction: out
    collector: ca
    match:
      protocol: udp
  - name: b
    interfaces: [{b[0]}]
    direction: out
    collector: cb
    match:
      protocol: udp
"""


def wait_capturing(lab: Lab, n: int, timeout: float = 20, what: str = ": capturing out on ") -> None:
    """Until `n` workers logged that their socket (with its filter) is open."""
    def capturing() -> bool:
        lab.check_daemons()
        return lab.daemon_log().count(what) >= n

    wait_until(capturing, timeout, what=lambda: f"workers to start capturing:\n{lab.daemon_log()}")


def counts(lab: Lab, where: dict[str, Netns]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in dict.fromkeys(ns.name for ns in where.values()):
        out.update(lab.collector_counts(Netns(name)))
    return out


@pytest.mark.parametrize("layout", ["both-on-wan", "crossed"])
def test_one_datagram_gives_exactly_one_copy_per_mirror(lab: Lab, layout: str) -> None:
    lab.wan.sh(f"ip addr add {WAN_COLLECTOR_A}/24 dev eth0; ip addr add {WAN_COLLECTOR_B}/24 "
               f"dev eth0; ip addr add {TARGET}/24 dev eth0")
    if layout == "both-on-wan":
        # Both mirrors capture wan; both collectors are reached through wan.
        a, b = ("wan", WAN_COLLECTOR_A), ("wan", WAN_COLLECTOR_B)
        where = {"ca": lab.wan, "cb": lab.wan}
        expected = {"target": 1, "ca": 1, "cb": 1}
        rate_limit(lab.rtr, "wan")
    else:
        # a captures wan and sends through col; b captures col and sends through wan.
        a, b = ("wan", COLLECTOR), ("col", WAN_COLLECTOR_B)
        where = {"ca": lab.col, "cb": lab.wan}
        # The datagram leaves through wan only: a copies it, b sees only a's copy.
        expected = {"target": 1, "ca": 1, "cb": 0}
        rate_limit(lab.rtr, "wan", "col")
    # Every frame to a collector address, fragments included.
    per_ns: dict[str, dict[str, str]] = {}
    for name, (_iface, addr) in (("ca", a), ("cb", b)):
        per_ns.setdefault(where[name].name, {})[name] = f"ip daddr {addr}"
    per_ns.setdefault(lab.wan.name, {})["target"] = f"ip daddr {TARGET} udp dport {TARGET_PORT}"
    for ns in (lab.wan, lab.col):
        if ns.name in per_ns:
            lab.count_at_collector(per_ns[ns.name], ns)
    for addr in (a[1], b[1], TARGET):  # neighbours resolved: no frame waits for ARP
        lab.rtr.run("ping", "-c1", "-W2", addr)
    where["target"] = lab.wan

    daemon = lab.start_daemon(lab.write_spec(spec_text(a, b)))
    watchdog = threading.Timer(WATCHDOG, daemon.kill)
    watchdog.start()
    try:
        st = lab.wait_for_status(lambda s: s is not None and len(s["mirrors"]) == 2 and all(
            m["state"] == "active" and m["tzsp"] for m in s["mirrors"]))
        assert {m["transport"] for m in st["mirrors"]} == {"tzsp"}
        wait_capturing(lab, 2)
        for ns in (lab.wan, lab.col):
            if ns.name in per_ns:
                lab.reset_collector_counts(ns)
        lab.udp_send(lab.lan, TARGET, TARGET_PORT, 1)
        sent = time.monotonic()
        # Positive control: the datagram and the expected copies arrive...
        deadline = sent + 10
        got: dict[str, int] = {}
        while time.monotonic() < deadline:
            got = counts(lab, where)
            if all(got[k] >= n for k, n in expected.items()):
                break
            time.sleep(0.05)
        assert all(got[k] >= n for k, n in expected.items()), got
        # ...and for 5 s nothing more does: no copy of a copy.
        time.sleep(max(0.0, sent + WATCH - time.monotonic()))
        got = counts(lab, where)
    finally:
        watchdog.cancel()
        if daemon.poll() is None:
            lab.stop_daemon(daemon)
    print(f"{layout}: frames at the collectors in {WATCH:.0f} s after one datagram: {got}")
    assert got == expected


CLONE_BESIDE_TZSP = f"""
collectors:
  ids:
    address: {COLLECTOR}
    transport: clone
  far:
    address: {WAN_COLLECTOR_A}
    transport: tzsp
mirrors:
  - name: lan
    interfaces: [br-lan]
    direction: both
    collector: ids
    match:
      protocol: icmp
  - name: t
    interfaces: [col]
    direction: both
    collector: far
    match:
      protocol: icmp
"""


def test_kernel_clones_are_not_captured_by_a_tzsp_mirror(lab: Lab) -> None:
    """Clones to `ids` leave through col; mirror t captures col. A clone keeps
    the original addresses, so only not capturing col's outgoing half keeps
    mirrord's own clones out of t: status shows that half as an error."""
    n = 10
    lab.wan.sh(f"ip addr add {WAN_COLLECTOR_A}/24 dev eth0")
    rate_limit(lab.rtr, "wan", "col")
    lab.rtr.run("ping", "-c1", "-W2", WAN_COLLECTOR_A)
    lab.count_at_collector({"clones": "icmp type { echo-request, echo-reply }"})
    lab.count_at_collector({"tzsp": f"ip daddr {WAN_COLLECTOR_A}"}, lab.wan)
    daemon = lab.start_daemon(lab.write_spec(CLONE_BESIDE_TZSP))
    watchdog = threading.Timer(WATCHDOG, daemon.kill)
    watchdog.start()
    try:
        st = lab.wait_for_status(lambda s: s is not None and len(s["mirrors"]) == 2 and any(
            m["name"] == "t" and m["tzsp"] for m in s["mirrors"]))
        t = next(m for m in st["mirrors"] if m["name"] == "t")
        assert t["state"] == "degraded" and "kernel clones leave through col" in t["reason"]
        assert {(x["direction"], x["state"]) for x in t["taps"]} == {
            ("in", "active"), ("out", "error")}
        assert next(m for m in st["mirrors"] if m["name"] == "lan")["state"] == "active"
        wait_capturing(lab, 1, what=": capturing in on col")
        lab.reset_collector_counts()
        lab.reset_collector_counts(lab.wan)
        lab.ping(lab.lan, WAN_HOST, n)
        # Positive control: the clones left through col while t was capturing there.
        deadline = time.monotonic() + 10
        while lab.collector_counts()["clones"] < 2 * n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lab.collector_counts()["clones"] == 2 * n
        time.sleep(1.0)
        got = lab.collector_counts(lab.wan)["tzsp"]
    finally:
        watchdog.cancel()
        if daemon.poll() is None:
            lab.stop_daemon(daemon)
    assert got == 0
