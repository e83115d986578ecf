"""The whole-frame copies as `table netdev mirrord` (pure).

One base chain per device and hook (`ingress`: frames received, `egress`:
frames sent), each bound to its device by name: exactly one copy per
crossing, and a device that goes away takes only its own chains. nft up to
1.0.9 cannot give a chain several devices in JSON (nor list them), which is
the other reason for one chain per device.

The priority runs the chains before a flowtable (fw4 hooks its flowtable at
ingress priority 0): an offloaded flow skips the IP hooks a `clone` uses, but
never this one.

In a chain: first the collectors' traffic returns (their addresses, under a
`meta protocol` guard so that ARP and other non-IP frames still reach the
copies), then the copies, through a verdict map where many mirrors test ports.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ...match import Match
from ...plan import FrameRule, Plan
from ..base import comment
from .maps import Entry, chain_rules, frame_key
from .render import (
    FAMILIES,
    TABLE,
    ActionChains,
    Expr,
    _match,
    _meta,
    _payload,
    _value,
    chain_name,
    counter_name,
    counting,
    match_exprs,
)

FAMILY = "netdev"
PRIO_NETDEV = -300  # below fw4's flowtable (0) and anything at the default (0)
ETHER = {4: "ip", 6: "ip6"}
HOOKS = {"in": "ingress", "out": "egress"}


def frame_match_exprs(m: Match) -> list[list[Expr]]:
    """The match as alternatives of netdev expressions; [[]]: every frame."""
    if m == Match():
        return [[]]
    out: list[list[Expr]] = []
    for version in (4, 6):
        fm = m.for_version(version)
        if fm is None:
            continue
        guard = _match(_meta("protocol"), ETHER[version])
        out += [[guard, *alt] for alt in match_exprs(fm)]
    return out


def exclusion_rules(t: dict[str, str], chain: str, rule: FrameRule) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for version in (4, 6):
        addrs = sorted((a for a in rule.exclude if a.version == version), key=int)
        if not addrs:
            continue
        fam = FAMILIES[version]
        for end in ("saddr", "daddr"):
            out.append({"rule": {**t, "chain": chain, "expr": [
                _match(_meta("protocol"), ETHER[version]),
                _match(_payload(fam, end), _value([str(a) for a in addrs])),
                {"return": None}]}})
    return out


def netdev_table(plan: Plan, ranges: bool = True) -> list[dict[str, Any]]:
    """The objects of `table netdev mirrord`, in creation order; [] when no
    mirror copies whole frames."""
    if not plan.frames:
        return []
    t = {"family": FAMILY, "table": TABLE}
    objs: list[dict[str, Any]] = [{"table": {"family": FAMILY, "name": TABLE}}]
    keys = list(dict.fromkeys((r.mirror, r.direction) for r in plan.frames))
    objs += [{"counter": {**t, "name": counter_name(k)}} for k in keys]
    per_chain: dict[tuple[str, str], list[FrameRule]] = defaultdict(list)
    for r in plan.frames:
        per_chain[(r.direction, r.interface)].append(r)
    taken: set[str] = set()
    actions = ActionChains(taken)
    rule_objs: list[dict[str, Any]] = []
    for (direction, ifname), rules in sorted(per_chain.items()):
        chain = chain_name(direction, ifname, taken)
        objs.append({"chain": {**t, "name": chain, "type": "filter", "hook": HOOKS[direction],
                               "prio": PRIO_NETDEV, "dev": ifname, "policy": "accept"}})
        rule_objs += exclusion_rules(t, chain, rules[0])
        rule_objs += chain_rules(t, chain, [_entry(r, actions) for r in rules], ranges)
    objs += actions.objects(t, rule_objs)
    return objs + rule_objs


def _entry(r: FrameRule, actions: ActionChains) -> Entry:
    leaf: tuple[Expr, ...] = (*counting((r.mirror, r.direction)), {"dup": {"addr": r.target}})
    key = frame_key(r.match)
    return Entry(tuple(tuple(alt) for alt in frame_match_exprs(r.match)), leaf,
                 comment(r.mirror, r.direction),
                 actions.name(r.mirror, r.direction, leaf) if key else "", key)
