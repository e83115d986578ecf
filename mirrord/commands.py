"""The one-shot commands: check, render, status, flush."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import cast

from . import backends, plan, spec
from .cli import add_config_argument
from .netlink import links, topology
from .observe.document import StatusDocument
from .observe.status import format_prometheus, format_table, healthy
from .service.control import default_socket, try_request

log = logging.getLogger("mirrord")

EXIT_NOT_ACTIVE = 1
EXIT_NO_DAEMON = 2


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--backend", choices=sorted(backends.FACTORIES), default=None,
                   help="render for this backend instead of the spec's choice")
    p.add_argument("--offline", action="store_true",
                   help="render as on the router, without asking this machine's kernel: every "
                        "interface present and up, every collector on-link")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=None, metavar="PATH",
                   help="the daemon's control socket (default: /run/mirrord/mirrord.sock or "
                        "/run/mirrord.sock, whichever exists; $MIRRORD_SOCKET overrides)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--prometheus", action="store_true",
                     help="Prometheus text format (for node_exporter's textfile collector)")


def add_flush_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="say what would be removed")


def _load(args: argparse.Namespace) -> spec.Spec:
    return spec.load(args.config or spec.default_path())


def _print_problems(e: spec.SpecError) -> int:
    for problem in e.problems:
        print(problem, file=sys.stderr)
    return 1


def describe_mirror(s: spec.Spec, m: spec.Mirror) -> str:
    c = s.collector_of(m)
    ways = {"in": "in", "out": "out", "both": "in+out"}[m.direction]
    via = f" via {c.interface}" if c.interface and c.address is not None else ""
    extra = {"tzsp": f":{c.port}", "vxlan": f":{c.port} vni {c.vni}",
             "erspan": f" session {c.session}"}.get(c.transport, "")
    if c.is_group:
        extra = (f" (port {c.port}, vni {c.vni} + member index)" if c.transport == "vxlan"
                 else "") + f", balance {c.balance}"
    note = ""
    if c.transport == "clone" and m.match.family == "any" and c.address is not None:
        note = f" (IPv{c.address.version} only: a clone goes to a next hop of its own family)"
    return (f"{m.name}: {', '.join(m.interfaces)} {ways}, {m.match.describe()} -> "
            f"{c.name} {c.where()}{extra}{via} (transport {c.transport}){note}")


def run_check(args: argparse.Namespace) -> int:
    try:
        s = _load(args)
    except spec.SpecError as e:
        return _print_problems(e)
    from .spec.loops import static_problems

    loops = static_problems(s)
    if loops:
        return _print_problems(spec.SpecError(loops))
    for m in s.mirrors:
        print(describe_mirror(s, m))
    print("OK")
    return 0


def run_render(args: argparse.Namespace) -> int:
    try:
        s = _load(args)
    except spec.SpecError as e:
        return _print_problems(e)
    name = args.backend or s.backend
    if name == "auto":
        chosen, why = (None, "--offline") if args.offline else backends.select("auto")
        if chosen is None:
            print(f"# {why}; rendering for {backends.PREFERRED}", file=sys.stderr)
        name = chosen.name if chosen else backends.PREFERRED
    backend = backends.create(name)
    topo = offline_topology(s) if args.offline else _with_tunnels(
        topology.read(plan.collector_keys(s)), s)
    frames = (backend.frame_support() if not args.offline and any(
        c.copies_frames for c in s.collectors.values()) else plan.FrameSupport())
    p = plan.build(s, topo, backend.name, versions=backend.capabilities.versions,
                   frame_support=frames)
    # A set: a scan of every rule per mirror was quadratic.
    with_rules = {r.mirror for r in p.clones} | {r.mirror for r in p.frames}
    for mp in p.mirrors:
        if mp.mirror.name not in with_rules:
            what = "TZSP capture, no kernel rule" if mp.transport == "tzsp" else "no rule"
            print(f"# mirror {mp.mirror.name}: {mp.state}, {what}"
                  f"{': ' + mp.reason if mp.reason else ''}")
    sys.stdout.write(backend.render(p).text)
    return 0


def _with_tunnels(topo: topology.Topology, s: spec.Spec) -> topology.Topology:
    """The live topology plus the tunnel devices the daemon would make first
    (ifindex 0: not made yet), so that render shows the rules copying into them."""
    links = dict(topo.links)
    for t in plan.tunnels(s):
        links.setdefault(t.name, topology.Link(t.name, 0, True, t.kind, topology.ARPHRD_ETHER,
                                               65535))
    return dataclasses.replace(topo, links=links)


def offline_topology(s: spec.Spec) -> topology.Topology:
    """The router the spec describes: its interfaces up, its collectors on-link."""
    names = list(dict.fromkeys(
        [i for m in s.mirrors for i in m.interfaces]
        + [c.interface for c in s.collectors.values() if c.interface]
        + [m for c in s.collectors.values() if c.transport == "span" for m in c.members]
        + [t.name for t in plan.tunnels(s)]
    ))
    links = {n: topology.Link(n, i, True, None, topology.ARPHRD_ETHER, 1500)
             for i, n in enumerate(names, 2)}
    reach = {(a, i): topology.Reach(a, oif=i) for a, i in plan.collector_keys(s)}
    return topology.Topology(links=links, reach=reach)


def run_status(args: argparse.Namespace) -> int:
    path = args.socket or default_socket()
    reply, err = try_request(path, "status")
    if reply is not None and "error" in reply:
        err = str(reply["error"])
        reply = None
    if reply is None:
        if args.prometheus:
            sys.stdout.write(format_prometheus(None))
        print(f"mirrord status: {err}", file=sys.stderr)
        return EXIT_NO_DAEMON
    doc = cast("StatusDocument", reply)  # what the daemon's build_status wrote
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.prometheus:
        sys.stdout.write(format_prometheus(doc))
    else:
        print(format_table(doc))
    return 0 if healthy(doc) else EXIT_NOT_ACTIVE


def _flush_tunnels(dry_run: bool) -> tuple[bool, int]:
    """mirrord's tunnel devices (alias "mirrord ..."): after the rules, which copy into them."""
    try:
        owned = links.owned()
    except OSError as e:
        log.debug("tunnel devices: not readable (%s)", e)
        return False, 0
    rc = 0
    for name, t in sorted(owned.items()):
        if dry_run:
            print(f"would remove tunnel device {name} ({t.kind} to {t.remote})")
            continue
        try:
            links.delete(name)
            print(f"removed tunnel device {name} ({t.kind} to {t.remote})")
        except (OSError, links.LinkError) as e:
            print(f"tunnel device {name}: {e}", file=sys.stderr)
            rc = 1
    return bool(owned), rc


def run_flush(args: argparse.Namespace) -> int:
    """Remove what any mirrord left behind, in every backend, and nothing else.

    A `mirrord trace` table is removed only when its trace is no longer
    running: a live trace is left alone (the daemon's own flush never takes it).
    """
    rc = 0
    looked: list[str] = []
    found = False
    for b in backends.flush_candidates():
        name = b.name
        try:
            before = b.snapshot()
        except (ImportError, OSError) as e:
            log.debug("%s: not available (%s)", name, e)
            continue
        looked.append(name)
        found = found or bool(before)
        if args.dry_run:
            if before:
                print(f"{name}: would remove mirrord's rules ({b.capabilities.removes})")
            continue
        try:
            # Always: removal is idempotent, and a snapshot that saw nothing
            # costs a second look at most.
            b.flush()
            if before:
                print(f"{name}: removed mirrord's rules ({b.capabilities.removes})")
        except backends.BackendError as e:
            print(f"{name}: {e}", file=sys.stderr)
            rc = 1
    trace_found, trace_rc = _flush_trace_table(args.dry_run)
    found, rc = found or trace_found, max(rc, trace_rc)
    tunnels_found, tunnels_rc = _flush_tunnels(args.dry_run)
    found, rc = found or tunnels_found, max(rc, tunnels_rc)
    if not looked:
        print("mirrord flush: no kernel clone backend is usable here ("
              f"{', '.join(backends.FLUSH_ORDER)}); nothing to remove", file=sys.stderr)
    elif not found and rc == 0:
        print(f"nothing to remove: no mirrord rules in {', '.join(looked)}")
    return rc


def _flush_trace_table(dry_run: bool) -> tuple[bool, int]:
    """(whether a trace table was there, exit status): a crashed trace's table
    is removed, a running trace's is left alone, and either is said."""
    from .backends.libnft import NftSession
    from .observe.trace import TRACE_FAMILY, TRACE_TABLE, owner_alive, stale_owner

    try:
        nft = NftSession.open()
    except (ImportError, OSError) as e:
        log.debug("no libnftables, so no trace table (%s)", e)
        return False, 0
    objs = nft.list_table(TRACE_FAMILY, TRACE_TABLE)
    if objs is None:
        return False, 0
    what = f"table {TRACE_FAMILY} {TRACE_TABLE}"
    owner = stale_owner(objs)
    if owner is not None and owner_alive(owner):
        print(f"{what}: left alone, its mirrord trace (pid {owner[0]}) is running")
        return True, 0
    if dry_run:
        print(f"{what}: would remove it (left behind by a trace that is no longer running)")
        return True, 0
    ref = {"family": TRACE_FAMILY, "name": TRACE_TABLE}
    rc, _, err = nft.json([{"add": {"table": ref}}, {"delete": {"table": ref}}])
    if rc != 0:
        print(f"{what}: cannot remove it: {err.strip()}", file=sys.stderr)
        return True, 1
    print(f"{what}: removed (left behind by a trace that is no longer running)")
    return True, 0
