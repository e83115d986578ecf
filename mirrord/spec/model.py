"""The typed result of reading a spec: `Spec`, its collectors and mirrors, and `SpecError`.

Plain frozen data: nothing here knows YAML, so the plan, the backends and the
daemon use a Spec without the reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..match import Address, Match

DEFAULT_PATH = "/etc/mirrord.yaml"
TZSP_PORT = 37008

Backend = Literal["auto", "nftables", "iptables", "iptables-legacy", "route-tee"]
Transport = Literal["auto", "clone", "tzsp"]
Direction = Literal["in", "out", "both"]
BACKENDS: tuple[str, ...] = ("auto", "nftables", "iptables", "iptables-legacy", "route-tee")
TRANSPORTS: tuple[str, ...] = ("auto", "clone", "tzsp")
DIRECTIONS: tuple[str, ...] = ("in", "out", "both")
FAMILIES: tuple[str, ...] = ("ipv4", "ipv6", "any")


@dataclass(frozen=True)
class Collector:
    name: str
    address: Address
    interface: Optional[str] = None
    transport: Transport = "auto"
    port: int = TZSP_PORT
    snaplen: int = 65535
    # TZSP capture ring per interface, all of it resident; bursts want more (README,
    # limits). 0: not set, the capture's default (512 KiB).
    ring_mib: int = 0


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
