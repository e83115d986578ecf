"""The status document the daemon serves, and its human and Prometheus renderings."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .daemon import Daemon


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def build_status(d: Daemon) -> dict[str, Any]:
    counts = d.counts()
    tzsp = d.tzsp_counts()
    mirrors: list[dict[str, Any]] = []
    for mp in d.plan.mirrors if d.plan else ():
        m = mp.mirror
        per_dir = {
            way: {"packets": counts.get((m.name, way), (0, 0))[0],
                  "bytes": counts.get((m.name, way), (0, 0))[1]}
            for way in m.directions
        }
        tp, tb = tzsp.get(m.name, (0, 0))
        packets = sum(v["packets"] for v in per_dir.values()) + tp
        nbytes = sum(v["bytes"] for v in per_dir.values()) + tb
        rec = d.records.get(m.name)
        heal = rec.last_change if rec else None
        workers = []
        for w in d.workers.values():
            if w.tap.mirror != m.name:
                continue
            c = w.handle.counters()
            workers.append({
                "interface": w.tap.interface, "pid": getattr(w.handle, "pid", None),
                "running": w.exited is None, "exit_reason": w.exited,
                **{k: getattr(c, k) for k in
                   ("captured", "sent", "bytes", "ring_drops", "send_errors", "truncated")
                   if hasattr(c, k)},
            })
        mirrors.append({
            "name": m.name,
            "state": mp.state,
            "reason": mp.reason,
            "transport": mp.transport,
            "interfaces": list(m.interfaces),
            "direction": m.direction,
            "match": m.match.describe(),
            "collector": {
                "name": mp.collector.name,
                "address": str(mp.collector.address),
                "reach": mp.reach.describe() if mp.reach else None,
            },
            "packets": packets,
            "bytes": nbytes,
            "directions": per_dir if mp.transport == "clone" else {},
            "taps": [{"interface": t.interface, "direction": t.direction, "state": t.state,
                      "reason": t.reason} for t in mp.taps],
            "tzsp": workers,
            "last_heal": {"when": _iso(heal.when), "why": heal.why} if heal else None,
        })
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started": _iso(d.started),
        "config": d.spec.path,
        "backend": d.backend.name if d.backend else None,
        "backend_error": d.backend_error or None,
        "summary": d.summary(),
        "applies": d.applies,
        "reapplies": d.reapplies,
        "mirrors": mirrors,
    }


def all_active(status: dict[str, Any]) -> bool:
    return all(m.get("state") == "active" for m in status.get("mirrors", []))


def _human_count(n: int) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n}{unit}"
        n //= 1000
    return f"{n}P"


def format_table(status: dict[str, Any]) -> str:
    lines = [
        f"mirrord {status.get('version')} pid {status.get('pid')}, backend "
        f"{status.get('backend') or 'none'}, {status.get('summary')}, "
        f"reapplies {status.get('reapplies')}",
    ]
    if status.get("backend_error"):
        lines.append(f"backend: {status['backend_error']}")
    rows = [("MIRROR", "STATE", "TRANSPORT", "PACKETS", "BYTES", "COLLECTOR", "DETAIL")]
    for m in status.get("mirrors", []):
        detail = m.get("reason") or ""
        heal = m.get("last_heal")
        if heal and not detail:
            detail = f"last heal {heal['when']}: {heal['why']}"
        rows.append((
            m["name"], m["state"], m.get("transport") or "-", str(m["packets"]),
            _human_count(m["bytes"]) + "B",
            f"{m['collector']['address']} ({m['collector'].get('reach') or '?'})", detail,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)
