"""Plans and rendered rulesets, against golden files and against the kernel.

A Plan is built with plan.build() from a spec in golden/render/<case>.yaml and
a Topology written here: the links and collector routes a router would report.
That is plain input data for a pure function, not a stand-in for the kernel.

Golden outputs per case: <case>.nft (nft text, `mirrord render`),
<case>.nft.json (the libnftables JSON batch that apply() commits on a router
without mirrord tables), <case>.iptables / .iptables-legacy / .route-tee
(iptables-restore input). As root, every nft golden is loaded into a kernel
in a throwaway network namespace, and every iptables golden is checked with
iptables-restore --test and then really restored there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mirrord import plan, spec
from mirrord.backends import create
from mirrord.backends.nftables import batch
from mirrord.match import Address
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology

GOLDEN = Path(__file__).parent / "golden"
RENDER = GOLDEN / "render"

# The router's port towards the collectors, unless a case says otherwise.
COLLECTOR_PORT = "eth2"
EGRESS: dict[str, str] = {"egress": "br-lan"}
CASES = sorted(p.stem for p in RENDER.glob("*.yaml"))
IPV4_ONLY = [c for c in CASES if c not in ("ipv6", "both_families", "collector_interface")]
IPT_BACKENDS = ("iptables", "iptables-legacy")


def load_case(case: str) -> spec.Spec:
    return spec.load(str(RENDER / f"{case}.yaml"))


def links(*names: str, down: tuple[str, ...] = (), arphrd: int = ARPHRD_ETHER) -> dict[str, Link]:
    return {n: Link(n, i, n not in down, None, arphrd, 1500) for i, n in enumerate(names, 2)}


def router(s: spec.Spec, egress: str = COLLECTOR_PORT) -> Topology:
    """Every interface the spec names is up; every collector is on-link via `egress`."""
    names = [i for m in s.mirrors for i in m.interfaces]
    names += [c.interface for c in s.collectors.values() if c.interface] + [egress]
    reach = {
        (c.address, c.interface): Reach(c.address, oif=c.interface or egress, neighbour="REACHABLE")
        for c in s.collectors.values()
    }
    return Topology(links(*dict.fromkeys(names)), reach)


def build(case: str, backend: str) -> plan.Plan:
    s = load_case(case)
    return plan.build(s, router(s, EGRESS.get(case, COLLECTOR_PORT)), backend)


def nft_tables(case: str) -> dict[str, list[dict[str, Any]]]:
    tables: dict[str, list[dict[str, Any]]] = create("nftables").render(build(case, "nftables")).payload
    return tables


def json_text(cmds: list[dict[str, Any]]) -> str:
    """One command per line: a reviewable diff, and still one JSON document."""
    return '{"nftables": [\n' + ",\n".join(json.dumps(c) for c in cmds) + "\n]}\n"


# -- golden files ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_nft_text_golden(case: str, golden: Any) -> None:
    golden.check(f"render/{case}.nft", create("nftables").render(build(case, "nftables")).text)


@pytest.mark.parametrize("case", CASES)
def test_nft_json_golden(case: str, golden: Any) -> None:
    golden.check(f"render/{case}.nft.json", json_text(batch(nft_tables(case), {})))


@pytest.mark.parametrize("backend", IPT_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_iptables_golden(case: str, backend: str, golden: Any) -> None:
    golden.check(f"render/{case}.{backend}", create(backend).render(build(case, backend)).text)


@pytest.mark.parametrize("case", IPV4_ONLY)
def test_route_tee_golden(case: str, golden: Any) -> None:
    golden.check(f"render/{case}.route-tee", create("route-tee").render(build(case, "route-tee")).text)


def test_every_golden_file_belongs_to_a_test() -> None:
    expected = {f"{c}.yaml" for c in CASES}
    for c in CASES:
        expected |= {f"{c}.nft", f"{c}.nft.json", f"{c}.iptables", f"{c}.iptables-legacy"}
    expected |= {f"{c}.route-tee" for c in IPV4_ONLY}
    assert {p.name for p in RENDER.iterdir()} == expected


def test_iptables_variants_differ_only_in_the_command() -> None:
    for case in CASES:
        nft_variant = (RENDER / f"{case}.iptables").read_text()
        legacy = (RENDER / f"{case}.iptables-legacy").read_text()
        assert legacy == nft_variant.replace("tables-restore", "tables-legacy-restore")


# -- what the goldens must mean ------------------------------------------------------------
def chain_rules(objs: list[dict[str, Any]], chain: str) -> list[dict[str, Any]]:
    return [o["rule"] for o in objs if "rule" in o and o["rule"]["chain"] == chain]


def vmap_of(objs: list[dict[str, Any]], hook: str) -> dict[str, str]:
    (rule,) = chain_rules(objs, hook)
    (expr,) = rule["expr"]
    return {k: v["jump"]["target"] for k, v in expr["vmap"]["data"]["set"]}


def collector_chains(text: str, top: str) -> list[str]:
    """The per-collector chains under MIRRORD_PRE or MIRRORD_POST, in declaration order."""
    return re.findall(rf"^:({top}_\w+) ", text, re.M)


def test_single_both_directions() -> None:
    tables = nft_tables("single")
    assert list(tables) == ["ip"]  # an IPv4 collector clones IPv4 only
    objs = tables["ip"]
    hooks = {o["chain"]["name"]: o["chain"] for o in objs if "chain" in o and "hook" in o["chain"]}
    assert hooks["prerouting"]["hook"] == "prerouting" and hooks["prerouting"]["prio"] == -150
    assert hooks["postrouting"]["hook"] == "postrouting" and hooks["postrouting"]["prio"] == 300
    assert vmap_of(objs, "prerouting") == {"br-lan": "in_br-lan"}
    assert vmap_of(objs, "postrouting") == {"br-lan": "out_br-lan"}
    assert [o["counter"]["name"] for o in objs if "counter" in o] == [
        "lan.in", "lan.out", "_clone_192.0.2.50.delivered"]
    for chain, key in (("in_br-lan", "lan.in"), ("out_br-lan", "lan.out")):
        (rule,) = chain_rules(objs, chain)  # one copy per crossing, no duplicate rule
        assert rule["expr"][-3:] == [{"counter": key}, {"counter": None},
                                     {"dup": {"addr": "192.0.2.50"}}]
        # The collector's own traffic is excluded: no feedback loop.
        assert rule["expr"][:2] == [
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": "192.0.2.50"}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": "192.0.2.50"}},
        ]
    text = (RENDER / "single.iptables").read_text()
    (pre,), (post,) = collector_chains(text, "MIRRORD_PRE"), collector_chains(text, "MIRRORD_POST")
    assert f'-A {pre} -i br-lan -m comment --comment "mirrord lan in" ' \
           "-j TEE --gateway 192.0.2.50\n" in text
    assert f'-A {post} -o br-lan -m comment --comment "mirrord lan out" ' \
           "-j TEE --gateway 192.0.2.50\n" in text
    assert text.count("-j TEE") == 2
    assert "UNTRACKED" not in text


def test_fifty_mirrors_dispatch_through_one_map() -> None:
    objs = nft_tables("fifty")["ip"]
    for hook, prefix in (("prerouting", "in"), ("postrouting", "out")):
        dispatch = vmap_of(objs, hook)
        assert dispatch == {f"lan{i:02d}": f"{prefix}_lan{i:02d}" for i in range(50)}
        for i in range(50):
            (rule,) = chain_rules(objs, f"{prefix}_lan{i:02d}")  # one rule per mirror
            assert rule["comment"] == f"mirrord m{i:02d} {prefix}"
    rules = [o for o in objs if "rule" in o and o["rule"]["chain"] != "delivered"]
    assert len(rules) == 2 + 100
    text = (RENDER / "fifty.iptables").read_text()
    assert len(re.findall(r"^-A MIRRORD_(PRE|POST)_\w+ -[io] lan\d\d -p udp -m multiport --dports 50\d\d ",
                          text, re.M)) == 100


def test_egress_through_a_mirrored_interface_skips_clones() -> None:
    p = build("egress", "nftables")
    assert p.clone_egress == frozenset({"br-lan"})
    objs = nft_tables("egress")["ip"]
    first, *rest = chain_rules(objs, "out_br-lan")
    assert first["expr"] == [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "untracked"}},
        {"return": None},
    ]
    assert len(rest) == 1 and rest[0]["comment"] == "mirrord lan out"
    # Only where clones leave, and only on the way out.
    for chain in ("in_br-lan", "in_wan"):
        assert all("return" not in e for r in chain_rules(objs, chain) for e in r["expr"])
    text = (RENDER / "egress.iptables").read_text()
    lines = text.splitlines()
    (post,) = collector_chains(text, "MIRRORD_POST")
    untracked = f"-A {post} -o br-lan -m conntrack --ctstate UNTRACKED -j RETURN"
    copy = lines.index(f'-A {post} -o br-lan -m comment --comment "mirrord lan out" '
                       "-j TEE --gateway 192.0.2.50")
    assert lines.index(untracked) < copy
    assert text.count("UNTRACKED") == 1


def test_no_untracked_return_without_a_clone_egress() -> None:
    for case in ("single", "shared", "match", "fifty"):
        assert "untracked return" not in (RENDER / f"{case}.nft").read_text()
        assert "UNTRACKED" not in (RENDER / f"{case}.iptables").read_text()


def test_collector_interface_is_the_dup_device_and_tee_oif() -> None:
    tables = nft_tables("collector_interface")
    assert sorted(tables) == ["ip", "ip6"]
    dups = {json.dumps(e["dup"], sort_keys=True) for objs in tables.values() for o in objs
            if "rule" in o for e in o["rule"]["expr"] if "dup" in e}
    assert dups == {'{"addr": "192.0.2.50", "dev": "mon0"}', '{"addr": "2001:db8::50", "dev": "mon0"}'}
    text = (RENDER / "collector_interface.iptables").read_text()
    assert text.count("-j TEE --gateway 192.0.2.50 --oif mon0") == 2
    assert text.count("-j TEE --gateway 2001:db8::50 --oif mon0") == 1
    v4, v6 = re.split(r"^# ip6tables-restore .*\n", text, flags=re.M)
    assert "2001:db8" not in v4 and "192.0.2" not in v6


def test_ipv6_collector_renders_the_ip6_table_only() -> None:
    tables = nft_tables("ipv6")
    assert list(tables) == ["ip6"]
    text = (RENDER / "ipv6.nft").read_text()
    assert "table ip mirrord" not in text
    # An IPv4 destination in a mixed list cannot reach an IPv6 collector: dropped.
    assert "192.0.2" not in text
    assert "ip6 daddr 2001:db8:2::/48 th dport 22" in text
    # Overlapping prefixes were merged before they reach an nft set.
    assert "ip6 saddr 2001:db8:1::/48 " in text and "2001:db8:1:2::/64" not in text
    ipt = (RENDER / "ipv6.iptables").read_text()
    assert ipt.startswith("# ip6tables-restore ") and "# iptables-restore" not in ipt


def test_shared_interface_keeps_both_mirrors() -> None:
    objs = nft_tables("shared")["ip"]
    comments = [r["comment"] for r in chain_rules(objs, "in_br-lan")]
    # all-lan once; lan-dns twice (either-end port 53: two exclusive alternatives).
    assert comments == ["mirrord all-lan in", "mirrord lan-dns in", "mirrord lan-dns in"]
    assert [r["comment"] for r in chain_rules(objs, "in_guest")] == ["mirrord lan-dns in"] * 2
    assert vmap_of(objs, "prerouting") == {"br-lan": "in_br-lan", "guest": "in_guest"}
    text = (RENDER / "shared.iptables").read_text()
    # One chain per collector; the top chains first return every collector's
    # traffic, so neither collector's traffic is copied to the other one.
    chains = collector_chains(text, "MIRRORD_PRE")
    assert len(chains) == 2 and len(collector_chains(text, "MIRRORD_POST")) == 1
    for top in ("MIRRORD_PRE", "MIRRORD_POST"):
        assert ("".join(f"-A {top} -s {gw} -j RETURN\n-A {top} -d {gw} -j RETURN\n"
                        for gw in ("192.0.2.50", "192.0.2.60"))
                + f"-A {top} -j {top}_A1\n") in text
    for chain in chains:
        assert f"-A MIRRORD_PRE -j {chain}\n" in text
        assert f"-A {chain} -s " not in text and f"-A {chain} -d " not in text


def test_match_case_expressions() -> None:
    text = (RENDER / "match.nft").read_text()
    # port 53 either end: exactly two exclusive alternatives.
    assert "meta l4proto udp th dport 53 ip saddr" in text
    assert "meta l4proto udp th sport 53 th dport != 53 ip saddr" in text
    # Prefix lists collapsed (two /25 halves -> one /24, the /32 inside it gone).
    assert "ip saddr { 198.51.100.0/24, 203.0.113.9 }" in text
    assert "th dport { 80, 443, 8000-8081 }" in text
    ipt = (RENDER / "match.iptables").read_text()
    # 17 slots of dports (21-23 merged: a range takes two) do not fit one
    # multiport match of at most 15: two rules, each port in exactly one.
    assert ipt.count("--dports 21:23,25,53,80,110,143,443,465,587,993,995,3306,5432,6379 ") == 1
    assert ipt.count("--dports 8080:8090 ") == 1
    assert ipt.count('"mirrord many-ports out"') == 2
    assert "-p icmp -s 203.0.113.0/24" in ipt


def test_every_clone_rule_excludes_every_collector() -> None:
    """Clones never copy what mirrord sends to a TZSP collector, nor any collector's traffic."""
    p = build("loop", "nftables")
    assert [str(a) for a in p.clones[0].exclude] == [
        "192.0.2.50", "203.0.113.130", "2001:db8:3::10"]
    assert all(r.exclude == p.clones[0].exclude for r in p.clones)
    tables = nft_tables("loop")
    assert list(tables) == ["ip"]  # the IPv6 TZSP collector adds no ip6 table
    never = {"set": ["192.0.2.50", "203.0.113.130"]}
    for chain in ("in_br-lan", "out_br-lan"):
        (rule,) = chain_rules(tables["ip"], chain)
        assert rule["expr"][:2] == [
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": never}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": never}},
        ]
    text = (RENDER / "loop.iptables").read_text()
    lines = text.splitlines()
    for top in ("MIRRORD_PRE", "MIRRORD_POST"):
        returns = [f"-A {top} -{d} {a} -j RETURN" for a in ("192.0.2.50", "203.0.113.130")
                   for d in "sd"]
        first_jump = lines.index(f"-A {top} -j {top}_A1")
        assert [lines.index(r) for r in returns] == list(range(first_jump - 4, first_jump))
    assert "2001:db8" not in text


def test_clone_exclusions_only_of_the_rules_family() -> None:
    tables = nft_tables("both_families")
    for fam, objs in tables.items():
        for o in objs:
            for e in o.get("rule", {}).get("expr", []):
                if "match" in e and e["match"]["op"] == "!=" and "payload" in e["match"]["left"]:
                    right = e["match"]["right"]
                    values = right["set"] if isinstance(right, dict) else [right]
                    assert all((":" in v) == (fam == "ip6") for v in values)


# -- plan states -----------------------------------------------------------------------------
ONE = """\
collectors:
  ids:
    address: {address}
    {extra}
mirrors:
  - name: m
    interfaces: [br-lan, wan]
    direction: {direction}
    collector: ids
"""


def one(address: str = "192.0.2.50", extra: str = "", direction: str = "both",
        match: str = "") -> spec.Spec:
    text = ONE.format(address=address, extra=extra, direction=direction)
    return spec.parse(text + (f"    match:\n{match}" if match else ""), "one.yaml")


def topo_for(s: spec.Spec, reach: Reach, present: tuple[str, ...] = ("br-lan", "wan", "eth2"),
             down: tuple[str, ...] = (), arphrd: int = ARPHRD_ETHER) -> Topology:
    c = s.collectors["ids"]
    return Topology(links(*present, down=down, arphrd=arphrd), {(c.address, c.interface): reach})


def addr(text: str) -> Address:
    return spec.parse(f"collectors: {{x: {{address: '{text}'}}}}\nmirrors: "
                      "[{name: a, interfaces: [e], collector: x}]").collectors["x"].address


ONLINK = Reach(addr("192.0.2.50"), oif="eth2", neighbour="REACHABLE")
OFFLINK = Reach(addr("203.0.113.5"), oif="eth2", gateway="192.0.2.1")


def test_plan_active_clone() -> None:
    s = one()
    p = plan.build(s, topo_for(s, ONLINK), "nftables")
    (mp,) = p.mirrors
    assert (mp.state, mp.transport, mp.reason) == ("active", "clone", "")
    assert [(r.direction, r.interfaces, str(r.gateway), r.device) for r in p.clones] == [
        ("in", ("br-lan", "wan"), "192.0.2.50", None), ("out", ("br-lan", "wan"), "192.0.2.50", None)]
    assert p.clone_egress == frozenset({"eth2"})
    assert p.mirror("m") is mp and p.mirror("nope") is None


def test_plan_offlink_clone_is_an_error_naming_tzsp() -> None:
    s = one("203.0.113.5", "transport: clone")
    p = plan.build(s, topo_for(s, OFFLINK), "nftables")
    (mp,) = p.mirrors
    assert (mp.state, mp.transport) == ("error", "clone")
    assert "not on-link" in mp.reason and "routed via 192.0.2.1 dev eth2" in mp.reason
    assert "transport: tzsp" in mp.reason
    assert p.clones == () and p.tzsp == ()
    assert create("nftables").render(p).text == ""


def test_plan_auto_offlink_uses_tzsp_taps() -> None:
    s = one("203.0.113.5", "transport: auto", direction="in")
    p = plan.build(s, topo_for(s, OFFLINK), "nftables")
    (mp,) = p.mirrors
    assert (mp.state, mp.transport, mp.reason) == ("active", "tzsp", "")
    assert p.clones == ()
    assert [(t.mirror, t.interface, t.ifindex, t.directions, t.collector.name) for t in p.tzsp] == [
        ("m", "br-lan", 2, ("in",), "ids"), ("m", "wan", 3, ("in",), "ids")]
    assert create("nftables").render(p).text == ""


def test_plan_auto_onlink_clones() -> None:
    s = one(extra="transport: auto")
    p = plan.build(s, topo_for(s, ONLINK), "iptables")
    assert p.mirrors[0].transport == "clone" and len(p.clones) == 2 and p.tzsp == ()


def test_plan_absent_interface_waits() -> None:
    s = one()
    p = plan.build(s, topo_for(s, ONLINK, present=("eth2",)), "nftables")
    (mp,) = p.mirrors
    assert mp.state == "waiting"
    assert mp.reason == "interface br-lan does not exist; interface wan does not exist"
    assert {(t.interface, t.direction, t.state) for t in mp.taps} == {
        (i, d, "waiting") for i in ("br-lan", "wan") for d in ("in", "out")}
    # Rules match names, so they are in place for when the interface appears.
    assert len(p.clones) == 2


def test_plan_some_interfaces_absent_or_down_is_degraded() -> None:
    s = one()
    p = plan.build(s, topo_for(s, ONLINK, present=("br-lan", "eth2")), "nftables")
    assert (p.mirrors[0].state, p.mirrors[0].reason) == ("degraded", "interface wan does not exist")
    p = plan.build(s, topo_for(s, ONLINK, down=("wan",)), "nftables")
    assert (p.mirrors[0].state, p.mirrors[0].reason) == ("degraded", "interface wan is down")


def test_plan_absent_interface_tzsp_has_no_tap() -> None:
    s = one("203.0.113.5", "transport: tzsp")
    p = plan.build(s, topo_for(s, OFFLINK, present=("wan", "eth2")), None, "no backend here")
    (mp,) = p.mirrors
    assert (mp.state, mp.transport) == ("degraded", "tzsp")  # tzsp needs no firewall backend
    assert [t.interface for t in p.tzsp] == ["wan"]


def test_plan_tzsp_on_a_non_ethernet_interface_says_so() -> None:
    s = one("203.0.113.5", "transport: tzsp")
    p = plan.build(s, topo_for(s, OFFLINK, arphrd=512), "nftables")  # 512: ARPHRD_PPP
    assert p.mirrors[0].state == "active"
    assert p.mirrors[0].reason == (
        "br-lan is not Ethernet (a header is synthesized); wan is not Ethernet (a header is synthesized)"
    )


def test_plan_neighbour_failed_is_degraded() -> None:
    s = one()
    failed = Reach(addr("192.0.2.50"), oif="eth2", neighbour="FAILED")
    p = plan.build(s, topo_for(s, failed), "nftables")
    (mp,) = p.mirrors
    assert mp.state == "degraded"
    assert mp.reason == "collector 192.0.2.50 does not answer ARP/ND (neighbour FAILED on eth2)"
    assert len(p.clones) == 2  # the rules stay: the collector may come back


def test_plan_local_collector_is_an_error() -> None:
    s = one()
    p = plan.build(s, topo_for(s, Reach(addr("192.0.2.50"), local=True)), "nftables")
    (mp,) = p.mirrors
    assert (mp.state, mp.transport) == ("error", None)
    assert mp.reason == "collector 192.0.2.50 is an address of this router"
    assert p.clones == ()


def test_plan_no_backend_is_an_error_carrying_the_reason() -> None:
    s = one()
    why = "no kernel clone backend is usable (tried nftables: x; iptables: y)"
    p = plan.build(s, topo_for(s, ONLINK), None, why)
    (mp,) = p.mirrors
    assert (mp.state, mp.transport, mp.reason) == ("error", "clone", why)
    assert p.clones == ()


def test_plan_unreachable_collector_waits() -> None:
    s = one()
    p = plan.build(s, topo_for(s, Reach(addr("192.0.2.50"), error="no route to collector 192.0.2.50")),
                   "nftables")
    assert (p.mirrors[0].state, p.mirrors[0].reason) == ("waiting", "no route to collector 192.0.2.50")
    p = plan.build(s, Topology(links("br-lan", "wan"), {}), "nftables")
    assert (p.mirrors[0].state, p.mirrors[0].reason) == ("waiting", "collector 192.0.2.50 not looked up")


def test_plan_auto_onlink_with_other_family_match_is_an_error() -> None:
    s = one(extra="transport: auto", match="      family: ipv6\n")
    p = plan.build(s, topo_for(s, ONLINK), "nftables")
    assert (p.mirrors[0].state, p.mirrors[0].reason) == ("error", "no IPv4 traffic to clone")
    assert p.clones == ()


def test_plan_route_tee_cannot_clone_ipv6() -> None:
    s = one("2001:db8::50")
    reach = Reach(addr("2001:db8::50"), oif="eth2", neighbour="REACHABLE")
    # The caller passes what its backend can clone, as the daemon does.
    p = plan.build(s, topo_for(s, reach), "route-tee", versions=create("route-tee").capabilities.versions)
    (mp,) = p.mirrors
    assert mp.state == "error" and "IPv6" in mp.reason and p.clones == ()


TZSP_BESIDE_CLONE = """\
collectors:
  ids:
    address: 192.0.2.50
  far:
    address: 203.0.113.5
    transport: tzsp
  far6:
    address: 2001:db8::5
    transport: tzsp
mirrors:
  - name: lan
    interfaces: [br-lan]
    direction: in
    collector: ids
  - name: t
    interfaces: [{ifaces}]
    direction: both
    collector: far
"""


def tzsp_beside_clone(ifaces: str, clone_oif: str = "eth2") -> plan.Plan:
    s = spec.parse(TZSP_BESIDE_CLONE.format(ifaces=ifaces), "t.yaml")
    lk = links("br-lan", "wan", "eth2", "lan1")
    lk["lan1"] = Link("lan1", lk["lan1"].index, True, None, ARPHRD_ETHER, 1500,
                      master=lk["eth2"].index)  # lan1 is a port of eth2 (a bridge here)
    reach = {
        (addr("192.0.2.50"), None): Reach(addr("192.0.2.50"), oif=clone_oif, neighbour="REACHABLE"),
        (addr("203.0.113.5"), None): Reach(addr("203.0.113.5"), oif="wan", gateway="198.51.100.1"),
        (addr("2001:db8::5"), None): Reach(addr("2001:db8::5"), oif="wan", gateway="fe80::1"),
    }
    return plan.build(s, Topology(lk, reach), "nftables")


def test_plan_taps_exclude_every_collector_of_both_families() -> None:
    p = tzsp_beside_clone("wan")
    (tap,) = p.tzsp
    assert [str(a) for a in tap.exclude] == ["192.0.2.50", "203.0.113.5", "2001:db8::5"]
    assert tap.directions == ("in", "out") and p.mirror("t").state == "active"  # type: ignore[union-attr]


@pytest.mark.parametrize("iface", ["eth2", "lan1"])
def test_plan_tzsp_capture_of_clone_egress_is_an_error(iface: str) -> None:
    """Clones carry the original addresses: only not capturing them keeps them out."""
    p = tzsp_beside_clone(f"wan, {iface}")
    assert p.clone_egress == frozenset({"eth2"})
    mp = p.mirror("t")
    assert mp is not None and mp.state == "degraded"
    assert "kernel clones leave through eth2" in mp.reason
    assert "mirrord's own clones" in mp.reason
    states = {(t.interface, t.direction): t.state for t in mp.taps}
    assert states == {("wan", "in"): "active", ("wan", "out"): "active",
                      (iface, "in"): "active", (iface, "out"): "error"}
    # The outgoing half is not captured at all; the incoming half still is.
    assert {t.interface: t.directions for t in p.tzsp} == {"wan": ("in", "out"), iface: ("in",)}
    # Without a clone leaving there, the same tap captures both ways.
    p = tzsp_beside_clone(f"wan, {iface}", clone_oif="br-lan")
    assert {t.interface: t.directions for t in p.tzsp} == {
        "wan": ("in", "out"), iface: ("in", "out")}


def test_iptables_render_text_includes_the_hook_jumps() -> None:
    text = create("iptables").render(build("single", "iptables")).text
    assert re.search(r"^-[AI] PREROUTING (1 )?-j MIRRORD_PRE$", text, re.M)
    assert re.search(r"^-[AI] POSTROUTING (1 )?-j MIRRORD_POST$", text, re.M)
