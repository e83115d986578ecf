"""What `mirrord trace` prints for each packet: text for people, or one JSON object.

A packet's line gives its time, interfaces, decoded headers and the mirrors
that copied it; below it, the table/chain/rule/verdict path outside the trace
table, with each copy a dup rule made and that copy's own path indented under it.
"""

from __future__ import annotations

import time
from typing import Any

from ...netlink.nftrace import (
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_TRACETYPE_POLICY,
    NFT_TRACETYPE_RETURN,
    NFT_TRACETYPE_RULE,
    TraceEvent,
    ifname,
)
from .events import Packet, Step
from .rulebook import RuleInfo


def verdict_text(e: TraceEvent) -> str:
    if e.verdict is None:
        return ""
    return e.verdict.name


def step_text(s: Step, names: dict[int, str]) -> list[str]:
    e = s.event
    where = f"{e.family_name} {e.table} {e.chain}"
    lines: list[str] = []
    if s.changed is not None:
        lines.append(f"now {s.changed.text()}")
    if e.type == NFT_TRACETYPE_RULE:
        info = s.rule or RuleInfo(None)
        head = f"{where} rule #{e.rule_handle}"
        if info.mirror is not None:
            line = f"{head} ({verdict_text(e)}) [{info.mirror.text()}]"
        elif info.text:
            line = f"{head}: {info.text} ({verdict_text(e)})"
        else:
            # Replaced since, or a table nft cannot list by name.
            line = f"{head} ({verdict_text(e)})"
        lines.append(line)
        if s.copy is not None:
            c = s.copy
            out = ifname(c.oif, names)
            lines.append(f"  copy {'out ' + out if out else 'sent'}"
                         + (f": {c.headers.text()}" if c.headers else ""))
            for cs in c.visible_steps():
                lines.extend("    " + x for x in step_text(cs, names))
    elif e.type == NFT_TRACETYPE_RETURN:
        v = verdict_text(e)
        lines.append(f"{where} return" if v in ("continue", "") else f"{where} verdict {v}")
    elif e.type == NFT_TRACETYPE_POLICY:
        mark = f" meta mark 0x{e.mark:08x}" if e.mark else ""
        lines.append(f"{where} policy {e.policy_name}{mark}")
    return lines


def packet_text(pkt: Packet, names: dict[int, str]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(pkt.wall)) + f".{int(pkt.wall % 1 * 1e6):06d}"
    iif = ifname(pkt.iif, names) or ""
    oif = ifname(pkt.oif, names) or ""
    if pkt.headers is not None:
        what = pkt.headers.text()
    else:
        what = {NFPROTO_IPV4: "IPv4", NFPROTO_IPV6: "IPv6"}.get(pkt.nfproto or 0, "packet")
    head = f"#{pkt.number} {stamp} IN={iif} OUT={oif} {what}"
    mirrors = pkt.mirrors
    if mirrors:
        head += "  => mirrored by " + ", ".join(f"{m.mirror} ({m.direction})" for m in mirrors)
    lines = [head]
    for s in pkt.visible_steps():
        lines.extend("  " + x for x in step_text(s, names))
    if len(lines) == 1:
        lines.append("  (no nftables rule outside the trace table saw it)")
    return "\n".join(lines)


def step_json(s: Step, names: dict[int, str]) -> dict[str, Any]:
    e = s.event
    d: dict[str, Any] = {"family": e.family_name, "table": e.table, "chain": e.chain,
                         "type": e.type_name}
    if e.rule_handle is not None:
        d["handle"] = e.rule_handle
    if e.verdict is not None:
        d["verdict"] = e.verdict.name
    if e.policy is not None:
        d["policy"] = e.policy_name
    if e.mark:
        d["mark"] = e.mark
    if s.rule is not None:
        d["rule"] = s.rule.text
        d["mirror"] = s.rule.mirror.as_json() if s.rule.mirror else None
    if s.changed is not None:
        d["packet_now"] = s.changed.as_json()
    if s.copy is not None:
        d["copy"] = {"out": ifname(s.copy.oif, names),
                     "trace_ids": [f"{t:08x}" for t in s.copy.trace_ids],
                     "events": [step_json(x, names) for x in s.copy.visible_steps()]}
    return d


def packet_json(pkt: Packet, names: dict[int, str]) -> dict[str, Any]:
    return {
        "packet": pkt.number,
        "time": round(pkt.wall, 6),
        "trace_ids": [f"{t:08x}" for t in pkt.trace_ids],
        "in": ifname(pkt.iif, names),
        "out": ifname(pkt.oif, names),
        "headers": pkt.headers.as_json() if pkt.headers else None,
        "summary": pkt.headers.text() if pkt.headers else None,
        "mirrored": [m.as_json() for m in pkt.mirrors],
        "events": [step_json(s, names) for s in pkt.visible_steps()],
    }
