"""The rules a trace event names, as the output shows them.

An event names a rule by (family, table, chain, handle) only. `RuleBook` lists
each table once (`nft -a -s list table`, cached until the ruleset changes) for
the rule's text, and reads mirrord's own rule comments ("mirrord <mirror>
<in|out>") and dup statements for which mirror copied the packet, and where to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from ...backends.libnft import NftSession

MIRRORD_TABLE = "mirrord"


@dataclass(frozen=True)
class MirrorHit:
    mirror: str
    direction: str
    to: Optional[str] = None
    device: Optional[str] = None

    def text(self) -> str:
        s = f"mirror {self.mirror} {self.direction}"
        if self.to:
            s += f": copied to {self.to}" + (f" via {self.device}" if self.device else "")
        return s

    def as_json(self) -> dict[str, Any]:
        return {"mirror": self.mirror, "direction": self.direction, "to": self.to,
                "device": self.device}


@dataclass(frozen=True)
class RuleInfo:
    text: Optional[str]
    mirror: Optional[MirrorHit] = None


RULE_LINE = re.compile(r"^(.*\S)\s+# handle (\d+)$")
CHAIN_LINE = re.compile(r'^chain ("(?:[^"\\]|\\.)*"|\S+) \{')
CHAIN_PROPS = ("type ", "policy ", "comment ", "devices ", "flags ")


def _listed_text(nft: NftSession, family: str, table: str) -> str:
    """The table in nft syntax, with handles and without counts ("" when it is gone)."""
    rc, out, _ = nft.text(f"list table {family} {table}", handles=True, stateless=True)
    return out if rc == 0 else ""


def rules_from_text(listing: str) -> dict[tuple[str, int], str]:
    """(chain, handle) -> rule text from `nft -a -s list table` output."""
    out: dict[tuple[str, int], str] = {}
    chain: Optional[str] = None
    pending: list[str] = []
    for raw in listing.splitlines():
        line = raw.strip()
        m = CHAIN_LINE.match(line)
        if m:
            chain = m.group(1).strip('"')
            pending = []
            continue
        if chain is None:
            continue
        if line == "}":
            chain, pending = None, []
            continue
        if not line or (not pending and line.startswith(CHAIN_PROPS)):
            continue
        m = RULE_LINE.match(line)
        if m:
            out[(chain, int(m.group(2)))] = " ".join([*pending, m.group(1)])
            pending = []
        else:
            # Long anonymous sets may wrap onto following lines.
            pending.append(line)
    return out


def mirror_hit(rule: dict[str, Any]) -> Optional[MirrorHit]:
    """The mirror a daemon rule belongs to, from its comment "mirrord <mirror> <in|out>"."""
    from ...backends.base import parse_comment

    key = parse_comment(str(rule.get("comment", "")))
    if key is None:
        return None
    to: Optional[str] = None
    dev: Optional[str] = None
    for e in rule.get("expr", []):
        if isinstance(e, dict) and "dup" in e:
            d = e["dup"] or {}
            to = str(d["addr"]) if "addr" in d else None
            dev = str(d["dev"]) if "dev" in d else None
    return MirrorHit(key[0], key[1], to, dev)


class RuleBook:
    """Looks rules up by (family, table, chain, handle), cached until the ruleset changes."""

    def __init__(self, nft: Optional[NftSession]) -> None:
        self.nft = nft
        self.tables: dict[tuple[str, str], dict[tuple[str, int], RuleInfo]] = {}

    def invalidate(self) -> None:
        self.tables.clear()

    def load(self, family: str, table: str) -> dict[tuple[str, int], RuleInfo]:
        cached = self.tables.get((family, table))
        if cached is not None:
            return cached
        infos: dict[tuple[str, int], RuleInfo] = {}
        if self.nft is not None:
            texts = rules_from_text(_listed_text(self.nft, family, table))
            hits: dict[tuple[str, int], MirrorHit] = {}
            if table == MIRRORD_TABLE:
                for o in self.nft.list_table(family, table) or []:
                    r = o.get("rule")
                    if r and "handle" in r:
                        hit = mirror_hit(r)
                        if hit:
                            hits[(str(r["chain"]), int(r["handle"]))] = hit
            for key in set(texts) | set(hits):
                infos[key] = RuleInfo(texts.get(key), hits.get(key))
        self.tables[(family, table)] = infos
        return infos

    def lookup(self, family: str, table: str, chain: str, handle: int) -> RuleInfo:
        info = self.load(family, table).get((chain, handle))
        return info or RuleInfo(None)
