"""What `mirrord trace` follows: its command-line options, and the `Selection` they make.

A selection is a `Match` and the interface crossings it must happen on. It
comes from a spec's mirror (`--mirror`), or from match options read by the
spec's own rules (`mirrord.spec.match_from_text`), so `--port 53` and a
spec's `port: 53` select the same packets and reject the same mistakes.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from ...match import Match

log = logging.getLogger(__package__)  # the command's one logger, whichever module logs

MATCH_KEYS = ("family", "protocol", "port", "sport", "dport", "source", "destination")


class TraceError(Exception):
    """Something that stops the trace before it starts, said for a user."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ...cli import add_config_argument

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


def match_from_options(args: argparse.Namespace) -> Match:
    """The match of --protocol/--port/.../--family, by the rules of a spec's `match:`.

    Repeated and comma-separated values are the command line's way of writing
    a list; everything else (names, numbers, ranges, prefixes, how the parts
    must agree) is the spec's reading, errors included.
    """
    from ...spec import SpecError, match_from_text

    values: dict[str, str | list[str]] = {"family": args.family}
    for key in MATCH_KEYS[1:]:
        given: list[str] = getattr(args, key)
        if given:
            values[key] = _split(given)
    try:
        return match_from_text(values, "match")
    except SpecError as e:
        raise TraceError("\n".join(e.problems)) from None


def selection_from_args(args: argparse.Namespace) -> Selection:
    match_opts = ("protocol", "port", "sport", "dport", "source", "destination", "interface")
    if args.mirror:
        given = [f"--{o}" for o in match_opts if getattr(args, o)]
        if args.family != "any":
            given.append("--family")
        if given:
            raise TraceError(f"--mirror takes the match from the spec; drop {', '.join(given)}")
        from ...spec import SpecError, default_path, load

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
        elif collector.copies_frames:
            # The trace marks packets in an inet table; netdev ingress runs before it.
            log.warning("mirror %s copies whole frames in netdev hooks, which run before the "
                        "trace marks a packet: the trace shows where its packets go, but no "
                        "copy rule (its counters are in `mirrord status`)", mirror.name)
        crossings = tuple((i, d) for i in mirror.interfaces for d in mirror.directions)
        return Selection(mirror.match, crossings, f"mirror {mirror.name}")
    match = match_from_options(args)
    dirs = ("in", "out") if args.direction == "both" else (args.direction,)
    from ...spec import valid_ifname

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
