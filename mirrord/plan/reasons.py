"""Why a mirror or a tap is not simply active: a code, the text users read, the fix.

The plan decides; everything downstream (status, health findings, logs)
reads the code, never the wording. The text is what status has always
shown, word for word: monitors and people grep it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from ..match import Address
from ..netlink.topology import Reach, Topology


class Code(enum.Enum):
    # A tap's interface (TapState.cause).
    INTERFACE_ABSENT = "interface-absent"
    INTERFACE_DOWN = "interface-down"
    BRIDGE_PORT = "bridge-port"  # a clone mirror's interface is a bridge port
    TZSP_SEES_CLONES = "tzsp-sees-clones"  # a TZSP capture of the clones' egress
    # A mirror's collector.
    COLLECTOR_NOT_LOOKED_UP = "collector-not-looked-up"
    COLLECTOR_UNREACHABLE = "collector-unreachable"  # the route lookup's own error
    COLLECTOR_LOCAL = "collector-local"
    COLLECTOR_NOT_A_HOST = "collector-not-a-host"
    COLLECTOR_OFFLINK = "collector-offlink"
    NEIGHBOUR_FAILED = "neighbour-failed"
    MEMBERS_DEAD = "members-dead"  # some members of a group (degraded)
    ALL_MEMBERS_DEAD = "all-members-dead"  # every member of a group (error)
    # What a kernel clone needs.
    NO_FAMILY_TRAFFIC = "no-family-traffic"
    NO_BACKEND = "no-backend"
    BACKEND_CANNOT_CLONE_FAMILY = "backend-cannot-clone-family"
    # What a whole-frame copy (netdev dup) needs.
    FRAMES_UNSUPPORTED = "frames-unsupported"
    EGRESS_UNSUPPORTED = "egress-unsupported"  # a tap's: no netdev egress hook
    COLLECTOR_PORT = "collector-port"  # a span port absent, down or not Ethernet
    TUNNEL_FAILED = "tunnel-failed"
    COPIES_COPIED = "copies-copied"  # a tap's: its interface carries mirrord's copies
    # A note on an active TZSP mirror, no fault.
    NOT_ETHERNET = "not-ethernet"


@dataclass(frozen=True)
class Reason:
    """One reason. `interface` and `bridge` are the facts a finding names beyond the text."""

    code: Code
    text: str
    fix: str = ""
    interface: str = ""
    # BRIDGE_PORT: the bridge as a finding names it (its ifindex when it is no known link).
    bridge: str = ""


def join(reasons: tuple[Reason, ...]) -> str:
    """The one-line text status and logs show: each distinct text once, in order."""
    return "; ".join(dict.fromkeys(r.text for r in reasons))


def interface_absent(name: str) -> Reason:
    return Reason(Code.INTERFACE_ABSENT, f"interface {name} does not exist",
                  f"check the name with `ip link`; mirrord starts copying when {name} appears",
                  interface=name)


def interface_down(name: str) -> Reason:
    return Reason(Code.INTERFACE_DOWN, f"interface {name} is down", interface=name)


def bridge_port(name: str, topo: Topology) -> Optional[Reason]:
    """The one rule for bridge ports: `name` is a port of a bridge (or bond), or None.

    A kernel clone hooks IP processing, which sees the bridge, never its
    ports: such an interface copies nothing with transport clone.
    """
    link = topo.link(name)
    if link is None or link.master is None:
        return None
    master = topo.by_index(link.master)
    shown = master.name if master else "a bridge"
    named = master.name if master else f"ifindex {link.master}"
    return Reason(
        Code.BRIDGE_PORT,
        f"{name} is a port of {shown}: kernel clones see {shown}, not its ports (mirror the "
        "bridge, or use transport tzsp)",
        f"mirror {named} (match on addresses to narrow it), or set transport: tzsp, which "
        f"captures on {name} itself",
        interface=name, bridge=named)


def tzsp_sees_clones(name: str, via: str) -> Reason:
    port = f" (a port of {via})" if via != name else ""
    return Reason(
        Code.TZSP_SEES_CLONES,
        f"kernel clones leave through {via}: a TZSP capture of what leaves {name}{port} would "
        "copy mirrord's own clones (mirror it with transport clone, or reach the clone "
        "collector through another interface)",
        "mirror it with transport clone, or reach the clone collector through another interface",
        interface=name)


def collector_not_looked_up(address: Address) -> Reason:
    return Reason(Code.COLLECTOR_NOT_LOOKED_UP, f"collector {address} not looked up")


def collector_unreachable(error: str) -> Reason:
    """`error`: the topology's own words (no route, the collector's interface absent, ...)."""
    return Reason(Code.COLLECTOR_UNREACHABLE, error)


def collector_local(address: Address) -> Reason:
    return Reason(Code.COLLECTOR_LOCAL, f"collector {address} is an address of this router")


def collector_not_a_host(text: str) -> Reason:
    return Reason(Code.COLLECTOR_NOT_A_HOST, text)


def collector_offlink(address: Address, reach: Reach) -> Reason:
    return Reason(
        Code.COLLECTOR_OFFLINK,
        f"collector {address} is not on-link ({reach.describe()}); a kernel clone only reaches "
        "the next hop: use transport: tzsp (or auto)",
        "set transport: tzsp (or auto) for this collector")


def neighbour_failed(address: Address, oif: Optional[str]) -> Reason:
    return Reason(
        Code.NEIGHBOUR_FAILED,
        f"collector {address} does not answer ARP/ND (neighbour FAILED on {oif})",
        f"check that {address} is up and attached to {oif} (`ip neigh show {address}`)",
        interface=oif or "")


def members_dead(collector: str, dead: list[tuple[str, str]], left: int) -> Reason:
    """`dead`: (member, why) of a group some of whose members are alive."""
    names = "; ".join(f"{m}: {c}" for m, c in dead)
    return Reason(Code.MEMBERS_DEAD,
                  f"collector '{collector}': {len(dead)} member(s) unreachable, their flows "
                  f"moved to the {left} other(s) ({names})",
                  "bring the members back; their flows return to them")


def all_members_dead(collector: str, dead: list[tuple[str, str]]) -> Reason:
    names = "; ".join(f"{m}: {c}" for m, c in dead)
    return Reason(Code.ALL_MEMBERS_DEAD,
                  f"collector '{collector}': every member unreachable ({names})",
                  "bring at least one member back")


def no_family_traffic(version: int) -> Reason:
    return Reason(Code.NO_FAMILY_TRAFFIC, f"no IPv{version} traffic to clone")


def no_backend(backend_error: str) -> Reason:
    if not backend_error:
        return Reason(Code.NO_BACKEND, "no usable firewall backend")
    return Reason(Code.NO_BACKEND, backend_error,
                  "install the package named above (or set backend: to one that works)")


def backend_cannot_clone(backend: str, version: int) -> Reason:
    return Reason(
        Code.BACKEND_CANNOT_CLONE_FAMILY,
        f"backend {backend} cannot clone IPv{version} (use backend nftables or iptables, or "
        "transport tzsp)",
        "use backend nftables or iptables, or transport tzsp")


def not_ethernet(name: str) -> Reason:
    return Reason(Code.NOT_ETHERNET, f"{name} is not Ethernet (a header is synthesized)",
                  interface=name)


# -- whole-frame transports (span, vxlan, gretap, erspan) ------------------------
def frames_unsupported(text: str) -> Reason:
    """`text`: the backend's own words (what it tried, what to install)."""
    return Reason(Code.FRAMES_UNSUPPORTED, text,
                  "install kmod-nft-netdev (OpenWrt), or use transport clone or tzsp")


def egress_unsupported(name: str, text: str) -> Reason:
    return Reason(Code.EGRESS_UNSUPPORTED, f"copies of frames sent on {name}: {text}",
                  "use direction: in here (and mirror the other end's in), or transport tzsp",
                  interface=name)


def span_port(name: str, problem: str) -> Reason:
    """The span collector's port is absent, down or no Ethernet port."""
    fix = ("check the name with `ip link`; mirrord starts copying when it appears"
           if problem == "does not exist" else "")
    return Reason(Code.COLLECTOR_PORT, f"span port {name} {problem}", fix, interface=name)


def tunnel_failed(name: str, error: str) -> Reason:
    return Reason(Code.TUNNEL_FAILED, error or f"tunnel device {name} is missing",
                  "install the kernel module named above" if "install" in error else "",
                  interface=name)


def carries_copies(name: str, what: str) -> Reason:
    """A mirror of `name` would copy what mirrord itself sends through it."""
    return Reason(Code.COPIES_COPIED,
                  f"{name} carries {what}: mirroring what leaves it would copy the copies",
                  "mirror another interface, or direction: in for this one", interface=name)
