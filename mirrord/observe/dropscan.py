"""Which firewall rule drops mirrord's copies on their way out (pure).

When a delivery point (plan.delivery) counts fewer copies leaving than its
rules copied, something between the copy and the point dropped them: almost
always a rule of the output or postrouting hooks, such as fw4's zone output
policy REJECT towards the collector's zone. This walks those hooks in the
order the kernel runs them, with what is known of a copy (the device it
leaves through, conntrack state, protocol, address), and names the first rule
that drops it: certainly, or possibly where a match cannot be evaluated here
(named sets, marks, limits). The ruleset is libnftables JSON, as `nft -j
list ruleset` prints it, without mirrord's own tables.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Optional

HOOK_ORDER = ("output", "postrouting")
MAX_DEPTH = 16  # nft refuses deeper jump stacks; a malformed input must not recurse for ever


@dataclass(frozen=True)
class Copy:
    """What is known of a copy when it crosses output and postrouting; None: unknown."""

    version: int
    oifname: Optional[str]
    ct_state: Optional[str] = None  # "untracked" for clones
    l4proto: Optional[int] = None
    daddr: Optional[str] = None
    dport: Optional[int] = None


@dataclass(frozen=True)
class Culprit:
    family: str
    table: str
    chain: str
    handle: Optional[int]  # None: the base chain's policy
    verdict: str  # "drop", "reject" or "policy drop"
    certain: bool  # False: a match on the way could not be evaluated
    comment: str = ""

    @property
    def zone(self) -> Optional[str]:
        """The fw4 zone whose chain holds the rule (fw4 names them so)."""
        if self.table != "fw4":
            return None
        m = re.match(r"^(?:output|reject_to|drop_to|srcnat)_(.+)$", self.chain)
        return m.group(1) if m else None

    def describe(self) -> str:
        where = f"table {self.family} {self.table} chain {self.chain}"
        what = (f"{where} policy drop" if self.handle is None
                else f"{where} rule handle {self.handle} ({self.verdict})")
        if self.comment:
            what += f' "{self.comment}"'
        if self.zone:
            what += f" (fw4 zone {self.zone})"
        return what if self.certain else f"probably {what}"


def find_drop(ruleset: dict[str, Any], copy: Copy, below: int,
              hooks: tuple[str, ...] = HOOK_ORDER) -> Optional[Culprit]:
    """The first rule of `hooks` (base chains below priority `below`) that
    drops `copy`, or None."""
    objs = [o for o in ruleset.get("nftables", []) if isinstance(o, dict)]
    families = ("ip" if copy.version == 4 else "ip6", "inet")
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    rules: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for o in objs:
        c, r = o.get("chain"), o.get("rule")
        if isinstance(c, dict) and c.get("family") in families:
            chains[(c["family"], c.get("table", ""), c.get("name", ""))] = c
        if isinstance(r, dict) and r.get("family") in families:
            rules.setdefault((r["family"], r.get("table", ""), r.get("chain", "")), []).append(r)
    bases = [(HOOK_ORDER.index(c["hook"]), _prio(c), key) for key, c in chains.items()
             if c.get("hook") in hooks and _prio(c) < below]
    maybe: Optional[Culprit] = None
    for _, _, key in sorted(bases):
        walker = _Walker(copy, chains, rules)
        verdict, culprit = walker.chain(key, 0, True)
        if verdict == "drop" and culprit is not None:
            return culprit
        if culprit is not None and maybe is None:
            maybe = culprit
        if verdict == "continue" and chains[key].get("policy") == "drop":
            return Culprit(key[0], key[1], key[2], None, "policy drop", walker.certain)
    return maybe


def _prio(c: dict[str, Any]) -> int:
    p = c.get("prio", 0)
    return p if isinstance(p, int) else 0


class _Walker:
    def __init__(self, copy: Copy, chains: dict[tuple[str, str, str], dict[str, Any]],
                 rules: dict[tuple[str, str, str], list[dict[str, Any]]]) -> None:
        self.copy, self.chains, self.rules = copy, chains, rules
        self.certain = True
        self.maybe: Optional[Culprit] = None

    def chain(self, key: tuple[str, str, str], depth: int,
              sure: bool) -> tuple[str, Optional[Culprit]]:
        """("accept" | "drop" | "continue", the culprit or a possible one)."""
        if depth > MAX_DEPTH:
            return "continue", self.maybe
        for r in self.rules.get(key, []):
            exprs = r.get("expr") or []
            matched = _matches(exprs, self.copy)
            if matched is False:
                continue
            definite = sure and matched is True
            verdict, target = _verdict(exprs, self.copy)
            if verdict in ("drop", "reject"):
                culprit = Culprit(key[0], key[1], key[2], r.get("handle"), verdict, definite,
                                  str(r.get("comment") or ""))
                if definite:
                    return "drop", culprit
                self.maybe = self.maybe or culprit
                self.certain = False
            elif verdict == "accept":
                if definite:
                    return "accept", self.maybe
                self.certain = False
            elif verdict in ("jump", "goto") and target:
                sub, found = self.chain((key[0], key[1], target), depth + 1, definite)
                if sub in ("drop", "accept") and definite:
                    return sub, found
                if sub != "continue":
                    self.certain = False
                if verdict == "goto" and definite:
                    return "continue", self.maybe
            elif verdict == "return" and definite:
                return "continue", self.maybe
            elif verdict == "unknown":
                self.certain = False
        return "continue", self.maybe


def _verdict(exprs: list[Any], copy: Copy) -> tuple[str, Optional[str]]:
    for e in exprs:
        if not isinstance(e, dict):
            continue
        found = _plain_verdict(e)
        if found is not None:
            return found
        if "queue" in e:
            return "unknown", None
        if "vmap" in e and isinstance(e["vmap"], dict):
            return _vmap(e["vmap"], copy)
    return "", None


def _plain_verdict(e: dict[str, Any]) -> Optional[tuple[str, Optional[str]]]:
    """An expression's verdict (or a map element's): (name, jump target)."""
    for v in ("accept", "drop", "reject", "return"):
        if v in e:
            return v, None
    for v in ("jump", "goto"):
        if v in e and isinstance(e[v], dict):
            return v, str(e[v].get("target", ""))
    return None


def _vmap(vm: dict[str, Any], copy: Copy) -> tuple[str, Optional[str]]:
    value = _value_of(vm.get("key"), copy)
    data = vm.get("data")
    items = data.get("set") if isinstance(data, dict) else None
    if value is None or not isinstance(items, list):
        return "unknown", None
    for item in items:
        if isinstance(item, list) and len(item) == 2 and _equal(item[0], value):
            found = _plain_verdict(item[1]) if isinstance(item[1], dict) else None
            return found or ("unknown", None)
    return "", None


def _matches(exprs: list[Any], copy: Copy) -> Optional[bool]:
    """True, False, or None (some match could not be evaluated)."""
    result: Optional[bool] = True
    for e in exprs:
        if not isinstance(e, dict):
            continue
        if "match" in e and isinstance(e["match"], dict):
            m = _match(e["match"], copy)
        elif any(k in e for k in ("limit", "quota", "ct count", "xt")):
            m = None
        else:
            continue
        if m is False:
            return False
        if m is None:
            result = None
    return result


def _value_of(left: Any, copy: Copy) -> Any:
    """What the copy holds for an expression's left side (None: unknown)."""
    if not isinstance(left, dict):
        return None
    if "meta" in left and isinstance(left["meta"], dict):
        key = left["meta"].get("key")
        if key in ("oifname", "oif"):
            return copy.oifname
        if key == "nfproto":
            return "ipv4" if copy.version == 4 else "ipv6"
        if key == "l4proto":
            return copy.l4proto
        return None
    if "payload" in left and isinstance(left["payload"], dict):
        proto, field = left["payload"].get("protocol"), left["payload"].get("field")
        if field == "daddr" and proto in ("ip", "ip6"):
            return copy.daddr if proto == ("ip" if copy.version == 4 else "ip6") else None
        if field in ("protocol", "nexthdr") and proto in ("ip", "ip6"):
            return copy.l4proto
        if field == "dport" and proto in ("udp", "th"):
            return copy.dport if copy.l4proto == 17 or proto == "th" else None
        return None
    if "ct" in left and isinstance(left["ct"], dict) and left["ct"].get("key") == "state":
        return copy.ct_state
    return None


_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "gre": 47, "ipv6-icmp": 58, "icmpv6": 58,
              "sctp": 132, "esp": 50, "ah": 51}


def _match(m: dict[str, Any], copy: Copy) -> Optional[bool]:
    left = m.get("left")
    value = _value_of(left, copy)
    if value is None:
        return None
    right, op = m.get("right"), m.get("op", "==")
    is_ct = isinstance(left, dict) and "ct" in left
    if is_ct:
        states = right.get("set") if isinstance(right, dict) else right
        wanted = set(states) if isinstance(states, list) else {states}
        hit: Optional[bool] = value in wanted
    elif isinstance(right, dict) and "set" in right and isinstance(right["set"], list):
        hits = [_equal(r, value) for r in right["set"]]
        hit = True if True in hits else (None if None in hits else False)
    elif isinstance(right, str) and right.startswith("@"):
        return None  # a named set: not evaluated here
    else:
        hit = _equal(right, value)
    if hit is None:
        return None
    if op in ("==", "in"):
        return hit
    if op == "!=":
        return not hit
    return None


def _equal(right: Any, value: Any) -> Optional[bool]:
    if isinstance(value, str) and isinstance(right, str):
        if value.count(".") == 3 or ":" in value:
            try:
                return ipaddress.ip_address(value) == ipaddress.ip_address(right)
            except ValueError:
                pass
        return fnmatch.fnmatchcase(value, right) if right.endswith("*") else value == right
    if isinstance(value, str) and isinstance(right, dict) and "prefix" in right:
        p = right["prefix"]
        try:
            net = ipaddress.ip_network(f"{p['addr']}/{p['len']}", strict=False)
            return ipaddress.ip_address(value) in net
        except (ValueError, KeyError, TypeError):
            return None
    if isinstance(value, str) and isinstance(right, dict) and "range" in right:
        return None
    if isinstance(value, int):
        if isinstance(right, str):
            right = _PROTOCOLS.get(right, right)
        if isinstance(right, dict) and "range" in right:
            lo, hi = right["range"]
            return isinstance(lo, int) and isinstance(hi, int) and lo <= value <= hi
        return right == value if isinstance(right, int) else None
    return None
