"""The status document the daemon serves, and its human and Prometheus renderings."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

from .. import __version__
from .delivery import Delivery, DeliveryMeter, why_dropped
from .document import (
    TZSP_COUNTERS,
    CollectorRow,
    DeliveryRow,
    DirectionCount,
    MemberRow,
    MirrorRow,
    MirrorState,
    Rate,
    StatusDocument,
    TzspRow,
)

if TYPE_CHECKING:  # the `mirrord status` client needs none of the daemon's modules
    from ..backends.base import Counts
    from ..netlink.topology import Reach
    from ..plan import MirrorPlan
    from ..plan.groups import Group
    from ..reconcile.snapshot import Reading, Snapshot
    from ..spec import Collector


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


RATE_MIN_INTERVAL = 0.5  # seconds; a shorter interval gives noise, not a rate
RATE_MAX_AGE = 300.0


class RateMeter:
    """Packets/s and bytes/s per mirror since the previous status query.

    The daemon takes no samples on its own (it never wakes without a
    reason): a monitor that polls every N seconds gets the rate over N.
    """

    def __init__(self) -> None:
        self._sample: Optional[tuple[float, dict[str, tuple[int, int]]]] = None

    def rates(self, now: float, totals: dict[str, tuple[int, int]]) -> dict[str, Rate]:
        prev = self._sample
        out: dict[str, Rate] = {}
        if prev is not None and RATE_MIN_INTERVAL <= now - prev[0] <= RATE_MAX_AGE:
            dt = now - prev[0]
            for name, (p, b) in totals.items():
                pp, pb = prev[1].get(name, (p, b))
                out[name] = {"interval": round(dt, 3), "pps": round(max(0, p - pp) / dt, 2),
                             "bps": round(max(0, b - pb) * 8 / dt, 1)}
        if prev is None or now - prev[0] >= RATE_MIN_INTERVAL:
            self._sample = (now, totals)
        return out


def build_status(snap: Snapshot, reading: Optional[Reading], meter: RateMeter,
                 delivery: Optional[DeliveryMeter] = None) -> StatusDocument:
    """The status document from what the reconciler produced and the counters now.
    `delivery`: the meter that keeps the previous query's delivery counts."""
    from .health import Finding, delivery_findings, offload_findings, plan_findings, tzsp_findings

    counts = reading.clones if reading else {}
    points = snap.plan.deliveries if snap.plan and reading else ()
    deliveries = (delivery or DeliveryMeter()).assess(points, counts, time.time(), snap.started,
                                                      snap.applies + snap.reapplies,
                                                      mono=time.monotonic())
    tzsp = reading.tzsp if reading else {}
    taps = reading.taps if reading else ()
    mirror_plans = snap.plan.mirrors if snap.plan else ()
    totals: dict[str, tuple[int, int]] = {}
    for mp in mirror_plans:
        name = mp.mirror.name
        tp, tb = tzsp.get(name, (0, 0))
        cp = sum(counts.get((name, w), (0, 0))[0] for w in mp.mirror.directions)
        cb = sum(counts.get((name, w), (0, 0))[1] for w in mp.mirror.directions)
        totals[name] = (cp + tp, cb + tb)
    rates = meter.rates(time.monotonic(), totals)
    mirrors: list[MirrorRow] = []
    for mp in mirror_plans:
        m = mp.mirror
        per_dir: dict[str, DirectionCount] = {
            way: {"packets": counts.get((m.name, way), (0, 0))[0],
                  "bytes": counts.get((m.name, way), (0, 0))[1]}
            for way in m.directions
        }
        heal = snap.heals.get(m.name)
        workers: list[TzspRow] = []
        for t in taps:
            if t.mirror != m.name:
                continue
            # pid: the capture process every tap shares; state: this tap's own.
            row: TzspRow = {"interface": t.interface, "id": t.id, "pid": t.pid, "state": t.state,
                            "running": t.running, "exit_reason": t.exit_reason,
                            "restart_in": t.restart_in, "member": t.member}
            for k in TZSP_COUNTERS:
                if k in t.counters:
                    row[k] = t.counters[k]
            workers.append(row)
        state: MirrorState = mp.state
        reason = mp.reason
        if mp.transport == "tzsp" and state in ("active", "degraded"):
            state, reason = tzsp_state(state, reason, workers, mp.collector.where())
        kernel = mp.kernel_copies
        through = [d for d in deliveries.values() if any(f[0] == m.name for f in d.point.feeds)
                   or (mp.group is not None and mp.collector.name in d.point.collectors)]
        dropped = [d for d in through if d.verdict == "dropped"]
        if dropped and state == "active":
            state = "degraded"
            reason = "; ".join(why_dropped(d, mp.collector.name, _device_of(mp)) for d in dropped)
        if snap.apply_error and kernel:
            # The kernel refused the last apply: what runs may not be this plan.
            state, reason = "error", f"rules could not be applied: {snap.apply_error}"
        mirrors.append({
            "name": m.name,
            "state": state,
            "reason": reason,
            "transport": mp.transport,
            "interfaces": list(m.interfaces),
            "direction": m.direction,
            "match": m.match.describe(),
            "collector": _collector_row(mp.collector, mp.reach),
            "packets": totals[m.name][0],
            "bytes": totals[m.name][1],
            "directions": per_dir if kernel else {},
            "taps": [{"interface": t.interface, "direction": t.direction, "state": t.state,
                      "reason": t.reason} for t in mp.taps],
            "tzsp": workers,
            "rate": rates.get(m.name),
            "last_heal": {"when": _iso(heal.when), "why": heal.why} if heal else None,
            "delivery": [_delivery_row(d) for d in through],
        })
        if mp.group is not None:
            mirrors[-1]["members"] = _member_rows(mp.group, counts, snap.member_since,
                                                  tzsp if mp.transport == "tzsp" else None)
    findings = plan_findings(snap.plan, snap.backend_error, snap.topology) if snap.plan else []
    if snap.apply_error:
        findings.insert(0, Finding(
            "apply-failed", "error", f"the kernel refused mirrord's rules: {snap.apply_error}",
            "see the daemon's log for the refused input; mirrord retries on every change and "
            "with a growing delay"))
    findings += tzsp_findings(mirrors)
    if snap.plan is not None:
        findings += delivery_findings(snap.plan, [d for d in deliveries.values()
                                                  if d.verdict == "dropped"])
    findings += offload_findings()
    # Never silently: where a total could not be kept exact, say when and why.
    findings += [Finding("counters-inexact", "warning", note,
                         "the totals go on from what was counted before and after; nothing "
                         "to fix unless it repeats (then see what deletes mirrord's rules)")
                 for note in (reading.notes if reading else ())]
    doc: StatusDocument = {
        "version": __version__,
        "pid": os.getpid(),
        "started": _iso(snap.started),
        "config": snap.spec.path,
        "backend": snap.backend,
        "backend_error": snap.backend_error or None,
        # The mirrors' states as shown (a TZSP mirror's from its capture), not the plan's.
        "summary": _summary(mirrors) if snap.plan else snap.summary(),
        "applies": snap.applies,
        "reapplies": snap.reapplies,
        "mirrors": mirrors,
        "findings": [f.as_dict() for f in findings],
    }
    return doc


def healthy(status: StatusDocument) -> bool:
    """Every mirror active and no error finding (warnings advise; they do not fail)."""
    errors = [f for f in status.get("findings", []) if f.get("severity") == "error"]
    return all_active(status) and not errors


def all_active(status: StatusDocument) -> bool:
    return all(m.get("state") == "active" for m in status.get("mirrors", []))


def _human_count(n: int) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n}{unit}"
        n //= 1000
    return f"{n}P"


def _summary(mirrors: list[MirrorRow]) -> str:
    states: dict[str, int] = {}
    for m in mirrors:
        states[m["state"]] = states.get(m["state"], 0) + 1
    return f"{len(mirrors)} mirror(s): " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))


def _restart(w: TzspRow) -> str:
    due = w.get("restart_in")
    if due is None:
        return "restarting"  # its end is not read yet: no restart planned so far
    return f"restarting in {due:.1f} s" if due > 0 else "restarting now"


def tzsp_state(state: MirrorState, reason: str, workers: list[TzspRow],
               collector: str) -> tuple[MirrorState, str]:
    """A TZSP mirror's state from its taps as the capture process reports them.

    The plan says what should capture; only the capture process knows when a
    tap does: it marks the tap's slot running once its socket is bound with
    its filter and ring. From the plan alone, status said `active` about
    70 ms before the first frame could be captured, through a restart's
    delay, and to a collector that refused every datagram. So, with the
    plan's state `active` or `degraded` (`state`):

    - a tap exited (waiting for its restart, or its end not read yet), or
      one whose every send failed: `degraded`, or `error` when no other tap
      is capturing or starting; the reason names each and when it restarts;
    - else a tap still starting: `starting` (a `degraded` plan stays
      `degraded`), the reason naming the taps; all of a mirror's taps start
      together, so a mirror whose taps are partly open is `starting` too;
    - else (every tap running and sending) the plan's state and reason.
    """
    exited = [w for w in workers if w["state"] == "exited"]
    # Every datagram refused by the kernel (no route, unreachable, a broadcast
    # address): capturing is not copying.
    failing = [w for w in workers if w["state"] != "exited" and not w.get("sent")
               and w.get("send_errors")]
    starting = [w for w in workers if w["state"] in ("starting", "not started")]
    why = ([f"TZSP capture on {w['interface']} stopped ({w['exit_reason'] or 'ended'}), "
            f"{_restart(w)}" for w in exited]
           + [f"every TZSP datagram from {w['interface']} to {w.get('member') or collector} "
              "failed to send "
              f"({w.get('send_errors')} so far)" for w in failing]
           + [f"TZSP capture on {w['interface']} starting (not capturing yet)"
              for w in starting])
    new: MirrorState
    if exited or failing:
        new = "error" if len(exited) + len(failing) >= len(workers) else "degraded"
    elif starting:
        new = "starting" if state == "active" else state
    else:
        return state, reason
    return new, "; ".join(r for r in (*why, reason) if r)


def _device_of(mp: MirrorPlan) -> Optional[str]:
    if mp.group is not None:
        return None  # a device per member: the delivery row names the member
    if mp.collector.copies_frames:
        from ..plan.frames import target_of

        return target_of(mp.collector)
    return mp.reach.oif if mp.reach is not None else None


def _member_rows(g: Group, counts: Counts, since: Mapping[tuple[str, str], float],
                 tzsp: Optional[Mapping[str, tuple[int, int]]] = None) -> list[MemberRow]:
    """`tzsp`: a TZSP group's totals, where each member counts under its
    counter name (its taps' slots); else the kernel's member counters."""
    rows: list[MemberRow] = []
    for m in g.members:
        when = since.get((g.collector, m.name))
        p, b = tzsp.get(m.counter_name, (0, 0)) if tzsp is not None else counts.get(m.counter,
                                                                                    (0, 0))
        rows.append({"name": m.name, "state": "alive" if m.alive else "dead", "reason": m.cause,
                     "since": _iso(when) if when is not None else None,
                     "buckets": len(m.buckets), "packets": p, "bytes": b})
    return rows


def _delivery_row(d: Delivery) -> DeliveryRow:
    return {"via": d.point.describe(), "collectors": list(d.point.collectors),
            "mirrors": list(dict.fromkeys(f[0] for f in d.point.feeds)),
            "copied": d.copied, "left": d.left, "left_bytes": d.left_bytes,
            "verdict": d.verdict, "lost": d.lost, "since": _iso(d.since)}


def _collector_row(c: Collector, reach: Optional[Reach]) -> CollectorRow:
    from ..plan.frames import target_of

    row: CollectorRow = {"name": c.name, "address": str(c.address) if c.address else None,
                         "reach": reach.describe() if reach else None}
    if c.is_group:
        row["members"] = list(c.members)
    elif c.copies_frames:
        row["device"] = target_of(c)
    return row


def _collector_cell(c: CollectorRow) -> str:
    if c.get("members"):
        return f"{c['name']} (group of {len(c['members'])})"
    device = c.get("device")
    if c.get("address") is None:
        return f"{device} (span port)"
    via = f", via {device}" if device else ""
    return f"{c['address']} ({c.get('reach') or '?'}{via})"


def format_table(status: StatusDocument) -> str:
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
            _collector_cell(m["collector"]), detail,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        lines.append(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip())
    for m in status.get("mirrors", []):
        rate = m.get("rate")
        dirs = ", ".join(f"{w} {v['packets']} pkts" for w, v in m.get("directions", {}).items())
        extra = []
        if dirs:
            extra.append(dirs)
        if rate:
            extra.append(f"{rate['pps']} pkt/s over {rate['interval']}s")
        for d in m.get("delivery", []):
            shared = f", with {', '.join(n for n in d['mirrors'] if n != m['name'])}" if len(
                d["mirrors"]) > 1 else ""
            extra.append(f"left the router {d['left']} of {d['copied']} copied ({d['via']}"
                         f"{shared}){': ' + str(d['lost']) + ' lost' if d['verdict'] == 'dropped' else ''}")
        for mb in m.get("members", []):
            since = f" since {mb['since']}" if mb["since"] else ""
            dead = f" ({mb['reason']})" if mb["reason"] else ""
            extra.append(f"member {mb['name']} {mb['state']}{since}{dead}: {mb['buckets']} "
                         f"buckets, {mb['packets']} pkts")
        for w in m.get("tzsp", []):
            state = w.get("state")
            shown = f" ({state}: {w.get('exit_reason')})" if state == "exited" else (
                f" ({state})" if state not in (None, "running") else "")
            to = f" -> {w['member']}" if w.get("member") else ""
            extra.append(f"tzsp {w['interface']}{to}{shown}: " + ", ".join(
                f"{k.replace('_', ' ')} {w[k]}" for k in
                ("captured", "sent", "ring_drops", "send_errors", "truncated", "oversize")
                if k in w))
        if extra:
            lines.append(f"  {m['name']}: " + "; ".join(extra))
    for f in status.get("findings", []):
        lines.append(f"{f['severity'].upper()}: {f['what']}")
        lines.append(f"  fix: {f['fix']}")
    return "\n".join(lines)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\"", '\\"').replace("\n", "\\n")


STATES = ("active", "starting", "waiting", "degraded", "error")


def format_prometheus(status: Optional[StatusDocument]) -> str:
    """The Prometheus text format, for node_exporter's textfile collector."""
    out = ["# HELP mirrord_up Whether the mirrord daemon answered.", "# TYPE mirrord_up gauge",
           f"mirrord_up {0 if status is None else 1}"]
    if status is None:
        return "\n".join(out) + "\n"
    metrics: dict[str, tuple[str, str, list[str]]] = {
        "mirrord_mirror_packets_total": ("counter", "Packets copied to the collector.", []),
        "mirrord_mirror_bytes_total": ("counter", "Bytes copied to the collector.", []),
        "mirrord_mirror_state": ("gauge", "1 for the state the mirror is in.", []),
        "mirrord_tzsp_errors_total": ("counter", "TZSP copies lost, by cause.", []),
        "mirrord_tzsp_oversize_total": (
            "counter", "TZSP copies longer than the interface's MTU (GRO/GSO super-frames): "
            "sent, but an IDS may truncate or drop them.", []),
        "mirrord_delivery_copied_packets_total": (
            "counter", "Kernel copies made for a delivery point (every mirror it serves).", []),
        "mirrord_delivery_left_packets_total": (
            "counter", "Kernel copies that left the router, after every firewall chain.", []),
        "mirrord_delivery_left_bytes_total": (
            "counter", "Bytes of those copies as they left (with any encapsulation).", []),
        "mirrord_member_packets_total": (
            "counter", "Copies sent to a member of a group collector (all its mirrors).", []),
        "mirrord_member_bytes_total": ("counter", "Bytes of those copies.", []),
        "mirrord_member_alive": ("gauge", "1 while the member is alive, 0 while dead.", []),
        "mirrord_member_buckets": ("gauge", "Flow buckets (of 64) the member holds.", []),
        "mirrord_reapplies_total": ("counter", "Rule re-applications after start.", []),
        "mirrord_findings": ("gauge", "Health findings, by code.", []),
    }
    for m in status.get("mirrors", []):
        name = _label(m["name"])
        transport = _label(m.get("transport") or "none")
        dirs = m.get("directions") or {}
        if dirs:
            for way, v in dirs.items():
                lbl = f'mirror="{name}",direction="{way}",transport="{transport}"'
                metrics["mirrord_mirror_packets_total"][2].append(f"{{{lbl}}} {v['packets']}")
                metrics["mirrord_mirror_bytes_total"][2].append(f"{{{lbl}}} {v['bytes']}")
        else:
            lbl = f'mirror="{name}",direction="{_label(m["direction"])}",transport="{transport}"'
            metrics["mirrord_mirror_packets_total"][2].append(f"{{{lbl}}} {m['packets']}")
            metrics["mirrord_mirror_bytes_total"][2].append(f"{{{lbl}}} {m['bytes']}")
        for st in STATES:
            metrics["mirrord_mirror_state"][2].append(
                f'{{mirror="{name}",state="{st}"}} {1 if m["state"] == st else 0}')
        for w in m.get("tzsp", []):
            who = w.get("member")
            tap = (f'mirror="{name}",interface="{_label(w["interface"])}"'
                   + (f',member="{_label(who)}"' if who else ""))
            for cause in ("ring_drops", "send_errors", "truncated"):
                if cause in w:
                    metrics["mirrord_tzsp_errors_total"][2].append(
                        f'{{{tap},cause="{cause}"}} {w[cause]}')
            if "oversize" in w:
                metrics["mirrord_tzsp_oversize_total"][2].append(f"{{{tap}}} {w['oversize']}")
    seen: set[str] = set()
    for m in status.get("mirrors", []):
        for d in m.get("delivery", []):
            if d["via"] in seen:
                continue  # one point serves several mirrors: counted once
            seen.add(d["via"])
            lbl = f'{{via="{_label(d["via"])}",collectors="{_label(",".join(d["collectors"]))}"}}'
            metrics["mirrord_delivery_copied_packets_total"][2].append(f"{lbl} {d['copied']}")
            metrics["mirrord_delivery_left_packets_total"][2].append(f"{lbl} {d['left']}")
            metrics["mirrord_delivery_left_bytes_total"][2].append(f"{lbl} {d['left_bytes']}")
    members: set[tuple[str, str]] = set()
    for m in status.get("mirrors", []):
        for mb in m.get("members", []):
            key = (m["collector"]["name"], mb["name"])
            if key in members:
                continue  # one member serves every mirror of its group: counted once
            members.add(key)
            lbl = f'{{collector="{_label(key[0])}",member="{_label(key[1])}"}}'
            metrics["mirrord_member_packets_total"][2].append(f"{lbl} {mb['packets']}")
            metrics["mirrord_member_bytes_total"][2].append(f"{lbl} {mb['bytes']}")
            metrics["mirrord_member_alive"][2].append(f"{lbl} {int(mb['state'] == 'alive')}")
            metrics["mirrord_member_buckets"][2].append(f"{lbl} {mb['buckets']}")
    metrics["mirrord_reapplies_total"][2].append(f" {status.get('reapplies', 0)}")
    codes: dict[str, int] = {}
    for f in status.get("findings", []):
        codes[f["code"]] = codes.get(f["code"], 0) + 1
    for code, n in sorted(codes.items()):
        metrics["mirrord_findings"][2].append(f'{{code="{_label(code)}"}} {n}')
    for metric, (kind, text, samples) in metrics.items():
        if not samples:
            continue
        out.append(f"# HELP {metric} {text}")
        out.append(f"# TYPE {metric} {kind}")
        out += [f"{metric}{sample}" for sample in samples]
    return "\n".join(out) + "\n"
