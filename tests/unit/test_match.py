"""The match model: port clauses, prefix collapse, range merge, per-family views.

The property tests compare three things for random packets and random specs:
the spec's plain meaning (a reference written here from the YAML keys), the
alternatives the model produces (evaluated from FamilyMatch/PortClause data),
and the alternatives each backend renders (nft JSON expressions, iptables
arguments, evaluated by small interpreters written here). A packet must be
selected by at most one alternative (exactly-once copying) and by one exactly
when the plain meaning says so.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Optional, Union

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mirrord import spec
from mirrord.backends.iptables import MULTIPORT_MAX, match_args
from mirrord.backends.nftables import match_exprs
from mirrord.match import (
    DEFAULT_PORT_PROTOCOLS,
    PORT_PROTOCOLS,
    PROTOCOLS,
    FamilyMatch,
    Match,
    PortClause,
    PortRange,
    collapse,
    merge_ranges,
)

Addr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


def nets(*texts: str) -> tuple[Any, ...]:
    return tuple(net(t) for t in texts)


def pr(low: int, high: Optional[int] = None) -> PortRange:
    return PortRange(low, low if high is None else high)


# -- port clauses ---------------------------------------------------------------
def test_no_ports_is_one_empty_clause() -> None:
    assert Match().port_clauses() == (PortClause(()),)
    assert Match(protocols=(1,)).port_clauses() == (PortClause(()),)


def test_sport_and_dport_are_one_conjunction() -> None:
    m = Match(sports=(pr(1024, 65535),), dports=(pr(53),))
    assert m.port_clauses() == (
        PortClause((("sport", (pr(1024, 65535),), False), ("dport", (pr(53),), False))),
    )


def test_either_end_port_is_two_exclusive_clauses() -> None:
    p = (pr(53), pr(5353))
    assert Match(ports=p).port_clauses() == (
        PortClause((("dport", p, False),)),
        PortClause((("sport", p, False), ("dport", p, True))),
    )


def test_either_end_port_keeps_the_other_tests_in_both_clauses() -> None:
    p, s = (pr(80),), (pr(1000, 2000),)
    assert Match(ports=p, sports=s).port_clauses() == (
        PortClause((("sport", s, False), ("dport", p, False))),
        PortClause((("sport", s, False), ("sport", p, False), ("dport", p, True))),
    )


def _clause_hits(clauses: tuple[PortClause, ...], sport: int, dport: int) -> int:
    values = {"sport": sport, "dport": dport}

    def holds(field: str, ranges: tuple[PortRange, ...], negated: bool) -> bool:
        inside = any(r.low <= values[field] <= r.high for r in ranges)
        return inside != negated

    return sum(all(holds(*t) for t in c.tests) for c in clauses)


@pytest.mark.parametrize(("sport", "dport", "hits"), [
    (53, 53, 1),  # server to server: both ends in P, copied once, not twice
    (40000, 53, 1),
    (53, 40000, 1),
    (40000, 40001, 0),
])
def test_either_end_port_matches_exactly_once(sport: int, dport: int, hits: int) -> None:
    clauses = Match(ports=(pr(53),)).port_clauses()
    assert _clause_hits(clauses, sport, dport) == hits


def test_port_without_protocol_means_tcp_and_udp() -> None:
    assert DEFAULT_PORT_PROTOCOLS == (6, 17)
    assert Match(ports=(pr(53),)).effective_protocols() == (6, 17)
    assert Match(dports=(pr(53),), protocols=(132,)).effective_protocols() == (132,)
    assert Match().effective_protocols() == ()


# -- prefixes and ranges ----------------------------------------------------------
def test_collapse_merges_overlaps_and_neighbours() -> None:
    assert collapse(nets("192.0.2.0/25", "192.0.2.128/25")) == nets("192.0.2.0/24")
    assert collapse(nets("198.51.100.7/32", "198.51.100.0/24")) == nets("198.51.100.0/24")
    assert collapse(nets("203.0.113.9/32", "192.0.2.0/24", "203.0.113.8/32")) == nets(
        "192.0.2.0/24", "203.0.113.8/31"
    )
    assert collapse(nets("2001:db8::/33", "2001:db8:8000::/33", "2001:db8:1::1/128")) == nets(
        "2001:db8::/32"
    )
    assert collapse(()) == ()


def test_collapse_keeps_families_apart() -> None:
    got = collapse(nets("2001:db8::/64", "192.0.2.0/24", "192.0.2.5/32", "2001:db8::1/128"))
    assert got == nets("192.0.2.0/24", "2001:db8::/64")


def test_collapsed_prefixes_are_disjoint() -> None:
    got = collapse(nets("192.0.2.0/26", "192.0.2.32/27", "192.0.2.64/26", "192.0.2.200/29"))
    assert got == nets("192.0.2.0/25", "192.0.2.200/29")
    for i, a in enumerate(got):
        for b in got[i + 1:]:
            assert not a.overlaps(b)


def test_merge_ranges() -> None:
    assert merge_ranges([pr(20, 30), pr(1, 5), pr(3, 10), pr(11, 12), pr(40)]) == (
        pr(1, 12), pr(20, 30), pr(40)
    )
    assert merge_ranges([pr(53), pr(53)]) == (pr(53),)
    assert merge_ranges([pr(1, 65535), pr(80)]) == (pr(1, 65535),)
    assert merge_ranges([pr(80), pr(82)]) == (pr(80), pr(82))  # 81 is not in either
    assert merge_ranges([]) == ()


def test_port_range_text() -> None:
    assert str(pr(53)) == "53"
    assert str(pr(1000, 2000)) == "1000-2000"


# -- per-family views ----------------------------------------------------------------
def test_for_version_splits_mixed_address_lists() -> None:
    m = Match(sources=nets("192.0.2.0/24", "2001:db8::/32", "192.0.2.7/32"),
              destinations=nets("2001:db8:1::/48", "203.0.113.0/24"))
    v4, v6 = m.for_version(4), m.for_version(6)
    assert v4 is not None and v6 is not None
    assert (v4.version, v4.sources, v4.destinations) == (4, nets("192.0.2.0/24"), nets("203.0.113.0/24"))
    assert (v6.version, v6.sources, v6.destinations) == (6, nets("2001:db8::/32"), nets("2001:db8:1::/48"))
    assert m.versions() == (4, 6)


def test_for_version_list_of_the_other_family_never_matches() -> None:
    only6 = Match(sources=nets("2001:db8::/32"))
    assert only6.for_version(4) is None
    assert only6.versions() == (6,)
    # A source list of both families but a destination list of one.
    m = Match(sources=nets("192.0.2.0/24", "2001:db8::/32"), destinations=nets("198.51.100.0/24"))
    assert m.versions() == (4,)


def test_for_version_family() -> None:
    assert Match(family="ipv4").versions() == (4,)
    assert Match(family="ipv6").versions() == (6,)
    assert Match(family="any").versions() == (4, 6)
    assert Match(family="ipv4").for_version(6) is None


def test_for_version_icmp_and_icmpv6() -> None:
    both = Match(protocols=(1, 58, 6))
    v4, v6 = both.for_version(4), both.for_version(6)
    assert v4 is not None and v4.protocols == (1, 6)
    assert v6 is not None and v6.protocols == (58, 6)
    assert Match(protocols=(1,)).versions() == (4,)
    assert Match(protocols=(58,)).versions() == (6,)
    # icmp with IPv6-only addresses selects nothing at all.
    assert Match(protocols=(1,), sources=nets("2001:db8::/32")).versions() == ()


def test_for_version_carries_collapsed_lists_and_clauses() -> None:
    m = Match(ports=(pr(53),), sources=nets("192.0.2.0/25", "192.0.2.128/25"))
    fm = m.for_version(4)
    assert fm == FamilyMatch(4, (6, 17), m.port_clauses(), nets("192.0.2.0/24"), ())
    assert fm.has_ports
    assert not FamilyMatch(4, (), (PortClause(()),), (), ()).has_ports


def test_describe() -> None:
    assert Match().describe() == "all traffic"
    m = Match(family="ipv4", protocols=(17, 99), ports=(pr(53), pr(1000, 2000)), dports=(pr(7),),
              sources=nets("192.0.2.0/24"), destinations=nets("203.0.113.7/32"))
    assert m.describe() == "ipv4 udp/99 port 53,1000-2000 dport 7 from 192.0.2.0/24 to 203.0.113.7/32"


# -- the property: exactly once, and exactly the plain meaning ---------------------------
PORT_DOMAIN = 80
V4_BASE = int(ipaddress.IPv4Address("192.0.2.0"))
V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))


@dataclass(frozen=True)
class Packet:
    version: int
    proto: int
    sport: Optional[int]
    dport: Optional[int]
    src: Addr
    dst: Addr


def _addr(version: int, offset: int) -> Addr:
    if version == 4:
        return ipaddress.IPv4Address(V4_BASE + offset)
    return ipaddress.IPv6Address(V6_BASE + offset)


def _edges(d: dict[str, Any]) -> tuple[list[int], dict[int, list[Addr]]]:
    """Port values and addresses at and just beyond the edges of what `d` names."""
    ports: list[int] = []
    for key in ("port", "sport", "dport"):
        for lo, hi in _port_set(d[key]) if key in d else []:
            ports += [lo - 1, lo, hi, hi + 1]
    addrs: dict[int, list[Addr]] = {4: [], 6: []}
    for key in ("source", "destination"):
        for n in map(net, d.get(key, [])):
            first, last = int(n.network_address), int(n.broadcast_address)
            for v in (first - 1, first, last, last + 1):
                addrs[n.version].append(ipaddress.ip_address(v) if n.version == 4 else
                                        ipaddress.IPv6Address(v))
    return [p for p in ports if 1 <= p <= 65535], addrs


@st.composite
def packets(draw: st.DrawFn, d: dict[str, Any]) -> Packet:
    """A packet; its ports and addresses often sit on the edges of the match `d`."""
    edge_ports, edge_addrs = _edges(d)
    version = draw(st.sampled_from((4, 6)))
    icmp = 1 if version == 4 else 58
    proto = draw(st.sampled_from((6, 17, 132, 136, icmp, 47)))
    port = st.integers(1, PORT_DOMAIN)
    if edge_ports:
        port = st.sampled_from(edge_ports) | port
    addr: st.SearchStrategy[Addr] = st.integers(0, 255).map(lambda o: _addr(version, o))
    if edge_addrs[version]:
        addr = st.sampled_from(edge_addrs[version]) | addr
    has_ports = proto in PORT_PROTOCOLS
    sport = draw(port) if has_ports else None
    dport = draw(port) if has_ports else None
    return Packet(version, proto, sport, dport, draw(addr), draw(addr))


@st.composite
def port_items(draw: st.DrawFn) -> Any:
    # Spaced values, so that lists do not all merge into one range and
    # iptables' 15-slot multiport limit is reached now and then.
    low = draw(st.integers(1, PORT_DOMAIN // 3)) * 3
    kind = draw(st.sampled_from(("int", "str", "range", "colon")))
    if kind == "int":
        return low
    if kind == "str":
        return str(low)
    high = low + draw(st.integers(0, 1))  # never adjacent to the next item
    return f"{low}-{high}" if kind == "range" else f"{low}:{high}"


@st.composite
def prefixes(draw: st.DrawFn, version: int) -> str:
    offset = draw(st.integers(0, 255))
    length = draw(st.integers(24, 32) if version == 4 else st.integers(120, 128))
    return str(ipaddress.ip_network((_addr(version, offset), length), strict=False))


@st.composite
def match_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A `match:` mapping as a user would write it, valid by construction."""
    d: dict[str, Any] = {}
    family = draw(st.sampled_from((None, "ipv4", "ipv6", "any")))
    if family:
        d["family"] = family
    port_keys = draw(st.sets(st.sampled_from(("port", "sport", "dport"))))
    for key in sorted(port_keys):
        items = draw(st.lists(port_items(), min_size=1, max_size=16))
        d[key] = items[0] if len(items) == 1 and draw(st.booleans()) else items
    pool: list[Any] = ["tcp", "udp", "sctp", 136] if port_keys else [
        "tcp", "udp", "icmp", "icmpv6", "sctp", 47]
    other_icmp = {"ipv4": "icmpv6", "ipv6": "icmp"}.get(family or "any")
    pool = [x for x in pool if x != other_icmp]
    if draw(st.booleans()):
        protos = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        d["protocol"] = protos[0] if len(protos) == 1 and draw(st.booleans()) else protos
    versions = [4] if family == "ipv4" else [6] if family == "ipv6" else [4, 6]
    for key in ("source", "destination"):
        if draw(st.booleans()):
            items = draw(st.lists(
                st.sampled_from(versions).flatmap(lambda v: prefixes(v)), min_size=1, max_size=4))
            d[key] = items
    return d


def _listify(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _port_set(v: Any) -> list[tuple[int, int]]:
    out = []
    for item in _listify(v):
        text = str(item)
        for sep in ("-", ":"):
            if sep in text:
                lo, hi = text.split(sep)
                out.append((int(lo), int(hi)))
                break
        else:
            out.append((int(text), int(text)))
    return out


def reference(d: dict[str, Any], p: Packet) -> bool:
    """What the YAML says, read plainly."""
    family = d.get("family", "any")
    if family != "any" and family != f"ipv{p.version}":
        return False
    protos = [PROTOCOLS[x] if isinstance(x, str) else x for x in _listify(d.get("protocol", []))]
    has_ports = any(k in d for k in ("port", "sport", "dport"))
    if not protos and has_ports:
        protos = [6, 17]  # "port 53" means TCP or UDP port 53
    if protos and p.proto not in protos:
        return False

    def inside(value: Optional[int], key: str) -> bool:
        return value is not None and any(lo <= value <= hi for lo, hi in _port_set(d[key]))

    if "port" in d and not (inside(p.sport, "port") or inside(p.dport, "port")):
        return False
    if "sport" in d and not inside(p.sport, "sport"):
        return False
    if "dport" in d and not inside(p.dport, "dport"):
        return False
    for key, addr in (("source", p.src), ("destination", p.dst)):
        if key in d and not any(
            n.version == addr.version and addr in n for n in map(net, d[key])
        ):
            return False
    return True


def _parse_match(d: dict[str, Any]) -> Optional[Match]:
    doc = {"collectors": {"ids": {"address": "192.0.2.50"}},
           "mirrors": [{"name": "m", "interfaces": ["eth0"], "collector": "ids", "match": d}]}
    try:
        s = spec.parse(yaml.safe_dump(doc), "prop.yaml")
    except spec.SpecError as e:
        # The generator builds valid matches; the only refusal allowed is a
        # match whose parts leave no packet at all.
        assert len(e.problems) == 1 and "can never select a packet" in e.problems[0], e.problems
        return None
    return s.mirrors[0].match


def _in_nets(addr: Addr, networks: tuple[Any, ...]) -> bool:
    return any(n.version == addr.version and addr in n for n in networks)


def model_hits(m: Match, p: Packet) -> int:
    """How many of the model's alternatives select the packet."""
    fm = m.for_version(4 if p.version == 4 else 6)
    if fm is None:
        return 0
    assert fm.version == p.version
    if fm.protocols and p.proto not in fm.protocols:
        return 0
    if fm.sources and not _in_nets(p.src, fm.sources):
        return 0
    if fm.destinations and not _in_nets(p.dst, fm.destinations):
        return 0
    values = {"sport": p.sport, "dport": p.dport}
    hits = 0
    for clause in fm.port_clauses:
        ok = True
        for field, ranges, negated in clause.tests:
            v = values[field]
            # A port test on a packet without ports never holds, negated or not.
            if v is None or (any(r.low <= v <= r.high for r in ranges) == negated):
                ok = False
        hits += ok
    return hits


# nft JSON expressions, interpreted.
def _nft_items(right: Any) -> list[Any]:
    return right["set"] if isinstance(right, dict) and "set" in right else [right]


def _nft_contains(items: list[Any], value: Any) -> bool:
    for it in items:
        if isinstance(it, dict) and "range" in it:
            if value is not None and it["range"][0] <= value <= it["range"][1]:
                return True
        elif isinstance(it, dict) and "prefix" in it:
            n = ipaddress.ip_network(f"{it['prefix']['addr']}/{it['prefix']['len']}")
            if value.version == n.version and value in n:
                return True
        elif isinstance(it, str):
            if value == ipaddress.ip_address(it):
                return True
        elif it == value:
            return True
    return False


def nft_hits(fm: FamilyMatch, p: Packet) -> int:
    hits = 0
    fam = "ip" if fm.version == 4 else "ip6"
    for alt in match_exprs(fm):
        l4: Optional[set[int]] = None
        ok = True
        for e in alt:
            m = e["match"]
            left, items = m["left"], _nft_items(m["right"])
            if left == {"meta": {"key": "l4proto"}}:
                l4 = set(items)
                value: Any = p.proto
            elif "payload" in left and left["payload"]["protocol"] == fam:
                value = {"saddr": p.src, "daddr": p.dst}[left["payload"]["field"]]
            elif "payload" in left and left["payload"]["protocol"] == "th":
                # nft reads the bytes at the transport header whatever the
                # protocol: only an earlier l4proto test makes them ports.
                assert l4 is not None and l4 <= PORT_PROTOCOLS, alt
                value = {"sport": p.sport, "dport": p.dport}[left["payload"]["field"]]
                if value is None:
                    ok = False
                    continue
            else:
                raise AssertionError(f"unexpected expression {e}")
            inside = _nft_contains(items, value)
            if inside != (m["op"] == "=="):
                ok = False
            assert m["op"] in ("==", "!=")
        hits += ok
    return hits


# iptables arguments, interpreted.
def _ipt_ports(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        out.append((int(lo), int(hi or lo)))
    return out


def ipt_hits(fm: FamilyMatch, p: Packet) -> int:
    hits = 0
    for args in match_args(fm):
        ok = True
        proto: Optional[int] = None
        i = 0
        while i < len(args):
            a = args[i]
            if a == "-p":
                name = args[i + 1]
                proto = PROTOCOLS[name] if name in PROTOCOLS else int(name)
                ok = ok and p.proto == proto
                i += 2
            elif a in ("-s", "-d"):
                n = net(args[i + 1])
                addr = p.src if a == "-s" else p.dst
                ok = ok and addr.version == n.version and addr in n
                i += 2
            elif a == "-m" and args[i + 1] == "multiport":
                # iptables refuses multiport without a protocol that has ports.
                assert proto is not None and proto in PORT_PROTOCOLS, args
                i += 2
                negated = args[i] == "!"
                i += negated
                flag, ports = args[i], _ipt_ports(args[i + 1])
                assert sum(1 if lo == hi else 2 for lo, hi in ports) <= MULTIPORT_MAX, args
                value = p.sport if flag == "--sports" else p.dport
                assert flag in ("--sports", "--dports")
                inside = value is not None and any(lo <= value <= hi for lo, hi in ports)
                ok = ok and value is not None and inside != negated
                i += 2
            else:
                raise AssertionError(f"unexpected argument {a} in {args}")
        hits += ok
    return hits


PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@PROPERTY
@given(match_specs(), st.data())
def test_model_selects_exactly_once_and_as_the_spec_says(d: dict[str, Any], data: st.DataObject) -> None:
    pkts = data.draw(st.lists(packets(d), min_size=1, max_size=25))
    m = _parse_match(d)
    if m is None:
        assert not any(reference(d, p) for p in pkts)
        return
    for p in pkts:
        hits = model_hits(m, p)
        assert hits <= 1, (d, p)
        assert (hits == 1) == reference(d, p), (d, p, m)


@PROPERTY
@given(match_specs(), st.data())
def test_rendered_alternatives_select_exactly_once(d: dict[str, Any], data: st.DataObject) -> None:
    pkts = data.draw(st.lists(packets(d), min_size=1, max_size=25))
    m = _parse_match(d)
    assume(m is not None)
    assert m is not None
    for p in pkts:
        fm = m.for_version(4 if p.version == 4 else 6)
        want = reference(d, p)
        if fm is None:
            assert not want
            continue
        nft, ipt = nft_hits(fm, p), ipt_hits(fm, p)
        assert nft <= 1 and ipt <= 1, (d, p, nft, ipt)
        assert (nft == 1) == want, ("nft", d, p)
        assert (ipt == 1) == want, ("iptables", d, p)


def test_iptables_splits_long_port_lists_and_still_copies_once() -> None:
    ports = tuple(pr(n) for n in range(1, 40, 2))  # 20 single ports: two multiport matches
    m = Match(protocols=(6,), ports=ports)
    fm = m.for_version(4)
    assert fm is not None
    args = match_args(fm)
    # Positive test: one rule per chunk; negated test: all chunks in one rule.
    assert len(args) == 2 + 2
    for sport in (1, 2, 39, 40):
        for dport in (1, 2, 39, 40):
            p = Packet(4, 6, sport, dport, _addr(4, 1), _addr(4, 2))
            want = sport % 2 == 1 or dport % 2 == 1
            assert ipt_hits(fm, p) == int(want), (sport, dport)
            assert nft_hits(fm, p) == int(want), (sport, dport)
