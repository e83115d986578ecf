"""NFT_MSG_TRACE events grouped into packets (the netlink parsing is mirrord.netlink.nftrace).

The kernel reports one event per rule, return and policy a marked packet
meets, tagged with a trace id that is not a packet identity. `Tracker` groups
the stream into `Packet`s, each with the `Step`s the output prints, follows a
packet across hooks and NAT by its headers, and attaches the clone a dup rule
made to the rule that made it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ...netlink.nftrace import (
    NFT_TRACETYPE_POLICY,
    NFT_TRACETYPE_RETURN,
    NFT_TRACETYPE_RULE,
    TraceEvent,
)
from .headers import Headers, copy_key, decode_headers, nat_key
from .rulebook import MirrorHit, RuleBook, RuleInfo
from .table import TRACE_FAMILY, TRACE_TABLE

# A packet crosses all its hooks within microseconds unless it is queued;
# events of one trace id further apart than this belong to another packet
# (the kernel's trace id is a hash of the skb address, which gets reused).
PACKET_GAP = 0.5
# How long a packet stays open for more events before it is printed.
HOLD = 0.2


@dataclass
class Step:
    """One printed line of a packet's path."""

    event: TraceEvent
    rule: Optional[RuleInfo] = None
    copy: Optional[Packet] = None
    changed: Optional[Headers] = None  # the packet as this base chain saw it, if different

    @property
    def own(self) -> bool:
        return is_own(self.event)


def is_own(e: TraceEvent) -> bool:
    return e.family_name == TRACE_FAMILY and e.table == TRACE_TABLE


@dataclass
class Packet:
    trace_ids: list[int]
    first_seen: float
    last_seen: float
    wall: float
    events: list[TraceEvent] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    headers: Optional[Headers] = None
    last_headers: Optional[Headers] = None
    copy_key: Optional[bytes] = None
    nat_key: Optional[bytes] = None
    iif: Optional[int] = None
    oif: Optional[int] = None
    nfproto: Optional[int] = None
    copy_of: Optional[Packet] = None
    number: int = 0

    @property
    def trace_id(self) -> int:
        return self.trace_ids[0]

    @property
    def between_hooks(self) -> bool:
        """Its last base chain ended (policy or accept): it may go on in another hook."""
        if not self.events:
            return False
        e = self.events[-1]
        if e.type == NFT_TRACETYPE_POLICY:
            return True
        return e.verdict is not None and e.verdict.name == "accept"

    @property
    def mirrors(self) -> list[MirrorHit]:
        return [s.rule.mirror for s in self.steps if s.rule is not None and s.rule.mirror]

    def visible_steps(self) -> list[Step]:
        return [s for s in self.steps if not s.own]


Decode = Callable[[bytes, Optional[bytes]], Optional[Headers]]


class Tracker:
    """Turns the event stream into packets; a packet is done when it has been quiet HOLD s.

    Events carry a trace id, a hash of the skb address, its flow hash and input
    interface. It is not a packet identity: the kernel reuses skb addresses for
    later packets, and a forwarded packet may reach its next hook under another
    id. So a known id is only followed while the packet headers agree, and a
    new id continues a packet that just left a hook when the headers say it is
    the same packet. A kernel clone (dup/TEE) is a new packet with the same
    headers, born in the middle of its original's chain: it first meets the
    output hook, where mirrord_trace's `out` chain is the first to see it.
    """

    def __init__(self, rules: RuleBook, decode: Decode = decode_headers,
                 hold: float = HOLD, gap: float = PACKET_GAP) -> None:
        self.rules = rules
        self.decode = decode
        self.hold = hold
        self.gap = gap
        self.open: dict[int, Packet] = {}
        self.done: list[Packet] = []

    def add(self, e: TraceEvent, now: float, wall: Optional[float] = None) -> None:
        pkt = self.open.get(e.trace_id)
        ckey = copy_key(e.network_header, e.transport_header) if e.has_packet else None
        nkey = nat_key(e.network_header) if e.has_packet else None
        if pkt is not None and (
            now - pkt.last_seen > self.gap
            or (ckey is not None and pkt.copy_key is not None and ckey != pkt.copy_key
                and (nkey is None or nkey != pkt.nat_key))
        ):
            self._close(pkt)
            pkt = None
        if pkt is None and e.has_packet and not (is_own(e) and e.chain == "out"):
            pkt = self._continued(ckey, nkey, now)
            if pkt is not None:
                pkt.trace_ids.append(e.trace_id)
                self.open[e.trace_id] = pkt
        if pkt is None:
            pkt = Packet([e.trace_id], now, now, wall if wall is not None else time.time())
            self.open[e.trace_id] = pkt
        pkt.last_seen = now
        pkt.events.append(e)
        if e.nfproto is not None and pkt.nfproto is None:
            pkt.nfproto = e.nfproto
        changed: Optional[Headers] = None
        if e.has_packet:
            if pkt.iif is None and e.iif is not None:
                pkt.iif = e.iif
            if e.oif is not None:
                pkt.oif = e.oif
            if e.network_header:
                headers = self.decode(e.network_header, e.transport_header)
                # A dup rule after NAT copies the translated packet: compare
                # clones with the packet as last seen.
                pkt.copy_key, pkt.nat_key = ckey, nkey
                if pkt.headers is None:
                    pkt.headers = headers
                elif headers is not None and pkt.last_headers is not None and (
                    headers.flow() != pkt.last_headers.flow()
                ):
                    changed = headers
                if headers is not None:
                    pkt.last_headers = headers
        step = self._step(e, changed)
        if step is not None:
            pkt.steps.append(step)
            if step.rule is not None and step.rule.mirror is not None:
                step.copy = self._find_copy(pkt)

    def _continued(self, ckey: Optional[bytes], nkey: Optional[bytes],
                   now: float) -> Optional[Packet]:
        for pkt in self._unique_open():
            if pkt.copy_of is not None or not pkt.between_hooks or now - pkt.last_seen > self.gap:
                continue
            if (ckey is not None and ckey == pkt.copy_key) or (
                nkey is not None and nkey == pkt.nat_key
            ):
                return pkt
        return None

    def _unique_open(self) -> list[Packet]:
        return list({id(p): p for p in self.open.values()}.values())

    def _step(self, e: TraceEvent, changed: Optional[Headers]) -> Optional[Step]:
        if e.type == NFT_TRACETYPE_RULE:
            # The kernel reports the end of a rule list as a rule without a
            # handle; `nft monitor trace` does not print it either.
            if e.rule_handle is None:
                return None
            if is_own(e):
                return Step(e, RuleInfo(None), changed=changed)
            info = self.rules.lookup(e.family_name, e.table or "", e.chain or "", e.rule_handle)
            return Step(e, info, changed=changed)
        if e.type in (NFT_TRACETYPE_RETURN, NFT_TRACETYPE_POLICY):
            return Step(e, changed=changed)
        return None

    def _find_copy(self, original: Packet) -> Optional[Packet]:
        """The clone a dup rule just made: it crossed its hooks before the rule's own event."""
        key = original.copy_key
        if key is None:
            return None
        for pkt in self._unique_open() + self.done[::-1]:
            if pkt is original or pkt.copy_of is not None or pkt.number:
                continue
            if pkt.copy_key == key and original.last_seen - pkt.first_seen < 1.0:
                pkt.copy_of = original
                if pkt in self.done:
                    self.done.remove(pkt)
                # It stays open: any later event of its trace id is still its own.
                return pkt
        return None

    def _close(self, pkt: Packet) -> None:
        for tid in pkt.trace_ids:
            if self.open.get(tid) is pkt:
                del self.open[tid]
        if pkt.copy_of is None and pkt not in self.done:
            self.done.append(pkt)

    def next_due(self) -> Optional[float]:
        if self.done:
            return 0.0
        if not self.open:
            return None
        return min(p.last_seen for p in self.open.values()) + self.hold

    def ready(self, now: float, flush: bool = False) -> list[Packet]:
        for pkt in self._unique_open():
            if flush or now - pkt.last_seen >= self.hold:
                self._close(pkt)
        out = sorted(self.done, key=lambda p: p.first_seen)
        self.done = []
        return out
