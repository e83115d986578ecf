"""Health findings and the status document, from plans built offline (no root).

A plan is built with plan.build() from spec text and a Topology written here:
the links and collector routes a router would report, plain input data for a
pure function. The kernel-facing half of each finding is in
tests/integration/test_health.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from mirrord import plan, spec
from mirrord.match import Address
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology
from mirrord.observe import status

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
@dataclass
class _Record:
    last_change: Any = None


@dataclass
class _DaemonView:
    """What build_status reads of the daemon, for a plan that ran no rules yet."""

    plan: plan.Plan
    topo: Topology
    backend_error: str = ""
    apply_error: str = ""
    rate_sample: Any = None
    records: dict[str, _Record] = field(default_factory=dict)
    workers: dict[Any, Any] = field(default_factory=dict)

    def counts(self) -> dict[Any, tuple[int, int]]:
        return {}

    def tzsp_counts(self) -> dict[str, tuple[int, int]]:
        return {}


def status_json(p: plan.Plan, topo: Topology, backend_error: str = "",
                monkeypatch: Optional[pytest.MonkeyPatch] = None) -> str:
    """The plan-made part of the status document: its mirrors and findings."""
    from mirrord.observe import health

    assert monkeypatch is not None
    # The host's own firewall is no input of these cases.
    monkeypatch.setattr(health, "offload_findings", lambda: [])
    view: Any = _DaemonView(p, topo, backend_error)
    view.started, view.applies, view.reapplies, view.backend = 0.0, 0, 0, None
    view.spec = type("S", (), {"path": "t.yaml"})()
    view.summary = lambda: ""
    doc = status.build_status(view)
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
    raise AssertionError(name)


CASES = ("bridge_ports", "offlink", "tzsp", "errors", "families")


@pytest.mark.parametrize("name", CASES)
def test_status_document_of_a_plan_is_unchanged(name: str, golden: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirrors and findings status --json shows, against the text they had before
    reasons became typed (golden/status/<case>.json, written by that code)."""
    p, topo, why = case(name)
    golden.check(f"status/{name}.json", status_json(p, topo, why, monkeypatch))
