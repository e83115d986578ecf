"""Many filtered mirrors on one chain at the cost of one lookup: verdict maps.

A chain that tests fifty `udp dport N` mirrors one rule after another pays
fifty comparisons per packet. Mirrors whose match is a port test (with its
protocols, and in the netdev family its IP version) become elements of one
anonymous verdict map keyed on `[meta protocol .] meta l4proto . th dport`
(or sport), each element jumping to the mirror's own chain, which counts and
copies. Intervals in concatenations need Linux 5.6 and nft 0.9.4: where the
kernel refuses them (`ranges=False`), mirrors with port ranges stay rules.

One lookup yields one verdict, so two mirrors whose keys overlap (the same
port of the same protocol) cannot share a map: the first takes its place,
the second stays a linear rule, and a packet both select is still copied once
per mirror, as without maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from ...match import FamilyMatch, Match, PortRange

# Below this many mirrors a linear walk costs no more than the lookup.
MAP_MIN = 4

Expr = dict[str, Any]
Field = Literal["sport", "dport"]
# (ethertype name or None, IP protocol number, port range)
Element = tuple[Optional[str], int, PortRange]


@dataclass(frozen=True)
class Key:
    """A mirror's match as points of the map's key space, when it can be one."""

    field: Field
    elements: tuple[Element, ...]

    @property
    def has_ranges(self) -> bool:
        return any(r.low != r.high for _, _, r in self.elements)

    def overlaps(self, other: Key) -> bool:
        return self.field == other.field and any(
            a[0] == b[0] and a[1] == b[1] and a[2].low <= b[2].high and b[2].low <= a[2].high
            for a in self.elements for b in other.elements)


@dataclass(frozen=True)
class Entry:
    """One mirror's copy on a chain: its match as rules, or as a map key."""

    alternatives: tuple[tuple[Expr, ...], ...]  # one rule each: match expressions
    leaf: tuple[Expr, ...]  # what a selected packet gets: counter, exclusions, dup
    comment: str
    action_chain: str  # the chain holding `leaf` when the entry is a map element
    key: Optional[Key] = None


def family_key(fm: FamilyMatch) -> Optional[Key]:
    """The key of an ip/ip6 table's mirror (None: not a plain port test)."""
    if fm.sources or fm.destinations or len(fm.port_clauses) != 1 or not fm.protocols:
        return None
    tests = fm.port_clauses[0].tests
    if len(tests) != 1 or tests[0][2]:
        return None
    field, ranges, _ = tests[0]
    return Key(field, tuple((None, p, r) for p in fm.protocols for r in ranges))


def frame_key(m: Match) -> Optional[Key]:
    """The key of a netdev mirror: its IP versions are part of it."""
    if m.sources or m.destinations or m.ports or bool(m.sports) == bool(m.dports):
        return None
    field: Field = "sport" if m.sports else "dport"
    elements: list[Element] = []
    for version, ether in ((4, "ip"), (6, "ip6")):
        fm = m.for_version(version)  # type: ignore[arg-type]
        if fm is None:
            continue
        key = family_key(fm)
        if key is None:
            return None
        elements += [(ether, p, r) for _, p, r in key.elements]
    return Key(field, tuple(elements)) if elements else None


def chain_rules(t: dict[str, str], chain: str, entries: list[Entry],
                ranges: bool = True) -> list[dict[str, Any]]:
    """The chain's rules: map lookups jumping to the entries' action chains, and
    linear rules for the rest.

    Map lookups come first, then the linear rules; their order changes which
    copy leaves first, never whether one does.
    """
    by_field: dict[Field, list[Entry]] = {}
    for e in entries:
        if e.key is not None and (ranges or not e.key.has_ranges):
            by_field.setdefault(e.key.field, []).append(e)
    mapped: set[int] = set()
    rules: list[dict[str, Any]] = []
    for field, candidates in sorted(by_field.items()):
        chosen: list[Entry] = []
        for e in candidates:
            assert e.key is not None
            if not any(e.key.overlaps(c.key) for c in chosen if c.key is not None):
                chosen.append(e)
        if len(chosen) < MAP_MIN:
            continue
        rules.append({"rule": {**t, "chain": chain, "expr": [_lookup(field, chosen)]}})
        mapped.update(id(e) for e in chosen)
    for e in entries:
        if id(e) in mapped:
            continue
        for alt in e.alternatives:
            rules.append({"rule": {**t, "chain": chain, "expr": [*alt, *e.leaf],
                                   "comment": e.comment}})
    return rules


def _lookup(field: Field, entries: list[Entry]) -> Expr:
    with_ether = any(el[0] is not None for e in entries if e.key for el in e.key.elements)
    key: list[Expr] = [{"meta": {"key": "protocol"}}] if with_ether else []
    key += [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": field}}]
    items: list[list[Any]] = []
    for e in entries:
        assert e.key is not None
        for ether, proto, r in e.key.elements:
            port: Any = r.low if r.low == r.high else {"range": [r.low, r.high]}
            parts = ([ether] if with_ether else []) + [proto, port]
            items.append([{"concat": parts}, {"jump": {"target": e.action_chain}}])
    return {"vmap": {"key": {"concat": key}, "data": {"set": items}}}
