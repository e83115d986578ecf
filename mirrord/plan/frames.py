"""The whole-frame transports in the plan: `span` copies each frame out of a
local port, `vxlan`, `gretap` and `erspan` into a tunnel device mirrord makes
for the collector. The kernel copies (nftables netdev `dup`); the plan says
which frames, from which device, to which device, and why not when it cannot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Protocol

from ..netlink.links import Tunnel
from ..netlink.topology import ARPHRD_ETHER, Topology
from ..spec import TUNNEL_TRANSPORTS, VXLAN_PORT, Collector, Mirror, Spec
from . import reasons as why
from .groups import IFNAMSIZ, TUNNEL_PREFIX, _fnv1a, member_tunnels
from .model import FrameRule, FrameSupport, MirrorPlan, State, TapState, TransportName, summarize
from .reasons import Reason

# Device names say whose they are at a glance (`ip link`); the alias
# ("mirrord COLLECTOR") says it for certain: only devices carrying it are removed.
# (TUNNEL_PREFIX, IFNAMSIZ, _fnv1a live in plan.groups, imported here.)


class Result(Protocol):
    def __call__(self, transport: Optional[TransportName], state: State,
                 *causes: Reason) -> MirrorPlan: ...


def tunnel_name(c: Collector) -> str:
    """The collector's tunnel device: prefix + name, or + a hash of a long name."""
    prefix = TUNNEL_PREFIX[c.transport]
    if len(prefix) + len(c.name.encode()) < IFNAMSIZ:
        return prefix + c.name
    return prefix + f"{_fnv1a(c.name.encode()):08x}"


def tunnels(spec: Spec) -> tuple[Tunnel, ...]:
    """The tunnel devices the spec's mirrors copy into: one per collector used."""
    used = {m.collector for m in spec.mirrors}
    out: list[Tunnel] = []
    for c in spec.collectors.values():
        if c.name in used and c.transport == "vxlan" and c.is_group:
            out += member_tunnels(c)
            continue
        if c.name not in used or c.transport not in TUNNEL_TRANSPORTS or c.address is None:
            continue
        out.append(Tunnel(
            name=tunnel_name(c), kind=c.transport,  # type: ignore[arg-type]
            remote=c.address,
            vni=c.vni if c.transport == "vxlan" else 0,
            port=c.port if c.transport == "vxlan" else VXLAN_PORT,
            session=c.session if c.transport == "erspan" else 0,
            owner=c.name))
    return tuple(out)


def target_of(c: Collector) -> str:
    """The device a frame mirror's copies are sent out of."""
    if c.transport == "span":
        return c.interface or ""
    return tunnel_name(c)


def plan_frames(
    mirror: Mirror,
    collector: Collector,
    topo: Topology,
    taps: list[TapState],
    support: FrameSupport,
    tunnel_errors: Mapping[str, str],
    carriers: Mapping[str, str],
    result: Result,
) -> tuple[MirrorPlan, list[FrameRule]]:
    """A frame mirror's plan and rules. `taps` (one per interface and
    direction, from the links alone) is updated in place with what stops a
    copy here; `carriers` maps a device to what mirrord sends through it."""
    t: TransportName = collector.transport  # type: ignore[assignment]
    if support.ingress:
        return result(t, "error", why.frames_unsupported(support.ingress)), []
    target = target_of(collector)
    link = topo.link(target)
    if t == "span":
        if link is None:
            return result(t, "waiting", why.span_port(target, "does not exist")), []
        if link.arphrd != ARPHRD_ETHER:
            return result(t, "error", why.span_port(
                target, "is not an Ethernet port: the copies are whole Ethernet frames")), []
        if link.kind == "bridge":
            # A bridge floods what it does not know to every port: the copies
            # would reach every host, and its mirrored ports would copy them.
            return result(t, "error", why.span_port(
                target, "is a bridge: it would flood every copy to all its ports; name one "
                "port, out of the bridge")), []
        if not link.up:
            return result(t, "waiting", why.span_port(target, "is down")), []
    else:
        error = tunnel_errors.get(target)
        if error:
            return result(t, "error", why.tunnel_failed(target, error)), []
        if link is None or not link.up:
            return result(t, "waiting", why.tunnel_failed(
                target, f"tunnel device {target} is {'down' if link else 'not there yet'}")), []
    rules = frame_rules(mirror, topo, taps, support, carriers, target, link.index)
    state, causes = summarize(taps)
    return result(t, state, *causes), rules


def frame_rules(mirror: Mirror, topo: Topology, taps: list[TapState], support: FrameSupport,
                carriers: Mapping[str, str], target: str, target_index: int) -> list[FrameRule]:
    """The active taps' frame rules to `target`; `taps` updated in place with
    what stops a copy on one of them."""
    rules: list[FrameRule] = []
    for i, tap in enumerate(taps):
        if tap.state != "active":
            continue
        carried = carriers.get(tap.interface)
        if carried is not None and tap.direction == "out":
            taps[i] = TapState(tap.interface, "out", "error",
                               why.carries_copies(tap.interface, carried))
            continue
        if tap.direction == "out" and support.egress:
            taps[i] = TapState(tap.interface, "out", "error",
                               why.egress_unsupported(tap.interface, support.egress))
            continue
        src = topo.link(tap.interface)
        assert src is not None  # an active tap's link exists
        rules.append(FrameRule(mirror.name, tap.direction, tap.interface, src.index,
                               mirror.match, target, target_index))
    return rules


def carriers(spec: Spec) -> dict[str, str]:
    """Devices mirrord sends whole-frame copies out of, and what they carry."""
    used = {m.collector for m in spec.mirrors}
    out: dict[str, str] = {}
    for c in spec.collectors.values():
        if c.name not in used or not c.copies_frames:
            continue
        targets = ([t.name for t in member_tunnels(c)] if c.transport == "vxlan" else
                   list(c.members)) if c.is_group else [target_of(c)]
        for target in targets:
            out.setdefault(target, f"the copies for collector '{c.name}'")
    return out
