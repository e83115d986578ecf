"""The nftables backend: `dup to` rules in mirrord's own tables, one JSON transaction.

Both tables (see render) are deleted and re-created in one libnftables
batch: the kernel swaps the old rules for the new ones at commit, so there is
never a moment without rules, and a refused batch changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, Optional

from ...plan import FrameSupport, Plan
from ..base import ApplyError, Backend, Capabilities, CounterKey, Counts, Rendered
from ..libnft import NftSession
from .netdev import FAMILY as NETDEV
from .netdev import PRIO_NETDEV
from .nfnetlink import dump_counters, ruleset_generation
from .render import TABLE, TABLE_FAMILIES, batch, counter_key
from .tables import bindings, render_tables
from .text import to_text

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
PROBE_AGAIN = 30.0  # seconds between asking a kernel that could not copy frames again


OWN_TABLES = frozenset((fam, TABLE) for fam in TABLE_FAMILIES)


class NftablesBackend(Backend):
    name = "nftables"
    capabilities = Capabilities(
        versions=frozenset({4, 6}),
        watch_tables=OWN_TABLES,
        event_driven=True,
        kernel_owner="nftables",
        removes=" and ".join(f"table {fam} {table}" for fam, table in sorted(OWN_TABLES)),
        delivery_counters=True,
        counted_deletes=True,
    )

    def __init__(self) -> None:
        self._session: Optional[NftSession] = None
        # (generation, snapshot) of the last listing: unchanged generation,
        # unchanged tables (counts aside, which a snapshot leaves out).
        self._snapshot_at: Optional[tuple[int, str]] = None
        self._frames: Optional[tuple[float, FrameSupport]] = None  # (when asked, answer)
        self._ranges: Optional[bool] = None
        # What the last applied rules were bound to (see Rendered.binds).
        self._binds: Optional[tuple[tuple[str, int], ...]] = None

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

    def frame_support(self) -> FrameSupport:
        """Asked of the kernel with rules it checks and never keeps: once when it
        can, again at most every PROBE_AGAIN s when it cannot (a module may be
        installed meanwhile; OpenWrt loads kmods on install)."""
        now = time.monotonic()
        if self._frames is None or (self._frames[1] != FrameSupport() and
                                    now - self._frames[0] >= PROBE_AGAIN):
            ingress = self._probe_netdev("ingress")
            egress = ingress or self._probe_netdev("egress")
            self._frames = (now, FrameSupport(ingress, egress))
        return self._frames[1]

    def _probe_netdev(self, hook: str) -> str:
        try:
            lib = self._lib()
        except (ImportError, OSError) as e:
            return str(e)
        t: dict[str, Any] = {"family": NETDEV, "table": "mirrord_probe"}
        rc, err = lib.check([
            {"add": {"table": {"family": NETDEV, "name": "mirrord_probe"}}},
            {"add": {"chain": {**t, "name": "c", "type": "filter", "hook": hook,
                               "prio": PRIO_NETDEV, "dev": "lo", "policy": "accept"}}},
            {"add": {"rule": {**t, "chain": "c", "expr": [{"dup": {"addr": "lo"}}]}}},
        ])
        if rc == 0:
            return ""
        first = err.strip().splitlines()[0] if err.strip() else f"error {rc}"
        if "Operation not permitted" in err:
            return "not permitted to change nftables (needs CAP_NET_ADMIN)"
        if hook == "egress":
            return (f"the kernel has no netdev egress hook ({first}): copies of sent frames need "
                    "Linux 5.16 or later with CONFIG_NETFILTER_EGRESS")
        return (f"the kernel refused an nftables netdev dup rule ({first}); install "
                "kmod-nft-netdev (OpenWrt) or a kernel with CONFIG_NF_TABLES_NETDEV and "
                "CONFIG_NF_DUP_NETDEV")

    def _interval_maps(self) -> bool:
        """Whether the kernel takes port ranges in concatenated map keys (Linux 5.6+;
        OpenWrt 21.02 runs 5.4), asked once with a map it checks and never keeps."""
        if self._ranges is None:
            t: dict[str, Any] = {"family": "ip", "table": "mirrord_probe"}
            key = {"concat": [{"meta": {"key": "l4proto"}},
                              {"payload": {"protocol": "th", "field": "dport"}}]}
            vmap = {"vmap": {"key": key, "data": {"set": [
                [{"concat": [17, {"range": [1000, 2000]}]}, {"jump": {"target": "d"}}]]}}}
            try:
                rc, err = self._lib().check([
                    {"add": {"table": {"family": "ip", "name": "mirrord_probe"}}},
                    {"add": {"chain": {**t, "name": "c"}}}, {"add": {"chain": {**t, "name": "d"}}},
                    {"add": {"rule": {**t, "chain": "c", "expr": [vmap]}}}])
            except (ImportError, OSError):
                return True  # nothing is applied without the library anyway
            if rc != 0 and "Operation not permitted" in err:
                return True  # not an answer (`mirrord render` as a user): assume a new kernel
            self._ranges = rc == 0
            if rc != 0:
                log.info("the kernel takes no port ranges in verdict maps (%s): mirrors with "
                         "port ranges stay one rule each", err.strip().splitlines()[0] if err
                         else rc)
        return self._ranges

    def render(self, plan: Plan) -> Rendered:
        ranges = self._interval_maps() if plan.clones or plan.frames else True
        tables = render_tables(plan, ranges)
        return Rendered(text=to_text(tables), payload=tables, binds=bindings(plan))

    def apply(self, rendered: Rendered, carry: Counts) -> None:
        # The batch is built from a listing; a change landing between the
        # listing and the commit (a flush deleting the table the batch
        # flushes) makes the kernel refuse it. That is a race, not a refusal
        # of our rules: list again and retry while the listing keeps moving.
        # Rules bound to devices that were made again are loaded anew.
        for _ in range(APPLY_ATTEMPTS):
            existing = self._existing()
            renew = self._renew(rendered, existing)
            if not existing and rendered.payload:
                rc, err = self._load_fresh(rendered, carry)
                if rc == 0:
                    self._binds = rendered.binds
                    return
                log.warning("nft refused the ruleset in its own syntax (%s); loading it as JSON",
                            err.strip().splitlines()[0] if err.strip() else rc)
            cmds = batch(rendered.payload, carry, existing, renew)
            rc, _, err = self._json(cmds)
            if rc == 0:
                self._binds = rendered.binds
                return
            if _strip_volatile(self._existing()) == _strip_volatile(existing):
                break
        raise ApplyError(
            f"nftables refused the ruleset: {err.strip()}\n"
            f"input: {json.dumps({'nftables': cmds})}"
        )

    def _renew(self, rendered: Rendered, existing: dict[str, list[dict[str, Any]]]
               ) -> frozenset[str]:
        """The families to delete and make again in the batch: none, except
        netdev on a kernel whose base chains may outlive their device.

        Everywhere else the netdev table is refilled in place: every rule is
        loaded again, which binds each `dup to` to the device of its name now,
        and a base chain either died with its device (before Linux 6.14: the
        batch adds it again) or follows its name (6.16+). Replacing base
        chains hooks the old and the new at once for a moment, and a frame
        crossing then is copied twice (seen on 6.18 at a restart and at a
        reload adding a device). On 6.14 and 6.15 a base chain whose device
        was made again stays, bound to nothing: the table is made again when
        a device it binds to changed, or when nothing says what it was bound
        to (a restart adopting the table the last daemon left)."""
        if NETDEV not in existing or not _chains_may_lose_device():
            return frozenset()
        if self._binds is None:
            return frozenset({NETDEV})
        was = dict(self._binds)
        if any(was.get(name, index) != index for name, index in rendered.binds):
            return frozenset({NETDEV})
        return frozenset()

    def _load_fresh(self, rendered: Rendered, carry: Counts) -> tuple[int, str]:
        """Every table anew, in nft syntax: one transaction, like batch()'s.

        The add/delete pair first makes the batch replace a table that
        appeared since the listing instead of failing on it. A refusal here
        is answered by the JSON batch, whose error is the one reported.
        """
        head = "".join(f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n"
                       for fam in TABLE_FAMILIES if fam in rendered.payload or fam != NETDEV)
        rc, _, err = self._lib().text(head + to_text(rendered.payload, carry))
        return rc, err

    def _existing(self) -> dict[str, list[dict[str, Any]]]:
        existing = {}
        for fam in TABLE_FAMILIES:
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
        for fam in TABLE_FAMILIES:
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
        for fam in TABLE_FAMILIES:
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

    def named_counter(self, name: str) -> Optional[CounterKey]:
        return counter_key(name)

    def flush(self) -> None:
        cmds: list[dict[str, Any]] = []
        for fam, name in sorted(OWN_TABLES):
            if fam == NETDEV and not self._list(fam):
                continue  # a kernel without the netdev family refuses even its delete
            cmds.append({"add": {"table": {"family": fam, "name": name}}})
            cmds.append({"delete": {"table": {"family": fam, "name": name}}})
        rc, _, err = self._json(cmds)
        if rc != 0:
            raise ApplyError(f"nftables refused to remove mirrord's tables: {err.strip()}")


def _chains_may_lose_device() -> bool:
    """Linux 6.14 and 6.15 keep a netdev base chain whose device went away,
    bound to nothing, and do not bind it again: its listing cannot be trusted."""
    import platform

    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return True
    return (major, minor) in ((6, 14), (6, 15))
