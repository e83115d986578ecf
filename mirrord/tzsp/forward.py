"""The hot loop: one tap's ring -> TZSP -> sendmmsg.

`Forwarder.pump` walks the ready blocks of a TPACKET_V3 ring, points a pair of
iovecs per frame at a TZSP header and at the frame in the ring (so the kernel
copies each frame once, into the datagram), sends the batch with sendmmsg,
and only then hands the blocks back. Frames whose VLAN tag the kernel took
off, frames cut to the snap length, and frames of devices without a link
header get their header built in the sender's scratch area. Frames the ring
marks TP_STATUS_CSUMNOTREADY get their TCP/UDP checksum completed in place in
the ring first (csum.py): the flag shares the VLAN bit's test, so other
frames pay nothing for it. Frames longer than the device's MTU (GRO/GSO
super-frames) are counted as `oversize` (one comparison per frame). The
capture process (capture.py) runs one Forwarder per tap; the loop reads best
whole, so the per-frame paths for both link types stay here, side by side.
"""

from __future__ import annotations

import ctypes
import struct
import time

from . import codec as tzsp
from .csum import TP_STATUS_CSUMNOTREADY, complete_ethernet, complete_l3
from .ring import (
    BLOCK_HDR,
    BLOCK_STATUS_BYTE,
    PACKET_OUTGOING,
    PKT_HDR,
    SLL_OFF,
    SLL_PKTTYPE_OFF,
    SLL_PROTOCOL,
    TP_STATUS_USER,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    RxRing,
    synth_ethernet,
)
from .send import IOV_PAIR, IOV_PAIR_SIZE, SCRATCH_SLOT, UdpBatchSender

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from .protocol import Slot


class StopFlag:
    """Set from a signal handler; the hot loop checks it once per block."""

    def __init__(self) -> None:
        self.set = False


# Frames that leave the fast path: a VLAN tag to put back, a checksum to complete.
SLOW_STATUS = TP_STATUS_VLAN_VALID | TP_STATUS_CSUMNOTREADY
# Room for link headers above the MTU: Ethernet and one 802.1Q tag left in the frame.
ETH_OVERHEAD = 18


class Forwarder:
    """Ring -> TZSP -> sendmmsg. The hot loop is `pump`."""

    def __init__(self, ring: RxRing, sender: UdpBatchSender, shared: Optional[Slot],
                 stop: StopFlag) -> None:
        self.ring, self.sender, self.shared = ring, sender, shared
        self.stop = stop
        self.header = ctypes.create_string_buffer(tzsp.HEADER, len(tzsp.HEADER))
        self.header_addr = ctypes.addressof(self.header)
        self.scratch = memoryview(sender.scratch).cast("B")
        self.captured = self.sent = self.bytes = self.send_errors = self.truncated = 0
        self.oversize = 0  # frames longer than MTU + link header: GRO/GSO super-frames
        self.checksummed = 0  # partial checksums completed (logged, not a slot counter)
        self.mtu = 0
        # The longest frame that is not a super-frame (65535 until the MTU is known).
        self.max_len = 0xFFFF
        self._read_mtu()
        self.max_held = max(1, ring.block_nr // 4)
        # Blocks per pump() at most: under sustained load on one tap the loop
        # still comes round to the others (and to the daemon's messages).
        self.budget = max(2, ring.block_nr // 2)
        self._stats_due = 0.0
        self._eth_cache: dict[tuple[int, bool], bytes] = {}

    def counters(self) -> tuple[int, ...]:
        return (self.captured, self.sent, self.bytes, self.ring.drops, self.send_errors,
                self.truncated, self.oversize)

    def _read_mtu(self) -> None:
        try:
            mtu = self.ring.mtu()
        except OSError:
            return  # the device is going away: the ring's error says so
        if mtu != self.mtu:
            self.mtu = mtu
            self.max_len = mtu + (ETH_OVERHEAD if self.ring.link == "ethernet" else 0)

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._stats_due:
            return
        self._stats_due = now + 0.25
        self.ring.statistics()
        self._read_mtu()
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
        """Forward the frames of the ready blocks (`budget` at most); returns how many."""
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
        max_len = self.max_len
        slot = nbytes = handled = blocks = 0
        budget = self.budget
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
                if status & SLOW_STATUS or snap != plen or plen > max_len:
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
            blocks += 1
            if len(held) >= self.max_held:
                self._send_and_release(slot, nbytes, held)
                slot = nbytes = 0
            if blocks >= budget:
                break
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
        """A frame off the fast path: a partial checksum is completed (unless
        the frame was cut), a super-frame counted; a frame whose VLAN tag must
        be re-inserted, or that was cut, gets its header (and the first 12
        bytes + tag) built in the slot's scratch."""
        m = self.ring.map
        assert m is not None
        frame = self.ring.address + off + mac
        at = slot * SCRATCH_SLOT
        cut = snap != plen
        if plen > self.max_len:
            self.oversize += 1
        if cut:
            self.truncated += 1
        elif status & TP_STATUS_CSUMNOTREADY and complete_ethernet(m, off + mac,
                                                                   off + mac + snap):
            # Written in the ring: the block is ours until released, mapped writable.
            self.checksummed += 1
        if not cut and not status & TP_STATUS_VLAN_VALID:
            IOV_PAIR.pack_into(self.sender.iov, slot * IOV_PAIR_SIZE, self.header_addr,
                               tzsp.HEADER_LEN, frame, snap)
            return tzsp.HEADER_LEN + snap
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
        slot = nbytes = handled = blocks = 0
        budget = self.budget
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
                nxt, snap, plen, status, mac, net, _tci, _tpid = PKT_HDR.unpack_from(m, off)
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
                if olen > self.max_len:
                    self.oversize += 1
                if flen != olen:
                    self.truncated += 1
                    piece = tzsp.header(olen + 14) + eth
                else:
                    piece = tzsp.HEADER + eth
                    if status & TP_STATUS_CSUMNOTREADY and complete_l3(m, off + net,
                                                                        off + net + flen):
                        self.checksummed += 1
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
            blocks += 1
            if len(held) >= self.max_held:
                self._send_and_release(slot, nbytes, held)
                slot = nbytes = 0
            if blocks >= budget:
                break
        self._send_and_release(slot, nbytes, held)
        return handled
