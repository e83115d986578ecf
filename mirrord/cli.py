"""The `mirrord` command line.

Each subcommand lives in its own module, imported only when chosen: the daemon
must start on a router without the optional packages that tools need (scapy).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional

from . import __version__
from .spec import default_path

# name -> (module, help). A module provides add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("mirrord.commands", "validate the spec and print what each mirror does"),
    "render": ("mirrord.commands", "print the exact rules that would be applied"),
    "run": ("mirrord.service.daemon", "run the daemon in the foreground"),
    "status": ("mirrord.commands", "show what the running daemon mirrors and how much"),
    "flush": ("mirrord.commands", "remove everything mirrord added to the kernel"),
    "receive": ("mirrord.tzsp.receive", "receive TZSP and write pcap, a pcap stream or a TAP device"),
    "trace": ("mirrord.observe.trace", "follow matching packets through nftables (nftrace)"),
}


# Commands that read or change the kernel's firewall. Without CAP_NET_ADMIN
# each of their steps fails on its own, with a tool's raw message; one line
# up front says what is wrong instead.
NEEDS_NET_ADMIN = ("run", "flush", "trace")
CAP_NET_ADMIN = 12

EPILOG = """\
examples:
  mirrord check -c /etc/mirrord.yaml      validate a spec
  mirrord render --offline                the rules it would apply, without this kernel
  mirrord run                             the daemon (as root), usually from systemd/procd
  mirrord status                          exit 0 all active, 1 a mirror not active, 2 no daemon
  mirrord flush --dry-run                 what mirrord left in the kernel
  mirrord trace --mirror lan --count 5    follow 5 packets of mirror "lan" through nftables
  mirrord receive --write lan.pcap        on the collector: TZSP copies to a capture file

run, flush and trace need root (CAP_NET_ADMIN).
"""

EPILOGS: dict[str, str] = {
    "check": """\
exit status: 0 the spec is valid, 1 it is not (FILE:LINE:COL: problem, one a line)

example:
  mirrord check -c /etc/mirrord.yaml
""",
    "render": """\
examples:
  mirrord render                          as this machine's kernel would get them
  mirrord render --offline --backend iptables   for the router the spec describes
""",
    "run": """\
Needs root (CAP_NET_ADMIN). SIGHUP reloads the spec, SIGTERM/SIGINT remove the
rules and exit 0.

example:
  mirrord run -c /etc/mirrord.yaml -v
""",
    "status": """\
exit status:
  0  every mirror is active and no finding is an error
  1  a mirror is not active (waiting, degraded, error) or a finding is an error
  2  no daemon answers on the socket

examples:
  mirrord status
  mirrord status --json | jq '.mirrors[].state'
  mirrord status --prometheus > /var/lib/node_exporter/mirrord.prom
""",
    "flush": """\
Removes mirrord's own tables and chains (also those a crashed daemon or trace
left) from nftables, iptables and iptables-legacy, and nothing else. Needs root.
exit status: 0 done (also when there was nothing to remove), 1 a removal failed

examples:
  mirrord flush --dry-run
  mirrord flush
""",
    "trace": """\
Needs root (CAP_NET_ADMIN). The trace table is removed on every exit path.

examples:
  mirrord trace --mirror lan --count 5
  mirrord trace --protocol icmp --interface br-lan --timeout 30 --json
""",
}


def has_net_admin() -> bool:
    """Whether this process may change the firewall (root, or a unit granting the capability)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported to fill it in."""
    parser = argparse.ArgumentParser(
        prog="mirrord", description="Mirror router traffic to an IDS or logging collector.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mirrord {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    args = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in args if not a.startswith("-")), None)
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOGS.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if args.command in NEEDS_NET_ADMIN and not has_net_admin():
        print(f"mirrord {args.command}: needs root (CAP_NET_ADMIN), because it reads and changes "
              "the kernel's firewall; run it as root (e.g. with sudo)", file=sys.stderr)
        return 1
    mod = importlib.import_module(args._module)
    run = getattr(mod, args._run, None) or mod.run
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
