"""Where kernel copies leave the router, so that what left can be counted.

A copy counted by its rule has not reached the collector yet: a clone is sent
with ip_local_out() and crosses every table's output chains,
and a tunnel's outer packet (VXLAN, GRE) is a locally generated datagram that
crosses them too. A firewall whose output policy rejects towards the
collector's zone drops them all while the copy counters keep rising. A
delivery point is one place those copies can be recognised after every
firewall chain (the backend counts there), and the counters of the rules
that feed it: the two compared say whether copies are leaving.

The identification, per kind:
- clone: untracked (nf_dup marks every clone so) and routed to the
  collector (on-link, as every clone collector is: nft `rt ip nexthop` is
  the address nf_dup routed to, tested; through a gateway it would be the
  gateway);
- vxlan: UDP to the remote and the tunnel's destination port;
- gre (gretap, erspan): IP protocol GRE to the remote.

Several mirrors (and both directions of one) may feed one point; the
comparison is then for all of them together. Span ports have no point: the
copy is queued straight on the port, no firewall chain sees it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Optional

from ..match import Address
from ..netlink.links import Tunnel
from .model import CloneRule, DeliveryPoint, FrameRule, MirrorPlan, PointKind


def delivery_points(mirrors: Iterable[MirrorPlan], clones: Iterable[CloneRule],
                    frames: Iterable[FrameRule],
                    tunnels: Iterable[Tunnel]) -> tuple[DeliveryPoint, ...]:
    """The points the plan's kernel copies leave through, in a stable order
    (plan.build stores them in Plan.deliveries)."""
    by_mirror = {mp.mirror.name: mp for mp in mirrors}
    feeds: dict[tuple[PointKind, Address, int], dict[tuple[str, str], None]] = {}
    owners: dict[tuple[PointKind, Address, int], dict[str, None]] = {}

    def add(key: tuple[PointKind, Address, int], feed: tuple[str, str], owner: str) -> None:
        feeds.setdefault(key, {})[feed] = None
        owners.setdefault(key, {})[owner] = None

    for r in clones:
        mp = by_mirror.get(r.mirror)
        if r.group is not None:
            # A group: one point per member holding buckets, fed by its own
            # counter (the mirror's counts the copies to every member).
            for m in r.group.members:
                if m.buckets:
                    add(("clone", ipaddress.ip_address(m.target), 0), m.counter, r.group.collector)
            continue
        hop = _next_hop(mp, r.gateway)
        if mp is not None and hop is not None:
            add(("clone", hop, 0), (r.mirror, r.direction), mp.collector.name)
    by_device = {t.name: t for t in tunnels}
    for f in frames:
        if f.group is not None:
            for m in f.group.members:
                tm = by_device.get(m.target) if m.buckets else None
                if tm is not None:
                    add(("vxlan", tm.remote, tm.port), m.counter, tm.owner)
            continue
        t = by_device.get(f.target)
        if t is None:
            continue  # a span port
        kind: PointKind = "vxlan" if t.kind == "vxlan" else "gre"
        add((kind, t.remote, t.port if kind == "vxlan" else 0), (f.mirror, f.direction), t.owner)
    points = [DeliveryPoint(k, a, p, tuple(feeds[(k, a, p)]), tuple(owners[(k, a, p)]))
              for (k, a, p) in feeds]
    return tuple(sorted(points, key=lambda d: (d.version, d.kind, int(d.address), d.port)))


def _next_hop(mp: Optional[MirrorPlan], gateway: Address) -> Optional[Address]:
    """Where nf_dup routes a clone: the collector itself, which a clone
    collector always is when the plan has rules for it (on-link)."""
    reach = mp.reach if mp is not None else None
    return gateway if reach is not None and reach.onlink else None
