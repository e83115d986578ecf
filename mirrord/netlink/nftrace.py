"""nftables trace events: the NFNLGRP_NFTRACE listener and the NFT_MSG_TRACE parser.

The kernel (net/netfilter/nf_tables_trace.c) sends one NFT_MSG_TRACE message
for every rule a packet with `meta nftrace` set matches, every chain return
and every base-chain policy. The first message of each base-chain run also
carries the packet: devices and up to 20/40/20 bytes of link, network and
transport header. pyroute2 has no parser for these messages, and the layout
is small and stable, so it is decoded here with struct.

Layout (include/uapi/linux/netfilter/nf_tables.h, enum nft_trace_attributes):
nlmsghdr, then nfgenmsg (family u8 = the table's family, version u8,
res_id be16), then attributes. Integers are big endian except NFTA_TRACE_ID,
which the kernel writes with nla_put_u32 (host order); libnftnl reads it with
ntohl, so it is read big endian here too and prints as `nft monitor trace` does.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNLGRP_NFTRACE = 9
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_TRACE = 17
TRACE_MSG_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFTA_TABLE_NAME = 1

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# enum nft_trace_attributes
NFTA_TRACE_TABLE = 1
NFTA_TRACE_CHAIN = 2
NFTA_TRACE_RULE_HANDLE = 3
NFTA_TRACE_TYPE = 4
NFTA_TRACE_VERDICT = 5
NFTA_TRACE_ID = 6
NFTA_TRACE_LL_HEADER = 7
NFTA_TRACE_NETWORK_HEADER = 8
NFTA_TRACE_TRANSPORT_HEADER = 9
NFTA_TRACE_IIF = 10
NFTA_TRACE_IIFTYPE = 11
NFTA_TRACE_OIF = 12
NFTA_TRACE_OIFTYPE = 13
NFTA_TRACE_MARK = 14
NFTA_TRACE_NFPROTO = 15
NFTA_TRACE_POLICY = 16
NFTA_TRACE_PAD = 17
# Linux 6.16+: the packet's conntrack view.
NFTA_TRACE_CT_ID = 18
NFTA_TRACE_CT_DIRECTION = 19
NFTA_TRACE_CT_STATUS = 20
NFTA_TRACE_CT_STATE = 21

# enum nft_verdict_attributes
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2

# enum nft_trace_types
NFT_TRACETYPE_POLICY = 1
NFT_TRACETYPE_RETURN = 2
NFT_TRACETYPE_RULE = 3
TRACE_TYPES = {NFT_TRACETYPE_POLICY: "policy", NFT_TRACETYPE_RETURN: "return",
               NFT_TRACETYPE_RULE: "rule"}

# nfgen_family / NFTA_TRACE_NFPROTO values (NFPROTO_*), named as nft names them.
FAMILIES = {0: "unspec", 1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

NF_VERDICT_MASK = 0xFF
VERDICTS = {
    0: "drop", 1: "accept", 2: "stolen", 3: "queue", 4: "repeat", 5: "stop",
    -1: "continue", -2: "break", -3: "jump", -4: "goto", -5: "return",
}

# ct state bits as `ct state` prints them (NF_CT_STATE_BIT; untracked is bit 6).
CT_STATES = {1: "invalid", 2: "established", 4: "related", 8: "new", 64: "untracked"}


class TraceParseError(ValueError):
    """A message that does not have the NFT_MSG_TRACE layout."""


@dataclass(frozen=True)
class Verdict:
    code: int
    chain: Optional[str] = None

    @property
    def name(self) -> str:
        base = self.code if self.code < 0 else self.code & NF_VERDICT_MASK
        word = VERDICTS.get(base, f"verdict-{self.code}")
        if base == 3 and self.code >> 16:
            return f"queue num {self.code >> 16}"
        return f"{word} {self.chain}" if self.chain else word


@dataclass(frozen=True)
class TraceEvent:
    """One NFT_MSG_TRACE message, attributes decoded; absent ones are None."""

    family: int
    trace_id: int
    type: int
    table: Optional[str] = None
    chain: Optional[str] = None
    rule_handle: Optional[int] = None
    verdict: Optional[Verdict] = None
    policy: Optional[int] = None
    nfproto: Optional[int] = None
    iif: Optional[int] = None
    iiftype: Optional[int] = None
    oif: Optional[int] = None
    oiftype: Optional[int] = None
    mark: Optional[int] = None
    ll_header: Optional[bytes] = None
    network_header: Optional[bytes] = None
    transport_header: Optional[bytes] = None
    ct_state: Optional[int] = None
    ct_id: Optional[int] = None
    ct_direction: Optional[int] = None
    ct_status: Optional[int] = None
    unknown: tuple[int, ...] = field(default=())

    @property
    def family_name(self) -> str:
        return FAMILIES.get(self.family, str(self.family))

    @property
    def type_name(self) -> str:
        return TRACE_TYPES.get(self.type, f"type-{self.type}")

    @property
    def has_packet(self) -> bool:
        """The first message of a base-chain run carries the packet itself."""
        return self.network_header is not None or self.ll_header is not None

    @property
    def policy_name(self) -> Optional[str]:
        if self.policy is None:
            return None
        return VERDICTS.get(self.policy, str(self.policy))


def iter_attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without flag bits, payload) for each netlink attribute in data[offset:]."""
    end = len(data)
    while offset + 4 <= end:
        length, atype = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > end:
            raise TraceParseError(f"attribute at {offset} has bad length {length}")
        yield atype & NLA_TYPE_MASK, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def _u16(b: bytes) -> int:
    if len(b) != 2:
        raise TraceParseError(f"expected 2 bytes, got {len(b)}")
    return int(struct.unpack(">H", b)[0])


def _u32(b: bytes) -> int:
    if len(b) != 4:
        raise TraceParseError(f"expected 4 bytes, got {len(b)}")
    return int(struct.unpack(">I", b)[0])


def _u64(b: bytes) -> int:
    if len(b) != 8:
        raise TraceParseError(f"expected 8 bytes, got {len(b)}")
    return int(struct.unpack(">Q", b)[0])


def _string(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_verdict(data: bytes) -> Verdict:
    code: Optional[int] = None
    chain: Optional[str] = None
    for atype, payload in iter_attrs(data):
        if atype == NFTA_VERDICT_CODE:
            if len(payload) != 4:
                raise TraceParseError("verdict code is not 4 bytes")
            code = int(struct.unpack(">i", payload)[0])
        elif atype == NFTA_VERDICT_CHAIN:
            chain = _string(payload)
    if code is None:
        raise TraceParseError("verdict without a code")
    return Verdict(code, chain)


def parse_trace(payload: bytes) -> TraceEvent:
    """Decode the payload of an NFT_MSG_TRACE message (nfgenmsg + attributes)."""
    if len(payload) < 4:
        raise TraceParseError("message shorter than nfgenmsg")
    family = payload[0]
    values: dict[str, object] = {}
    unknown: list[int] = []
    for atype, data in iter_attrs(payload, 4):
        if atype == NFTA_TRACE_TABLE:
            values["table"] = _string(data)
        elif atype == NFTA_TRACE_CHAIN:
            values["chain"] = _string(data)
        elif atype == NFTA_TRACE_RULE_HANDLE:
            values["rule_handle"] = _u64(data)
        elif atype == NFTA_TRACE_TYPE:
            values["type"] = _u32(data)
        elif atype == NFTA_TRACE_VERDICT:
            values["verdict"] = parse_verdict(data)
        elif atype == NFTA_TRACE_ID:
            values["trace_id"] = _u32(data)
        elif atype == NFTA_TRACE_LL_HEADER:
            values["ll_header"] = bytes(data)
        elif atype == NFTA_TRACE_NETWORK_HEADER:
            values["network_header"] = bytes(data)
        elif atype == NFTA_TRACE_TRANSPORT_HEADER:
            values["transport_header"] = bytes(data)
        elif atype == NFTA_TRACE_IIF:
            values["iif"] = _u32(data)
        elif atype == NFTA_TRACE_IIFTYPE:
            values["iiftype"] = _u16(data)
        elif atype == NFTA_TRACE_OIF:
            values["oif"] = _u32(data)
        elif atype == NFTA_TRACE_OIFTYPE:
            values["oiftype"] = _u16(data)
        elif atype == NFTA_TRACE_MARK:
            values["mark"] = _u32(data)
        elif atype == NFTA_TRACE_NFPROTO:
            values["nfproto"] = _u32(data)
        elif atype == NFTA_TRACE_POLICY:
            values["policy"] = _u32(data)
        elif atype == NFTA_TRACE_CT_ID:
            values["ct_id"] = _u32(data)
        elif atype == NFTA_TRACE_CT_DIRECTION:
            if len(data) < 1:
                raise TraceParseError("empty ct direction")
            values["ct_direction"] = data[0]
        elif atype == NFTA_TRACE_CT_STATUS:
            values["ct_status"] = _u32(data)
        elif atype == NFTA_TRACE_CT_STATE:
            values["ct_state"] = _u32(data)
        elif atype != NFTA_TRACE_PAD:
            unknown.append(atype)
    # libnftnl treats a trace without these two as an ABI break; so do we.
    if "trace_id" not in values or "type" not in values:
        raise TraceParseError("trace message without NFTA_TRACE_ID or NFTA_TRACE_TYPE")
    return TraceEvent(family=family, unknown=tuple(unknown), **values)  # type: ignore[arg-type]


class Overrun(Exception):
    """The kernel dropped messages for this socket (ENOBUFS or NLMSG_OVERRUN)."""


def iter_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(nlmsg_type, payload) for each netlink message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, mtype, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            raise TraceParseError(f"netlink message at {offset} has bad length {length}")
        if mtype == NLMSG_OVERRUN:
            raise Overrun("netlink overrun")
        yield mtype, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def parse_datagram(data: bytes) -> list[TraceEvent]:
    """Every NFT_MSG_TRACE in one netlink datagram; other message types are skipped."""
    return [parse_trace(p) for t, p in iter_messages(data) if t == TRACE_MSG_TYPE]


def parse_table_event(msg: int, payload: bytes) -> tuple[str, str, str]:
    """("new" | "del", family, name) of an NFT_MSG_NEWTABLE/DELTABLE payload."""
    if len(payload) < 4:
        raise TraceParseError("message shorter than nfgenmsg")
    name = ""
    for atype, data in iter_attrs(payload, 4):
        if atype == NFTA_TABLE_NAME:
            name = _string(data)
    op = "new" if msg == NFT_MSG_NEWTABLE else "del"
    return op, FAMILIES.get(payload[0], str(payload[0])), name


class Received(NamedTuple):
    """An event and when it was read (each trace message is its own datagram)."""

    mono: float
    wall: float
    event: TraceEvent


class TraceSocket:
    """A netlink socket subscribed to NFNLGRP_NFTRACE in the current network namespace.

    Trace messages are only generated while some socket listens to the group
    (nfnetlink_has_listeners), so open this before marking any packet. It
    also listens to NFNLGRP_NFTABLES: rule handles are only meaningful until
    the next ruleset change (mirrord replaces its tables whole, so handles
    restart), and `ruleset_changed` tells the reader to look rules up again.
    """

    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            # Bursts of traced packets produce several messages each; a big
            # buffer keeps a burst from turning into ENOBUFS.
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTRACE)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.lost = 0
        self.ruleset_changed = False
        # ("new" | "del", family, table name) in the order the kernel made them.
        self.table_events: list[tuple[str, str, str]] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[Received]:
        """Drain what is queued now; counts kernel-side losses in `lost`."""
        events: list[Received] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
                mono, wall = time.monotonic(), time.time()
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost += 1
                    self.ruleset_changed = True  # a lost change is still a change
                    continue
                raise
            try:
                for mtype, payload in iter_messages(data):
                    if mtype == TRACE_MSG_TYPE:
                        events.append(Received(mono, wall, parse_trace(payload)))
                    elif mtype >> 8 == NFNL_SUBSYS_NFTABLES:
                        self.ruleset_changed = True
                        if mtype & 0xFF in (NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE):
                            self.table_events.append(parse_table_event(mtype & 0xFF, payload))
            except Overrun:
                self.lost += 1
                self.ruleset_changed = True
            except TraceParseError as e:
                # A kernel newer than this parser may say more; losing one
                # datagram beats stopping the trace.
                self.lost += 1
                log.warning("skipped a netlink message that does not parse: %s", e)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TraceSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ifname(index: Optional[int], cache: Optional[dict[int, str]] = None) -> Optional[str]:
    """Interface name of an ifindex in this namespace ('if#N' once it is gone)."""
    if index is None:
        return None
    if cache is not None and index in cache:
        return cache[index]
    try:
        name = socket.if_indextoname(index)
    except OSError:
        name = f"if#{index}"
    if cache is not None:
        cache[index] = name
    return name


def process_start_time(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def own_identity() -> tuple[int, int]:
    pid = os.getpid()
    return pid, process_start_time(pid) or 0
