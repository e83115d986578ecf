"""A TZSP tap as the daemon hands it over, and what it reads back.

- `TzspJob`: what one tap is asked to do, made from a `plan.TzspTap` in one
  place (`TzspJob.from_tap`); `TAP_FIELDS_UNUSED` names the tap's fields the
  job leaves out, and a unit test fails on any field in neither.
- The job's JSON form (`to_json`/`from_json`): generic over the dataclass's
  fields, so a field added to TzspJob travels without touching this code
  (tests hand jobs to a worker in another namespace this way).
- `tap_line`: the job as the capture process takes it (protocol.TapLine), its
  match compiled to classic BPF here, on the daemon's side.
- `TzspCounters`: a tap's counters, read from its slot of the shared block
  (`SharedCounters`; the layout is protocol.py's).

Not imported by the capture process (dataclasses, typing, ipaddress and the
match are what protocol.py keeps out of it).
"""

from __future__ import annotations

import functools
import ipaddress
import json
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Optional, Union, get_args, get_origin, get_type_hints

from ..match import Address, Match, PortRange
from .protocol import COUNTER_NAMES, Slot, TapLine

if TYPE_CHECKING:
    from ..plan import TzspTap

__all__ = [
    "TAP_FIELDS_UNUSED", "SharedCounters", "TzspCounters", "TzspJob", "match_from_dict",
    "match_to_dict", "tap_line",
]

# The fields of a plan.TzspTap (a dotted name: a field of its collector) that
# no job carries, and why. Every other field must reach the job through
# TzspJob.from_tap: tests/unit/test_tzsp.py changes each field in turn.
TAP_FIELDS_UNUSED: dict[str, str] = {
    "collector.name": "the spec's name for the collector; the job sends to its address",
    "collector.interface": "how the plan checked the collector's reach; the kernel routes "
                           "every datagram",
    "collector.transport": "decided by the plan: a TzspTap exists only for TZSP",
    "collector.vni": "VXLAN's; a TZSP collector has none",
    "collector.session": "ERSPAN's; a TZSP collector has none",
    "collector.members": "a group's: the plan made one tap per live member, and the job "
                         "sends to the tap's member_address",
    "collector.balance": "flow is the only balance; the tap's buckets carry it",
    "member": "the member as the spec wrote it; the job sends to member_address",
    "member_index": "which capture process serves the tap: the daemon's TapPool decides",
}


@dataclass(frozen=True)
class TzspJob:
    mirror: str
    interface: str
    ifindex: int
    directions: tuple[str, ...]  # ("in",), ("out",) or ("in", "out")
    match: Match
    collector: Address
    port: int
    snaplen: int
    # The sending socket's address; None: the kernel's choice. Only the
    # standalone worker sets it (a plan.TzspTap has none).
    source: Optional[Address] = None
    # Capture ring size; 0 = the default (512 KiB). Bigger rides out longer
    # stalls (a busy CPU, bursts of large frames) at the cost of memory: the
    # whole ring is resident.
    ring_bytes: int = 0
    # Other addresses whose traffic is never captured: every collector of the
    # spec (the daemon's plan.exclusions), so that no tap copies another
    # tap's datagrams (or their fragments, or the collectors' ICMP errors).
    exclude: tuple[Address, ...] = ()
    # A group member's flow buckets (tzsp.bpf): only those flows are captured;
    # None: every flow.
    buckets: Optional[tuple[int, ...]] = None

    @classmethod
    def from_tap(cls, tap: TzspTap) -> TzspJob:
        """The job of a planned tap: the one place a TzspTap becomes a job."""
        c = tap.collector
        return cls(mirror=tap.mirror, interface=tap.interface, ifindex=tap.ifindex,
                   directions=tuple(tap.directions), match=tap.match,
                   collector=tap.destination, port=c.port, snaplen=c.snaplen,
                   ring_bytes=c.ring_mib << 20, exclude=tap.exclude, buckets=tap.buckets)

    def never_captured(self) -> tuple[Address, ...]:
        """The collector and `exclude`, each once: traffic to or from them is dropped."""
        return tuple(dict.fromkeys((self.collector, *self.exclude)))

    def to_json(self) -> str:
        return json.dumps(_encode(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TzspJob:
        job = _decode(cls, json.loads(text), "job")
        assert isinstance(job, cls)
        return job


def tap_line(job: TzspJob, slot: int) -> TapLine:
    """The job as the capture process takes it: filters compiled for both link types."""
    from .bpf import compile_filter, pack

    never = job.never_captured()
    programs = {link: pack(compile_filter(job.match, never, directions=job.directions, link=link,
                                          snaplen=job.snaplen, buckets=job.buckets))
                for link in ("ethernet", "raw")}
    return TapLine(slot, job.ifindex, tuple(job.directions), str(job.collector), job.port,
                   str(job.source) if job.source else None, job.ring_bytes, job.interface,
                   job.mirror, programs)


# -- counters ---------------------------------------------------------------

@dataclass(frozen=True)
class TzspCounters:
    captured: int = 0     # frames taken from the ring
    sent: int = 0         # datagrams handed to the kernel
    bytes: int = 0        # UDP payload bytes sent (TZSP header + frame)
    ring_drops: int = 0   # frames the kernel dropped because the ring was full
    send_errors: int = 0  # datagrams not sent (unreachable collector, no route...)
    truncated: int = 0    # frames cut to the snap length
    oversize: int = 0     # frames longer than the MTU (GRO/GSO super-frames)

    def __add__(self, other: TzspCounters) -> TzspCounters:
        return TzspCounters(*(getattr(self, f.name) + getattr(other, f.name)
                              for f in fields(self)))


# The slot's words are these counters, in this order.
assert tuple(f.name for f in fields(TzspCounters)) == COUNTER_NAMES


class SharedCounters(Slot):
    """A tap's slot, read as TzspCounters."""

    def read(self) -> TzspCounters:
        return TzspCounters(*self.values())


# -- the job's JSON form ---------------------------------------------------------
# Generic over the dataclass's fields and their annotations. A Match keeps its
# own form (the one the standalone worker's --match option reads).

def _encode(v: Any) -> Any:
    if isinstance(v, Match):
        return match_to_dict(v)
    if is_dataclass(v) and not isinstance(v, type):
        return {f.name: _encode(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address,
                      ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(v)
    if isinstance(v, (tuple, list, frozenset, set)):
        return [_encode(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    raise TypeError(f"cannot send a {type(v).__name__} to the worker")


_ADDRESSES = frozenset({ipaddress.IPv4Address, ipaddress.IPv6Address})
_NETWORKS = frozenset({ipaddress.IPv4Network, ipaddress.IPv6Network})


def _decode(tp: Any, v: Any, where: str) -> Any:
    """`v` (from JSON) as a value of type `tp`; ValueError names the field."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Match:
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected a match object")
        return match_from_dict(v)
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected an object")
        hints = _hints(tp)
        known = {f.name: f for f in fields(tp)}
        unknown = sorted(set(v) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        kw = {name: _decode(hints[name], v[name], f"{where}.{name}")
              for name in known if name in v}
        try:
            return tp(**kw)
        except TypeError as e:  # a field without a default is missing
            raise ValueError(f"{where}: {e}") from None
    if origin is Union:
        if v is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: missing")
        members = frozenset(a for a in args if a is not type(None))
        if members <= _ADDRESSES:
            return ipaddress.ip_address(_need(str, v, where))
        if members <= _NETWORKS:
            return ipaddress.ip_network(_need(str, v, where))
        if len(members) == 1:
            return _decode(next(iter(members)), v, where)
        raise TypeError(f"{where}: cannot decode {tp}")
    if origin in (tuple, list, frozenset, set):
        items = _need(list, v, where)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ValueError(f"{where}: expected {len(args)} items")
            return tuple(_decode(a, x, f"{where}[{i}]")
                         for i, (a, x) in enumerate(zip(args, items)))
        out = [_decode(args[0] if args else Any, x, f"{where}[{i}]") for i, x in enumerate(items)]
        return origin(out)
    if tp in _ADDRESSES:
        return tp(_need(str, v, where))
    if tp in _NETWORKS:
        return tp(_need(str, v, where))
    if tp is float:
        return float(_need((int, float), v, where))
    if tp in (int, str, bool):
        return _need(tp, v, where)
    if tp is Any:
        return v
    raise TypeError(f"{where}: cannot decode {tp}")


@functools.cache
def _hints(tp: type) -> dict[str, Any]:
    return get_type_hints(tp)


def _need(tp: Any, v: Any, where: str) -> Any:
    if not isinstance(v, tp) or (isinstance(v, bool) and tp is not bool):
        raise ValueError(f"{where}: unexpected value {v!r}")
    return v


def match_to_dict(m: Match) -> dict[str, Any]:
    def ranges(rs: tuple[PortRange, ...]) -> list[list[int]]:
        return [[r.low, r.high] for r in rs]

    return {
        "family": m.family, "protocols": list(m.protocols), "ports": ranges(m.ports),
        "sports": ranges(m.sports), "dports": ranges(m.dports),
        "sources": [str(n) for n in m.sources], "destinations": [str(n) for n in m.destinations],
    }


def match_from_dict(d: dict[str, Any]) -> Match:
    def ranges(key: str) -> tuple[PortRange, ...]:
        return tuple(PortRange(int(lo), int(hi)) for lo, hi in d.get(key, ()))

    def nets(key: str) -> tuple[Any, ...]:
        return tuple(ipaddress.ip_network(n) for n in d.get(key, ()))

    return Match(
        family=d.get("family", "any"), protocols=tuple(int(p) for p in d.get("protocols", ())),
        ports=ranges("ports"), sports=ranges("sports"), dports=ranges("dports"),
        sources=nets("sources"), destinations=nets("destinations"),
    )
