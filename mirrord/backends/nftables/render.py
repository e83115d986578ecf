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

import re
from collections import defaultdict
from typing import Any, Optional

from ...match import PROTOCOL_NAMES, FamilyMatch, Network, PortRange
from ...plan import CloneRule, Plan
from ..base import CounterKey, Counts, comment

TABLE = "mirrord"
FAMILIES = {4: "ip", 6: "ip6"}
PRIO_PREROUTING = -150  # mangle: after conntrack, before dstnat
PRIO_POSTROUTING = 300  # after srcnat: what actually leaves the interface

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


def _chain_name(direction: str, ifname: str, taken: set[str]) -> str:
    base = f"{direction}_{re.sub(r'[^A-Za-z0-9_.-]', '_', ifname)}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def counter_name(key: CounterKey) -> str:
    return f"{key[0]}.{key[1]}"


def render_tables(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """family -> the objects of that table, in creation order (pure)."""
    by_version: dict[int, list[CloneRule]] = defaultdict(list)
    for rule in plan.clones:
        by_version[rule.version].append(rule)
    tables: dict[str, list[dict[str, Any]]] = {}
    for version, rules in sorted(by_version.items()):
        fam = FAMILIES[version]
        t = {"family": fam, "table": TABLE}
        objs: list[dict[str, Any]] = [{"table": {"family": fam, "name": TABLE}}]
        keys = list(dict.fromkeys((r.mirror, r.direction) for r in rules))
        objs += [{"counter": {**t, "name": counter_name(k)}} for k in keys]
        taken: set[str] = set()
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
                chain = _chain_name(direction, ifname, taken)
                objs.append({"chain": {**t, "name": chain}})
                dispatch.append([ifname, {"jump": {"target": chain}}])
                if direction == "out" and ifname in plan.clone_egress:
                    # Clones leave through this interface and traverse
                    # postrouting; the kernel marks them untracked. Their
                    # copy is already suppressed, but they must not count.
                    rule_objs.append({"rule": {**t, "chain": chain, "expr": [
                        _match({"ct": {"key": "state"}}, "untracked", "in"), {"return": None}]}})
                for r in per_if[ifname]:
                    rule_objs += _clone_rules(t, chain, r)
            rule_objs.insert(0, {"rule": {**t, "chain": hook, "expr": [
                {"vmap": {"key": _meta(meta), "data": {"set": dispatch}}}]}})
        objs += rule_objs
        tables[fam] = objs
    return tables


def exclusion_list(r: CloneRule) -> list[str]:
    """The addresses of the rule's family whose traffic is never cloned.

    Every collector's, not only this rule's: what mirrord sends (TZSP
    datagrams, whole or fragmented) and what collectors answer must never
    become a copy, or two mirrors could copy each other's copies for ever.
    """
    addrs = {a for a in (r.gateway, *r.exclude) if a.version == r.version}
    return [str(a) for a in sorted(addrs, key=int)]


def _clone_rules(t: dict[str, str], chain: str, r: CloneRule) -> list[dict[str, Any]]:
    fam = FAMILIES[r.version]
    gw = str(r.gateway)
    never = _value(exclusion_list(r))
    exclude = [_match(_payload(fam, "saddr"), never, "!="),
               _match(_payload(fam, "daddr"), never, "!=")]
    dup: dict[str, Any] = {"addr": gw}
    if r.device:
        dup["dev"] = r.device
    out = []
    for alt in match_exprs(r.match):
        expr = [*alt, *exclude, {"counter": counter_name((r.mirror, r.direction))}, {"dup": dup}]
        out.append({"rule": {**t, "chain": chain, "expr": expr,
                             "comment": comment(r.mirror, r.direction)}})
    return out


def batch(
    tables: dict[str, list[dict[str, Any]]],
    carry: Counts,
    existing: Optional[dict[str, list[dict[str, Any]]]] = None,
) -> list[dict[str, Any]]:
    """One transaction from whatever the kernel holds to the wanted tables.

    `existing` maps a family to the objects its mirrord table holds now
    (absent: no such table). A table that stays is flushed and refilled, not
    deleted: its named counters live on, so no copy counted between a read
    and the commit is lost. A new table's counters start at `carry`.
    """
    if existing is None:
        existing = {}
    cmds: list[dict[str, Any]] = []
    for fam in FAMILIES.values():
        have = existing.get(fam)
        want = tables.get(fam)
        ref = {"family": fam, "name": TABLE}
        if want is None:
            # Both verbs: "delete" alone fails on a table that is not there.
            cmds += [{"add": {"table": ref}}, {"delete": {"table": ref}}]
            continue
        if have is None:
            cmds += [{"add": {"table": ref}}, {"delete": {"table": ref}}]
            cmds += [{"add": _seeded(obj, carry)} for obj in want]
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
            cmds.append({"add": _seeded(obj, carry)})
    return cmds


def _seeded(obj: dict[str, Any], carry: Counts) -> dict[str, Any]:
    if "counter" not in obj:
        return obj
    key = counter_key(obj["counter"]["name"])
    packets, nbytes = carry.get(key, (0, 0)) if key else (0, 0)
    return {"counter": {**obj["counter"], "packets": packets, "bytes": nbytes}}


def counter_key(name: str) -> Optional[CounterKey]:
    mirror, _, direction = name.rpartition(".")
    return (mirror, direction) if mirror and direction in ("in", "out") else None


# -- text form, for `mirrord render` ------------------------------------------
def _text_value(v: Any) -> str:
    if isinstance(v, dict):
        if "set" in v:
            return "{ " + ", ".join(_text_value(x) for x in v["set"]) + " }"
        if "range" in v:
            return f"{v['range'][0]}-{v['range'][1]}"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    if isinstance(v, list):
        return f"{_text_value(v[0])} : {_text_value(v[1])}"
    if isinstance(v, str) and not re.fullmatch(r"[0-9a-fA-F.:]+", v):
        return v
    return str(v)


def _protocol_names(v: Any) -> Any:
    if isinstance(v, dict) and "set" in v:
        return {"set": [_protocol_names(x) for x in v["set"]]}
    return PROTOCOL_NAMES.get(v, v) if isinstance(v, int) else v


def _text_left(e: Expr) -> str:
    if "meta" in e:
        key = e["meta"]["key"]
        return key if key in ("iifname", "oifname") else f"meta {key}"
    if "payload" in e:
        return f"{e['payload']['protocol']} {e['payload']['field']}"
    if "ct" in e:
        return f"ct {e['ct']['key']}"
    raise ValueError(f"no text form for {e}")


def _text_expr(e: Expr) -> str:
    if "match" in e:
        m = e["match"]
        op = "" if m["op"] in ("==", "in") else f"{m['op']} "
        right = m["right"]
        if m["left"] == _meta("l4proto"):
            right = _protocol_names(right)
        return f"{_text_left(m['left'])} {op}{_text_value(right)}"
    if "counter" in e:
        return f'counter name "{e["counter"]}"'
    if "dup" in e:
        dev = f' device "{e["dup"]["dev"]}"' if "dev" in e["dup"] else ""
        return f"dup to {e['dup']['addr']}{dev}"
    if "vmap" in e:
        items = ", ".join(f'"{k}" : jump {v["jump"]["target"]}' for k, v in e["vmap"]["data"]["set"])
        return f"{_text_left(e['vmap']['key'])} vmap {{ {items} }}"
    if "return" in e:
        return "return"
    raise ValueError(f"no text form for {e}")


def to_text(tables: dict[str, list[dict[str, Any]]], carry: Optional[Counts] = None) -> str:
    """nft's own syntax for the tables: what `mirrord render` prints and, with
    `carry` (the counters' starting values), what apply() loads into a
    ruleset that holds no mirrord table (nft parses it in half the time of
    the same objects as JSON: the heal after `nft flush ruleset`)."""
    out: list[str] = []
    for fam, objs in tables.items():
        chains = [o["chain"] for o in objs if "chain" in o]
        rules = _rules_by_chain(objs)
        out.append(f"table {fam} {TABLE} {{")
        for o in objs:
            if "counter" not in o:
                continue
            name = o["counter"]["name"]
            if carry is None:
                out.append(f"\tcounter {name} {{\n\t}}")
            else:
                key = counter_key(name)
                packets, nbytes = carry.get(key, (0, 0)) if key else (0, 0)
                out.append(f"\tcounter {name} {{\n\t\tpackets {packets} bytes {nbytes}\n\t}}")
        for c in chains:
            out.append(f"\tchain {c['name']} {{")
            if "hook" in c:
                out.append(f"\t\ttype {c['type']} hook {c['hook']} priority {c['prio']}; "
                           f"policy {c['policy']};")
            for r in rules.get(c["name"], ()):
                line = " ".join(_text_expr(e) for e in r["expr"])
                if "comment" in r:
                    line += f' comment "{r["comment"]}"'
                out.append(f"\t\t{line}")
            out.append("\t}")
        out.append("}")
    return "\n".join(out) + ("\n" if out else "")


def _rules_by_chain(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """chain -> its rules in order: one pass, not one scan of every rule per chain."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in objs:
        r = o.get("rule")
        if r:
            out[r["chain"]].append(r)
    return out
