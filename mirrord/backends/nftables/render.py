"""nftables rendering of a plan: mirrord's tables as libnftables JSON (pure).

nft 1.0.x cannot `dup` from an inet table, so mirrord owns `table ip mirrord`
and `table ip6 mirrord`.

Layout per table: base chains `prerouting` (mangle priority, before DNAT: the
packet as it arrived) and `postrouting` (after SNAT: the packet as it leaves)
dispatch by interface name through a verdict map to one chain per interface,
so the per-packet cost stays one hash lookup however many interfaces are
mirrored. Interface names (not indexes) are matched, so rules survive an
interface being deleted and re-created.

Also here: batch(), the one transaction from what the kernel holds to the
wanted tables, and to_text(), the same tables in nft's own syntax.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from ...match import FamilyMatch, Network, PortRange
from ...plan import CloneRule, Plan
from ...plan.groups import MEMBER
from ...plan.model import DELIVERED, DeliveryPoint
from ..base import CounterKey, Counts, comment
from .groups import MemberChains
from .maps import Entry, chain_rules, family_key
from .naming import chain_name as chain_name
from .naming import counter_name as counter_name
from .naming import counting as counting

TABLE = "mirrord"
FAMILIES = {4: "ip", 6: "ip6"}
# Every family mirrord has a table in; netdev only when whole frames are copied.
TABLE_FAMILIES = ("ip", "ip6", "netdev")
OPTIONAL_FAMILIES = frozenset({"netdev"})
PRIO_PREROUTING = -150  # mangle: after conntrack, before dstnat
PRIO_POSTROUTING = 300  # after srcnat: what actually leaves the interface
# Copies leave through the output hook (a clone is sent with ip_local_out(),
# a tunnel's outer packet is the router's own): counted after every output
# chain (fw4's filter is at 0), where forwarded traffic never passes. A
# postrouting chain would charge every forwarded packet (bench_rules: 11 %).
PRIO_DELIVERED = 500

Expr = dict[str, Any]


def _value(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": items}


def _net(n: Network) -> Any:
    if n.prefixlen == n.max_prefixlen:
        return str(n.network_address)
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


def _port(r: PortRange) -> Any:
    return r.low if r.low == r.high else {"range": [r.low, r.high]}


def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def match_exprs(fm: FamilyMatch) -> list[list[Expr]]:
    """The match as alternatives of nft JSON expressions (one rule each)."""
    fam = FAMILIES[fm.version]
    common: list[Expr] = []
    if fm.protocols:
        common.append(_match(_meta("l4proto"), _value(list(fm.protocols))))
    if fm.sources:
        common.append(_match(_payload(fam, "saddr"), _value([_net(n) for n in fm.sources])))
    if fm.destinations:
        common.append(_match(_payload(fam, "daddr"), _value([_net(n) for n in fm.destinations])))
    alternatives: list[list[Expr]] = []
    for clause in fm.port_clauses:
        exprs = list(common)
        for field, ranges, negated in clause.tests:
            exprs.append(
                _match(_payload("th", field), _value([_port(r) for r in ranges]),
                       "!=" if negated else "==")
            )
        alternatives.append(exprs)
    return alternatives


def ip_tables(plan: Plan, ranges: bool = True) -> dict[str, list[dict[str, Any]]]:
    """family -> the objects of that ip/ip6 table, in creation order (pure).
    `ranges`: the kernel takes port ranges in map keys (see maps)."""
    by_version: dict[int, list[CloneRule]] = defaultdict(list)
    for rule in plan.clones:
        by_version[rule.version].append(rule)
    points: dict[int, list[DeliveryPoint]] = defaultdict(list)
    for point in plan.deliveries:
        points[point.version].append(point)
    tables: dict[str, list[dict[str, Any]]] = {}
    for version in sorted(set(by_version) | set(points)):
        rules = by_version.get(version, [])
        fam = FAMILIES[version]
        t = {"family": fam, "table": TABLE}
        objs: list[dict[str, Any]] = [{"table": {"family": fam, "name": TABLE}}]
        keys: list[CounterKey] = list(dict.fromkeys((r.mirror, r.direction) for r in rules))
        keys += [p.key for p in points.get(version, [])]
        objs += [{"counter": {**t, "name": counter_name(k)}} for k in keys]
        taken: set[str] = set()
        actions = ActionChains(taken)
        members = MemberChains(taken)
        rule_objs: list[dict[str, Any]] = []
        for direction, hook, prio, meta in (
            ("in", "prerouting", PRIO_PREROUTING, "iifname"),
            ("out", "postrouting", PRIO_POSTROUTING, "oifname"),
        ):
            per_if: dict[str, list[CloneRule]] = defaultdict(list)
            for r in rules:
                if r.direction == direction:
                    for ifname in r.interfaces:
                        per_if[ifname].append(r)
            if not per_if:
                continue
            objs.append({"chain": {**t, "name": hook, "type": "filter", "hook": hook,
                                   "prio": prio, "policy": "accept"}})
            dispatch: list[list[Any]] = []
            for ifname in sorted(per_if):
                chain = chain_name(direction, ifname, taken)
                objs.append({"chain": {**t, "name": chain}})
                dispatch.append([ifname, {"jump": {"target": chain}}])
                if direction == "out" and ifname in plan.clone_egress:
                    # Clones leave through this interface and traverse
                    # postrouting; the kernel marks them untracked. Their
                    # copy is already suppressed, but they must not count.
                    rule_objs.append({"rule": {**t, "chain": chain, "expr": [
                        _match({"ct": {"key": "state"}}, "untracked", "in"), {"return": None}]}})
                entries = [_clone_entry(r, actions, members) for r in per_if[ifname]]
                rule_objs += chain_rules(t, chain, entries, ranges)
            rule_objs.insert(0, {"rule": {**t, "chain": hook, "expr": [
                {"vmap": {"key": _meta(meta), "data": {"set": dispatch}}}]}})
        if points.get(version):
            objs.append({"chain": {**t, "name": "delivered", "type": "filter",
                                   "hook": "output", "prio": PRIO_DELIVERED,
                                   "policy": "accept"}})
            objs_, rules_ = delivered_rules(t, points[version], taken)
            objs += objs_
            rule_objs += rules_
        objs += members.objects(t)
        objs += actions.objects(t, rule_objs)
        objs += rule_objs
        tables[fam] = objs
    return tables


def delivered_rules(t: dict[str, str], points: list[DeliveryPoint], taken: set[str]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Chain `delivered`'s rules (and the chains they jump to). Several clone
    points (a group's members) are one lookup of the clone's next hop, each
    address jumping to its point's chain, so a copy's cost here does not grow
    with the members; other points are a rule each."""
    clones = [p for p in points if p.kind == "clone"]
    if len(clones) < 2:
        return [], [{"rule": {**t, "chain": "delivered", "expr": delivered_exprs(p)}}
                    for p in points]
    fam = FAMILIES[clones[0].version]
    chains: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    items: list[list[Any]] = []
    for p in clones:
        name = chain_name("d", str(p.address).replace(":", "-"), taken)
        chains.append({"chain": {**t, "name": name}})
        rules.append({"rule": {**t, "chain": name, "expr": [*counting(p.key)]}})
        items.append([str(p.address), {"jump": {"target": name}}])
    lookup = {"rule": {**t, "chain": "delivered", "expr": [
        _match({"ct": {"key": "state"}}, "untracked", "in"),
        {"vmap": {"key": {"rt": {"key": "nexthop", "family": fam}}, "data": {"set": items}}}]}}
    rules = [lookup, *rules]
    rules += [{"rule": {**t, "chain": "delivered", "expr": delivered_exprs(p)}}
              for p in points if p.kind != "clone"]
    return chains, rules


def delivered_exprs(p: DeliveryPoint) -> list[Expr]:
    """What recognises the point's copies as they leave (see plan.delivery)."""
    fam = FAMILIES[p.version]
    if p.kind == "clone":
        head = [_match({"ct": {"key": "state"}}, "untracked", "in"),
                _match({"rt": {"key": "nexthop", "family": fam}}, str(p.address))]
    elif p.kind == "vxlan":
        head = [_match(_payload(fam, "daddr"), str(p.address)),
                _match(_meta("l4proto"), 17), _match(_payload("udp", "dport"), p.port)]
    else:
        head = [_match(_payload(fam, "daddr"), str(p.address)), _match(_meta("l4proto"), 47)]
    return [*head, *counting(p.key)]


class ActionChains:
    """The chains map elements jump to, one per (mirror, direction) of a table,
    named once: mirror names that differ only in odd characters must not
    share one."""

    def __init__(self, taken: set[str]) -> None:
        self._taken = taken
        self._names: dict[tuple[str, str], str] = {}
        self._leaves: dict[str, tuple[Expr, ...]] = {}
        self._comments: dict[str, str] = {}

    def name(self, mirror: str, direction: str, leaf: tuple[Expr, ...]) -> str:
        key = (mirror, direction)
        if key not in self._names:
            name = chain_name("m", f"{mirror}_{direction}", self._taken)
            self._names[key] = name
            self._leaves[name] = leaf
            self._comments[name] = comment(mirror, direction)
        return self._names[key]

    def objects(self, t: dict[str, str], rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chains some rule of `rules` jumps to, each with its one rule."""
        used = {j for r in rules for j in _map_jumps(r["rule"]["expr"])}
        out: list[dict[str, Any]] = []
        for name, leaf in self._leaves.items():
            if name in used:
                out.append({"chain": {**t, "name": name}})
                out.append({"rule": {**t, "chain": name, "expr": list(leaf),
                                     "comment": self._comments[name]}})
        return out


def _map_jumps(exprs: list[Expr]) -> list[str]:
    out: list[str] = []
    for e in exprs:
        if "vmap" in e and "concat" in e["vmap"]["key"]:
            out += [v["jump"]["target"] for _, v in e["vmap"]["data"]["set"] if "jump" in v]
    return out


def exclusion_list(r: CloneRule) -> list[str]:
    """The addresses of the rule's family whose traffic is never cloned.

    Every collector's, not only this rule's: what mirrord sends (TZSP
    datagrams, whole or fragmented) and what collectors answer must never
    become a copy, or two mirrors could copy each other's copies for ever.
    """
    addrs = {a for a in (r.gateway, *r.exclude) if a.version == r.version}
    return [str(a) for a in sorted(addrs, key=int)]


def _clone_entry(r: CloneRule, actions: ActionChains, members: MemberChains) -> Entry:
    fam = FAMILIES[r.version]
    never = _value(exclusion_list(r))
    dup: dict[str, Any] = {"addr": str(r.gateway)}
    if r.device:
        dup["dev"] = r.device
    # A group: the flow's member chain copies (backends.nftables.groups).
    copy = members.lookup(r.group) if r.group is not None else {"dup": dup}
    leaf = (_match(_payload(fam, "saddr"), never, "!="), _match(_payload(fam, "daddr"), never, "!="),
            *counting((r.mirror, r.direction)), copy)
    key = family_key(r.match)
    return Entry(tuple(tuple(alt) for alt in match_exprs(r.match)), leaf,
                 comment(r.mirror, r.direction),
                 actions.name(r.mirror, r.direction, leaf) if key else "", key)


def batch(
    tables: dict[str, list[dict[str, Any]]],
    carry: Counts,
    existing: Optional[dict[str, list[dict[str, Any]]]] = None,
    renew: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """One transaction from whatever the kernel holds to the wanted tables.

    `existing` maps a family to the objects its mirrord table holds now
    (absent: no such table). A table that stays is flushed and refilled, not
    deleted: its named counters live on, so no copy counted between a read
    and the commit is lost. A new table's counters start at `carry`, and so
    do those of the families in `renew`, deleted and made again. A netdev
    table is only touched when wanted or there: a kernel without the family
    refuses even its deletion.
    """
    if existing is None:
        existing = {}
    kept = {fam: objs for fam, objs in existing.items() if fam not in renew and fam in tables}
    seeds = family_seeds(tables, carry, kept)
    seeded_rules: set[tuple[str, str]] = set()
    cmds: list[dict[str, Any]] = []
    for fam in TABLE_FAMILIES:
        have = None if fam in renew else existing.get(fam)
        want = tables.get(fam)
        ref = {"family": fam, "name": TABLE}
        if want is None and fam in OPTIONAL_FAMILIES and fam not in existing:
            continue
        if want is None:
            # Both verbs: "delete" alone fails on a table that is not there.
            cmds += [{"add": {"table": ref}}, {"delete": {"table": ref}}]
            continue
        if have is None:
            cmds += [{"add": {"table": ref}}, {"delete": {"table": ref}}]
            cmds += [{"add": _seeded(fam, obj, seeds, seeded_rules)} for obj in want]
            continue
        cmds.append({"flush": {"table": ref}})
        # A base chain whose hook or priority changed (an upgrade) cannot be
        # re-added over the old one: the kernel refuses the whole batch.
        hooks = ("type", "hook", "prio", "policy")
        old_def = {o["chain"]["name"]: tuple(o["chain"].get(k) for k in hooks)
                   for o in have if "chain" in o}
        want_chains = {o["chain"]["name"] for o in want if "chain" in o
                       if old_def.get(o["chain"]["name"], ()) in
                       ((), tuple(o["chain"].get(k) for k in hooks))}
        want_counters = {o["counter"]["name"] for o in want if "counter" in o}
        t = {"family": fam, "table": TABLE}
        cmds += [{"delete": {"chain": {**t, "name": o["chain"]["name"]}}}
                 for o in have if "chain" in o and o["chain"]["name"] not in want_chains]
        cmds += [{"delete": {"counter": {**t, "name": o["counter"]["name"]}}}
                 for o in have if "counter" in o and o["counter"]["name"] not in want_counters]
        had_counters = {o["counter"]["name"] for o in have if "counter" in o}
        for obj in want:
            if "counter" in obj and obj["counter"]["name"] in had_counters:
                continue  # kept, with its count
            if ("chain" in obj and "dev" in obj["chain"] and obj["chain"]["name"] in old_def
                    and obj["chain"]["name"] in want_chains):
                # Kept: it is bound to the device of its name (where it may
                # not be, the table is renewed; see NftablesBackend._renew).
                # Adding a device chain again asks old kernels to bind it twice.
                continue
            cmds.append({"add": _seeded(fam, obj, seeds, seeded_rules)})
    return cmds


Seeds = dict[tuple[str, str], tuple[int, int]]  # (family, counter name) -> (packets, bytes)


def family_seeds(tables: dict[str, list[dict[str, Any]]], carry: Counts,
                 kept: dict[str, list[dict[str, Any]]]) -> Seeds:
    """What each named counter a batch creates starts from.

    A mirror's total is the sum of its counters in every family (counters()
    adds them up): the carry goes to the first family that creates the
    counter, less what the counters that stay (listed in `kept`) hold, so
    that the sum goes on from the carry and is never seeded twice. (A clone
    mirror counts in its collector's family only today.)
    """
    held: dict[CounterKey, tuple[int, int]] = {}
    for objs in kept.values():
        for o in objs:
            c = o.get("counter")
            key = counter_key(c["name"]) if c else None
            if c and key:
                p, b = held.get(key, (0, 0))
                held[key] = (p + int(c.get("packets", 0)), b + int(c.get("bytes", 0)))
    kept_names = {(fam, o["counter"]["name"]) for fam, objs in kept.items() for o in objs
                  if "counter" in o}
    out: Seeds = {}
    given: set[CounterKey] = set()
    for fam in TABLE_FAMILIES:
        for o in tables.get(fam, ()):
            if "counter" not in o or (fam, o["counter"]["name"]) in kept_names:
                continue
            key = counter_key(o["counter"]["name"])
            seed = (0, 0)
            if key and key not in given:
                given.add(key)
                cp, cb = carry.get(key, (0, 0))
                hp, hb = held.get(key, (0, 0))
                seed = (max(0, cp - hp), max(0, cb - hb))
            out[fam, o["counter"]["name"]] = seed
    return out


def _seeded(fam: str, obj: dict[str, Any], seeds: Seeds,
            seeded_rules: set[tuple[str, str]]) -> dict[str, Any]:
    if "counter" in obj:
        packets, nbytes = seeds.get((fam, obj["counter"]["name"]), (0, 0))
        return {"counter": {**obj["counter"], "packets": packets, "bytes": nbytes}}
    if "rule" in obj:
        expr = seed_rule(fam, obj["rule"]["expr"], seeds, seeded_rules)
        if expr is not obj["rule"]["expr"]:
            return {"rule": {**obj["rule"], "expr": expr}}
    return obj


def seed_rule(fam: str, expr: list[Expr], seeds: Seeds,
              seeded_rules: set[tuple[str, str]]) -> list[Expr]:
    """`expr` with the anonymous counter after a named counter this batch creates
    seeded like it, in the first rule that references it (`seeded_rules`
    remembers which were): then the named counter equals the sum of its rules'
    anonymous counters until the rules are replaced. `expr` itself if none."""
    if len(seeded_rules) >= len(seeds):
        return expr  # every counter's first rule is seeded already
    out: Optional[list[Expr]] = None
    for i in range(len(expr) - 1):
        name = expr[i].get("counter")
        if not isinstance(name, str) or (fam, name) not in seeds or (fam, name) in seeded_rules:
            continue
        if "counter" not in expr[i + 1] or isinstance(expr[i + 1]["counter"], str):
            continue
        seeded_rules.add((fam, name))
        packets, nbytes = seeds[fam, name]
        if out is None:
            out = list(expr)
        out[i + 1] = {"counter": {"packets": packets, "bytes": nbytes}}
    return expr if out is None else out


def first_references(fam: str, objs: list[dict[str, Any]], seeds: Seeds,
                     seeded_rules: set[tuple[str, str]]) -> dict[int, tuple[int, tuple[int, int]]]:
    """What seed_rule would change, without copying a rule: id(rule) -> (position
    of the anonymous counter to seed, its seed), for rules in creation order.
    (Copying thousands of rules set off the garbage collector over the whole
    rendering: it doubled to_text's time with 5,000 mirrors.)"""
    out: dict[int, tuple[int, tuple[int, int]]] = {}
    for o in objs:
        if len(seeded_rules) >= len(seeds):
            break
        r = o.get("rule")
        if r is None:
            continue
        expr = r["expr"]
        # From the end: the counters sit right before the dup (one pair per rule).
        for i in range(len(expr) - 2, -1, -1):
            name = expr[i].get("counter")
            if not isinstance(name, str):
                continue
            if ((fam, name) in seeds and (fam, name) not in seeded_rules
                    and "counter" in expr[i + 1] and not isinstance(expr[i + 1]["counter"], str)):
                seeded_rules.add((fam, name))
                out[id(r)] = (i + 1, seeds[fam, name])
            break
    return out


def counter_key(name: str) -> Optional[CounterKey]:
    mirror, _, direction = name.rpartition(".")
    return (mirror, direction) if mirror and direction in ("in", "out", DELIVERED, MEMBER) else None
