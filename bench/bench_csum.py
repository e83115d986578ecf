#!/usr/bin/env python3
"""What completing partial checksums costs the TZSP forwarder, and what
segmenting GRO/GSO super-frames would cost. In-process: no root, no namespaces.

1. `complete`: mirrord.tzsp.csum.complete_ethernet on one frame (IPv4/TCP at
   64, 576 and 1500 bytes, IPv6/UDP at 1500, a 64 KiB TCP super-frame), ns per
   frame.
2. `pump`: Forwarder.pump over a synthetic TPACKET_V3 ring (the real block
   and tpacket3_hdr layout in an anonymous mapping) whose frames are marked
   TP_STATUS_CSUMNOTREADY or not, with the sendmmsg call stubbed out: the hot
   loop's own ns per frame, so the flag's cost shows against the loop's.
   With MIRRORD_SRC=/path/to/another/checkout the other version's pump runs
   (its unmarked case is the baseline the fast path is compared with).
3. `segment`: a pure-Python TCP segmenter (this file only, not in mirrord)
   cutting a 64 KiB IPv4 super-frame into MSS-sized frames with their IP and
   TCP headers and checksums: what segmenting in the worker would cost per
   super-frame, before the ~45 extra datagrams it would send.

4. `frames` (root; namespaces created and deleted): how often partial
   checksums and super-frames show in the test lab (tests/harness/lab.py): a
   bounded TCP transfer and 200 UDP datagrams from the LAN host across veth,
   captured on the router's br-lan by a TPACKET_V3 ring like the forwarder's.

    python3 bench/bench_csum.py [--rounds 7] [--only complete,pump,segment,frames]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("MIRRORD_SRC") or str(ROOT))

from mirrord.tzsp import ring as ringmod  # noqa: E402 - after the path set-up above
from mirrord.tzsp.forward import Forwarder, StopFlag  # noqa: E402
from mirrord.tzsp.send import UdpBatchSender  # noqa: E402

CSUMNOTREADY = 1 << 3
MAC_OFF, NET_OFF = 82, 96  # where the kernel puts an Ethernet frame in a ring slot
MSS = 1448


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp4_frame(size: int, timestamps: bool = True) -> bytes:
    """An Ethernet/IPv4/TCP frame of `size` bytes (with timestamps: a 32-byte TCP header)."""
    thl = 32 if timestamps else 20
    payload = bytes((i * 7) & 0xFF for i in range(size - 14 - 20 - thl))
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 2000, (thl // 4) << 4, 0x18, 512, 0, 0)
    if timestamps:
        tcp += b"\x01\x01\x08\x0a" + bytes(8)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000,
                               64, 6, 0, bytes([192, 0, 2, 10]), bytes([198, 51, 100, 10])))
    struct.pack_into("!H", ip, 10, ~_fold(sum(struct.unpack("!10H", ip))) & 0xFFFF)
    return bytes.fromhex("020000000001" "020000000002" "0800") + bytes(ip) + tcp + payload


def udp6_frame(size: int) -> bytes:
    payload = bytes((i * 5) & 0xFF for i in range(size - 14 - 40 - 8))
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(udp) + len(payload), 17, 64,
                     bytes.fromhex("20010db8" + "0" * 23 + "1"),
                     bytes.fromhex("20010db8" + "0" * 23 + "2"))
    return bytes.fromhex("020000000001" "020000000002" "86dd") + ip + udp + payload


def best_ns(fn: Callable[[], Any], n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


# -- 1. completing one frame -------------------------------------------------------

def bench_complete(rounds: int) -> None:
    try:
        from mirrord.tzsp.csum import complete_ethernet
    except ImportError:
        print("complete: this mirrord has no mirrord.tzsp.csum")
        return
    cases = [("ipv4/tcp 64", tcp4_frame(64, timestamps=False)),
             ("ipv4/tcp 576", tcp4_frame(576)), ("ipv4/tcp 1500", tcp4_frame(1514)),
             ("ipv6/udp 1500", udp6_frame(1514)),
             ("ipv4/tcp 64 KiB super-frame", tcp4_frame(65226))]
    print("complete_ethernet, ns per frame (best of rounds):")
    for name, frame in cases:
        buf = mmap.mmap(-1, MAC_OFF + len(frame))
        buf[MAC_OFF:] = frame
        start, end = MAC_OFF, MAC_OFF + len(frame)
        assert complete_ethernet(buf, start, end)
        n = 20000 if len(frame) < 4000 else 500
        ns = best_ns(lambda: complete_ethernet(buf, start, end), n, rounds)  # noqa: B023
        print(f"  {name:30s} ({len(frame):5d} B): {ns:8.0f}")


# -- 2. the forwarder's hot loop ------------------------------------------------------

class SyntheticRing:
    """A TPACKET_V3 ring's layout in anonymous memory, every block full of one frame."""

    link = "ethernet"

    def __init__(self, frame: bytes, status: int, block_size: int = 1 << 20,
                 block_nr: int = 4) -> None:
        self.block_size, self.block_nr = block_size, block_nr
        self.map = mmap.mmap(-1, block_size * block_nr)
        self._holder = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._holder)
        self.cursor = self.drops = 0
        step = (MAC_OFF + len(frame) + 7) & ~7
        per_block = (block_size - 48) // step
        for b in range(block_nr):
            boff = b * block_size
            ringmod.BLOCK_HDR.pack_into(self.map, boff + 12, per_block, 48)
            off = boff + 48
            for _ in range(per_block):
                ringmod.PKT_HDR.pack_into(self.map, off, step, len(frame), len(frame), status,
                                          MAC_OFF, NET_OFF, 0, 0)
                self.map[off + MAC_OFF:off + MAC_OFF + len(frame)] = frame
                off += step
        self.frames = per_block * block_nr

    def ready_all(self) -> None:
        for b in range(self.block_nr):
            self.map[b * self.block_size + ringmod.BLOCK_STATUS_BYTE] = ringmod.TP_STATUS_USER
        self.cursor = 0

    def release(self, block: int) -> None:
        self.map[block * self.block_size + ringmod.BLOCK_STATUS_BYTE] = 0

    def statistics(self) -> tuple[int, int]:
        return 0, 0

    def mtu(self) -> int:
        return 1500


def pump_ns(frame: bytes, status: int, rounds: int) -> float:
    ring = SyntheticRing(frame, status)
    sender = UdpBatchSender("127.0.0.1", 9)
    sender.flush = lambda n: (n, 0)  # type: ignore[method-assign]
    fwd = Forwarder(ring, sender, None, StopFlag())  # type: ignore[arg-type]
    fwd.budget = fwd.max_held = ring.block_nr + 1
    best = float("inf")
    for _ in range(rounds):
        ring.ready_all()
        t0 = time.perf_counter_ns()
        handled = fwd.pump()
        best = min(best, (time.perf_counter_ns() - t0) / handled)
        assert handled == ring.frames
    sender.close()
    return best


def bench_pump(rounds: int) -> None:
    import mirrord.tzsp.forward as fw

    print(f"Forwarder.pump, ns per frame, sendmmsg stubbed (mirrord from {Path(fw.__file__).parent}):")
    for name, frame in (("64", tcp4_frame(64, timestamps=False)), ("576", tcp4_frame(576)),
                        ("1500", tcp4_frame(1514))):
        plain = pump_ns(frame, 0, rounds)
        marked = pump_ns(frame, CSUMNOTREADY, rounds)
        print(f"  {name:>5s} B: unmarked {plain:6.0f}   CSUMNOTREADY {marked:6.0f}   "
              f"(+{marked - plain:.0f})")


# -- 3. segmenting a super-frame (a prototype, here only) ---------------------------------

def segment_tcp4(frame: bytes, mss: int = MSS) -> list[bytes]:
    """Cut an Ethernet/IPv4/TCP super-frame into frames of `mss` payload bytes."""
    eth = frame[:14]
    ihl = (frame[14] & 0x0F) * 4
    ip = frame[14:14 + ihl]
    thl = (frame[14 + ihl + 12] >> 4) * 4
    tcp = frame[14 + ihl:14 + ihl + thl]
    payload = frame[14 + ihl + thl:]
    seq = struct.unpack_from("!I", tcp, 4)[0]
    ident = struct.unpack_from("!H", ip, 4)[0]
    flags = tcp[13]
    pseudo_base = int.from_bytes(ip[12:20], "big") + 6
    out = []
    for i, at in enumerate(range(0, len(payload), mss)):
        data = payload[at:at + mss]
        last = at + mss >= len(payload)
        h = bytearray(ip)
        struct.pack_into("!HH", h, 2, ihl + thl + len(data), (ident + i) & 0xFFFF)
        struct.pack_into("!H", h, 10, 0)
        struct.pack_into("!H", h, 10, 0xFFFF - (int.from_bytes(h, "big") % 0xFFFF or 0xFFFF))
        t = bytearray(tcp)
        struct.pack_into("!I", t, 4, (seq + at) & 0xFFFFFFFF)
        t[13] = flags if last else flags & ~0x09  # FIN, PSH on the last segment only
        struct.pack_into("!H", t, 16, 0)
        seg = bytes(t) + data
        n = int.from_bytes(seg, "big") << (8 if len(seg) & 1 else 0)
        s = (n + pseudo_base + len(seg)) % 0xFFFF
        struct.pack_into("!H", t, 16, 0xFFFF - s if s else 0)
        out.append(eth + bytes(h) + bytes(t) + data)
    return out


def bench_segment(rounds: int) -> None:
    frame = tcp4_frame(65226)
    segs = segment_tcp4(frame)
    ns = best_ns(lambda: segment_tcp4(frame), 200, rounds)
    print(f"segmenting a {len(frame)} B IPv4/TCP super-frame into {len(segs)} frames (Python): "
          f"{ns / 1000:.1f} us per super-frame, {ns / len(segs):.0f} ns per segment")


# -- 4. what the lab's veth links hand the capture ----------------------------------------

CAPTURE = r"""
import _socket, json, struct, sys, time
from mirrord.tzsp.ring import BLOCK_HDR, BLOCK_STATUS_BYTE, PKT_HDR, TP_STATUS_USER, RxRing
prog = struct.pack("=HBBI", 0x06, 0, 0, 0xFFFF)  # ret #65535: every frame, whole
ring = RxRing(_socket.if_nametoindex(sys.argv[1]), {"ethernet": prog}, ring_bytes=8 << 20)
print("ready", flush=True)
m, mtu = ring.map, ring.mtu()
st = {"frames": 0, "partial": 0, "tcp": 0, "tcp_over_mtu": 0, "bytes_tcp": 0,
      "bytes_over_mtu": 0, "max_len": 0, "udp": 0, "udp_partial": 0, "tcp_partial": 0}
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    b = ring.cursor
    boff = b * ring.block_size
    if not m[boff + BLOCK_STATUS_BYTE] & TP_STATUS_USER:
        ring.wait(50)
        continue
    num, off = BLOCK_HDR.unpack_from(m, boff + 12)
    off += boff
    for _ in range(num):
        nxt, snap, plen, status, mac, net, _tci, _tpid = PKT_HDR.unpack_from(m, off)
        proto = m[off + mac + 23] if m[off + mac + 12:off + mac + 14] == b"\x08\x00" else -1
        st["frames"] += 1
        st["partial"] += bool(status & 8)
        st["max_len"] = max(st["max_len"], plen)
        if proto == 6:
            st["tcp"] += 1
            st["tcp_partial"] += bool(status & 8)
            st["bytes_tcp"] += plen
            if plen > mtu + 18:
                st["tcp_over_mtu"] += 1
                st["bytes_over_mtu"] += plen
        elif proto == 17:
            st["udp"] += 1
            st["udp_partial"] += bool(status & 8)
        off += nxt
    ring.release(b)
    ring.cursor = (b + 1) % ring.block_nr
print(json.dumps(st), flush=True)
"""
SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5001))
s.listen(1)
s.settimeout(20)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(20)
while c.recv(1 << 16):
    pass
"""
CLIENT = r"""
import socket, sys
total, sent = int(sys.argv[2]), 0
s = socket.create_connection((sys.argv[1], 5001), timeout=20)
chunk = b"x" * 65536
while sent < total:
    sent += s.send(chunk[:total - sent])
s.close()
"""


def bench_frames(total: int) -> None:
    import json
    import subprocess

    from tests.harness.lab import WAN_HOST, Lab, python_env

    def start(ns: str, code: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                                stdout=subprocess.PIPE, text=True, env=python_env(),
                                cwd=str(ROOT))

    with Lab(ipv6=False) as lab:
        cap = start(lab.rtr.name, CAPTURE, "br-lan", "8")
        srv = start(lab.wan.name, SERVER)
        try:
            assert cap.stdout is not None and srv.stdout is not None
            assert cap.stdout.readline().strip() == srv.stdout.readline().strip() == "ready"
            lab.lan.run(sys.executable, "-c", CLIENT, WAN_HOST, str(total), timeout=30)
            srv.wait(30)
            lab.udp_send(lab.lan, WAN_HOST, 5555, 200, rate=1000)
            st = json.loads(cap.stdout.readline())
        finally:
            for p in (cap, srv):
                if p.poll() is None:
                    p.kill()
                p.wait()
    print(f"lab, br-lan input: {total} B of TCP and 200 UDP datagrams from behind veth:")
    print(f"  frames {st['frames']}, marked CSUMNOTREADY {st['partial']} "
          f"(TCP {st['tcp_partial']} of {st['tcp']}, UDP {st['udp_partial']} of {st['udp']})")
    print(f"  TCP frames {st['tcp']}, longer than MTU + 18: {st['tcp_over_mtu']} carrying "
          f"{100 * st['bytes_over_mtu'] / max(1, st['bytes_tcp']):.1f} % of the TCP bytes; "
          f"longest {st['max_len']} B")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="complete,pump,segment",
                    help="sections, comma-separated; 'frames' (root) only when named")
    ap.add_argument("--tcp-bytes", type=int, default=4_000_000, help="frames: TCP bytes sent")
    args = ap.parse_args()
    only = set(args.only.split(","))
    print(f"Python {sys.version.split()[0]}")
    if "complete" in only:
        bench_complete(args.rounds)
    if "pump" in only:
        bench_pump(args.rounds)
    if "segment" in only:
        bench_segment(args.rounds)
    if "frames" in only:
        bench_frames(args.tcp_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
