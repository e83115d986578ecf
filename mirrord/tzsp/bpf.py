"""Compile a `Match` into a classic BPF socket filter for an AF_PACKET socket.

The filter runs in the kernel before a packet is copied to the capture ring,
so unmatched traffic costs the TZSP worker nothing. It also drops everything
to or from the excluded addresses, every collector of the spec: no TZSP
datagram (nor a fragment of one: later fragments have no UDP header, but the
addresses are in every fragment), nor an ICMP error a collector answers with,
is ever captured again, whichever worker sent it and whichever interface it
crosses. Excluding only a worker's own collector let two workers copy each
other's datagrams for ever.

Offsets are from the start of the link-layer frame (Ethernet: L3 at 14). A
VLAN tag stripped into skb metadata is invisible here; a tag still in the
frame (an outgoing tag the driver did not offload, QinQ) moves L3 by 4 per tag,
so the program keeps the L3 offset in X and uses indirect loads throughout.
Devices without a link header (tun, PPP, IP tunnels) start at L3; their
ethertype comes from the skb protocol (an ancillary load).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Sequence
from typing import Literal, Optional

from ..match import PORT_PROTOCOLS, Address, FamilyMatch, Match, Network, PortClause
from .bpf_asm import (
    ABS,
    ADD,
    ALU,
    AND,
    IMM,
    IND,
    JEQ,
    JGE,
    JGT,
    JSET,
    LD,
    LDX,
    LSH,
    MEM,
    MISC,
    MUL,
    PACKET_OUTGOING,
    RSH,
    SKF_AD_PKTTYPE,
    SKF_AD_PROTOCOL,
    ST,
    STX,
    SUB,
    TAX,
    TXA,
    XOR,
    B,
    BpfError,
    H,
    Insn,
    K,
    W,
    X,
    anc,
    attach,
    disassemble,
    pack,
)
from .bpf_asm import Assembler as _Asm

__all__ = ["BUCKETS", "BpfError", "Insn", "Link", "attach", "compile_filter", "disassemble",
           "pack"]

Link = Literal["ethernet", "raw"]

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
ETH_HLEN = 14
VLAN_HLEN = 4


# A collector group's flow buckets (plan.groups.BUCKETS; a unit test checks
# they agree): the hash's top bits, 32 - 6 of them shifted out.
BUCKETS = 64
BUCKET_SHIFT = 26
# Transports whose ports enter a flow's hash (TCP, UDP, DCCP, SCTP, UDP-Lite),
# as the kernel's flow dissector takes them.
HASHED_PORTS = (6, 17, 33, 132, 136)
# Scratch words: the L3 offset, the hash, a temporary.
M_L3, M_HASH, M_TMP = 0, 1, 2
GOLDEN = 0x9E3779B1  # Fibonacci hashing: the product's top bits depend on every bit

# Largest frame a TZSP datagram can carry over IPv4 (65507-byte UDP payload
# minus the header with tag 41, minus a VLAN tag that may be re-inserted).
MAX_SNAPLEN = 65507 - 9 - VLAN_HLEN


def _v4_words(net: Network) -> list[tuple[int, int, int]]:
    """(byte offset within the address, mask, value) words that decide `net`."""
    n = int(net.network_address)
    bits = net.max_prefixlen
    words = bits // 32
    out = []
    for i in range(words):
        covered = max(0, min(32, net.prefixlen - 32 * i))
        if covered == 0:
            break
        mask = (0xFFFFFFFF << (32 - covered)) & 0xFFFFFFFF
        value = (n >> (bits - 32 * (i + 1))) & mask
        out.append((4 * i, mask, value))
    return out


class _Compiler:
    def __init__(self, snaplen: int) -> None:
        self.a = _Asm()
        self.snaplen = snaplen
        self.reject = self.a.label("reject")
        self.accept = self.a.label("accept")
        self.bucket_accept = self.a.label("bucket_accept")

    # A = 32-bit word at L3 + off (X holds the L3 offset)
    def ld_ind(self, size: int, off: int) -> None:
        self.a.op(LD | size | IND, off)

    def exclude_address(self, addr: Address, fields: Sequence[int]) -> None:
        """Reject when the address at any of `fields` (L3 offsets) equals `addr`."""
        words = _v4_words(ipaddress.ip_network(addr))
        for field in fields:
            differs = self.a.label("differs")
            for i, (off, _mask, value) in enumerate(words):
                self.ld_ind(W, field + off)
                last = i == len(words) - 1
                self.a.jump(JEQ, value, self.reject if last else None, differs)
            self.a.place(differs)

    def any_of(self, size: int, off: int, values: Iterable[int]) -> None:
        """Continue when the field equals one of `values`, else reject."""
        ok = self.a.label("ok")
        self.ld_ind(size, off)
        vals = list(values)
        for i, v in enumerate(vals):
            self.a.jump(JEQ, v, ok, self.reject if i == len(vals) - 1 else None)
        self.a.place(ok)

    def networks(self, field: int, nets: Sequence[Network]) -> None:
        """Continue when the address at `field` is in one of `nets`, else reject."""
        if not nets or any(n.prefixlen == 0 for n in nets):
            return
        ok = self.a.label("in_net")
        for j, net in enumerate(nets):
            nxt = self.reject if j == len(nets) - 1 else self.a.label("next_net")
            words = _v4_words(net)
            for i, (off, mask, value) in enumerate(words):
                self.ld_ind(W, field + off)
                if mask != 0xFFFFFFFF:
                    self.a.op(ALU | AND | K, mask)
                self.a.jump(JEQ, value, ok if i == len(words) - 1 else None, nxt)
            if nxt != self.reject:
                self.a.place(nxt)
        self.a.place(ok)

    def ports(self, clauses: Sequence[PortClause]) -> None:
        """X = L4 offset. Accept when any clause holds, else reject."""
        for ci, clause in enumerate(clauses):
            fail = self.reject if ci == len(clauses) - 1 else self.a.label("next_clause")
            for field, ranges, negated in clause.tests:
                passed = self.a.label("test_ok")
                inside, outside = (fail, passed) if negated else (passed, fail)
                self.ld_ind(H, 0 if field == "sport" else 2)
                for ri, r in enumerate(ranges):
                    nxt = outside if ri == len(ranges) - 1 else self.a.label("next_range")
                    if r.low == r.high:
                        self.a.jump(JEQ, r.low, inside, nxt)
                    else:
                        check_high = self.a.label("check_high")
                        self.a.jump(JGE, r.low, check_high, nxt)
                        self.a.place(check_high)
                        self.a.jump(JGT, r.high, nxt, inside)
                    if nxt is not outside:
                        self.a.place(nxt)
                self.a.place(passed)
            self.a.ja(self.accept)
            if fail != self.reject:
                self.a.place(fail)

    def family(self, fm: Optional[FamilyMatch], version: int, exclude: Sequence[Address]) -> None:
        if fm is None:
            self.a.ja(self.reject)
            return
        v6 = version == 6
        src, dst, proto = (8, 24, 6) if v6 else (12, 16, 9)
        for addr in exclude:
            if addr.version == version:
                self.exclude_address(addr, (src, dst))
        if fm.protocols:
            protocols = fm.protocols
            if fm.has_ports:
                protocols = tuple(p for p in protocols if p in PORT_PROTOCOLS)
                if not protocols:
                    self.a.ja(self.reject)
                    return
            self.any_of(B, proto, protocols)
        elif fm.has_ports:
            self.any_of(B, proto, sorted(PORT_PROTOCOLS))
        self.networks(src, fm.sources)
        self.networks(dst, fm.destinations)
        if fm.has_ports:
            if v6:
                # Ports only after a plain next header (no extension header walk).
                self.a.op(MISC | TXA)
                self.a.op(ALU | ADD | K, 40)
            else:
                # A non-first fragment carries no transport header, so no ports.
                self.ld_ind(H, 6)
                self.a.jump(JSET, 0x1FFF, self.reject, None)
                self.ld_ind(B, 0)
                self.a.op(ALU | AND | K, 0x0F)
                self.a.op(ALU | LSH | K, 2)
                self.a.op(ALU | ADD | X)
            self.a.op(MISC | TAX)
            self.ports(fm.port_clauses)
        else:
            self.a.ja(self.accept)


class _Buckets:
    """A group member's share of the flows: the frame's symmetric flow hash
    picks one of BUCKETS buckets, and the member takes the frames of its own.

    The hash XORs the source and destination addresses, and for an unfragmented
    TCP/UDP/DCCP/SCTP/UDP-Lite packet its two ports, so a flow and its reply
    hash alike; any IPv4 fragment (the first too) and any IPv6 packet whose
    next header is not one of those (a fragment header, an extension header)
    hashes its addresses only, so a datagram's fragments stay together, as in
    the kernel's own symmetric hash. It is then folded and multiplied, and
    its top 6 bits are the bucket. Non-IP frames are bucket 0.
    """

    def __init__(self, c: _Compiler, held: Collection[int]) -> None:
        self.c, self.a = c, c.a
        self.mask = sum(1 << b for b in set(held) if 0 <= b < BUCKETS)

    @property
    def everything(self) -> bool:
        return self.mask == (1 << BUCKETS) - 1

    def xor_word(self, size: int, off: int) -> None:
        """M_HASH ^= the field at L3 + off (X: the L3 offset, kept)."""
        a = self.a
        a.op(LD | size | IND, off)
        a.op(LDX | W | MEM, M_HASH)
        a.op(ALU | XOR | X)
        a.op(ST, M_HASH)
        a.op(LDX | W | MEM, M_L3)

    def ports(self, l4_from_l3: Optional[int]) -> None:
        """M_HASH ^= sport ^ dport; the L4 offset is L3 + `l4_from_l3`, or
        (None) L3 + the IPv4 header's length."""
        a = self.a
        if l4_from_l3 is None:
            a.op(LD | B | IND, 0)
            a.op(ALU | AND | K, 0x0F)
            a.op(ALU | LSH | K, 2)
        else:
            a.op(LD | W | IMM, l4_from_l3)
        a.op(ALU | ADD | X)
        a.op(MISC | TAX)
        a.op(LD | H | IND, 0)
        a.op(ST, M_TMP)
        a.op(LD | H | IND, 2)
        a.op(LDX | W | MEM, M_TMP)
        a.op(ALU | XOR | X)
        a.op(LDX | W | MEM, M_HASH)
        a.op(ALU | XOR | X)
        a.op(ST, M_HASH)

    def hash(self, version: int, done: str) -> None:
        """M_HASH = the frame's flow hash (X: the L3 offset in, anything out); then `done`."""
        a = self.a
        addresses = range(12, 20, 4) if version == 4 else range(8, 40, 4)
        first, *rest = addresses
        a.op(LD | W | IND, first)
        a.op(ST, M_HASH)
        for off in rest:
            self.xor_word(W, off)
        with_ports = a.label("with_ports")
        if version == 4:
            a.op(LD | H | IND, 6)
            a.jump(JSET, 0x3FFF, done, None)  # MF or an offset: a fragment
            a.op(LD | B | IND, 9)
        else:
            a.op(LD | B | IND, 6)
        for i, proto in enumerate(HASHED_PORTS):
            a.jump(JEQ, proto, with_ports, done if i == len(HASHED_PORTS) - 1 else None)
        a.place(with_ports)
        self.ports(None if version == 4 else 40)
        a.ja(done)

    def decide(self) -> None:
        """From M_HASH: accept the frame when its bucket is this member's."""
        a, c = self.a, self.c
        a.op(LD | W | MEM, M_HASH)
        a.op(ALU | RSH | K, 16)
        a.op(LDX | W | MEM, M_HASH)
        a.op(ALU | XOR | X)
        a.op(ALU | MUL | K, GOLDEN)
        a.op(ALU | RSH | K, BUCKET_SHIFT)
        self.held(c.bucket_accept, c.reject)

    def held(self, yes: str, no: str) -> None:
        """A: a bucket (0..63); to `yes` when the member holds it, else `no`."""
        a = self.a
        high = a.label("high")
        a.jump(JGE, 32, high, None)
        a.op(MISC | TAX)
        a.op(LD | W | IMM, self.mask & 0xFFFFFFFF)
        a.op(ALU | RSH | X)
        a.jump(JSET, 1, yes, no)
        a.place(high)
        a.op(ALU | SUB | K, 32)
        a.op(MISC | TAX)
        a.op(LD | W | IMM, self.mask >> 32)
        a.op(ALU | RSH | X)
        a.jump(JSET, 1, yes, no)


def compile_filter(
    match: Match,
    exclude: Sequence[Address] = (),
    *,
    directions: Sequence[str] = ("in", "out"),
    link: Link = "ethernet",
    snaplen: int = MAX_SNAPLEN,
    buckets: Optional[Collection[int]] = None,
) -> list[Insn]:
    """The filter program for `match`, dropping traffic to/from `exclude`.

    The exclusion is tested first, before the protocol and ports, so it holds
    for IPv4 fragments too.

    `directions` ("in", "out") tests the packet type in the kernel, so a
    one-direction mirror never wakes the worker for the other direction.
    The accept return value is the snap length: the kernel cuts the copy.
    A match on all traffic (family any, nothing else) also passes non-IP
    frames (ARP, LLDP), as a switch's SPAN port would.

    `buckets` (a collector group's member): only the frames whose flow hash
    falls in one of these buckets (see _Buckets); None: every frame.
    """
    snaplen = max(1, min(snaplen, MAX_SNAPLEN))
    exclude = tuple(dict.fromkeys(exclude))
    dirs = set(directions)
    if not dirs or not dirs <= {"in", "out"}:
        raise BpfError(f"directions must be 'in' and/or 'out', not {tuple(directions)}")
    c = _Compiler(snaplen)
    a = c.a
    share = _Buckets(c, buckets) if buckets is not None else None
    if share is not None and share.everything:
        share = None
    if share is not None and not share.mask:
        a.ret(0)  # a member holding no bucket takes nothing
        return a.assemble()
    if dirs != {"in", "out"}:
        a.op(LD | W | ABS, anc(SKF_AD_PKTTYPE))
        if dirs == {"in"}:
            a.jump(JEQ, PACKET_OUTGOING, c.reject, None)
        else:
            a.jump(JEQ, PACKET_OUTGOING, None, c.reject)
    dispatch = a.label("dispatch")
    if link == "ethernet":
        tagged = a.label("tagged")
        double = a.label("double")
        a.op(LD | H | ABS, 12)
        for tpid in VLAN_TPIDS:
            a.jump(JEQ, tpid, tagged, None)
        a.op(LDX | W | IMM, ETH_HLEN)
        a.ja(dispatch)
        # The (inner) ethertype follows each 4-byte tag; L3 follows it.
        a.place(tagged)
        a.op(LD | H | ABS, 12 + VLAN_HLEN)
        for tpid in VLAN_TPIDS:
            a.jump(JEQ, tpid, double, None)
        a.op(LDX | W | IMM, ETH_HLEN + VLAN_HLEN)
        a.ja(dispatch)
        a.place(double)
        a.op(LD | H | ABS, 12 + 2 * VLAN_HLEN)
        a.op(LDX | W | IMM, ETH_HLEN + 2 * VLAN_HLEN)
    elif link == "raw":
        a.op(LD | W | ABS, anc(SKF_AD_PROTOCOL))
        a.op(LDX | W | IMM, 0)
    else:
        raise BpfError(f"unknown link type {link!r}")
    a.place(dispatch)
    if share is not None:
        a.op(STX, M_L3)
    v4, v6 = a.label("ipv4"), a.label("ipv6")
    a.jump(JEQ, ETH_P_IP, v4, None)
    a.jump(JEQ, ETH_P_IPV6, v6, None)
    unconstrained = match == Match()
    if share is not None and unconstrained:
        a.op(LD | W | IMM, 0)  # non-IP: bucket 0's member
        share.held(c.bucket_accept, c.reject)
    else:
        a.ret(snaplen if unconstrained else 0)
    accepts = {4: c.accept, 6: c.accept}
    versions: tuple[tuple[Literal[4, 6], str], ...] = ((4, v4), (6, v6))
    for version, label in versions:
        a.place(label)
        if share is not None:
            # Each family hashes its own way: a private accept label to start from.
            accepts[version] = c.accept = a.label(f"hash{version}")
        c.family(match.for_version(version), version, exclude)
    if share is not None:
        decide = a.label("decide")
        for version in (4, 6):
            a.place(accepts[version])
            a.op(LDX | W | MEM, M_L3)
            share.hash(version, decide)
        a.place(decide)
        share.decide()
    a.place(c.accept if share is None else c.bucket_accept)
    a.ret(snaplen)
    a.place(c.reject)
    a.ret(0)
    return a.assemble()
