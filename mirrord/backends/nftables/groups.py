"""A group collector's copies (plan.groups) as nftables objects (pure).

The copy rule of a mirror to a group ends, where a single collector's has
`dup to ADDR`, in one lookup:

    symhash mod 64 vmap { 0 : jump g_sensors_0, 1 : jump g_sensors_2, ... }

and each member has a chain that counts (its named counter,
`_member_COLLECTOR_MEMBER.member`) and copies to it. One hash and one map
lookup per packet, whatever the number of members (a hash table: one element
per bucket). A member without buckets (dead) keeps its
counter and has no chain. Members are shared by every mirror of the group in
one table: their counters count the group's copies to that member.
"""

from __future__ import annotations

from typing import Any

from ...plan.groups import BUCKETS, Group
from .naming import chain_name, counter_name, counting

Expr = dict[str, Any]


class MemberChains:
    """The member chains of the groups a table's rules copy to, named once."""

    def __init__(self, taken: set[str]) -> None:
        self._taken = taken
        self._groups: dict[str, Group] = {}
        self._chains: dict[tuple[str, str], str] = {}

    def _chain(self, g: Group, k: int) -> str:
        key = (g.collector, g.members[k].name)
        if key not in self._chains:
            self._chains[key] = chain_name("g", f"{g.collector}_{k}", self._taken)
        return self._chains[key]

    def lookup(self, g: Group) -> Expr:
        """The expression that sends a packet to its flow's member chain: a
        jump when one member holds every bucket (a group of one, or the only
        one alive: no hash), else the bucket map. Its elements are single
        buckets, not ranges: a map of single values is a hash table, one of
        ranges an interval tree, which bench_rules measured slower per copy."""
        self._groups.setdefault(g.collector, g)
        holders = [k for k, m in enumerate(g.members) if m.buckets]
        if len(holders) == 1:
            return {"jump": {"target": self._chain(g, holders[0])}}
        items = [[b, {"jump": {"target": self._chain(g, k)}}]
                 for b, k in sorted((b, k) for k, m in enumerate(g.members) for b in m.buckets)]
        return {"vmap": {"key": {"symhash": {"mod": BUCKETS}}, "data": {"set": items}}}

    def objects(self, t: dict[str, str]) -> list[dict[str, Any]]:
        """Every member's counter, and the chains of those holding buckets with
        their one rule: count, copy."""
        counters: list[dict[str, Any]] = []
        chains: list[dict[str, Any]] = []
        for g in self._groups.values():
            for k, m in enumerate(g.members):
                counters.append({"counter": {**t, "name": counter_name(m.counter)}})
                if not m.buckets:
                    continue
                name = self._chain(g, k)
                chains.append({"chain": {**t, "name": name}})
                chains.append({"rule": {**t, "chain": name, "expr": [
                    *counting(m.counter), {"dup": {"addr": m.target}}],
                    "comment": f"mirrord member {g.collector} {m.name}"}})
        return counters + chains
