"""The whole-frame transports' rendering (span, vxlan, gretap, erspan) and the verdict
maps of port-filtered mirrors, against golden files.

A case is golden/frames/<case>.yaml; its nft text and JSON batch are
golden/frames/<case>.nft and .nft.json (`pytest --update-golden` rewrites
them). The kernel takes them: tests/kernel/test_render_frames.py loads each
into a namespace that has the devices.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord import plan, spec
from mirrord.backends import create
from mirrord.backends.nftables import batch
from mirrord.backends.nftables.maps import MAP_MIN
from mirrord.backends.nftables.netdev import PRIO_NETDEV
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology
from tests.unit.test_render import json_text

FRAMES = Path(__file__).parent / "golden" / "frames"
CASES = sorted(p.stem for p in FRAMES.glob("*.yaml"))
FW4_FLOWTABLE = Path(__file__).parent / "data" / "fw4_flowtable.uc"


def devices(s: spec.Spec) -> list[str]:
    """Every device the case's rules bind to: mirrored interfaces, span ports, tunnels."""
    names = [i for m in s.mirrors for i in m.interfaces]
    names += [c.interface for c in s.collectors.values() if c.interface]
    names += [t.name for t in plan.tunnels(s)]
    return list(dict.fromkeys(names))


def build(case: str) -> plan.Plan:
    s = spec.load(str(FRAMES / f"{case}.yaml"))
    links = {n: Link(n, i, True, None, ARPHRD_ETHER, 1500)
             for i, n in enumerate([*devices(s), "eth2"], 2)}
    reach = {(c.address, c.interface): Reach(c.address, oif="eth2", neighbour="REACHABLE")
             for c in s.collectors.values() if c.address is not None}
    return plan.build(s, Topology(links, reach), "nftables")


def tables(case: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = create("nftables").render(build(case)).payload
    return out


@pytest.mark.parametrize("case", CASES)
def test_nft_text_golden(case: str, golden: Any) -> None:
    p = build(case)
    assert all(mp.state == "active" for mp in p.mirrors), [(m.mirror.name, m.reason)
                                                          for m in p.mirrors]
    golden.check(f"frames/{case}.nft", create("nftables").render(p).text)


@pytest.mark.parametrize("case", CASES)
def test_nft_json_golden(case: str, golden: Any) -> None:
    golden.check(f"frames/{case}.nft.json", json_text(batch(tables(case), {})))


def rules(objs: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [o["rule"]["expr"] for o in objs if "rule" in o and o["rule"]["chain"] == chain]


def test_one_chain_per_device_and_direction_bound_to_it() -> None:
    nd = tables("span")["netdev"]
    chains = {o["chain"]["name"]: o["chain"] for o in nd if "chain" in o}
    assert {(c["hook"], c["dev"]) for c in chains.values()} == {
        ("ingress", "br-lan"), ("egress", "br-lan"), ("ingress", "wan"), ("egress", "wan")}
    # No match: every frame (ARP too) reaches the copy; only the collectors'
    # IP traffic returns first, under a protocol guard that lets ARP through.
    lan_in = rules(nd, "in_br-lan")
    assert lan_in[-1] == [{"counter": "lan.in"}, {"counter": None}, {"dup": {"addr": "lan4"}}]
    guards = [r[0] for r in lan_in[:-1]]
    assert guards == [{"match": {"op": "==", "left": {"meta": {"key": "protocol"}},
                                 "right": "ip"}}] * 2
    assert [r[-1] for r in lan_in[:-1]] == [{"return": None}] * 2


def test_netdev_chains_run_before_fw4s_flowtable() -> None:
    """fw4 hooks its flowtable at ingress priority N (its template, verbatim in
    tests/unit/data): a flow it offloads skips the IP hooks, never a netdev
    chain at a lower priority. (This kernel has no flowtables: the order is
    proven here on the declarations, not run.)"""
    m = re.search(r"flowtable ft \{\s*hook ingress priority (-?\d+);", FW4_FLOWTABLE.read_text())
    assert m is not None
    fw4_priority = int(m.group(1))
    for case in CASES:
        for o in tables(case).get("netdev", []):
            c = o.get("chain", {})
            if c.get("hook") == "ingress":
                assert c["prio"] == PRIO_NETDEV < fw4_priority, (case, c)


def test_disjoint_port_mirrors_share_one_map_the_rest_stay_rules() -> None:
    nd = tables("vxlan_maps")["netdev"]
    wan_in = rules(nd, "in_wan")
    lookups = [r for r in wan_in if "vmap" in r[0]]
    assert len(lookups) == 1
    elements = lookups[0][0]["vmap"]["data"]["set"]
    targets = {e[1]["jump"]["target"] for e in elements}
    assert targets == {"m_dns_in", "m_ntp_in", "m_syslog_in", "m_web_in", "m_v4web_in"}
    keys = {tuple(json.dumps(x) for x in e[0]["concat"]) for e in elements}
    assert ('"ip"', '"udp"', "53") in {(a, b, c) for a, b, c in keys} or ('"ip"', "17", "53") in keys
    # dns-again overlaps dns (udp 53): a linear rule; so are an address match and `port`.
    linear = [r for r in wan_in if "vmap" not in r[0] and r[-1] != {"return": None}]
    counters = [next(e["counter"] for e in r if "counter" in e) for r in linear]
    assert counters == ["dns-again.in", "dns-again.in", "lan-net.in", "either.in", "either.in",
                        "either.in", "either.in"]
    # Fewer than MAP_MIN on a chain: plain rules (out_wan holds one mirror).
    assert not any("vmap" in r[0] for r in rules(nd, "out_wan")) and MAP_MIN > 1


def test_map_elements_jump_to_a_chain_that_counts_and_copies() -> None:
    nd = tables("vxlan_maps")["netdev"]
    assert rules(nd, "m_dns_in") == [[{"counter": "dns.in"}, {"counter": None},
                                      {"dup": {"addr": "mvx-ids"}}]]
    ip = tables("clone_maps")["ip"]
    (leaf,) = rules(ip, "m_p1_in")
    assert leaf[-3:] == [{"counter": "p1.in"}, {"counter": None}, {"dup": {"addr": "192.0.2.50"}}]
    assert [e["match"]["op"] for e in leaf[:2]] == ["!=", "!="]  # collectors never copied


def test_tunnel_names_and_devices() -> None:
    s = spec.load(str(FRAMES / "gre.yaml"))
    got = {t.name: (t.kind, str(t.remote), t.session) for t in plan.tunnels(s)}
    long = [n for n in got if n.startswith("mvx-")]
    assert got["mgt-gt"] == ("gretap", "198.51.100.30", 0)
    assert got["mes-es"] == ("erspan", "198.51.100.31", 7)
    assert len(long) == 1 and len(long[0]) <= 15 and re.fullmatch(r"mvx-[0-9a-f]{8}", long[0])
    text = create("nftables").render(build("gre")).text
    assert 'dup to "mgt-gt"' in text and 'dup to "mes-es"' in text
    assert "table ip mirrord" in text and "table netdev mirrord" in text


# -- any set of port mirrors: each copies exactly where it did without maps --------------
PORT_MATCHES = [
    "{protocol: udp, dport: 53}", "{protocol: udp, dport: 53-60}", "{protocol: tcp, dport: 53}",
    "{dport: 80}", "{family: ipv6, protocol: udp, dport: 123}", "{protocol: udp, sport: 53}",
    "{family: ipv4, dport: '1000-2000'}", "{protocol: [udp, tcp], dport: [7, 9]}",
    "{port: 22}", "{source: 192.0.2.0/24}", "{protocol: icmp}", "{}",
]


@given(st.lists(st.sampled_from(PORT_MATCHES), min_size=1, max_size=12),
       st.sampled_from(["span", "clone"]))
@settings(max_examples=60, deadline=None)
def test_every_mirror_is_one_map_target_or_its_own_rules(matches: list[str],
                                                          transport: str) -> None:
    collector = ("{transport: span, interface: lan4}" if transport == "span"
                 else "{address: 192.0.2.50, transport: clone}")
    if transport == "clone":  # an IPv4 clone collector takes no IPv6-only mirror
        matches = [m.replace("ipv6", "ipv4") for m in matches]
    text = f"collectors:\n  c: {collector}\nmirrors:\n" + "".join(
        f"  - {{name: m{i}, interfaces: [wan], direction: in, collector: c, match: {m}}}\n"
        for i, m in enumerate(matches))
    s = spec.parse(text)
    links = {n: Link(n, i, True, None, ARPHRD_ETHER, 1500) for i, n in enumerate(
        ["wan", "lan4", "eth2"], 2)}
    reach = {(c.address, c.interface): Reach(c.address, oif="eth2", neighbour="REACHABLE")
             for c in s.collectors.values() if c.address is not None}
    p = plan.build(s, Topology(links, reach), "nftables")
    rendered = create("nftables").render(p)
    objs = rendered.payload["netdev" if transport == "span" else "ip"]
    chain = "in_wan"
    lookups = [r for r in rules(objs, chain) if "vmap" in r[0] and "concat" in r[0]["vmap"]["key"]]
    assert len(lookups) <= 2  # one per port field at most
    mapped: dict[str, set[str]] = {}
    for (lookup,) in lookups:
        seen: list[tuple[str, ...]] = []
        for key, verdict in lookup["vmap"]["data"]["set"]:
            mapped.setdefault(verdict["jump"]["target"], set())
            seen.append(tuple(json.dumps(x) for x in key["concat"]))
        assert len(seen) == len(set(seen))  # no element twice
    linear = {next(e["counter"] for e in r if "counter" in e) for r in rules(objs, chain)
              if any("counter" in e for e in r)}
    via_map = {next(e["counter"] for e in r if "counter" in e)
               for name in mapped for r in rules(objs, name)}
    names = {f"m{i}.in" for i in range(len(matches))}
    # Every mirror copies, through the map or its own rules, never both.
    assert linear | via_map == names and not linear & via_map
    assert all(len(mapped) >= MAP_MIN for _ in lookups)
    assert "vmap" in rendered.text or not lookups


def test_a_kernel_that_cannot_copy_frames_is_asked_again_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A module installed while mirrord runs (opkg install mirrord-frames) is seen
    within PROBE_AGAIN s; a kernel that can is asked once."""
    from mirrord.backends.nftables import backend as nft_backend

    answers = ["no netdev", "no netdev", "", ""]
    asked: list[str] = []

    def probe(self: object, hook: str) -> str:
        asked.append(hook)
        return answers[len(asked) - 1] if hook == "ingress" else ""

    now = [100.0]
    monkeypatch.setattr(nft_backend.NftablesBackend, "_probe_netdev", probe)
    monkeypatch.setattr(nft_backend.time, "monotonic", lambda: now[0])
    b = nft_backend.NftablesBackend()
    assert b.frame_support() == plan.FrameSupport("no netdev", "no netdev")
    now[0] += nft_backend.PROBE_AGAIN / 2
    assert b.frame_support().ingress == "no netdev" and asked == ["ingress"]
    now[0] += nft_backend.PROBE_AGAIN
    answers[1] = ""
    assert b.frame_support() == plan.FrameSupport() and asked == ["ingress", "ingress", "egress"]
    now[0] += 10 * nft_backend.PROBE_AGAIN
    assert b.frame_support() == plan.FrameSupport() and len(asked) == 3


def test_a_kernel_without_ranges_in_map_keys_keeps_range_mirrors_as_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux before 5.6 (OpenWrt 21.02: 5.4) refuses intervals in concatenations: the
    whole batch would fail, every mirror with it. Single ports still share the map."""
    from mirrord.backends.nftables import backend as nft_backend

    class OldKernel:
        def check(self, cmds: list[dict[str, Any]]) -> tuple[int, str]:
            return 1, "Error: Could not process rule: Operation not supported\n"

    b = nft_backend.NftablesBackend()
    monkeypatch.setattr(b, "_lib", lambda: OldKernel())
    objs = b.render(build("clone_maps")).payload["ip"]
    (lookup,) = [r for r in rules(objs, "in_br-lan") if "vmap" in r[0]]
    targets = {e[1]["jump"]["target"] for e in lookup[0]["vmap"]["data"]["set"]}
    # udp/tcp 6000-6010 is a rule of its own now; tcp 6005, which it overlapped, a map element.
    assert targets == {"m_p1_in", "m_p2_in", "m_p3_in", "m_p4.again_in"}
    linear = {next(e["counter"] for e in r if "counter" in e) for r in rules(objs, "in_br-lan")
              if any("counter" in e for e in r)}
    assert linear == {"p4.in", "all.in"}


def test_a_bridge_is_no_span_port() -> None:
    s = spec.parse("collectors:\n  p: {transport: span, interface: br-lan}\n"
                   "mirrors:\n  - {name: m, interfaces: [wan], collector: p}\n")
    links = {"wan": Link("wan", 2, True, None, ARPHRD_ETHER, 1500),
             "br-lan": Link("br-lan", 3, True, "bridge", ARPHRD_ETHER, 1500)}
    (mp,) = plan.build(s, Topology(links, {}), "nftables").mirrors
    assert mp.state == "error" and "is a bridge" in mp.reason
