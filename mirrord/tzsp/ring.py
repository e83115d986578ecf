"""AF_PACKET capture into a TPACKET_V3 ring.

The ring is shared with the kernel: it writes frames into blocks and hands a
whole block to userspace at once (one wake-up per block, or when the block
retire timer fires), so the per-packet cost in Python is a header unpack.
The sender (send.py) points its iovecs straight into the ring, so a frame is
copied once, by the kernel, from the ring into the outgoing datagram.
"""

from __future__ import annotations

# _socket, not socket: the wrapper module pulls in enum and selectors (about
# 1.3 MiB of a capture process that needs none of them); typing only for mypy.
import _socket
import ctypes
import errno
import mmap
import os
import select
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Literal, Optional

    Link = Literal["ethernet", "raw"]

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
ETH_P_ALL = 0x0003

PACKET_HOST = 0
PACKET_OUTGOING = 4

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_COPY = 1 << 1
TP_STATUS_LOSING = 1 << 2
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6

# Link types whose frames start with an Ethernet header.
ETHERNET_HATYPES = frozenset({1, 772})  # ARPHRD_ETHER, ARPHRD_LOOPBACK
# Link types with no link header: L3 starts the frame (tun/wireguard, PPP,
# raw-IP modems, IP-in-IP / SIT / GRE / ip6 tunnels).
RAW_HATYPES = frozenset({0xFFFE, 512, 519, 768, 769, 776, 778, 823})

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1:
# block_status @8, num_pkts @12, offset_to_first_pkt @16, blk_len @20.
BLOCK_STATUS_OFF = 8
# The byte of the (native-endian) u32 block_status that holds TP_STATUS_USER.
BLOCK_STATUS_BYTE = BLOCK_STATUS_OFF + (3 if sys.byteorder == "big" else 0)
BLOCK_HDR = struct.Struct("=II")  # num_pkts, offset_to_first_pkt at offset 12
# struct tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac, net,
# rxhash, vlan_tci, vlan_tpid ...
PKT_HDR = struct.Struct("=I8xIIIHH4xIH")
SLL_OFF = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr))
SLL_PROTOCOL = struct.Struct("!H")  # at SLL_OFF + 2
SLL_PKTTYPE_OFF = SLL_OFF + 10

DEFAULT_BLOCK_SIZE = 1 << 18
MIN_BLOCK_SIZE = 1 << 17  # a 64 KiB frame and its headers fit
# The whole ring is resident from the mmap on (the kernel maps every page at
# once), so it is the largest part of a tap's memory: 512 KiB holds about 4000
# small frames or 340 full-size ones (README's limits; bench/README.md).
DEFAULT_RING_BYTES = 1 << 19
DEFAULT_RETIRE_MS = 10
# At low rates a block is handed over when its retire timer fires, part full:
# the ring then holds block_nr x retire time of traffic, whatever its size. A
# small ring (4 blocks by default) gets a longer timer, so that it still rides
# out about 200 ms without the capture process (a busy CPU); a copy then waits
# up to that timer (50 ms in the default ring) before it is sent.
RING_HOLD_MS = 200


def retire_ms_for(block_nr: int) -> int:
    return max(DEFAULT_RETIRE_MS, RING_HOLD_MS // max(1, block_nr))
SO_ATTACH_FILTER = 26
SIOCGIFMTU = 0x8921


def block_size_for(ring_bytes: int) -> int:
    """Eight blocks where the minimum block size allows (four in the default
    ring): a block is handed back whole, so small rings want small blocks."""
    size = DEFAULT_BLOCK_SIZE
    while size > MIN_BLOCK_SIZE and ring_bytes // size < 8:
        size >>= 1
    return size


def attach_packed(sock: _socket.socket, packed: bytes) -> None:
    """SO_ATTACH_FILTER with a program already packed as struct sock_filter[]."""
    buf = ctypes.create_string_buffer(packed, len(packed))
    fprog = struct.pack("HL", len(packed) // 8, ctypes.addressof(buf))
    sock.setsockopt(_socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class CaptureError(OSError):
    """A capture or send failure with a one-line, user-facing reason."""


_libc: Optional[ctypes.CDLL] = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _bind_ifindex(sock: _socket.socket, ifindex: int, protocol: int) -> None:
    """bind(2) to an interface by index; Python's AF_PACKET bind only takes a name,
    and a name can point at a re-created device with another index."""
    sll = struct.pack("=HHiHBB8s", _socket.AF_PACKET, _socket.htons(protocol), ifindex, 0, 0, 0,
                      b"")
    buf = ctypes.create_string_buffer(sll, len(sll))
    if libc().bind(sock.fileno(), buf, len(sll)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def link_kind(hatype: int) -> Link:
    if hatype in ETHERNET_HATYPES:
        return "ethernet"
    if hatype in RAW_HATYPES:
        return "raw"
    raise CaptureError(errno.EPROTONOSUPPORT, f"link type {hatype} is neither Ethernet nor raw IP")


def synth_ethernet(ethertype: int, outgoing: bool) -> bytes:
    """An Ethernet header for a frame from a device that has none (PPP, tun).

    tzsp2pcap and most receivers assume Ethernet whatever the encapsulation
    says. The locally administered MACs tell the direction apart: the router
    is ...:01, the far end ...:02.
    """
    router, peer = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    dst, src = (peer, router) if outgoing else (router, peer)
    return dst + src + struct.pack("!H", ethertype)


class RxRing:
    """A packet socket on one interface with a BPF filter and a TPACKET_V3 ring.

    The order matters: the socket is created with protocol 0 (no packets),
    bound to learn the link type, given its filter and ring, and only then
    bound to ETH_P_ALL, so nothing unfiltered is ever queued.
    """

    def __init__(
        self,
        ifindex: int,
        programs: dict[str, bytes],
        *,
        ignore_outgoing: bool = False,
        block_size: int = 0,
        ring_bytes: int = DEFAULT_RING_BYTES,
        retire_ms: int = 0,
    ) -> None:
        """`programs`: the packed filter for each link type (see bpf.pack)."""
        self.ifindex = ifindex
        self.block_size = block_size or block_size_for(ring_bytes)
        self.block_nr = max(2, ring_bytes // self.block_size)
        self.sock = _socket.socket(_socket.AF_PACKET, _socket.SOCK_RAW, 0)
        self.map: Optional[mmap.mmap] = None
        self._addr_holder: Optional[ctypes.c_char] = None
        self._poller: Optional[tuple[tuple[int, ...], select.poll]] = None
        try:
            self._open(programs, ignore_outgoing, retire_ms or retire_ms_for(self.block_nr))
        except BaseException:
            self.close()
            raise
        self.cursor = 0
        self.drops = 0
        self.kernel_packets = 0

    def _open(self, programs: dict[str, bytes], ignore_outgoing: bool, retire_ms: int) -> None:
        s = self.sock
        _bind_ifindex(s, self.ifindex, 0)
        self.hatype: int = s.getsockname()[3]
        self.link: Link = link_kind(self.hatype)
        if self.link not in programs:
            raise CaptureError(errno.EPROTONOSUPPORT, f"no filter for a {self.link} link")
        attach_packed(s, programs[self.link])
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        self.ignore_outgoing = False
        if ignore_outgoing:
            try:
                s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                self.ignore_outgoing = True
            except OSError:
                pass  # kernel < 4.20: the BPF program still drops them
        frame_size = 2048
        req = struct.pack("=7I", self.block_size, self.block_nr, frame_size,
                          self.block_size * self.block_nr // frame_size, retire_ms, 0, 0)
        s.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        size = self.block_size * self.block_nr
        self.map = mmap.mmap(s.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The ring's address, for iovecs that point into it.
        self._addr_holder = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._addr_holder)
        _bind_ifindex(s, self.ifindex, ETH_P_ALL)
        self.check_error()

    def set_filter(self, programs: dict[str, bytes]) -> None:
        """Replace the socket's filter: SO_ATTACH_FILTER swaps it under RCU, so
        every frame meets either the old program or the new one."""
        if self.link not in programs:
            raise CaptureError(errno.EPROTONOSUPPORT, f"no filter for a {self.link} link")
        attach_packed(self.sock, programs[self.link])

    def fileno(self) -> int:
        return self.sock.fileno()

    def mtu(self) -> int:
        """The device's MTU now (SIOCGIFMTU): frames longer than it plus the
        link header are GRO/GSO super-frames."""
        ifreq = ctypes.create_string_buffer(
            _socket.if_indextoname(self.ifindex).encode()[:15].ljust(16, b"\0") + bytes(24), 40)
        if libc().ioctl(self.sock.fileno(), SIOCGIFMTU, ifreq) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(struct.unpack_from("=i", ifreq, 16)[0])

    def check_error(self) -> None:
        """Raise the socket's pending error (ENETDOWN when the device went down)."""
        err = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    def ready(self, block: int) -> bool:
        assert self.map is not None
        return bool(self.map[block * self.block_size + BLOCK_STATUS_BYTE] & TP_STATUS_USER)

    def block_offset(self, block: int) -> int:
        return block * self.block_size

    def release(self, block: int) -> None:
        """Hand a block back to the kernel (after its frames were sent)."""
        assert self.map is not None
        struct.pack_into("=I", self.map, block * self.block_size + BLOCK_STATUS_OFF,
                         TP_STATUS_KERNEL)

    def wait(self, timeout_ms: int, extra: Sequence[int] = ()) -> list[tuple[int, int]]:
        """poll(2) the socket (and `extra` fds) until a block is ready or an error."""
        key = tuple(extra)
        if self._poller is None or self._poller[0] != key:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN | select.POLLERR)
            for fd in extra:
                p.register(fd, select.POLLIN)
            self._poller = (key, p)
        return self._poller[1].poll(timeout_ms)

    def statistics(self) -> tuple[int, int]:
        """(packets, drops) since the last call; the kernel resets them on read."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, _freeze = struct.unpack("=III", raw)
        self.kernel_packets += packets
        self.drops += drops
        return packets, drops

    def close(self) -> None:
        self._addr_holder = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # an exported pointer still alive; the fd close below frees the ring
            self.map = None
        self.sock.close()
