"""The nftables backend: `dup to` rules in mirrord's own tables, one JSON transaction.

Both tables (see render) are deleted and re-created in one libnftables
batch: the kernel swaps the old rules for the new ones at commit, so there is
never a moment without rules, and a refused batch changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Optional

from ...plan import Plan
from ..base import ApplyError, Backend, Capabilities, Counts, Rendered
from ..libnft import NftSession
from .nfnetlink import dump_counters, ruleset_generation
from .render import FAMILIES, TABLE, batch, counter_key, render_tables, to_text

log = logging.getLogger("mirrord")


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


OWN_TABLES = frozenset((fam, TABLE) for fam in FAMILIES.values())


class NftablesBackend(Backend):
    name = "nftables"
    capabilities = Capabilities(
        versions=frozenset(FAMILIES),
        watch_tables=OWN_TABLES,
        event_driven=True,
        kernel_owner="nftables",
        removes=" and ".join(f"table {fam} {table}" for fam, table in sorted(OWN_TABLES)),
    )

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
                    key = counter_key(name)
                    if key:
                        p, b = out.get(key, (0, 0))
                        out[key] = (p + packets, b + nbytes)
                continue
            for o in self._list_counters(fam):
                c = o.get("counter")
                if c:
                    key = counter_key(c["name"])
                    if key:
                        p, b = out.get(key, (0, 0))
                        out[key] = (p + int(c.get("packets", 0)), b + int(c.get("bytes", 0)))
        return out

    def flush(self) -> None:
        cmds: list[dict[str, Any]] = []
        for fam, name in sorted(OWN_TABLES):
            cmds.append({"add": {"table": {"family": fam, "name": name}}})
            cmds.append({"delete": {"table": {"family": fam, "name": name}}})
        rc, _, err = self._json(cmds)
        if rc != 0:
            raise ApplyError(f"nftables refused to remove mirrord's tables: {err.strip()}")
