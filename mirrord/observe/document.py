"""The status document's declared type: what `mirrord status --json` prints.

Exactly the keys build_status writes; monitors parse this JSON, so a key
is added here before status writes it and never renamed. The readers
(format_table, format_prometheus, healthy) use .get() for keys an older
daemon may not send: the types describe what this version sends.
"""

from __future__ import annotations

from typing import Literal, Optional, TypedDict

from ..plan import State


class DirectionCount(TypedDict):
    packets: int
    bytes: int


class _CollectorKeys(TypedDict):
    name: str
    address: Optional[str]  # None: a span collector, a port of this router
    reach: Optional[str]  # None: its route was never looked up


class CollectorRow(_CollectorKeys, total=False):
    # Whole-frame transports only: the device copies leave through, the span
    # port or mirrord's tunnel device (clone and tzsp copies go where routed).
    device: str
    # A group collector only (then address and reach are None): its members.
    members: list[str]


class Rate(TypedDict):
    """Per second, since the previous status query (none on the first)."""

    interval: float
    pps: float
    bps: float


class LastHeal(TypedDict):
    when: str  # ISO 8601, UTC
    why: str


class TapRow(TypedDict):
    interface: str
    direction: str
    state: State
    reason: str  # "" when active


# A mirror's state: the plan's, or `starting` for a TZSP mirror whose capture
# is not open yet (the plan never says that; only the capture process can).
MirrorState = Literal["active", "starting", "waiting", "degraded", "error"]

TzspCounter = Literal["captured", "sent", "bytes", "ring_drops", "send_errors", "truncated",
                      "oversize"]
TZSP_COUNTERS: tuple[TzspCounter, ...] = (
    "captured", "sent", "bytes", "ring_drops", "send_errors", "truncated", "oversize")


class _TzspCounters(TypedDict, total=False):
    # Only the counters the capture handle has.
    captured: int
    sent: int
    bytes: int
    ring_drops: int
    send_errors: int
    truncated: int
    oversize: int


class TzspRow(_TzspCounters):
    """One TZSP tap's worker: the shared capture process, this tap's state and counters."""

    interface: str
    id: Optional[int]
    pid: Optional[int]
    state: str
    running: bool
    exit_reason: Optional[str]
    # Seconds until an exited tap is started again (as of this status); None
    # while it runs.
    restart_in: Optional[float]
    # A group collector's member this tap sends its share of the flows to.
    member: Optional[str]


class DeliveryRow(TypedDict):
    """Kernel copies counted again after every firewall chain (plan.delivery)."""

    via: str  # what is counted there: "clones routed to 192.0.2.50", "VXLAN datagrams to ..."
    collectors: list[str]
    mirrors: list[str]  # every mirror whose copies leave here: the counts are theirs together
    copied: int  # packets their rules copied
    left: int  # packets that left (after output and postrouting)
    left_bytes: int  # as they left, with any tunnel encapsulation
    verdict: str  # "leaving" | "dropped" | "idle" (no copies yet)
    lost: int  # copies that did not leave, in the window since `since`
    since: str  # ISO 8601, UTC


class MemberRow(TypedDict):
    """One member of a group collector (plan.groups)."""

    name: str  # its address, or its port (span)
    state: str  # "alive" | "dead"
    reason: str  # why it is dead; "" when alive
    since: Optional[str]  # ISO 8601, UTC: when it became alive or dead (None: before start)
    buckets: int  # of the 64 flow buckets, how many it holds
    packets: int  # copies sent to it (every mirror of the group)
    bytes: int


class _MirrorRowBase(TypedDict):
    name: str
    state: MirrorState
    reason: str  # the plan's reasons joined ("; "), "" when active
    transport: Optional[str]  # "clone", "tzsp", or None when the collector is unusable
    interfaces: list[str]
    direction: str
    match: str
    collector: CollectorRow
    packets: int
    bytes: int
    directions: dict[str, DirectionCount]  # kernel clone counters per direction; {} for TZSP
    taps: list[TapRow]
    tzsp: list[TzspRow]
    rate: Optional[Rate]
    last_heal: Optional[LastHeal]
    # Where the mirror's kernel copies are counted leaving; [] for TZSP and span
    # ports (TZSP's sends fail with EPERM where a firewall drops them; a span
    # copy is queued straight on the port) and the iptables backends.
    delivery: list[DeliveryRow]


class MirrorRow(_MirrorRowBase, total=False):
    # A group collector only: its members, each with its state and counts.
    members: list[MemberRow]


class _FindingBase(TypedDict):
    code: str
    severity: str  # "error" | "warning"
    what: str
    fix: str


class FindingRow(_FindingBase, total=False):
    mirror: str  # absent for findings about the router, not one mirror


class StatusDocument(TypedDict):
    version: str
    pid: int
    started: str  # ISO 8601, UTC
    config: str
    backend: Optional[str]
    backend_error: Optional[str]
    summary: str
    applies: int
    reapplies: int
    mirrors: list[MirrorRow]
    findings: list[FindingRow]
