"""`mirrord trace`: follow matching packets through nftables, like the seeds' iptables TRACE.

Matching packets get `meta nftrace set 1` from a temporary table
`inet mirrord_trace` (prerouting and output, raw priority, so everything later
sees the mark). The kernel then reports every rule, return and policy the
packet meets on NFNLGRP_NFTRACE; events are grouped per packet and printed as
one header line (decoded with scapy) followed by the table/chain/rule/verdict
path, with mirrord's own copy rules marked.

The table is not created inside `ip mirrord`/`ip6 mirrord`: the daemon replaces
those whole on every reconcile. It is removed on every way out (count, timeout,
SIGINT/SIGTERM/SIGHUP, errors); one left behind by a killed run is recognised
by the pid in its rule comments and removed by the next run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Optional, TextIO

from ..backends.libnft import NftSession
from ..match import (
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    PROTOCOLS,
    Match,
    Network,
    PortRange,
    merge_ranges,
)
from ..netlink.nftrace import (
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_TRACETYPE_POLICY,
    NFT_TRACETYPE_RETURN,
    NFT_TRACETYPE_RULE,
    TraceEvent,
    TraceSocket,
    ifname,
    own_identity,
    process_start_time,
)

log = logging.getLogger(__name__)

TRACE_FAMILY = "inet"
TRACE_TABLE = "mirrord_trace"  # also mirrord.backends.nftables.TRACE_TABLE (flush removes it)
MIRRORD_TABLE = "mirrord"
PRIO_RAW = -300
# (chain, hook, priority). Marking happens in prerouting (everything that
# arrives) and output (what the router itself sends): every packet's first
# hook. The empty `post` chain, after every NAT and mirror chain, marks
# nothing; its policy event tells where a traced packet finally leaves, which
# no other event may say when no other table has a postrouting chain.
MARK_CHAINS = (("pre", "prerouting"), ("out", "output"))
CHAINS = ((*MARK_CHAINS[0], PRIO_RAW), (*MARK_CHAINS[1], PRIO_RAW), ("post", "postrouting", 1000))
COMMENT_RE = re.compile(r"^mirrord trace pid=(\d+) start=(\d+)$")

# A packet crosses all its hooks within microseconds unless it is queued;
# events of one trace id further apart than this belong to another packet
# (the kernel's trace id is a hash of the skb address, which gets reused).
PACKET_GAP = 0.5
# How long a packet stays open for more events before it is printed.
HOLD = 0.2

EXIT_OK = 0
EXIT_NOT_REACHED = 1
EXIT_ERROR = 2

Expr = dict[str, Any]


class TraceError(Exception):
    """Something that stops the trace before it starts, said for a user."""


# -- options and selection -----------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_config_argument

    add_config_argument(p)
    p.add_argument("--mirror", metavar="NAME",
                   help="trace what this mirror of the spec selects (its match, "
                        "interfaces and directions)")
    g = p.add_argument_group("match (when no --mirror is given)")
    g.add_argument("--protocol", action="append", default=[], metavar="PROTO",
                   help="tcp, udp, icmp, icmpv6, ... or a number; repeat or comma-separate")
    g.add_argument("--port", action="append", default=[], metavar="PORTS",
                   help="either end's port: 53, 1000-2000, 53,853")
    g.add_argument("--sport", action="append", default=[], metavar="PORTS")
    g.add_argument("--dport", action="append", default=[], metavar="PORTS")
    g.add_argument("--source", action="append", default=[], metavar="PREFIX")
    g.add_argument("--destination", action="append", default=[], metavar="PREFIX")
    g.add_argument("--interface", action="append", default=[], metavar="IF",
                   help="packets crossing this interface (see --direction)")
    g.add_argument("--direction", choices=("in", "out", "both"), default="both",
                   help="with --interface: arriving on it, leaving through it, or both")
    g.add_argument("--family", choices=("ipv4", "ipv6", "any"), default="any")
    p.add_argument("--count", type=_positive_int, metavar="N",
                   help="stop after N packets (exit status 1 if fewer were seen)")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per packet")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return v


@dataclass(frozen=True)
class Selection:
    """What to mark: a match, and where packets must cross (or anywhere)."""

    match: Match
    crossings: tuple[tuple[str, str], ...] = ()  # (interface, "in" | "out")
    label: str = ""


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _ports(values: list[str], what: str) -> tuple[PortRange, ...]:
    out: list[PortRange] = []
    for v in _split(values):
        m = re.fullmatch(r"(\d+)(?:\s*[-:]\s*(\d+))?", v)
        if not m:
            raise TraceError(f"--{what}: '{v}' is not a port or a range like 1000-2000")
        low = int(m.group(1))
        high = int(m.group(2) or low)
        if not 1 <= low <= high <= 65535:
            raise TraceError(f"--{what}: {v} is not within 1-65535 with low <= high")
        out.append(PortRange(low, high))
    return merge_ranges(out)


def _networks(values: list[str], what: str) -> tuple[Network, ...]:
    out: list[Network] = []
    for v in _split(values):
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise TraceError(f"--{what}: '{v}' is not an address or prefix") from None
    return tuple(out)


def match_from_options(args: argparse.Namespace) -> Match:
    protocols: list[int] = []
    for v in _split(args.protocol):
        if v.isdigit() and int(v) <= 255:
            p = int(v)
        elif v.lower() in PROTOCOLS:
            p = PROTOCOLS[v.lower()]
        else:
            raise TraceError(f"--protocol: unknown protocol '{v}'; use one of "
                             f"{', '.join(sorted(PROTOCOLS))}, or a number")
        if p not in protocols:
            protocols.append(p)
    ports = _ports(args.port, "port")
    sports = _ports(args.sport, "sport")
    dports = _ports(args.dport, "dport")
    if (ports or sports or dports) and any(p not in PORT_PROTOCOLS for p in protocols):
        bad = next(p for p in protocols if p not in PORT_PROTOCOLS)
        raise TraceError(f"port options given, but protocol {PROTOCOL_NAMES.get(bad, bad)} "
                         "has no ports")
    sources = _networks(args.source, "source")
    destinations = _networks(args.destination, "destination")
    for n in (*sources, *destinations):
        if args.family != "any" and f"ipv{n.version}" != args.family:
            raise TraceError(f"{n} is not {args.family} (--family)")
    match = Match(
        family=args.family,
        protocols=tuple(protocols),
        ports=ports,
        sports=sports,
        dports=dports,
        sources=sources,
        destinations=destinations,
    )
    if not match.versions():
        raise TraceError("this match can never select a packet (its parts contradict)")
    return match


def selection_from_args(args: argparse.Namespace) -> Selection:
    match_opts = ("protocol", "port", "sport", "dport", "source", "destination", "interface")
    if args.mirror:
        given = [f"--{o}" for o in match_opts if getattr(args, o)]
        if args.family != "any":
            given.append("--family")
        if given:
            raise TraceError(f"--mirror takes the match from the spec; drop {', '.join(given)}")
        from ..spec import SpecError, default_path, load

        path = args.config or default_path()
        try:
            spec = load(path)
        except SpecError as e:
            raise TraceError(f"cannot use the spec:\n{e}") from e
        mirror = next((m for m in spec.mirrors if m.name == args.mirror), None)
        if mirror is None:
            names = ", ".join(m.name for m in spec.mirrors)
            raise TraceError(f"{path}: no mirror named '{args.mirror}' (defined: {names})")
        collector = spec.collector_of(mirror)
        if collector.transport == "tzsp":
            log.warning("mirror %s sends TZSP from a capture socket, not nft rules: the trace "
                        "shows where its packets go, but no copy rule", mirror.name)
        crossings = tuple((i, d) for i in mirror.interfaces for d in mirror.directions)
        return Selection(mirror.match, crossings, f"mirror {mirror.name}")
    match = match_from_options(args)
    dirs = ("in", "out") if args.direction == "both" else (args.direction,)
    from ..spec import valid_ifname

    for i in args.interface:
        why = valid_ifname(i)
        if why:
            raise TraceError(f"--interface '{i}' {why}")
    wanted: tuple[tuple[str, str], ...] = tuple(
        (i, d) for i in dict.fromkeys(args.interface) for d in dirs)
    return Selection(match, wanted, "")


def describe(sel: Selection) -> str:
    parts = [sel.label] if sel.label else []
    parts.append(sel.match.describe())
    if sel.crossings:
        parts.append(", ".join(f"{d} on {i}" for i, d in sel.crossings))
    return "; ".join(parts)


def _meta_match(key: str, value: Any) -> Expr:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


NFTRACE_ON: Expr = {"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}


def trace_rules(sel: Selection) -> list[tuple[str, list[Expr]]]:
    """(chain, expressions) of every marking rule; pure."""
    from ..backends.nftables import match_exprs

    rules: list[tuple[str, list[Expr]]] = []
    for version in sel.match.versions():
        fm = sel.match.for_version(version)
        if fm is None:
            continue
        # The lead renders protocols with `meta l4proto`, which in an inet
        # table matches both families: pin the family explicitly.
        family = _meta_match("nfproto", f"ipv{version}")
        for alt in match_exprs(fm):
            if not sel.crossings:
                for chain, _hook in MARK_CHAINS:
                    rules.append((chain, [family, *alt, NFTRACE_ON]))
                continue
            for iface, direction in sel.crossings:
                if direction == "in":
                    rules.append(("pre", [family, _meta_match("iifname", iface), *alt,
                                          NFTRACE_ON]))
                else:
                    # Forwarded packets: prerouting does not know the output
                    # interface yet, so ask the FIB where the packet will go.
                    fib = {"match": {"op": "==", "left": {"fib": {"result": "oifname",
                                                                  "flags": ["daddr"]}},
                                     "right": iface}}
                    rules.append(("pre", [family, fib, *alt, NFTRACE_ON]))
                    rules.append(("out", [family, _meta_match("oifname", iface), *alt,
                                          NFTRACE_ON]))
    return rules


def trace_comment(pid: int, start: int) -> str:
    return f"mirrord trace pid={pid} start={start}"


SshFlow = tuple[str, int, str, int]  # client address, client port, server address, server port


def ssh_flow(environ: dict[str, str]) -> Optional[SshFlow]:
    """The SSH connection this command runs in, from SSH_CONNECTION, if any."""
    parts = environ.get("SSH_CONNECTION", "").split()
    if len(parts) != 4:
        return None
    try:
        client, server = ipaddress.ip_address(parts[0]), ipaddress.ip_address(parts[2])
        cport, sport = int(parts[1]), int(parts[3])
    except ValueError:
        return None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    if isinstance(server, ipaddress.IPv6Address) and server.ipv4_mapped:
        server = server.ipv4_mapped
    if client.version != server.version:
        return None
    return str(client), cport, str(server), sport


def ssh_exclusions(flow: SshFlow) -> list[tuple[str, list[Expr]]]:
    """Rules that keep the user's own SSH session out of the trace.

    Tracing it would print a packet for every packet of the printing itself,
    a loop that floods the terminal as soon as the match is broad.
    """
    client, cport, server, sport = flow
    fam = "ip6" if ":" in client else "ip"

    def one(saddr: str, sp: int, daddr: str, dp: int) -> list[Expr]:
        def m(left: Expr, right: Any) -> Expr:
            return {"match": {"op": "==", "left": left, "right": right}}

        return [
            m({"payload": {"protocol": fam, "field": "saddr"}}, saddr),
            m({"payload": {"protocol": fam, "field": "daddr"}}, daddr),
            m({"meta": {"key": "l4proto"}}, "tcp"),
            m({"payload": {"protocol": "th", "field": "sport"}}, sp),
            m({"payload": {"protocol": "th", "field": "dport"}}, dp),
            {"return": None},
        ]

    return [("pre", one(client, cport, server, sport)), ("out", one(server, sport, client, cport))]


def create_commands(sel: Selection, comment: str,
                    ssh: Optional[SshFlow] = None) -> list[dict[str, Any]]:
    """One transaction creating the whole trace table; `create` fails if it exists."""
    t = {"family": TRACE_FAMILY, "table": TRACE_TABLE}
    cmds: list[dict[str, Any]] = [{"create": {"table": {"family": TRACE_FAMILY,
                                                        "name": TRACE_TABLE}}}]
    for chain, hook, prio in CHAINS:
        cmds.append({"add": {"chain": {**t, "name": chain, "type": "filter", "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
    rules = (ssh_exclusions(ssh) if ssh else []) + trace_rules(sel)
    for chain, exprs in rules:
        cmds.append({"add": {"rule": {**t, "chain": chain, "expr": exprs, "comment": comment}}})
    return cmds


DELETE_COMMANDS: list[dict[str, Any]] = [
    {"delete": {"table": {"family": TRACE_FAMILY, "name": TRACE_TABLE}}}
]


# -- the kernel side -------------------------------------------------------------
def open_session() -> NftSession:
    try:
        return NftSession.open()
    except (ImportError, OSError) as e:
        raise TraceError(str(e)) from e  # names the library's problem and the package


def _listed_text(nft: NftSession, family: str, table: str) -> str:
    """The table in nft syntax, with handles and without counts ("" when it is gone)."""
    rc, out, _ = nft.text(f"list table {family} {table}", handles=True, stateless=True)
    return out if rc == 0 else ""


def stale_owner(objs: list[dict[str, Any]]) -> Optional[tuple[int, int]]:
    """The (pid, start) a trace table's rule comments name, if any."""
    for o in objs:
        m = COMMENT_RE.match(str(o.get("rule", {}).get("comment", "")))
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def owner_alive(owner: tuple[int, int]) -> bool:
    pid, start = owner
    if pid == os.getpid():
        return False
    return process_start_time(pid) == start


class TraceTable:
    def __init__(self, nft: NftSession) -> None:
        self.nft = nft
        self.created = False
        self.seen_created = False  # our NEWTABLE came back on the event socket

    def clear_stale(self) -> None:
        objs = self.nft.list_table(TRACE_FAMILY, TRACE_TABLE)
        if objs is None:
            return
        owner = stale_owner(objs)
        if owner is not None and owner_alive(owner):
            raise TraceError(
                f"another mirrord trace (pid {owner[0]}) is running in this network namespace; "
                "stop it first (both would print each other's packets)")
        rc, _, err = self.nft.json(DELETE_COMMANDS)
        if rc != 0:
            raise TraceError(f"cannot remove the stale table {TRACE_FAMILY} {TRACE_TABLE}: "
                             f"{err.strip()}")
        who = f" (pid {owner[0]}, no longer running)" if owner else ""
        log.warning("removed table %s %s left behind by an earlier trace%s",
                    TRACE_FAMILY, TRACE_TABLE, who)

    def create(self, sel: Selection, comment: str, ssh: Optional[SshFlow] = None) -> None:
        cmds = create_commands(sel, comment, ssh)
        rc, _, err = self.nft.json(cmds)
        if rc != 0:
            raise TraceError(f"nftables refused the trace table: {err.strip()}\n"
                             f"input: {json.dumps({'nftables': cmds})}")
        self.created = True

    def delete(self) -> bool:
        if not self.created:
            return True
        rc, _, err = self.nft.json(DELETE_COMMANDS)
        if rc != 0 and self.nft.list_table(TRACE_FAMILY, TRACE_TABLE) is not None:
            log.error("could not remove table %s %s: %s; remove it with: "
                      "nft delete table %s %s", TRACE_FAMILY, TRACE_TABLE, err.strip(),
                      TRACE_FAMILY, TRACE_TABLE)
            return False
        self.created = False
        return True


# -- rules the events name -------------------------------------------------------
@dataclass(frozen=True)
class MirrorHit:
    mirror: str
    direction: str
    to: Optional[str] = None
    device: Optional[str] = None

    def text(self) -> str:
        s = f"mirror {self.mirror} {self.direction}"
        if self.to:
            s += f": copied to {self.to}" + (f" via {self.device}" if self.device else "")
        return s

    def as_json(self) -> dict[str, Any]:
        return {"mirror": self.mirror, "direction": self.direction, "to": self.to,
                "device": self.device}


@dataclass(frozen=True)
class RuleInfo:
    text: Optional[str]
    mirror: Optional[MirrorHit] = None


RULE_LINE = re.compile(r"^(.*\S)\s+# handle (\d+)$")
CHAIN_LINE = re.compile(r'^chain ("(?:[^"\\]|\\.)*"|\S+) \{')
CHAIN_PROPS = ("type ", "policy ", "comment ", "devices ", "flags ")


def rules_from_text(listing: str) -> dict[tuple[str, int], str]:
    """(chain, handle) -> rule text from `nft -a -s list table` output."""
    out: dict[tuple[str, int], str] = {}
    chain: Optional[str] = None
    pending: list[str] = []
    for raw in listing.splitlines():
        line = raw.strip()
        m = CHAIN_LINE.match(line)
        if m:
            chain = m.group(1).strip('"')
            pending = []
            continue
        if chain is None:
            continue
        if line == "}":
            chain, pending = None, []
            continue
        if not line or (not pending and line.startswith(CHAIN_PROPS)):
            continue
        m = RULE_LINE.match(line)
        if m:
            out[(chain, int(m.group(2)))] = " ".join([*pending, m.group(1)])
            pending = []
        else:
            # Long anonymous sets may wrap onto following lines.
            pending.append(line)
    return out


def mirror_hit(rule: dict[str, Any]) -> Optional[MirrorHit]:
    """The mirror a daemon rule belongs to, from its comment "mirrord <mirror> <in|out>"."""
    from ..backends.base import parse_comment

    key = parse_comment(str(rule.get("comment", "")))
    if key is None:
        return None
    to: Optional[str] = None
    dev: Optional[str] = None
    for e in rule.get("expr", []):
        if isinstance(e, dict) and "dup" in e:
            d = e["dup"] or {}
            to = str(d["addr"]) if "addr" in d else None
            dev = str(d["dev"]) if "dev" in d else None
    return MirrorHit(key[0], key[1], to, dev)


class RuleBook:
    """Looks rules up by (family, table, chain, handle), cached until the ruleset changes."""

    def __init__(self, nft: Optional[NftSession]) -> None:
        self.nft = nft
        self.tables: dict[tuple[str, str], dict[tuple[str, int], RuleInfo]] = {}

    def invalidate(self) -> None:
        self.tables.clear()

    def load(self, family: str, table: str) -> dict[tuple[str, int], RuleInfo]:
        cached = self.tables.get((family, table))
        if cached is not None:
            return cached
        infos: dict[tuple[str, int], RuleInfo] = {}
        if self.nft is not None:
            texts = rules_from_text(_listed_text(self.nft, family, table))
            hits: dict[tuple[str, int], MirrorHit] = {}
            if table == MIRRORD_TABLE:
                for o in self.nft.list_table(family, table) or []:
                    r = o.get("rule")
                    if r and "handle" in r:
                        hit = mirror_hit(r)
                        if hit:
                            hits[(str(r["chain"]), int(r["handle"]))] = hit
            for key in set(texts) | set(hits):
                infos[key] = RuleInfo(texts.get(key), hits.get(key))
        self.tables[(family, table)] = infos
        return infos

    def lookup(self, family: str, table: str, chain: str, handle: int) -> RuleInfo:
        info = self.load(family, table).get((chain, handle))
        return info or RuleInfo(None)


# -- packet headers --------------------------------------------------------------
@dataclass
class Headers:
    version: int
    src: str
    dst: str
    protocol: str
    length: Optional[int] = None
    ttl: Optional[int] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    info: str = ""

    def endpoints(self) -> str:
        def ep(addr: str, port: Optional[int]) -> str:
            if port is None:
                return addr
            return f"[{addr}]:{port}" if self.version == 6 else f"{addr}:{port}"

        return f"{ep(self.src, self.sport)} > {ep(self.dst, self.dport)}"

    def text(self) -> str:
        parts = [self.endpoints(), self.protocol.upper()]
        if self.info:
            parts.append(self.info)
        if self.length is not None:
            parts.append(f"len={self.length}")
        if self.ttl is not None:
            parts.append(f"{'ttl' if self.version == 4 else 'hlim'}={self.ttl}")
        return " ".join(parts)

    def flow(self) -> tuple[str, str, Optional[int], Optional[int]]:
        return (self.src, self.dst, self.sport, self.dport)

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "src": self.src, "dst": self.dst,
                "protocol": self.protocol, "sport": self.sport, "dport": self.dport,
                "length": self.length, "ttl": self.ttl, "info": self.info}


UPPER_LAYER = frozenset({1, 6, 17, 58, 132, 136})


def decode_headers(network: bytes, transport: Optional[bytes]) -> Optional[Headers]:
    """The packet's addresses, protocol, ports and ICMP/TCP details, from the trace's copies.

    Plain struct parsing: a router's image has no scapy, and the output must not
    depend on whether it is installed (tests check it against scapy's dissection).
    """
    if not network:
        return None
    version = network[0] >> 4
    th = transport or b""
    if version == 4 and len(network) >= 20:
        proto = network[9]
        h = Headers(4, str(ipaddress.IPv4Address(network[12:16])),
                    str(ipaddress.IPv4Address(network[16:20])),
                    PROTOCOL_NAMES.get(proto, str(proto)),
                    length=struct.unpack(">H", network[2:4])[0], ttl=network[8])
        flags_frag = struct.unpack(">H", network[6:8])[0]
        if flags_frag & 0x2000 or flags_frag & 0x1FFF:
            # Only the first fragment carries the transport header.
            h.info = f"fragment offset={(flags_frag & 0x1FFF) * 8}"
            return h
    elif version == 6 and len(network) >= 40:
        proto = network[6]
        h = Headers(6, str(ipaddress.IPv6Address(network[8:24])),
                    str(ipaddress.IPv6Address(network[24:40])), _v6_protocol(proto),
                    length=struct.unpack(">H", network[4:6])[0] + 40, ttl=network[7])
        if proto not in UPPER_LAYER:
            return h  # behind an extension header: the transport header is out of sight
    else:
        return None
    if proto == 6 and len(th) >= 14:
        h.sport, h.dport, seq, ack = struct.unpack(">HHII", th[:12])
        flags = ((th[12] & 1) << 8) | th[13]
        h.info = f"[{_tcp_flags(flags)}] seq={seq}" + (f" ack={ack}" if flags & 0x10 else "")
    elif (proto in (17, 136) and len(th) >= 8) or (proto == 132 and len(th) >= 4):
        h.sport, h.dport = struct.unpack(">HH", th[:4])
    elif proto == 1 and len(th) >= 4:
        h.info = ICMP_TYPES.get(th[0], str(th[0]))
        if th[0] in (0, 8) and len(th) >= 8:
            ident, seq16 = struct.unpack(">HH", th[4:8])
            h.info += f" id={ident} seq={seq16}"
    elif proto == 58 and len(th) >= 4:
        h.info = ICMPV6_TYPES.get(th[0], f"type {th[0]}")
        if th[0] in (128, 129) and len(th) >= 8:
            ident, seq16 = struct.unpack(">HH", th[4:8])
            h.info += f" id={ident} seq={seq16}"
    return h


TCP_FLAG_LETTERS = "FSRPAUECN"  # bit 0 upwards, as tcpdump/scapy print them


def _tcp_flags(bits: int) -> str:
    return "".join(c for i, c in enumerate(TCP_FLAG_LETTERS) if bits >> i & 1)


# The names scapy and Wireshark users know (scapy's icmptypes / icmp6types).
ICMP_TYPES = {
    0: "echo-reply", 3: "dest-unreach", 4: "source-quench", 5: "redirect", 8: "echo-request",
    9: "router-advertisement", 10: "router-solicitation", 11: "time-exceeded",
    12: "parameter-problem", 13: "timestamp-request", 14: "timestamp-reply",
    15: "information-request", 16: "information-response", 17: "address-mask-request",
    18: "address-mask-reply", 30: "traceroute", 31: "datagram-conversion-error",
    32: "mobile-host-redirect", 33: "ipv6-where-are-you", 34: "ipv6-i-am-here",
    35: "mobile-registration-request", 36: "mobile-registration-reply",
    37: "domain-name-request", 38: "domain-name-reply", 39: "skip", 40: "photuris",
}
ICMPV6_TYPES = {
    1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded",
    4: "parameter-problem", 128: "echo-request", 129: "echo-reply", 130: "mld-query",
    131: "mld-report", 132: "mld-done", 133: "router-solicitation", 134: "router-advertisement",
    135: "neighbor-solicitation", 136: "neighbor-advertisement", 137: "redirect-message",
    143: "mld-report-version-2",
}


# The kernel copies at most 40 bytes of network header, so behind an IPv6
# extension header the transport protocol is out of sight.
IPV6_EXTENSIONS = {0: "hop-by-hop", 43: "routing", 44: "fragment", 60: "dest-opts"}


def _v6_protocol(nh: int) -> str:
    if nh in IPV6_EXTENSIONS:
        return f"{IPV6_EXTENSIONS[nh]}-ext"
    return PROTOCOL_NAMES.get(nh, str(nh))


def copy_key(network: Optional[bytes], transport: Optional[bytes]) -> Optional[bytes]:
    """The packet's identity as far as a kernel clone or a forwarding step keeps it.

    Leaves out the TTL/hop limit (decremented), the IPv4 checksum and the DF bit
    (nf_dup sets it on clones).
    """
    if not network:
        return None
    if network[0] >> 4 == 4 and len(network) >= 20:
        return (network[0:6] + bytes([network[6] & ~0x40 & 0xFF]) + network[7:8]
                + network[9:10] + network[12:] + (transport or b""))
    if network[0] >> 4 == 6 and len(network) >= 40:
        return network[0:7] + network[8:] + (transport or b"")
    return None


def nat_key(network: Optional[bytes]) -> Optional[bytes]:
    """What NAT leaves alone in an IPv4 packet: total length, id, fragment, protocol.

    None when the id is 0 (some stacks send every DF packet with id 0), so
    that two different packets are never taken for one.
    """
    if not network or network[0] >> 4 != 4 or len(network) < 20:
        return None
    if network[4:6] == b"\0\0":
        return None
    return network[2:6] + bytes([network[6] & ~0x40 & 0xFF]) + network[7:8] + network[9:10]


# -- grouping events into packets -----------------------------------------------------
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


# -- output -------------------------------------------------------------------------
def verdict_text(e: TraceEvent) -> str:
    if e.verdict is None:
        return ""
    return e.verdict.name


def step_text(s: Step, names: dict[int, str]) -> list[str]:
    e = s.event
    where = f"{e.family_name} {e.table} {e.chain}"
    lines: list[str] = []
    if s.changed is not None:
        lines.append(f"now {s.changed.text()}")
    if e.type == NFT_TRACETYPE_RULE:
        info = s.rule or RuleInfo(None)
        head = f"{where} rule #{e.rule_handle}"
        if info.mirror is not None:
            line = f"{head} ({verdict_text(e)}) [{info.mirror.text()}]"
        elif info.text:
            line = f"{head}: {info.text} ({verdict_text(e)})"
        else:
            # Replaced since, or a table nft cannot list by name.
            line = f"{head} ({verdict_text(e)})"
        lines.append(line)
        if s.copy is not None:
            c = s.copy
            out = ifname(c.oif, names)
            lines.append(f"  copy {'out ' + out if out else 'sent'}"
                         + (f": {c.headers.text()}" if c.headers else ""))
            for cs in c.visible_steps():
                lines.extend("    " + x for x in step_text(cs, names))
    elif e.type == NFT_TRACETYPE_RETURN:
        v = verdict_text(e)
        lines.append(f"{where} return" if v in ("continue", "") else f"{where} verdict {v}")
    elif e.type == NFT_TRACETYPE_POLICY:
        mark = f" meta mark 0x{e.mark:08x}" if e.mark else ""
        lines.append(f"{where} policy {e.policy_name}{mark}")
    return lines


def packet_text(pkt: Packet, names: dict[int, str]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(pkt.wall)) + f".{int(pkt.wall % 1 * 1e6):06d}"
    iif = ifname(pkt.iif, names) or ""
    oif = ifname(pkt.oif, names) or ""
    if pkt.headers is not None:
        what = pkt.headers.text()
    else:
        what = {NFPROTO_IPV4: "IPv4", NFPROTO_IPV6: "IPv6"}.get(pkt.nfproto or 0, "packet")
    head = f"#{pkt.number} {stamp} IN={iif} OUT={oif} {what}"
    mirrors = pkt.mirrors
    if mirrors:
        head += "  => mirrored by " + ", ".join(f"{m.mirror} ({m.direction})" for m in mirrors)
    lines = [head]
    for s in pkt.visible_steps():
        lines.extend("  " + x for x in step_text(s, names))
    if len(lines) == 1:
        lines.append("  (no nftables rule outside the trace table saw it)")
    return "\n".join(lines)


def step_json(s: Step, names: dict[int, str]) -> dict[str, Any]:
    e = s.event
    d: dict[str, Any] = {"family": e.family_name, "table": e.table, "chain": e.chain,
                         "type": e.type_name}
    if e.rule_handle is not None:
        d["handle"] = e.rule_handle
    if e.verdict is not None:
        d["verdict"] = e.verdict.name
    if e.policy is not None:
        d["policy"] = e.policy_name
    if e.mark:
        d["mark"] = e.mark
    if s.rule is not None:
        d["rule"] = s.rule.text
        d["mirror"] = s.rule.mirror.as_json() if s.rule.mirror else None
    if s.changed is not None:
        d["packet_now"] = s.changed.as_json()
    if s.copy is not None:
        d["copy"] = {"out": ifname(s.copy.oif, names),
                     "trace_ids": [f"{t:08x}" for t in s.copy.trace_ids],
                     "events": [step_json(x, names) for x in s.copy.visible_steps()]}
    return d


def packet_json(pkt: Packet, names: dict[int, str]) -> dict[str, Any]:
    return {
        "packet": pkt.number,
        "time": round(pkt.wall, 6),
        "trace_ids": [f"{t:08x}" for t in pkt.trace_ids],
        "in": ifname(pkt.iif, names),
        "out": ifname(pkt.oif, names),
        "headers": pkt.headers.as_json() if pkt.headers else None,
        "summary": pkt.headers.text() if pkt.headers else None,
        "mirrored": [m.as_json() for m in pkt.mirrors],
        "events": [step_json(s, names) for s in pkt.visible_steps()],
    }


# -- the run ---------------------------------------------------------------------
class _Stop:
    """Signal flags, delivered through a self-pipe so select() wakes at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.old: dict[int, Any] = {}
        self.old_wakeup = -1

    def install(self) -> None:
        for s in self.SIGNALS:
            self.old[s] = signal.signal(s, self._handler)
        self.old_wakeup = signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum

    def restore(self) -> None:
        signal.set_wakeup_fd(self.old_wakeup)
        for s, h in self.old.items():
            signal.signal(s, h)
        os.close(self.rfd)
        os.close(self.wfd)

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 512):
                pass
        except BlockingIOError:
            pass


def run(args: argparse.Namespace) -> int:
    try:
        sel = selection_from_args(args)
        trace_rules(sel)  # fail on an unrenderable match before touching the kernel
    except TraceError as e:
        print(f"mirrord trace: {e}", file=sys.stderr)
        return EXIT_ERROR
    if not sel.crossings and sel.match == Match() and args.count is None:
        log.warning("tracing every packet the router sees; narrow the match or set --count")
    return trace(sel, count=args.count, timeout=args.timeout, as_json=args.json,
                 out=sys.stdout)


def trace(sel: Selection, count: Optional[int], timeout: Optional[float], as_json: bool,
          out: TextIO) -> int:
    stop = _Stop()
    stop.install()
    table: Optional[TraceTable] = None
    sock: Optional[TraceSocket] = None
    seen = 0
    try:
        try:
            nft = open_session()
            # Listen first: events are only generated while someone listens,
            # and none of the first packets should be missed.
            sock = TraceSocket()
            table = TraceTable(nft)
            table.clear_stale()
            ssh = ssh_flow(dict(os.environ))
            if ssh:
                log.info("not tracing this SSH session (%s port %d)", ssh[0], ssh[1])
            table.create(sel, trace_comment(*own_identity()), ssh)
        except PermissionError as e:
            print(f"mirrord trace: needs root (CAP_NET_ADMIN) to mark packets and read trace "
                  f"events ({e.strerror})", file=sys.stderr)
            return EXIT_ERROR
        except TraceError as e:
            print(f"mirrord trace: {e}", file=sys.stderr)
            return EXIT_ERROR
        print(f"tracing {describe(sel)}"
              + (f" for {timeout:g}s" if timeout else "")
              + (f", {count} packet(s)" if count else "")
              + "; Ctrl-C stops", file=sys.stderr, flush=True)
        rules = RuleBook(nft)
        tracker = Tracker(rules)
        names: dict[int, str] = {}
        deadline = time.monotonic() + timeout if timeout else None
        reason = "interrupted"
        while True:
            now = time.monotonic()
            if stop.signum is not None:
                reason = signal.Signals(stop.signum).name
                break
            if deadline is not None and now >= deadline:
                reason = "timeout"
                break
            due = tracker.next_due()
            if due == 0.0:
                wait: Optional[float] = 0.0
            else:
                waits = [w for w in (due, deadline) if w is not None]
                wait = max(0.0, min(waits) - now) if waits else None
            ready, _, _ = select.select([sock.fileno(), stop.rfd], [], [], wait)
            if stop.rfd in ready:
                stop.drain()
            if sock.fileno() in ready:
                received = sock.read()
                if sock.ruleset_changed:
                    sock.ruleset_changed = False
                    rules.invalidate()
                for r in received:
                    tracker.add(r.event, r.mono, r.wall)
                if _removed_by_others(sock, table):
                    log.warning("table %s %s was removed by someone else (mirrord flush?); "
                                "the trace cannot go on", TRACE_FAMILY, TRACE_TABLE)
                    reason = "trace table removed"
                    break
            seen = _emit(tracker.ready(time.monotonic()), seen, count, as_json, names, out)
            if count is not None and seen >= count:
                reason = "count"
                break
        if reason != "count":
            # What the kernel sent before the stop still belongs to the trace.
            for r in sock.read():
                tracker.add(r.event, r.mono, r.wall)
            seen = _emit(tracker.ready(time.monotonic(), flush=True), seen, count, as_json,
                         names, out)
        if sock.lost:
            log.warning("the kernel dropped trace events %d time(s): the output misses "
                        "parts of some packets (trace fewer packets: narrow the match)",
                        sock.lost)
        print(f"{seen} packet(s) traced ({'count reached' if reason == 'count' else reason})",
              file=sys.stderr, flush=True)
    finally:
        ok = table.delete() if table is not None else True
        if sock is not None:
            sock.close()
        stop.restore()
    if not ok or reason == "trace table removed":
        return EXIT_ERROR
    return EXIT_OK if count is None or seen >= count else EXIT_NOT_REACHED


def _removed_by_others(sock: TraceSocket, table: TraceTable) -> bool:
    """Whether our table was deleted after we created it (a stale one's deletion comes first)."""
    removed = False
    for op, family, name in sock.table_events:
        if (family, name) == (TRACE_FAMILY, TRACE_TABLE):
            if op == "new":
                table.seen_created = True
            elif table.seen_created:
                removed = True
    sock.table_events.clear()
    if removed:
        table.created = False
    return removed


def _emit(packets: list[Packet], seen: int, count: Optional[int], as_json: bool,
          names: dict[int, str], out: TextIO) -> int:
    for pkt in packets:
        if count is not None and seen >= count:
            break
        seen += 1
        pkt.number = seen
        if as_json:
            out.write(json.dumps(packet_json(pkt, names)) + "\n")
        else:
            out.write(packet_text(pkt, names) + "\n")
        out.flush()
    return seen

