"""The `mirrord` command line.

Each subcommand lives in its own module, imported only when chosen: the daemon
must start on a router without the optional packages that tools need (scapy).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from . import __version__
from .spec import default_path

# name -> (module, help). A module provides add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("mirrord.commands", "validate the spec and print what each mirror does"),
    "render": ("mirrord.commands", "print the exact rules that would be applied"),
    "run": ("mirrord.daemon", "run the daemon in the foreground"),
    "status": ("mirrord.commands", "show what the running daemon mirrors and how much"),
    "flush": ("mirrord.commands", "remove everything mirrord added to the kernel"),
    "receive": ("mirrord.receive", "receive TZSP and write pcap, a pcap stream or a TAP device"),
    "trace": ("mirrord.trace", "follow matching packets through nftables (nftrace)"),
}


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported to fill it in."""
    parser = argparse.ArgumentParser(
        prog="mirrord", description="Mirror router traffic to an IDS or logging collector."
    )
    parser.add_argument("--version", action="version", version=f"mirrord {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    args = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in args if not a.startswith("-")), None)
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
        p.set_defaults(_module=module, _run=f"run_{name}")
        if name == chosen:
            mod = importlib.import_module(module)
            add = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
            add(p)
    return parser


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", default=None, metavar="FILE",
        help=f"mirror spec (default: $MIRRORD_CONFIG, else {default_path()})",
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser(argv).parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    if args.command == "run":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    mod = importlib.import_module(args._module)
    run = getattr(mod, args._run, None) or mod.run
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
