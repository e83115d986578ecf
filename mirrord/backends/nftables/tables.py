"""Every table of mirrord's nftables rendering of a plan, by family (pure)."""

from __future__ import annotations

from typing import Any

from ...plan import Plan
from .netdev import FAMILY as NETDEV
from .netdev import netdev_table
from .render import ip_tables


def render_tables(plan: Plan, ranges: bool = True) -> dict[str, list[dict[str, Any]]]:
    """family -> the objects of mirrord's table of that family, in creation order.
    `ranges`: the kernel takes port ranges in verdict map keys (Linux 5.6+)."""
    tables = ip_tables(plan, ranges)
    frames = netdev_table(plan, ranges)
    if frames:
        tables[NETDEV] = frames
    return tables


def bindings(plan: Plan) -> tuple[tuple[str, int], ...]:
    """The devices the rendering binds to at load, with their ifindexes.

    nft resolves a netdev chain's device and a `dup to` device to an ifindex
    when it loads the rules; a device deleted and made again under the same
    name is another ifindex, which the loaded rules do not follow (the
    chain is gone or bound to nothing before Linux 6.16; a dup sends into the
    void on every kernel). A change here means: load the rules again.
    """
    out = {(r.interface, r.ifindex) for r in plan.frames}
    out |= {(r.target, r.target_index) for r in plan.frames}
    return tuple(sorted(out))
