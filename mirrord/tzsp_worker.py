"""The TZSP data path: one worker process per mirrored interface.

The daemon builds a `TzspJob`, wraps it in a `TzspWorker` and starts it; the
worker is a separate `python -m mirrord.tzsp_worker` process (spawned, not
forked: the daemon holds netlink sockets and a selector we do not want to
duplicate), so packet work never delays the control loop. The worker:

- opens an AF_PACKET socket on the job's ifindex with the job's match
  compiled to classic BPF (direction, match, and "never the collector"),
  attached before any packet can be queued, and a TPACKET_V3 ring;
- wraps each frame in TZSP (VLAN tags re-inserted, snap length honoured,
  tag 41 when cut) and sends batches with sendmmsg to the collector; the
  kernel routes them, through any interface;
- publishes its counters in a shared memory block the daemon reads without
  a round trip, and a one-line reason when it exits.

Collector trouble (ICMP errors, no route) is counted and survived; the
interface going down or away ends the worker with a reason (ENETDOWN /
ENXIO): the daemon starts a new one when the interface is back.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from . import tzsp
from .bpf import compile_filter
from .capture import (
    BLOCK_HDR,
    BLOCK_STATUS_BYTE,
    IOV_PAIR,
    IOV_PAIR_SIZE,
    PACKET_OUTGOING,
    PKT_HDR,
    SCRATCH_SLOT,
    SLL_OFF,
    SLL_PKTTYPE_OFF,
    SLL_PROTOCOL,
    TP_STATUS_USER,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    CaptureError,
    RxRing,
    UdpBatchSender,
    libc,
    synth_ethernet,
)
from .match import Address, Match, PortRange

# Not __name__: run with -m, that is "__main__", which says nothing in a log.
log = logging.getLogger("mirrord.tzsp_worker")

EXIT_STOPPED = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERFACE = 3


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
    source: Optional[Address] = None
    # Capture ring size; 0 = the default (8 MiB). Bigger rides out longer
    # stalls (a busy CPU, bursts of large frames) at the cost of memory.
    ring_bytes: int = 0
    # Other addresses whose traffic is never captured: every collector of the
    # spec (the daemon's plan.exclusions), so that no worker copies another
    # worker's datagrams (or their fragments, or the collectors' ICMP errors).
    exclude: tuple[Address, ...] = ()

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


# -- the job's wire form -------------------------------------------------------
# Generic over the dataclass's fields and their annotations, so a field added
# to TzspJob travels to the worker without touching this code. A Match keeps
# its own form (the one the standalone --match option reads).

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


# -- counters in shared memory ---------------------------------------------

@dataclass(frozen=True)
class TzspCounters:
    captured: int = 0     # frames taken from the ring
    sent: int = 0         # datagrams handed to the kernel
    bytes: int = 0        # UDP payload bytes sent (TZSP header + frame)
    ring_drops: int = 0   # frames the kernel dropped because the ring was full
    send_errors: int = 0  # datagrams not sent (unreachable collector, no route...)
    truncated: int = 0    # frames cut to the snap length

    def __add__(self, other: TzspCounters) -> TzspCounters:
        return TzspCounters(*(getattr(self, f.name) + getattr(other, f.name)
                              for f in fields(self)))


COUNTER_NAMES = tuple(f.name for f in fields(TzspCounters))
SHM_SIZE = 4096
# seq, counters..., pid, state, exit code: u64 each; then the reason text.
_SHM_WORDS = struct.Struct("=Q" + "Q" * len(COUNTER_NAMES))
_SHM_META = struct.Struct("=QQq")  # pid, state, exit code
_META_OFF = _SHM_WORDS.size
_REASON_OFF = 256
_REASON_LEN = struct.Struct("=H")
_REASON_MAX = SHM_SIZE - _REASON_OFF - 2
STATE_STARTING, STATE_RUNNING, STATE_EXITED = 0, 1, 2


class SharedCounters:
    """A seqlock-protected block: the worker writes, the daemon reads."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.seq = 0

    def write(self, values: tuple[int, ...]) -> None:
        self.seq += 1  # odd: a write is in progress
        struct.pack_into("=Q", self.buf, 0, self.seq)
        _SHM_WORDS.pack_into(self.buf, 0, self.seq, *values)
        self.seq += 1
        struct.pack_into("=Q", self.buf, 0, self.seq)

    def set_meta(self, pid: int, state: int, code: int = 0) -> None:
        _SHM_META.pack_into(self.buf, _META_OFF, pid, state, code)

    def set_reason(self, reason: str) -> None:
        raw = reason.encode("utf-8", "replace")[:_REASON_MAX]
        self.buf[_REASON_OFF + 2:_REASON_OFF + 2 + len(raw)] = raw
        _REASON_LEN.pack_into(self.buf, _REASON_OFF, len(raw))

    def read(self) -> TzspCounters:
        values: tuple[int, ...] = (0,) * (len(COUNTER_NAMES) + 1)
        for _ in range(1000):
            values = _SHM_WORDS.unpack_from(self.buf, 0)
            if values[0] & 1:
                continue
            if struct.unpack_from("=Q", self.buf, 0)[0] == values[0]:
                break
        return TzspCounters(*values[1:])

    def meta(self) -> tuple[int, int, int]:
        pid, state, code = _SHM_META.unpack_from(self.buf, _META_OFF)
        return int(pid), int(state), int(code)

    def reason(self) -> str:
        (n,) = _REASON_LEN.unpack_from(self.buf, _REASON_OFF)
        return bytes(self.buf[_REASON_OFF + 2:_REASON_OFF + 2 + n]).decode("utf-8", "replace")


def _new_shared_block() -> tuple[int, mmap.mmap]:
    try:
        fd = os.memfd_create("mirrord-tzsp", 0)
    except (AttributeError, OSError):
        import tempfile

        d = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryFile(dir=d) as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, SHM_SIZE)
    return fd, mmap.mmap(fd, SHM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


# -- the worker ------------------------------------------------------------

class StopFlag:
    """Set from a signal handler; the hot loop checks it once per block."""

    def __init__(self) -> None:
        self.set = False


class Forwarder:
    """Ring -> TZSP -> sendmmsg. The hot loop is `pump`."""

    def __init__(self, job: TzspJob, ring: RxRing, sender: UdpBatchSender,
                 shared: Optional[SharedCounters], stop: StopFlag) -> None:
        self.job, self.ring, self.sender, self.shared = job, ring, sender, shared
        self.stop = stop
        self.header = ctypes.create_string_buffer(tzsp.HEADER, len(tzsp.HEADER))
        self.header_addr = ctypes.addressof(self.header)
        self.scratch = memoryview(sender.scratch).cast("B")
        self.captured = self.sent = self.bytes = self.send_errors = self.truncated = 0
        self.max_held = max(1, ring.block_nr // 4)
        self._stats_due = 0.0
        self._eth_cache: dict[tuple[int, bool], bytes] = {}

    def counters(self) -> tuple[int, ...]:
        return (self.captured, self.sent, self.bytes, self.ring.drops, self.send_errors,
                self.truncated)

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._stats_due:
            return
        self._stats_due = now + 0.25
        self.ring.statistics()
        if self.shared is not None:
            self.shared.write(self.counters())

    def _flush(self, n: int, nbytes: int) -> None:
        sent, errors = self.sender.flush(n)
        self.sent += sent
        self.send_errors += errors
        self.bytes += nbytes if sent == n else self.sender.datagram_bytes(sent)
        # Under sustained load pump() does not return: publish from here too.
        self.publish()

    def pump(self) -> int:
        """Forward every frame of every ready block; returns the frames handled."""
        ring = self.ring
        m = ring.map
        assert m is not None
        if ring.link == "raw":
            return self._pump_raw()
        base, bs, nblocks = ring.address, ring.block_size, ring.block_nr
        iov = self.sender.iov
        cap = self.sender.capacity
        pack = IOV_PAIR.pack_into
        unpack = PKT_HDR.unpack_from
        hdr_addr, hdr_len = self.header_addr, tzsp.HEADER_LEN
        special = self._special
        slot = nbytes = handled = 0
        held: list[int] = []
        stop = self.stop
        while not stop.set:
            b = ring.cursor
            boff = b * bs
            if not m[boff + BLOCK_STATUS_BYTE] & TP_STATUS_USER:
                break
            num, off = BLOCK_HDR.unpack_from(m, boff + 12)
            off += boff
            self.captured += num
            for _ in range(num):
                nxt, snap, plen, status, mac, _net, tci, tpid = unpack(m, off)
                if status & TP_STATUS_VLAN_VALID or snap != plen:
                    nbytes += special(slot, off, mac, snap, plen, status, tci, tpid)
                else:
                    pack(iov, slot * IOV_PAIR_SIZE, hdr_addr, hdr_len, base + off + mac, snap)
                    nbytes += snap + hdr_len
                slot += 1
                if slot == cap:
                    self._send_and_release(slot, nbytes, held)
                    slot = nbytes = 0
                off += nxt
            handled += num
            held.append(b)
            ring.cursor = (b + 1) % nblocks
            if len(held) >= self.max_held:
                self._send_and_release(slot, nbytes, held)
                slot = nbytes = 0
        self._send_and_release(slot, nbytes, held)
        return handled

    def _send_and_release(self, slot: int, nbytes: int, held: list[int]) -> None:
        """Send the batch, then give its ring blocks back: the iovecs point into them."""
        self._flush(slot, nbytes)
        for h in held:
            self.ring.release(h)
        held.clear()

    def _special(self, slot: int, off: int, mac: int, snap: int, plen: int, status: int,
                 tci: int, tpid: int) -> int:
        """A frame whose VLAN tag must be re-inserted, or that was cut: build
        its header (and the first 12 bytes + tag) in the slot's scratch."""
        m = self.ring.map
        assert m is not None
        frame = self.ring.address + off + mac
        at = slot * SCRATCH_SLOT
        cut = snap != plen
        if cut:
            self.truncated += 1
        if status & TP_STATUS_VLAN_VALID and snap >= 12:
            if not status & TP_STATUS_VLAN_TPID_VALID:
                tpid = 0x8100
            head = tzsp.header(plen + 4) if cut else tzsp.HEADER
            start = off + mac
            piece = head + m[start:start + 12] + struct.pack("!HH", tpid, tci)
            skip = 12
        else:
            piece = tzsp.header(plen)
            skip = 0
        self.scratch[at:at + len(piece)] = piece
        IOV_PAIR.pack_into(self.sender.iov, slot * IOV_PAIR_SIZE,
                           self.sender.scratch_addr + at, len(piece), frame + skip, snap - skip)
        return len(piece) + snap - skip

    def _pump_raw(self) -> int:
        """Devices without a link header: every frame gets a synthesized
        Ethernet header (tzsp2pcap assumes Ethernet)."""
        ring = self.ring
        m = ring.map
        assert m is not None
        base, bs, nblocks = ring.address, ring.block_size, ring.block_nr
        cap = self.sender.capacity
        slot = nbytes = handled = 0
        held: list[int] = []
        while not self.stop.set:
            b = ring.cursor
            boff = b * bs
            if not m[boff + BLOCK_STATUS_BYTE] & TP_STATUS_USER:
                break
            num, off = BLOCK_HDR.unpack_from(m, boff + 12)
            off += boff
            self.captured += num
            for _ in range(num):
                nxt, snap, plen, _status, mac, net, _tci, _tpid = PKT_HDR.unpack_from(m, off)
                (proto,) = SLL_PROTOCOL.unpack_from(m, off + SLL_OFF + 2)
                outgoing = m[off + SLL_PKTTYPE_OFF] == PACKET_OUTGOING
                lead = max(0, net - mac)
                flen, olen = max(0, snap - lead), max(0, plen - lead)
                if proto not in (0x0800, 0x86DD) and flen:
                    version = m[off + net] >> 4
                    proto = 0x0800 if version == 4 else 0x86DD if version == 6 else proto
                eth = self._eth_cache.get((proto, outgoing))
                if eth is None:
                    eth = self._eth_cache[(proto, outgoing)] = synth_ethernet(proto, outgoing)
                if flen != olen:
                    self.truncated += 1
                    piece = tzsp.header(olen + 14) + eth
                else:
                    piece = tzsp.HEADER + eth
                at = slot * SCRATCH_SLOT
                self.scratch[at:at + len(piece)] = piece
                IOV_PAIR.pack_into(self.sender.iov, slot * IOV_PAIR_SIZE,
                                   self.sender.scratch_addr + at, len(piece),
                                   base + off + net, flen)
                nbytes += len(piece) + flen
                slot += 1
                if slot == cap:
                    self._send_and_release(slot, nbytes, held)
                    slot = nbytes = 0
                off += nxt
            handled += num
            held.append(b)
            ring.cursor = (b + 1) % nblocks
            if len(held) >= self.max_held:
                self._send_and_release(slot, nbytes, held)
                slot = nbytes = 0
        self._send_and_release(slot, nbytes, held)
        return handled


def _interface_state(ifindex: int, name: str) -> Optional[str]:
    """Why the interface cannot be captured (gone, renamed, re-created), or None."""
    try:
        now = socket.if_indextoname(ifindex)
    except OSError:
        return f"interface {name} went away (ENXIO)"
    if now != name:
        return f"interface {name} went away (ifindex {ifindex} is now {now})"
    return None


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


class _Stop(Exception):
    pass


def run_job(job: TzspJob, shared: Optional[SharedCounters], wakeup_fd: int, stop: StopFlag,
            ring_bytes: Optional[int] = None) -> tuple[int, str, TzspCounters]:
    """Capture and forward until stopped or the interface fails.

    Returns (exit code, one-line reason, final counters).
    """
    none = TzspCounters()
    why = _interface_state(job.ifindex, job.interface)
    if why:
        return EXIT_INTERFACE, why, none
    try:
        sender = UdpBatchSender(str(job.collector), job.port,
                                str(job.source) if job.source else None)
    except OSError as e:
        return (EXIT_CONFIG,
                f"cannot send to {job.collector}:{job.port}: {e.strerror} ({_errname(e)})", none)
    directions = tuple(job.directions)

    def program(link: Any) -> Any:
        return compile_filter(job.match, job.never_captured(), directions=directions, link=link,
                              snaplen=job.snaplen)

    kw: dict[str, Any] = {}
    if ring_bytes or job.ring_bytes:
        kw["ring_bytes"] = ring_bytes or job.ring_bytes
    try:
        ring = RxRing(job.ifindex, program, ignore_outgoing=directions == ("in",), **kw)
    except CaptureError as e:
        sender.close()
        return EXIT_CONFIG, f"interface {job.interface}: {e.strerror}", none
    except OSError as e:
        sender.close()
        if e.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
            gone = _interface_state(job.ifindex, job.interface)
            return (EXIT_INTERFACE, gone or f"interface {job.interface} is down (ENETDOWN)",
                    none)
        return (EXIT_ERROR,
                f"cannot capture on {job.interface}: {e.strerror} ({_errname(e)})", none)
    fwd = Forwarder(job, ring, sender, shared, stop)
    if not sender.connected:
        log.warning("%s: collector %s:%s not reachable yet (%s); counting send errors",
                    job.mirror, job.collector, job.port, sender.last_error)
    log.info("%s: capturing %s on %s (%s link, %d x %d KiB ring%s) -> %s:%d via %s",
             job.mirror, "/".join(directions), job.interface, ring.link, ring.block_nr,
             ring.block_size >> 10, ", ignoring outgoing" if ring.ignore_outgoing else "",
             job.collector, job.port, "sendmmsg" if sender.batched else "sendmsg")
    if shared is not None:
        shared.set_meta(os.getpid(), STATE_RUNNING)
    code, reason = EXIT_STOPPED, "stopped"
    try:
        idle_published = True
        while not stop.set:
            if fwd.pump():
                fwd.publish()
                idle_published = False
                continue
            if not idle_published:
                fwd.publish(force=True)
                idle_published = True
            events = ring.wait(-1, (wakeup_fd,))
            for fd, ev in events:
                if fd == wakeup_fd:
                    try:
                        os.read(wakeup_fd, 512)
                    except OSError:
                        pass
                    if stop.set:
                        raise _Stop()
                if ev & (select.POLLERR | select.POLLHUP):
                    try:
                        ring.check_error()
                    except OSError as e:
                        fwd.pump()  # frames captured before the error still go out
                        gone = _interface_state(job.ifindex, job.interface)
                        if gone:
                            code, reason = EXIT_INTERFACE, gone
                        elif e.errno == errno.ENETDOWN:
                            code, reason = EXIT_INTERFACE, (
                                f"interface {job.interface} went down (ENETDOWN)")
                        else:
                            code, reason = EXIT_ERROR, (
                                f"capture on {job.interface} failed: {e.strerror} ({_errname(e)})")
                        stop.set = True
    except _Stop:
        pass
    finally:
        try:
            fwd.publish(force=True)
        except OSError:
            pass
        if shared is not None:
            shared.write(fwd.counters())
        c = fwd.counters()
        log.info("%s: %s; captured %d, sent %d, ring drops %d, send errors %d, truncated %d%s",
                 job.mirror, reason, c[0], c[1], c[3], c[4], c[5],
                 f" (last error {sender.last_error})" if sender.last_error else "")
        ring.close()
        sender.close()
    return code, reason, TzspCounters(*fwd.counters())


def _die_with_parent(parent: int) -> None:
    try:
        libc().prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        return
    if parent and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mirrord.tzsp_worker",
                                description="mirrord TZSP worker (one interface)")
    p.add_argument("--job-fd", type=int, default=-1, metavar="FD",
                   help="read the job (JSON, from TzspJob.to_json) from this file descriptor "
                        "until EOF; the daemon passes it on stdin (0), never in argv or the "
                        "environment, which other users can read")
    p.add_argument("--shm-fd", type=int, default=-1, help="shared counter block (from the daemon)")
    p.add_argument("--parent", type=int, default=0, help="exit when this process goes away")
    p.add_argument("--interface", help="standalone: interface to mirror")
    p.add_argument("--direction", choices=("in", "out", "both"), default="both")
    p.add_argument("--collector", help="standalone: collector address")
    p.add_argument("--port", type=int, default=tzsp.PORT)
    p.add_argument("--snaplen", type=int, default=65535)
    p.add_argument("--match", default="{}", help="standalone: match as JSON (see match_to_dict)")
    p.add_argument("--ring-mib", type=int, default=0, help="ring size (default 8 MiB)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--stats", action="store_true", help="print the final counters as JSON")
    args = p.parse_args(argv)
    from .logsetup import setup_logging

    # The daemon's own target (journal, syslog or stderr) and format, so the
    # worker's lines reach the same place with the same priorities.
    debug = getattr(logging, str(args.log_level).upper(), logging.INFO) <= logging.DEBUG
    setup_logging(2 if debug else 1)
    if args.parent:
        _die_with_parent(args.parent)

    shared: Optional[SharedCounters] = None
    if args.shm_fd >= 0:
        shared = SharedCounters(mmap.mmap(args.shm_fd, SHM_SIZE, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE))
        os.close(args.shm_fd)
        shared.set_meta(os.getpid(), STATE_STARTING)

    def finish(code: int, reason: str) -> int:
        if shared is not None:
            shared.set_reason(reason)
            shared.set_meta(os.getpid(), STATE_EXITED, code)
        return code

    try:
        if args.job_fd >= 0:
            job = TzspJob.from_json(_read_all(args.job_fd).decode())
        elif args.interface and args.collector:
            directions = ("in", "out") if args.direction == "both" else (args.direction,)
            job = TzspJob(mirror=args.interface, interface=args.interface,
                          ifindex=socket.if_nametoindex(args.interface), directions=directions,
                          match=match_from_dict(json.loads(args.match)),
                          collector=ipaddress.ip_address(args.collector), port=args.port,
                          snaplen=args.snaplen)
        else:
            p.error("give --job-fd, or --interface and --collector")
    except (ValueError, KeyError, TypeError, OSError) as e:
        return finish(EXIT_CONFIG, f"bad job: {e}")

    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    stop = StopFlag()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    counters = TzspCounters()
    try:
        code, reason, counters = run_job(
            job, shared, rfd, stop, ring_bytes=args.ring_mib << 20 if args.ring_mib else None)
    except Exception as e:  # the reason line is what the daemon shows
        log.exception("%s: worker failed", job.mirror)
        code, reason = EXIT_ERROR, f"worker failed: {type(e).__name__}: {e}"
    if args.stats:
        print(json.dumps({"reason": reason, "code": code, **asdict(counters)}), flush=True)
    return finish(code, reason)


# -- the daemon's handle ---------------------------------------------------

F_SETPIPE_SZ = 1031


def _job_pipe(data: bytes) -> int:
    """The read end of a pipe that holds `data` and then EOF.

    Written whole before the worker exists, so the daemon never waits on
    it: the pipe is grown first when a job (long match lists) outgrows the
    default 64 KiB.
    """
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        if len(data) > 65536:
            fcntl.fcntl(wfd, F_SETPIPE_SZ, len(data))
        os.set_blocking(wfd, False)
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view):]
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return rfd


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TzspWorker:
    """The daemon's side of one worker process.

    `sentinel` is the read end of a pipe whose write end only the worker
    holds: it reads EOF when the worker exits, whatever the cause. It is new
    after every start(); unregister it from a selector before start() again.
    Counters add up across restarts of the same handle.
    """

    def __init__(self, job: TzspJob) -> None:
        self.job = job
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._shared: Optional[SharedCounters] = None
        self._sentinel: Optional[int] = None
        self._base = TzspCounters()
        self._stopped = False
        self._reason: Optional[str] = None
        self.starts = 0

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def sentinel(self) -> int:
        """The pipe end to watch; -1 once stop() released it (or before start())."""
        return self._sentinel if self._sentinel is not None else -1

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def state(self) -> str:
        """"not started", "starting" (socket not open yet), "running" or "exited"."""
        if self._proc is None:
            return "not started"
        if self._proc.poll() is not None:
            return "exited"
        if self._shared is None:
            return "starting"
        return "running" if self._shared.meta()[1] == STATE_RUNNING else "starting"

    def start(self) -> None:
        if self.running():
            return
        self._release()
        job_r = _job_pipe(self.job.to_json().encode())
        try:
            fd, buf = _new_shared_block()
        except BaseException:
            os.close(job_r)
            raise
        rfd, wfd = os.pipe()
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        level = logging.getLevelName(logging.getLogger("mirrord").getEffectiveLevel())
        # The job (collector, interface, match) goes through a pipe on stdin:
        # argv is world-readable (ps, /proc/PID/cmdline), and the network's
        # layout is why the status socket is 0600.
        argv = [sys.executable, "-m", "mirrord.tzsp_worker", "--job-fd", "0",
                "--shm-fd", str(fd), "--parent", str(os.getpid()), "--log-level", str(level)]
        try:
            # Own session: a terminal's ^C goes to the daemon, which stops us.
            self._proc = subprocess.Popen(argv, pass_fds=(fd, wfd), stdin=job_r,
                                          env=env, close_fds=True, start_new_session=True)
        except BaseException:
            os.close(rfd)
            buf.close()
            raise
        finally:
            os.close(job_r)
            os.close(fd)
            os.close(wfd)
        self._shared = SharedCounters(buf)
        self._sentinel = rfd
        self._stopped = False
        self._reason = None
        self.starts += 1
        log.debug("%s: started TZSP worker pid %d on %s", self.job.mirror, self._proc.pid,
                  self.job.interface)

    def _release(self) -> None:
        """Fold the last process's counters into the base and free its resources."""
        if self._shared is not None:
            self._base = self._base + self._shared.read()
            self._shared.buf.close()
            self._shared = None
        if self._sentinel is not None:
            os.close(self._sentinel)
            self._sentinel = None

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, wait, SIGKILL; idempotent. Unregister `sentinel` first: it is
        closed here (the counters stay readable)."""
        p = self._proc
        if p is not None and p.poll() is None:
            self._stopped = True
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s: TZSP worker pid %d ignored SIGTERM; killing it",
                            self.job.mirror, p.pid)
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        if p is not None:
            self.poll()  # keep the reason: it is read from the sentinel's side
        if self._sentinel is not None:
            os.close(self._sentinel)
            self._sentinel = None

    def poll(self) -> Optional[str]:
        p = self._proc
        if p is None:
            return "not started"
        rc = p.poll()
        if rc is None and self._sentinel is not None:
            # EOF on the sentinel comes as the worker closes its files, a moment
            # before it can be reaped: once it is readable, the exit is certain.
            probe = select.poll()
            probe.register(self._sentinel, select.POLLIN)
            if probe.poll(0):
                try:
                    rc = p.wait(5)
                except subprocess.TimeoutExpired:
                    rc = None
        if rc is None:
            return None
        if self._reason is None:
            reason = self._shared.reason() if self._shared is not None else ""
            if not reason:
                if rc < 0:
                    try:
                        name = signal.Signals(-rc).name
                    except ValueError:
                        name = str(-rc)
                    reason = f"worker killed by {name}"
                else:
                    reason = f"worker exited with status {rc}"
            if self._stopped and rc in (0, -signal.SIGTERM, -signal.SIGKILL):
                reason = "stopped"
            self._reason = reason
        return self._reason

    def counters(self) -> TzspCounters:
        if self._shared is None:
            return self._base
        return self._base + self._shared.read()

    def close(self) -> None:
        """stop() and release the sentinel and counter block."""
        self.stop()
        self.poll()
        self._release()
        self._proc = None

    def __repr__(self) -> str:
        return f"TzspWorker({self.job.mirror!r} on {self.job.interface}, pid {self.pid})"


def counters_dict(c: TzspCounters) -> dict[str, int]:
    return asdict(c)


if __name__ == "__main__":
    sys.exit(main())
