"""Direct nfnetlink queries where libnftables is too slow: the ruleset
generation, and the dump of mirrord's named counters.

Both are one small netlink exchange; libnftables lists (and prints) whole
tables for the same answers, seconds with thousands of mirrors.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional

from .render import TABLE

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3


def ruleset_generation() -> Optional[int]:
    """The kernel's nftables generation: it changes with every committed change.

    One small netlink round trip, where listing mirrord's tables costs
    seconds with thousands of mirrors. None when it cannot be read.
    """
    hdr = struct.Struct("=IHHII")
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           NETLINK_NETFILTER) as sock:
            sock.settimeout(1.0)
            sock.bind((0, 0))
            body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg, NFNETLINK_V0
            sock.send(hdr.pack(hdr.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                               1, 1, 0) + body)  # NLM_F_REQUEST, seq 1
            buf = sock.recv(4096)
    except OSError:
        return None
    offset = 0
    while offset + hdr.size <= len(buf):
        length, kind, _flags, seq, _pid = hdr.unpack_from(buf, offset)
        if length < hdr.size:
            return None
        if seq == 1 and kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            pos, end = offset + hdr.size + 4, offset + length  # after nfgenmsg
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", buf, pos)
                if alen < 4:
                    break
                if akind & 0x3FFF == NFTA_GEN_ID and alen >= 8:
                    return int(struct.unpack_from("!I", buf, pos + 4)[0])
                pos += (alen + 3) & ~3
            return None
        if kind == NLMSG_ERROR:
            return None
        offset += (length + 3) & ~3
    return None


NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2
NFPROTO = {"ip": 2, "ip6": 10, "netdev": 5}


def _nlattrs(buf: bytes, pos: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while pos + 4 <= end:
        alen, akind = struct.unpack_from("=HH", buf, pos)
        if alen < 4:
            break
        out[akind & 0x3FFF] = buf[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    return out


def dump_counters(fam: str) -> Optional[list[tuple[str, int, int]]]:
    """(name, packets, bytes) of every named counter in mirrord's `fam` table.

    One netlink dump of the counter objects: libnftables fetches and prints
    the whole table for `list counters`, seconds with thousands of mirrors,
    and every status asks. None when the dump cannot be made (the caller
    asks libnftables instead); [] when there is no such table.
    """
    hdr = struct.Struct("=IHHII")
    table = TABLE.encode() + b"\0"
    attrs = (struct.pack("=HH", 4 + len(table), NFTA_OBJ_TABLE) + table
             + b"\0" * (-len(table) % 4)
             + struct.pack("=HH", 8, NFTA_OBJ_TYPE) + struct.pack("!I", NFT_OBJECT_COUNTER))
    body = struct.pack("=BBH", NFPROTO[fam], 0, 0) + attrs
    out: list[tuple[str, int, int]] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           NETLINK_NETFILTER) as sock:
            sock.settimeout(5.0)
            sock.bind((0, 0))
            sock.send(hdr.pack(hdr.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
                               0x301, 1, 0) + body)  # NLM_F_REQUEST | NLM_F_DUMP, seq 1
            while True:
                buf = sock.recv(1 << 20)
                pos = 0
                while pos + hdr.size <= len(buf):
                    length, kind, _flags, seq, _pid = hdr.unpack_from(buf, pos)
                    if length < hdr.size:
                        return None
                    start, end = pos + hdr.size, pos + length
                    pos += (length + 3) & ~3
                    if seq != 1:
                        continue
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", buf, start)[0]
                        if code:
                            return None
                        continue
                    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
                        continue
                    a = _nlattrs(buf, start + 4, end)  # after nfgenmsg
                    if a.get(NFTA_OBJ_TABLE, b"").rstrip(b"\0") != TABLE.encode():
                        continue
                    data = a.get(NFTA_OBJ_DATA)
                    name = a.get(NFTA_OBJ_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
                    if data is None or not name:
                        continue
                    d = _nlattrs(data, 0, len(data))
                    nbytes = d.get(NFTA_COUNTER_BYTES, b"")
                    packets = d.get(NFTA_COUNTER_PACKETS, b"")
                    out.append((name,
                                struct.unpack("!Q", packets)[0] if len(packets) == 8 else 0,
                                struct.unpack("!Q", nbytes)[0] if len(nbytes) == 8 else 0))
    except OSError:
        return None
