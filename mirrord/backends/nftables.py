"""nftables backend: `dup to` rules in mirrord's own tables, one JSON transaction.

nft 1.0.x cannot `dup` from an inet table, so mirrord owns `table ip mirrord`
and `table ip6 mirrord`. Both are deleted and re-created in one libnftables
batch: the kernel swaps the old rules for the new ones at commit, so there is
never a moment without rules, and a refused batch changes nothing.

Layout per table: base chains `prerouting` (mangle priority, before DNAT: the
packet as it arrived) and `postrouting` (after SNAT: the packet as it leaves)
dispatch by interface name through a verdict map to one chain per interface,
so the per-packet cost stays one hash lookup however many interfaces are
mirrored. Interface names (not indexes) are matched, so rules survive an
interface being deleted and re-created.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
from collections import Counter, defaultdict
from typing import Any, Optional

from ..match import PROTOCOL_NAMES, FamilyMatch, Network, PortRange
from ..plan import CloneRule, Plan
from .base import ApplyError, Backend, CounterKey, Counts, Rendered, comment
from .libnft import NftSession

log = logging.getLogger("mirrord")

TABLE = "mirrord"
TRACE_TABLE = "mirrord_trace"
FAMILIES = {4: "ip", 6: "ip6"}
PRIO_PREROUTING = -150  # mangle: after conntrack, before dstnat
PRIO_POSTROUTING = 300  # after srcnat: what actually leaves the interface

Expr = dict[str, Any]


# -- pure rendering ---------------------------------------------------------
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
    key = _counter_key(obj["counter"]["name"])
    packets, nbytes = carry.get(key, (0, 0)) if key else (0, 0)
    return {"counter": {**obj["counter"], "packets": packets, "bytes": nbytes}}


def _counter_key(name: str) -> Optional[CounterKey]:
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
                key = _counter_key(name)
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


# -- verification ----------------------------------------------------------------
def fingerprint(objs: Any) -> Counter[tuple[Any, ...]]:
    """What of a table nft lists exactly as it was given, as a multiset.

    Matches come back normalized (`meta l4proto udp th dport` lists as `udp
    dport`), so they are left out; a `dup ... device` lists as an ifindex
    once its device was re-created, so only the address counts. What is
    left still tells a flushed or deleted table, chain or rule apart, and
    which rule copies where.
    """
    out: Counter[tuple[Any, ...]] = Counter()
    for o in objs:
        if "table" in o:
            out["table", o["table"]["family"], o["table"]["name"]] += 1
        elif "counter" in o:
            c = o["counter"]
            out["counter", c["family"], c["table"], c["name"]] += 1
        elif "chain" in o:
            c = o["chain"]
            out["chain", c["family"], c["table"], c["name"], c.get("hook")] += 1
        elif "rule" in o:
            r = o["rule"]
            jumps: list[str] = []
            dups: list[str] = []
            counters: list[str] = []
            _collect(r.get("expr", []), jumps, dups, counters)
            out["rule", r["family"], r["table"], r["chain"], r.get("comment"),
                tuple(sorted(jumps)), tuple(dups), tuple(counters)] += 1
    return out


def _collect(e: Any, jumps: list[str], dups: list[str], counters: list[str]) -> None:
    if isinstance(e, list):
        for x in e:
            _collect(x, jumps, dups, counters)
    elif isinstance(e, dict):
        for k, v in e.items():
            if k == "jump" and isinstance(v, dict):
                jumps.append(str(v.get("target")))
            elif k == "dup" and isinstance(v, dict):
                dups.append(str(v.get("addr")))
            elif k == "counter" and isinstance(v, str):
                counters.append(v)
            else:
                _collect(v, jumps, dups, counters)


def _difference(want: Counter[tuple[Any, ...]], have: Counter[tuple[Any, ...]]) -> Optional[str]:
    if want == have:
        return None
    missing = sum((want - have).values())
    extra = sum((have - want).values())
    first = next(iter(want - have), None) or next(iter(have - want))
    return f"{missing} object(s) missing, {extra} unexpected (e.g. {' '.join(map(str, first[:4]))})"


def _rules_by_chain(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """chain -> its rules in order: one pass, not one scan of every rule per chain."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in objs:
        r = o.get("rule")
        if r:
            out[r["chain"]].append(r)
    return out


def _strip_volatile(o: Any) -> Any:
    """Drop what changes without anyone changing the rules: handles, counts."""
    if isinstance(o, dict):
        return {
            k: _strip_volatile(v)
            for k, v in o.items()
            if k not in ("handle", "packets", "bytes")
        }
    if isinstance(o, list):
        return [_strip_volatile(v) for v in o]
    return o


# -- the kernel ----------------------------------------------------------------
APPLY_ATTEMPTS = 3


class NftablesBackend(Backend):
    name = "nftables"

    def __init__(self) -> None:
        self._session: Optional[NftSession] = None
        # (generation, snapshot) of the last listing: unchanged generation,
        # unchanged tables (counts aside, which a snapshot leaves out).
        self._snapshot_at: Optional[tuple[int, str]] = None

    def _lib(self) -> NftSession:
        if self._session is None:
            self._session = NftSession.open()
        return self._session

    def _json(self, cmds: list[dict[str, Any]]) -> tuple[int, Any, str]:
        return self._lib().json(cmds)

    def unsupported(self) -> Optional[str]:
        try:
            self._lib()
        except (ImportError, OSError) as e:
            return str(e)  # open_nftables names the library's problem and the package
        probe: dict[str, Any] = {"family": "ip", "table": "mirrord_probe"}
        cmds: list[dict[str, Any]] = [
            {"add": {"table": {"family": "ip", "name": "mirrord_probe"}}},
            {"add": {"chain": {**probe, "name": "c"}}},
            {"add": {"rule": {**probe, "chain": "c", "expr": [{"dup": {"addr": "192.0.2.1"}}]}}},
        ]
        rc, err = self._lib().check(cmds)
        if rc != 0:
            if "Operation not permitted" in err:
                return "not permitted to change nftables (needs CAP_NET_ADMIN)"
            return ("the kernel refused an nftables dup rule (" + err.strip().splitlines()[0]
                    + "); install kmod-nft-dup-inet (OpenWrt) or a kernel with "
                    "CONFIG_NFT_DUP_IPV4/IPV6")
        return None

    def render(self, plan: Plan) -> Rendered:
        tables = render_tables(plan)
        return Rendered(text=to_text(tables), payload=tables)

    def apply(self, rendered: Rendered, carry: Counts) -> None:
        # The batch is built from a listing; a change landing between the
        # listing and the commit (a flush deleting the table the batch
        # flushes) makes the kernel refuse it. That is a race, not a refusal
        # of our rules: list again and retry while the listing keeps moving.
        for _ in range(APPLY_ATTEMPTS):
            existing = self._existing()
            if not existing and rendered.payload:
                rc, err = self._load_fresh(rendered, carry)
                if rc == 0:
                    return
                log.warning("nft refused the ruleset in its own syntax (%s); loading it as JSON",
                            err.strip().splitlines()[0] if err.strip() else rc)
            cmds = batch(rendered.payload, carry, existing)
            rc, _, err = self._json(cmds)
            if rc == 0:
                return
            if _strip_volatile(self._existing()) == _strip_volatile(existing):
                break
        raise ApplyError(
            f"nftables refused the ruleset: {err.strip()}\n"
            f"input: {json.dumps({'nftables': cmds})}"
        )

    def _load_fresh(self, rendered: Rendered, carry: Counts) -> tuple[int, str]:
        """Every table anew, in nft syntax: one transaction, like batch()'s.

        The add/delete pair first makes the batch replace a table that
        appeared since the listing instead of failing on it. A refusal here
        is answered by the JSON batch, whose error is the one reported.
        """
        head = "".join(f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n"
                       for fam in FAMILIES.values())
        rc, _, err = self._lib().text(head + to_text(rendered.payload, carry))
        return rc, err

    def _existing(self) -> dict[str, list[dict[str, Any]]]:
        existing = {}
        for fam in FAMILIES.values():
            objs = self._list(fam)
            if objs:
                existing[fam] = objs
        return existing

    def _list(self, fam: str) -> list[dict[str, Any]]:
        rc, out, _ = self._json([{"list": {"table": {"family": fam, "name": TABLE}}}])
        if rc != 0 or not out:
            return []
        data = out if isinstance(out, dict) else json.loads(out)
        return [o for o in data.get("nftables", []) if "metainfo" not in o]

    def snapshot(self) -> str:
        gen = ruleset_generation()
        if gen is not None and self._snapshot_at is not None and self._snapshot_at[0] == gen:
            return self._snapshot_at[1]
        objs: list[Any] = []
        for fam in FAMILIES.values():
            for o in self._list(fam):
                objs.append(_strip_volatile(o))
        snap = json.dumps(objs, sort_keys=True) if objs else ""
        # Only a listing that no commit overlapped stands for its generation:
        # listing thousands of mirrors costs seconds, asking the generation not.
        self._snapshot_at = (gen, snap) if gen is not None and gen == ruleset_generation() else None
        return snap

    def _list_counters(self, fam: str) -> list[dict[str, Any]]:
        """The named counters alone: listing whole tables for them costs seconds."""
        rc, out, _ = self._json([{"list": {"counters": {"family": fam, "table": TABLE}}}])
        if rc != 0 or not out:
            return []
        data = out if isinstance(out, dict) else json.loads(out)
        return [o for o in data.get("nftables", []) if "metainfo" not in o]

    def verify(self, rendered: Rendered, snapshot: str) -> Optional[str]:
        want = fingerprint(o for objs in rendered.payload.values() for o in objs)
        have = fingerprint(json.loads(snapshot) if snapshot else [])
        return _difference(want, have)

    def counters(self) -> Counts:
        out: Counts = {}
        for fam in FAMILIES.values():
            dumped = dump_counters(fam)
            if dumped is not None:
                for name, packets, nbytes in dumped:
                    key = _counter_key(name)
                    if key:
                        p, b = out.get(key, (0, 0))
                        out[key] = (p + packets, b + nbytes)
                continue
            for o in self._list_counters(fam):
                c = o.get("counter")
                if c:
                    key = _counter_key(c["name"])
                    if key:
                        p, b = out.get(key, (0, 0))
                        out[key] = (p + int(c.get("packets", 0)), b + int(c.get("bytes", 0)))
        return out

    def flush(self) -> None:
        cmds: list[dict[str, Any]] = []
        for fam, name in (("ip", TABLE), ("ip6", TABLE), ("inet", TRACE_TABLE)):
            cmds.append({"add": {"table": {"family": fam, "name": name}}})
            cmds.append({"delete": {"table": {"family": fam, "name": name}}})
        rc, _, err = self._json(cmds)
        if rc != 0:
            raise ApplyError(f"nftables refused to remove mirrord's tables: {err.strip()}")


NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3


def ruleset_generation() -> Optional[int]:
    """The kernel's nftables generation: it changes with every committed change.

    One small netlink round trip, where listing mirrord's tables costs
    seconds with thousands of mirrors. None when it cannot be read.
    """
    hdr = struct.Struct("=IHHII")
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           NETLINK_NETFILTER) as sock:
            sock.settimeout(1.0)
            sock.bind((0, 0))
            body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg, NFNETLINK_V0
            sock.send(hdr.pack(hdr.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                               1, 1, 0) + body)  # NLM_F_REQUEST, seq 1
            buf = sock.recv(4096)
    except OSError:
        return None
    offset = 0
    while offset + hdr.size <= len(buf):
        length, kind, _flags, seq, _pid = hdr.unpack_from(buf, offset)
        if length < hdr.size:
            return None
        if seq == 1 and kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            pos, end = offset + hdr.size + 4, offset + length  # after nfgenmsg
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", buf, pos)
                if alen < 4:
                    break
                if akind & 0x3FFF == NFTA_GEN_ID and alen >= 8:
                    return int(struct.unpack_from("!I", buf, pos + 4)[0])
                pos += (alen + 3) & ~3
            return None
        if kind == NLMSG_ERROR:
            return None
        offset += (length + 3) & ~3
    return None


NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2
NFPROTO = {"ip": 2, "ip6": 10}


def _nlattrs(buf: bytes, pos: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while pos + 4 <= end:
        alen, akind = struct.unpack_from("=HH", buf, pos)
        if alen < 4:
            break
        out[akind & 0x3FFF] = buf[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    return out


def dump_counters(fam: str) -> Optional[list[tuple[str, int, int]]]:
    """(name, packets, bytes) of every named counter in mirrord's `fam` table.

    One netlink dump of the counter objects: libnftables fetches and prints
    the whole table for `list counters`, seconds with thousands of mirrors,
    and every status asks. None when the dump cannot be made (the caller
    asks libnftables instead); [] when there is no such table.
    """
    hdr = struct.Struct("=IHHII")
    table = TABLE.encode() + b"\0"
    attrs = (struct.pack("=HH", 4 + len(table), NFTA_OBJ_TABLE) + table
             + b"\0" * (-len(table) % 4)
             + struct.pack("=HH", 8, NFTA_OBJ_TYPE) + struct.pack("!I", NFT_OBJECT_COUNTER))
    body = struct.pack("=BBH", NFPROTO[fam], 0, 0) + attrs
    out: list[tuple[str, int, int]] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           NETLINK_NETFILTER) as sock:
            sock.settimeout(5.0)
            sock.bind((0, 0))
            sock.send(hdr.pack(hdr.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
                               0x301, 1, 0) + body)  # NLM_F_REQUEST | NLM_F_DUMP, seq 1
            while True:
                buf = sock.recv(1 << 20)
                pos = 0
                while pos + hdr.size <= len(buf):
                    length, kind, _flags, seq, _pid = hdr.unpack_from(buf, pos)
                    if length < hdr.size:
                        return None
                    start, end = pos + hdr.size, pos + length
                    pos += (length + 3) & ~3
                    if seq != 1:
                        continue
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", buf, start)[0]
                        if code:
                            return None
                        continue
                    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
                        continue
                    a = _nlattrs(buf, start + 4, end)  # after nfgenmsg
                    if a.get(NFTA_OBJ_TABLE, b"").rstrip(b"\0") != TABLE.encode():
                        continue
                    data = a.get(NFTA_OBJ_DATA)
                    name = a.get(NFTA_OBJ_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
                    if data is None or not name:
                        continue
                    d = _nlattrs(data, 0, len(data))
                    nbytes = d.get(NFTA_COUNTER_BYTES, b"")
                    packets = d.get(NFTA_COUNTER_PACKETS, b"")
                    out.append((name,
                                struct.unpack("!Q", packets)[0] if len(packets) == 8 else 0,
                                struct.unpack("!Q", nbytes)[0] if len(nbytes) == 8 else 0))
    except OSError:
        return None
