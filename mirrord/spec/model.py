"""The typed result of reading a spec: `Spec`, its collectors and mirrors, and `SpecError`.

Plain frozen data: nothing here knows YAML, so the plan, the backends and the
daemon use a Spec without the reader.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..match import Address, Match

DEFAULT_PATH = "/etc/mirrord.yaml"
TZSP_PORT = 37008
VXLAN_PORT = 4789  # IANA; Linux's own default (8472) is what no IDS listens on
DEFAULT_VNI = 1
DEFAULT_SESSION = 1  # ERSPAN session id (0-1023)

Backend = Literal["auto", "nftables", "iptables", "iptables-legacy", "route-tee"]
Transport = Literal["auto", "clone", "tzsp", "span", "vxlan", "gretap", "erspan"]
Direction = Literal["in", "out", "both"]
BACKENDS: tuple[str, ...] = ("auto", "nftables", "iptables", "iptables-legacy", "route-tee")
TRANSPORTS: tuple[str, ...] = ("auto", "clone", "tzsp", "span", "vxlan", "gretap", "erspan")
# Whole frames copied by the kernel (nftables netdev `dup`): to a local port
# (span) or into a tunnel device mirrord creates for the collector.
FRAME_TRANSPORTS: frozenset[str] = frozenset({"span", "vxlan", "gretap", "erspan"})
TUNNEL_TRANSPORTS: frozenset[str] = frozenset({"vxlan", "gretap", "erspan"})
DIRECTIONS: tuple[str, ...] = ("in", "out", "both")
FAMILIES: tuple[str, ...] = ("ipv4", "ipv6", "any")
BALANCES: tuple[str, ...] = ("flow",)
# Transports whose collector can be a group: one address or device per member.
GROUP_TRANSPORTS: frozenset[str] = frozenset({"clone", "span", "vxlan", "tzsp"})


@dataclass(frozen=True)
class Collector:
    name: str
    # None only for transport span, whose collector is a port of this router.
    address: Optional[Address]
    interface: Optional[str] = None
    transport: Transport = "auto"
    port: int = TZSP_PORT  # UDP port: TZSP's, or VXLAN's (VXLAN_PORT) for vxlan
    snaplen: int = 65535
    # TZSP capture ring per interface, all of it resident; bursts want more (README,
    # limits). 0: not set, the capture's default (512 KiB).
    ring_mib: int = 0
    vni: int = DEFAULT_VNI  # vxlan
    session: int = DEFAULT_SESSION  # erspan
    # A group (issue 13): the members' addresses (clone, vxlan) or ports
    # (span), as normalized text; `address` and `interface` are then None.
    members: tuple[str, ...] = ()
    balance: str = ""  # "flow" for a group

    @property
    def copies_frames(self) -> bool:
        return self.transport in FRAME_TRANSPORTS

    @property
    def is_group(self) -> bool:
        return bool(self.members)

    def member_addresses(self) -> tuple[Address, ...]:
        """The members that are hosts (clone, vxlan); () for a span group."""
        if self.transport == "span":
            return ()
        return tuple(ipaddress.ip_address(m) for m in self.members)

    def where(self) -> str:
        """The collector for humans: its address, or for span the port."""
        if self.members:
            return f"group {', '.join(self.members)}"
        if self.address is None:
            return f"port {self.interface}"
        return str(self.address)


@dataclass(frozen=True)
class Mirror:
    name: str
    interfaces: tuple[str, ...]
    direction: Direction
    collector: str
    match: Match = field(default_factory=Match)

    @property
    def directions(self) -> tuple[Literal["in", "out"], ...]:
        if self.direction == "both":
            return ("in", "out")
        return (self.direction,)


@dataclass(frozen=True)
class Spec:
    path: str
    backend: Backend
    collectors: dict[str, Collector]
    mirrors: tuple[Mirror, ...]
    poll_interval: float = 2.0

    def collector_of(self, mirror: Mirror) -> Collector:
        return self.collectors[mirror.collector]


class SpecError(Exception):
    """One or more problems, each already formatted as FILE:LINE:COL: message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def default_path() -> str:
    return os.environ.get("MIRRORD_CONFIG") or DEFAULT_PATH
