"""mirrord's tables in nft's own syntax: what `mirrord render` prints, and what
apply() loads into a ruleset that holds no mirrord table (nft parses it in
half the time of the same objects as JSON: the heal after `nft flush ruleset`).

The same objects as the JSON rendering, printed; never a second rendering.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from typing import Any, Optional

from ...match import PROTOCOL_NAMES
from ..base import Counts
from .render import TABLE, family_seeds, first_references

Expr = dict[str, Any]


def _text_value(v: Any) -> str:
    if isinstance(v, dict):
        if "set" in v:
            return "{ " + ", ".join(_text_value(x) for x in v["set"]) + " }"
        if "range" in v:
            return f"{v['range'][0]}-{v['range'][1]}"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "concat" in v:
            return " . ".join(_text_value(x) for x in v["concat"])
        if "jump" in v:
            return f"jump {v['jump']['target']}"
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
    if "rt" in e:
        return f"rt {e['rt']['family']} {e['rt']['key']}"
    if "concat" in e:
        return " . ".join(_text_left(x) for x in e["concat"])
    if "symhash" in e:
        return f"symhash mod {e['symhash']['mod']}"
    raise ValueError(f"no text form for {e}")


def _map_items(key: Expr, items: list[list[Any]]) -> str:
    """Map elements; an IP protocol inside a concatenation prints by name."""
    parts = key.get("concat", [key])
    proto_at = [i for i, k in enumerate(parts) if k == {"meta": {"key": "l4proto"}}]
    out = []
    for k, v in items:
        if isinstance(k, dict) and "concat" in k:
            vals = [_protocol_names(x) if i in proto_at else x for i, x in enumerate(k["concat"])]
            shown = " . ".join(_text_value(x) for x in vals)
        else:
            shown = f'"{k}"' if isinstance(k, str) else _text_value(k)
        out.append(f"{shown} : {_text_value(v)}")
    return ", ".join(out)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _text_expr(e: Expr) -> str:
    if "match" in e:
        m = e["match"]
        op = "" if m["op"] in ("==", "in") else f"{m['op']} "
        right = m["right"]
        if m["left"] == {"meta": {"key": "l4proto"}}:
            right = _protocol_names(right)
        return f"{_text_left(m['left'])} {op}{_text_value(right)}"
    if "counter" in e:
        c = e["counter"]
        if isinstance(c, str):
            return f'counter name "{c}"'
        if c:
            return f"counter packets {c['packets']} bytes {c['bytes']}"
        return "counter"
    if "dup" in e:
        if "dev" in e["dup"]:
            return f'dup to {e["dup"]["addr"]} device "{e["dup"]["dev"]}"'
        addr = e["dup"]["addr"]
        # An address is a next hop (ip, ip6); anything else a device (netdev).
        return f"dup to {addr}" if _is_address(addr) else f'dup to "{addr}"'
    if "vmap" in e:
        v = e["vmap"]
        return f"{_text_left(v['key'])} vmap {{ {_map_items(v['key'], v['data']['set'])} }}"
    if "return" in e:
        return "return"
    if "jump" in e:
        return f"jump {e['jump']['target']}"
    raise ValueError(f"no text form for {e}")


def to_text(tables: dict[str, list[dict[str, Any]]], carry: Optional[Counts] = None) -> str:
    """nft's own syntax for the tables; with `carry`, the counters start there."""
    out: list[str] = []
    seeds = family_seeds(tables, carry, {}) if carry is not None else {}
    seeded_rules: set[tuple[str, str]] = set()
    for fam, objs in tables.items():
        chains = [o["chain"] for o in objs if "chain" in o]
        # In creation order, as batch() seeds them: the same rule each way.
        firsts = first_references(fam, objs, seeds, seeded_rules) if seeds else {}
        rules = _rules_by_chain(objs)
        out.append(f"table {fam} {TABLE} {{")
        for o in objs:
            if "counter" not in o:
                continue
            name = o["counter"]["name"]
            if carry is None:
                out.append(f"\tcounter {name} {{\n\t}}")
            else:
                packets, nbytes = seeds.get((fam, name), (0, 0))
                out.append(f"\tcounter {name} {{\n\t\tpackets {packets} bytes {nbytes}\n\t}}")
        for c in chains:
            out.append(f"\tchain {c['name']} {{")
            if "hook" in c:
                dev = f' device "{c["dev"]}"' if "dev" in c else ""
                out.append(f"\t\ttype {c['type']} hook {c['hook']}{dev} priority {c['prio']}; "
                           f"policy {c['policy']};")
            for r in rules.get(c["name"], ()):
                first = firsts.get(id(r))
                if first is None:
                    line = " ".join(_text_expr(e) for e in r["expr"])
                else:
                    at, (packets, nbytes) = first
                    parts = [_text_expr(e) for e in r["expr"]]
                    parts[at] = f"counter packets {packets} bytes {nbytes}"
                    line = " ".join(parts)
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
