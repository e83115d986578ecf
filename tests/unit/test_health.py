"""Health findings and the status document, from plans built offline (no root).

A plan is built with plan.build() from spec text and a Topology written here:
the links and collector routes a router would report, plain input data for a
pure function. The kernel-facing half of each finding is in
tests/e2e/test_health.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from mirrord import plan, spec
from mirrord.match import Address
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology
from mirrord.observe import status
from mirrord.observe.health import FINDING_OF, Finding, plan_findings
from mirrord.plan import Code, Reason
from mirrord.reconcile.snapshot import Snapshot

ARPHRD_PPP = 512


def addr(text: str) -> Address:
    return spec.parse(f"collectors: {{x: {{address: '{text}'}}}}\nmirrors: "
                      "[{name: a, interfaces: [e], collector: x}]").collectors["x"].address


def router(*names: str, down: tuple[str, ...] = (), ports: Optional[dict[str, int]] = None,
           ppp: tuple[str, ...] = (), reach: tuple[Reach, ...] = ()) -> Topology:
    """Links numbered from 2 in the order given; `ports` maps a port to its master's ifindex."""
    ports = ports or {}
    links = {n: Link(n, i, n not in down, None, ARPHRD_PPP if n in ppp else ARPHRD_ETHER, 1500,
                     master=ports.get(n)) for i, n in enumerate(names, 2)}
    # No collector here names its interface: reach is keyed by the address alone.
    return Topology(links, {(r.address, None): r for r in reach})


# -- the status document, as status --json shows it -------------------------------------------
def status_json(p: plan.Plan, topo: Topology, backend_error: str,
                monkeypatch: pytest.MonkeyPatch) -> str:
    """The plan-made part of the status document: its mirrors and findings."""
    from mirrord.observe import health

    # The host's own firewall is no input of these cases.
    monkeypatch.setattr(health, "offload_findings", lambda: [])
    snap = Snapshot(spec=spec.parse(BRIDGE_PORTS, "t.yaml"), started=0.0, plan=p,
                    topology=topo, backend_error=backend_error)
    doc = status.build_status(snap, None, status.RateMeter())
    return json.dumps({"mirrors": doc["mirrors"], "findings": doc["findings"]}, indent=1) + "\n"


BRIDGE_PORTS = """\
collectors:
  ids:
    address: 192.0.2.50
mirrors:
  - name: ports
    interfaces: [lan1, lan2, wan]
    collector: ids
  - name: gone
    interfaces: [eth9, wan]
    direction: in
    collector: ids
"""

OFFLINK = """\
collectors:
  far:
    address: 203.0.113.5
    transport: clone
  ids:
    address: 192.0.2.50
    transport: clone
mirrors:
  - name: remote
    interfaces: [lan1, wan]
    collector: far
  - name: orphan-port
    interfaces: [lan3]
    direction: out
    collector: ids
"""

TZSP = """\
collectors:
  ids:
    address: 192.0.2.50
  far:
    address: 203.0.113.5
    transport: tzsp
  near:
    address: 192.0.2.60
    transport: tzsp
mirrors:
  - name: lan
    interfaces: [br-lan]
    collector: ids
  - name: v
    interfaces: [br-lan]
    direction: in
    collector: near
  - name: t
    interfaces: [ppp0, eth2, lan1]
    collector: far
  - name: u
    interfaces: [ppp0]
    collector: far
"""

ERRORS = """\
collectors:
  self:
    address: 192.0.2.1
  bcast:
    address: 192.0.2.255
  net6:
    address: "2001:db8:1::"
  nowhere:
    address: 198.51.100.9
  unknown:
    address: 198.51.100.10
  ids:
    address: 192.0.2.50
mirrors:
  - {name: local, interfaces: [wan], collector: self}
  - {name: broadcast, interfaces: [wan], collector: bcast}
  - {name: anycast, interfaces: [wan], collector: net6}
  - {name: noroute, interfaces: [wan], collector: nowhere}
  - {name: unlooked, interfaces: [wan], collector: unknown}
  - {name: nobackend, interfaces: [wan, lan1], collector: ids}
"""

FAMILIES = """\
collectors:
  ids:
    address: 192.0.2.50
  ids6:
    address: "2001:db8::50"
mirrors:
  - name: v6only
    interfaces: [wan]
    collector: ids
    match:
      family: ipv6
  - name: six
    interfaces: [wan]
    collector: ids6
"""

FRAMES = """\
collectors:
  port:
    transport: span
    interface: lan4
  gone:
    transport: span
    interface: lan9
  vx:
    transport: vxlan
    address: 198.51.100.20
  gt:
    transport: gretap
    address: 198.51.100.21
mirrors:
  - name: span
    interfaces: [wan, mvx-vx]
    collector: port
  - name: tunnel
    interfaces: [wan]
    direction: in
    collector: vx
  - name: nogre
    interfaces: [wan]
    collector: gt
  - name: noport
    interfaces: [wan]
    collector: gone
"""
NO_GRE = ("cannot create gretap device mgt-gt: the kernel has no gretap support (Operation not "
          "supported); install kmod-gre (OpenWrt) or a kernel with CONFIG_NET_IPGRE")
NO_EGRESS = ("the kernel has no netdev egress hook (Error: Operation not supported): copies of "
             "sent frames need Linux 5.16 or later with CONFIG_NETFILTER_EGRESS")
NO_NETDEV = ("the kernel refused an nftables netdev dup rule (Error: Could not process rule: No "
             "such file or directory); install kmod-nft-netdev (OpenWrt) or a kernel with "
             "CONFIG_NF_TABLES_NETDEV and CONFIG_NF_DUP_NETDEV")

GROUPS = """\
collectors:
  sensors:
    transport: clone
    members: [192.0.2.50, 192.0.2.51, 192.0.2.52]
  gone:
    transport: span
    members: [lan8, lan9]
mirrors:
  - {name: lan, interfaces: [wan], collector: sensors}
  - {name: ports, interfaces: [wan], direction: in, collector: gone}
"""
MEMBERS_DEAD = ("collector 'sensors': 1 member(s) unreachable, their flows moved to the 2 "
                "other(s) (192.0.2.51: 192.0.2.51 does not answer ARP/ND (neighbour FAILED on "
                "eth2))")
ALL_DEAD = ("collector 'gone': every member unreachable (lan8: port lan8 does not exist; lan9: "
            "port lan9 does not exist)")

ONLINK_50 = Reach(addr("192.0.2.50"), oif="eth2", neighbour="REACHABLE")
FAILED_50 = Reach(addr("192.0.2.50"), oif="eth2", neighbour="FAILED")
FAILED_60 = Reach(addr("192.0.2.60"), oif="eth2", neighbour="FAILED")
ROUTED_5 = Reach(addr("203.0.113.5"), oif="wan", gateway="198.51.100.1")


def _net(text: str) -> Any:
    import ipaddress

    return ipaddress.ip_network(text)


def case(name: str) -> tuple[plan.Plan, Topology, str]:
    """Each case: a plan, the topology it was built from, the backend error."""
    if name == "bridge_ports":
        # lan1 (up) and lan2 (down) are ports of br-lan; eth9 does not exist.
        topo = router("br-lan", "lan1", "lan2", "wan", "eth2", down=("lan2",),
                      ports={"lan1": 2, "lan2": 2}, reach=(ONLINK_50,))
        return plan.build(spec.parse(BRIDGE_PORTS, "t.yaml"), topo, "nftables"), topo, ""
    if name == "offlink":
        # lan1 and lan3 are ports of ifindex 99, which is not among the links.
        topo = router("lan1", "wan", "eth2", "lan3", ports={"lan1": 99, "lan3": 99},
                      reach=(ROUTED_5, ONLINK_50))
        return plan.build(spec.parse(OFFLINK, "t.yaml"), topo, "nftables"), topo, ""
    if name == "tzsp":
        # Both on-link collectors' neighbours failed (a TZSP one too); clones
        # leave through eth2, whose port lan1 also is; ppp0 is no Ethernet.
        topo = router("br-lan", "ppp0", "eth2", "lan1", ports={"lan1": 4}, ppp=("ppp0",),
                      reach=(FAILED_50, ROUTED_5, FAILED_60))
        return plan.build(spec.parse(TZSP, "t.yaml"), topo, "nftables"), topo, ""
    if name == "errors":
        topo = router("wan", "lan1", "eth2", down=("lan1",), reach=(
            Reach(addr("192.0.2.1"), local=True),
            Reach(addr("192.0.2.255"), oif="eth2", prefixes=(_net("192.0.2.0/24"),)),
            Reach(addr("2001:db8:1::"), oif="eth2", prefixes=(_net("2001:db8:1::/64"),)),
            Reach(addr("198.51.100.9"), oif=None, error="no route to collector 198.51.100.9"),
            ONLINK_50,
        ))
        why = "no kernel clone backend is usable (tried nftables: x; iptables: y)"
        return plan.build(spec.parse(ERRORS, "t.yaml"), topo, None, why), topo, why
    if name == "families":
        topo = router("wan", "eth2", reach=(
            ONLINK_50, Reach(addr("2001:db8::50"), oif="eth2", neighbour="STALE")))
        return plan.build(spec.parse(FAMILIES, "t.yaml"), topo, "route-tee",
                          versions=frozenset({4})), topo, ""
    if name in ("frames", "frames_off"):
        # lan4 is the span port, lan9 is none; mvx-vx is the vxlan collector's
        # device; the kernel has no GRE and no netdev egress hook (or, off:
        # no netdev family at all).
        topo = router("wan", "lan4", "mvx-vx", reach=(
            Reach(addr("198.51.100.20"), oif="wan", gateway="192.0.2.1"),
            Reach(addr("198.51.100.21"), oif="wan", gateway="192.0.2.1")))
        support = (plan.FrameSupport(NO_NETDEV, NO_NETDEV) if name == "frames_off"
                   else plan.FrameSupport("", NO_EGRESS))
        return plan.build(spec.parse(FRAMES, "t.yaml"), topo, "nftables",
                          frame_support=support, tunnel_errors={"mgt-gt": NO_GRE}), topo, ""
    if name == "groups":
        # One clone member's neighbour FAILED; neither span port exists.
        topo = router("wan", "eth2", reach=(
            ONLINK_50, Reach(addr("192.0.2.51"), oif="eth2", neighbour="FAILED"),
            Reach(addr("192.0.2.52"), oif="eth2", neighbour="REACHABLE")))
        return plan.build(spec.parse(GROUPS, "t.yaml"), topo, "nftables"), topo, ""
    raise AssertionError(name)


CASES = ("bridge_ports", "offlink", "tzsp", "errors", "families", "frames", "frames_off",
         "groups")


@pytest.mark.parametrize("name", CASES)
def test_status_document_of_a_plan_is_unchanged(name: str, golden: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirrors and findings status --json shows, against the text they had before
    reasons became typed (golden/status/<case>.json, written by that code)."""
    p, topo, why = case(name)
    golden.check(f"status/{name}.json", status_json(p, topo, why, monkeypatch))


# -- every reason code: its text, and the finding health makes of it --------------------------
def emitted(mp: plan.MirrorPlan) -> list[Reason]:
    """Every Reason a mirror's plan carries: its own, its taps', its bridge ports."""
    return [*mp.reasons, *(t.cause for t in mp.taps if t.cause is not None), *mp.bridge_ports]


@dataclass(frozen=True)
class Expect:
    code: Code
    case: str
    mirror: str
    text: str
    finding: Optional[tuple[str, str]] = None  # (code, what) when health maps the code


PORT_TEXT = ("lan1 is a port of br-lan: kernel clones see br-lan, not its ports (mirror the "
             "bridge, or use transport tzsp)")
OFFLINK_TEXT = ("collector 203.0.113.5 is not on-link (routed via 198.51.100.1 dev wan); a "
                "kernel clone only reaches the next hop: use transport: tzsp (or auto)")
EXPECTED = [
    Expect(Code.INTERFACE_ABSENT, "bridge_ports", "gone", "interface eth9 does not exist",
           ("interface-absent", "mirror gone: interface eth9 does not exist")),
    Expect(Code.INTERFACE_DOWN, "bridge_ports", "ports", "interface lan2 is down"),
    Expect(Code.BRIDGE_PORT, "bridge_ports", "ports", PORT_TEXT, (
        "bridge-port", "mirror ports: lan1 is a port of br-lan; the IP hooks a kernel clone uses "
        "see traffic on br-lan, never on its ports, so nothing is copied from lan1")),
    Expect(Code.TZSP_SEES_CLONES, "tzsp", "t",
           "kernel clones leave through eth2: a TZSP capture of what leaves eth2 would copy "
           "mirrord's own clones (mirror it with transport clone, or reach the clone collector "
           "through another interface)"),
    Expect(Code.COLLECTOR_NOT_LOOKED_UP, "errors", "unlooked",
           "collector 198.51.100.10 not looked up"),
    Expect(Code.COLLECTOR_UNREACHABLE, "errors", "noroute", "no route to collector 198.51.100.9"),
    Expect(Code.COLLECTOR_LOCAL, "errors", "local",
           "collector 192.0.2.1 is an address of this router"),
    Expect(Code.COLLECTOR_NOT_A_HOST, "errors", "broadcast",
           "collector 192.0.2.255 is the broadcast address of 192.0.2.0/24 on eth2: copies "
           "would go to every host there; a collector must be one host"),
    Expect(Code.COLLECTOR_OFFLINK, "offlink", "remote", OFFLINK_TEXT,
           ("collector-offlink", f"mirror remote: {OFFLINK_TEXT}")),
    Expect(Code.NEIGHBOUR_FAILED, "tzsp", "lan",
           "collector 192.0.2.50 does not answer ARP/ND (neighbour FAILED on eth2)"),
    Expect(Code.MEMBERS_DEAD, "groups", "lan", MEMBERS_DEAD,
           ("members-dead", f"mirror lan: {MEMBERS_DEAD}")),
    Expect(Code.ALL_MEMBERS_DEAD, "groups", "ports", ALL_DEAD,
           ("all-members-dead", f"mirror ports: {ALL_DEAD}")),
    Expect(Code.NO_FAMILY_TRAFFIC, "families", "v6only", "no IPv4 traffic to clone"),
    Expect(Code.NO_BACKEND, "errors", "nobackend",
           "no kernel clone backend is usable (tried nftables: x; iptables: y)"),
    Expect(Code.BACKEND_CANNOT_CLONE_FAMILY, "families", "six",
           "backend route-tee cannot clone IPv6 (use backend nftables or iptables, or "
           "transport tzsp)"),
    Expect(Code.NOT_ETHERNET, "tzsp", "u", "ppp0 is not Ethernet (a header is synthesized)"),
    Expect(Code.FRAMES_UNSUPPORTED, "frames_off", "span", NO_NETDEV,
           ("frames-unsupported", f"mirror span: {NO_NETDEV}")),
    Expect(Code.EGRESS_UNSUPPORTED, "frames", "span", f"copies of frames sent on wan: {NO_EGRESS}"),
    Expect(Code.COLLECTOR_PORT, "frames", "noport", "span port lan9 does not exist"),
    Expect(Code.TUNNEL_FAILED, "frames", "nogre", NO_GRE, ("tunnel-failed", f"mirror nogre: {NO_GRE}")),
    Expect(Code.COPIES_COPIED, "frames", "span",
           "mvx-vx carries the copies for collector 'vx': mirroring what leaves it would copy "
           "the copies"),
]


def test_every_code_the_plan_emits_is_expected_and_every_mapping_is_checked() -> None:
    assert {e.code for e in EXPECTED} == set(Code)
    assert {e.code for e in EXPECTED if e.finding} == set(FINDING_OF)
    seen = {r.code for name in CASES for mp in case(name)[0].mirrors for r in emitted(mp)}
    assert seen == set(Code)


@pytest.mark.parametrize("e", EXPECTED, ids=[e.code.name for e in EXPECTED])
def test_each_code_has_its_text_and_its_finding(e: Expect) -> None:
    p, topo, backend_error = case(e.case)
    mp = p.mirror(e.mirror)
    assert mp is not None
    (r,) = {r for r in emitted(mp) if r.code is e.code and r.text == e.text}
    findings = plan_findings(p, backend_error, topo)
    mine = [f for f in findings if f.mirror == e.mirror and f.code in
            {code for code, _ in FINDING_OF.values()}]
    if e.finding is None:
        assert r.code not in FINDING_OF
        return
    code, what = e.finding
    assert Finding(code, FINDING_OF[e.code][1], what, r.fix, e.mirror) in mine
    assert r.fix  # a finding always says what to do


def test_findings_keep_their_codes_severities_and_fixes() -> None:
    p, topo, _ = case("bridge_ports")
    got = [(f.code, f.severity, f.fix) for f in plan_findings(p, "", topo)]
    assert got == [
        ("bridge-port", "error", "mirror br-lan (match on addresses to narrow it), or set "
         "transport: tzsp, which captures on lan1 itself"),
        ("bridge-port", "error", "mirror br-lan (match on addresses to narrow it), or set "
         "transport: tzsp, which captures on lan2 itself"),
        ("interface-absent", "warning",
         "check the name with `ip link`; mirrord starts copying when eth9 appears"),
    ]
    p, topo, _ = case("offlink")
    offlink = [f for f in plan_findings(p, "", topo) if f.code == "collector-offlink"]
    assert [(f.severity, f.fix) for f in offlink] == [
        ("error", "set transport: tzsp (or auto) for this collector")]


def test_health_reads_the_code_not_the_words() -> None:
    p, topo, _ = case("offlink")
    remote = p.mirror("remote")
    assert remote is not None
    reworded = Reason(Code.COLLECTOR_OFFLINK, "the collector is behind a router", "use tzsp")
    # The old wording under another code is no off-link collector.
    misleading = Reason(Code.NO_BACKEND, "not on-link, does not exist")
    for reasons, found in (((reworded,), ["mirror remote: the collector is behind a router"]),
                           ((misleading,), [])):
        q = dataclasses.replace(p, mirrors=(dataclasses.replace(remote, reasons=reasons),))
        assert [f.what for f in plan_findings(q, "", topo)
                if f.code == "collector-offlink"] == found


def test_bridge_port_findings_are_per_interface_of_clone_mirrors_whatever_the_taps() -> None:
    # remote: off-link, so its taps were never marked; lan3 (orphan-port) is
    # a port of an ifindex no link has.
    p, topo, _ = case("offlink")
    remote = p.mirror("remote")
    assert remote is not None
    assert {(t.interface, t.state) for t in remote.taps} == {("lan1", "active"), ("wan", "active")}
    ports = [f.what for f in plan_findings(p, "", topo) if f.code == "bridge-port"]
    assert ports == [
        "mirror remote: lan1 is a port of ifindex 99; the IP hooks a kernel clone uses see "
        "traffic on ifindex 99, never on its ports, so nothing is copied from lan1",
        "mirror orphan-port: lan3 is a port of ifindex 99; the IP hooks a kernel clone uses "
        "see traffic on ifindex 99, never on its ports, so nothing is copied from lan3",
    ]
    orphan = p.mirror("orphan-port")
    assert orphan is not None and orphan.reason == (
        "lan3 is a port of a bridge: kernel clones see a bridge, not its ports (mirror the "
        "bridge, or use transport tzsp)")
    # A TZSP capture on a port is fine (lan1 is a port of eth2 in this case).
    p, topo, _ = case("tzsp")
    assert [f for f in plan_findings(p, "", topo) if f.code == "bridge-port"] == []
    t = p.mirror("t")
    assert t is not None and t.bridge_ports == ()
    # As before, no topology given: no bridge-port finding.
    p, _, _ = case("bridge_ports")
    assert "bridge-port" not in {f.code for f in plan_findings(p, "")}


def test_mirror_reason_joins_the_texts_once_each() -> None:
    p, _, _ = case("bridge_ports")
    ports = p.mirror("ports")
    assert ports is not None
    # Four idle taps, two reasons (both directions share one).
    assert [r.code for r in ports.reasons] == [Code.BRIDGE_PORT, Code.INTERFACE_DOWN]
    assert ports.reason == f"{PORT_TEXT}; interface lan2 is down"
    assert [t.reason for t in ports.taps if t.interface == "wan"] == ["", ""]
    p, _, _ = case("tzsp")
    lan = p.mirror("lan")
    assert lan is not None and [r.code for r in lan.reasons] == [Code.NEIGHBOUR_FAILED]


def test_tzsp_superframes_are_a_finding_naming_interface_and_fix() -> None:
    from mirrord.observe.health import tzsp_findings

    row: Any = {"name": "lan", "collector": {"name": "ids"},
                "tzsp": [{"interface": "wan", "oversize": 0}, {"interface": "br-lan", "oversize": 12}]}
    (f,) = tzsp_findings([row])
    assert (f.code, f.severity, f.mirror) == ("tzsp-superframes", "warning", "lan")
    assert "12 frame(s) captured on br-lan were longer than its MTU" in f.what
    assert "ethtool -K br-lan gro off" in f.fix and "tso off gso off" in f.fix
    assert tzsp_findings([{**row, "tzsp": [{"interface": "wan", "oversize": 0}]}]) == []
