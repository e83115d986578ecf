"""Netlink event sources: what changed in links, addresses, routes, neighbours, nftables.

These are plain non-blocking netlink sockets that the daemon's selector waits
on; topology.py asks the questions (through rtnl.py). An event source has to
be a socket whose readiness is the truth: pyroute2 0.9's synchronous sockets,
for one, read ahead into an internal queue, so select() on their descriptor
can miss events that were already read.

A source only says *that* something relevant changed (with a short reason for
the log); the daemon then re-reads the kernel and reconciles. ENOBUFS means
events were lost, which is reported as a change too: a full resync covers it.

One exception: the nftables source also keeps what deleted rules had counted
(`CounterEvent`). A deleted named counter's notification carries no values,
but a deleted rule's carries its anonymous counters' last values next to the
named counter's name; the counter ledger turns them into exact totals.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional

# The message and attribute parsing is rtnl.py's, which the topology queries share.
from .rtnl import address as _address
from .rtnl import attr as _attr
from .rtnl import attrs as _attrs
from .rtnl import cstr as _cstr
from .rtnl import messages as _messages

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
NFNLGRP_NFTABLES = 7

RTM_NAMES = {
    16: "link added/changed", 17: "link deleted",
    20: "address added", 21: "address deleted",
    24: "route added", 25: "route deleted",
    28: "neighbour changed", 29: "neighbour deleted",
}
IFLA_IFNAME = 3
NDA_DST = 1
NUD_FAILED = 0x20
NUD_NAMES = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY",
             0x10: "PROBE", 0x20: "FAILED", 0x40: "NOARP", 0x80: "PERMANENT"}

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NAMES = {
    0: "table added", 2: "table deleted", 3: "chain added", 5: "chain deleted",
    6: "rule added", 8: "rule deleted", 9: "set added", 11: "set deleted",
    12: "set element added", 14: "set element deleted", 18: "object added", 20: "object deleted",
}
NFT_MSG_NEWGEN = 15
NFT_MSG_DELRULE = 8
NFT_MSG_NEWOBJ = 18
NFT_MSG_DELOBJ = 20
NFPROTO_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
NFTA_RULE_EXPRESSIONS = 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_OBJREF_IMM_TYPE = 1
NFTA_OBJREF_IMM_NAME = 2
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2


class CounterEvent(NamedTuple):  # a NamedTuple: thousands are made per flush
    """What a notification says about named counters, in the order they came.

    kind: "rule" (a rule referencing `name` was deleted; `packets`/`nbytes`:
    the anonymous counter next to the reference, `values` False when there
    was none), "created"/"deleted" (the named counter object), "lost"
    (ENOBUFS: notifications were dropped, whatever they said is unknown).
    """

    kind: str
    family: str = ""
    name: str = ""
    packets: int = 0
    nbytes: int = 0
    values: bool = True


_NLA = struct.Struct("=HH")
_OBJREF = b"objref\0"
_COUNTER = b"counter\0"


def _be64(b: Optional[bytes]) -> Optional[int]:
    return struct.unpack("!Q", b)[0] if b is not None and len(b) == 8 else None


def _sub(b: bytes, pos: int, end: int, *wanted: int) -> list[Optional[bytes]]:
    """The payloads of the `wanted` attribute types between pos and end (None: absent)."""
    out: list[Optional[bytes]] = [None] * len(wanted)
    while pos + 4 <= end:
        alen, akind = _NLA.unpack_from(b, pos)
        if alen < 4 or pos + alen > end:
            break
        kind = akind & 0x3FFF
        if kind in wanted:
            out[wanted.index(kind)] = b[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    return out


_OBJREF_NAME = _NLA.pack(4 + len(_OBJREF), NFTA_EXPR_NAME) + _OBJREF


def rule_counts(family: str, buf: bytes, start: int, end: int) -> list[CounterEvent]:
    """A deleted rule's named counter references with the anonymous counter
    that follows each (mirrord renders them as a pair: see backends/nftables).

    A flush of thousands of mirrors' rules is thousands of these: each
    objref expression is found by its name's bytes and only it and the
    expression after it are decoded; anything unexpected there is decoded
    the long way, every expression in turn.
    """
    exprs = _attr(buf, start + 4, end, NFTA_RULE_EXPRESSIONS)
    if exprs is None:
        return []
    out: list[CounterEvent] = []
    at = exprs.find(_OBJREF_NAME)
    while at != -1:
        elem = at - 4
        if elem < 0:
            return _rule_counts_walk(family, exprs)
        alen, akind = _NLA.unpack_from(exprs, elem)
        if akind & 0x3FFF != NFTA_LIST_ELEM or alen < 4 or elem + alen > len(exprs):
            return _rule_counts_walk(family, exprs)
        nxt = elem + ((alen + 3) & ~3)
        name = _objref(exprs, elem + 4, elem + alen)
        if name is not None:
            out.append(_counter_after(family, name, exprs, nxt))
        at = exprs.find(_OBJREF_NAME, nxt)
    return out


def _objref(b: bytes, pos: int, end: int) -> Optional[str]:
    """The named counter an objref expression (its attributes from pos) refers to."""
    (data,) = _sub(b, pos, end, NFTA_EXPR_DATA)
    if data is None:
        return None
    typ, ref = _sub(data, 0, len(data), NFTA_OBJREF_IMM_TYPE, NFTA_OBJREF_IMM_NAME)
    if typ is None or len(typ) != 4 or struct.unpack("!I", typ)[0] != NFT_OBJECT_COUNTER:
        return None
    return _cstr(ref) or None


def _counter_after(family: str, name: str, b: bytes, pos: int) -> CounterEvent:
    """`name`'s event with the values of the anonymous counter at pos, if there is one."""
    if pos + 8 <= len(b):
        alen, akind = _NLA.unpack_from(b, pos)
        if akind & 0x3FFF == NFTA_LIST_ELEM and alen >= 8 and pos + alen <= len(b):
            ename, data = _sub(b, pos + 4, pos + alen, NFTA_EXPR_NAME, NFTA_EXPR_DATA)
            if ename is not None and ename.startswith(_COUNTER) and data is not None:
                nb, pk = _sub(data, 0, len(data), NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS)
                packets, nbytes = _be64(pk), _be64(nb)
                if packets is not None and nbytes is not None:
                    return CounterEvent("rule", family, name, packets, nbytes)
    return CounterEvent("rule", family, name, values=False)


def _rule_counts_walk(family: str, exprs: bytes) -> list[CounterEvent]:
    """rule_counts the long way: every expression in turn."""
    out: list[CounterEvent] = []
    pos, n = 0, len(exprs)
    while pos + 8 <= n:
        alen, akind = _NLA.unpack_from(exprs, pos)
        if alen < 4 or pos + alen > n:
            break
        elem, pos = pos, pos + ((alen + 3) & ~3)
        if akind & 0x3FFF != NFTA_LIST_ELEM:
            continue
        (ename,) = _sub(exprs, elem + 4, elem + alen, NFTA_EXPR_NAME)
        if ename is None or not ename.startswith(_OBJREF):
            continue
        name = _objref(exprs, elem + 4, elem + alen)
        if name is not None:
            out.append(_counter_after(family, name, exprs, pos))
    return out


@dataclass(frozen=True)
class Change:
    what: str  # for the log: "link deleted: wan", "table deleted: ip mirrord"
    resync: bool = False  # events were lost: assume everything changed
    # An address whose neighbour entry just FAILED. The kernel re-probes it
    # on the next packet (INCOMPLETE, without an event), so a later read
    # would not show the failure: the event is the evidence.
    neighbour_failed: Optional[str] = None


class _Parser:
    """What a datagram of netlink events reports, from its bytes alone (no socket)."""

    def changes(self, buf: bytes) -> list[Change]:
        """The changes one datagram reports (the unit tests feed it crafted bytes)."""
        changes: list[Change] = []
        for m in _messages(buf):
            change = self.parse(m.type, buf, m.start, m.end)
            if change is not None:
                changes.append(change)
        return changes

    def parse(self, kind: int, buf: bytes, start: int, end: int) -> Optional[Change]:
        raise NotImplementedError

    def lost(self) -> None:
        """Notifications were dropped (ENOBUFS)."""


class _Source(_Parser):
    def __init__(self, protocol: int, groups: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                  protocol)
        # Bursts (a firewall reload replaces thousands of rules) must not
        # overflow the queue; ENOBUFS is still handled as a full resync.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, groups))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self) -> list[Change]:
        changes: list[Change] = []
        while True:
            try:
                buf = self.sock.recv(1 << 16)
            except BlockingIOError:
                return changes
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost()
                    changes.append(Change("netlink events were lost (ENOBUFS)", resync=True))
                    continue
                raise
            changes.extend(self.changes(buf))


class RouteChanges(_Parser):
    """Which rtnetlink events (links, addresses, routes, neighbours) can change a plan."""

    def __init__(self) -> None:
        # Collector addresses (packed) the daemon considers FAILED: any news
        # of them matters, since it may be their recovery.
        self.failed_neighbours: set[bytes] = set()

    def parse(self, kind: int, buf: bytes, start: int, end: int) -> Optional[Change]:
        name = RTM_NAMES.get(kind)
        if name is None:
            return None
        detail = ""
        if kind in (16, 17):  # ifinfomsg: 16 bytes, then attributes
            detail = _cstr(_attrs(buf, start + 16, end).get(IFLA_IFNAME))
        elif kind in (28, 29):  # ndmsg: family, pad, pad, ifindex, state u16, flags, type
            if end - start < 12:
                return None
            state = struct.unpack_from("=H", buf, start + 8)[0]
            dst = _attrs(buf, start + 12, end).get(NDA_DST)
            where = _address(dst)
            # Neighbour churn (REACHABLE <-> STALE) is constant on a busy
            # router: only a FAILED, or news of a collector that failed, can
            # change a plan.
            if kind == 28 and state & NUD_FAILED:
                return Change(f"{name}: {where} FAILED", neighbour_failed=where)
            elif dst is not None and dst in self.failed_neighbours:
                detail = f"{where} {NUD_NAMES.get(state, hex(state)) if kind == 28 else 'gone'}"
            else:
                return None
        return Change(f"{name}: {detail}" if detail else name)


class RouteEvents(RouteChanges, _Source):
    """Links, addresses, routes, neighbours: what decides a plan's topology."""

    def __init__(self) -> None:
        RouteChanges.__init__(self)
        _Source.__init__(
            self,
            NETLINK_ROUTE,
            RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE,
        )


class NftChanges(_Parser):
    """Which nftables events (including iptables-nft's) touch the given tables."""

    def __init__(self, tables: frozenset[tuple[str, str]]) -> None:
        self.tables = tables  # (family, name) pairs whose changes matter
        self._changes: dict[tuple[int, str, str], Change] = {}
        self.counter_events: list[CounterEvent] = []

    def take_counter_events(self) -> list[CounterEvent]:
        out, self.counter_events = self.counter_events, []
        return out

    def lost(self) -> None:
        self.counter_events.append(CounterEvent("lost"))

    def _counters(self, msg: int, family: str, buf: bytes, start: int, end: int) -> None:
        if msg == NFT_MSG_DELRULE:
            self.counter_events += rule_counts(family, buf, start, end)
        elif msg in (NFT_MSG_NEWOBJ, NFT_MSG_DELOBJ):
            raw, typ = _sub(buf, start + 4, end, NFTA_OBJ_NAME, NFTA_OBJ_TYPE)
            name = _cstr(raw)
            if name and typ is not None and len(typ) == 4 and \
                    struct.unpack("!I", typ)[0] == NFT_OBJECT_COUNTER:
                self.counter_events.append(CounterEvent(
                    "created" if msg == NFT_MSG_NEWOBJ else "deleted", family, name))

    def parse(self, kind: int, buf: bytes, start: int, end: int) -> Optional[Change]:
        if kind >> 8 != NFNL_SUBSYS_NFTABLES:
            return None
        msg = kind & 0xFF
        name = NFT_MSG_NAMES.get(msg)
        if name is None or end - start < 4:
            return None
        family = NFPROTO_NAMES.get(buf[start], str(buf[start]))
        # Attribute 1 names the table in every table/chain/rule/set/object message.
        table = _cstr(_attr(buf, start + 4, end, 1))
        if (family, table) not in self.tables:
            return None
        if msg in (NFT_MSG_DELRULE, NFT_MSG_NEWOBJ, NFT_MSG_DELOBJ):
            self._counters(msg, family, buf, start, end)
        # A flush of thousands of mirrors' rules is tens of thousands of
        # messages alike: one Change each kind, not one per message.
        key = (msg, family, table)
        change = self._changes.get(key)
        if change is None:
            change = self._changes[key] = Change(f"{name}: {family} {table}")
        return change


class NftEvents(NftChanges, _Source):
    """nftables changes, including those iptables-nft makes; filtered by table."""

    def __init__(self, tables: frozenset[tuple[str, str]]) -> None:
        NftChanges.__init__(self, tables)
        _Source.__init__(self, NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1))
