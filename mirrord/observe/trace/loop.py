"""The run of `mirrord trace`: set up, the event loop, and every way out.

`run` turns the options into a selection; `trace` listens for trace events,
creates the marking table, then reads, groups and prints packets until the
count, the timeout, a signal (SIGINT/SIGTERM/SIGHUP, through a self-pipe so
select() wakes at once) or the table's removal by someone else ends it. The
table is removed in every case.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import time
from types import FrameType
from typing import Any, Optional, TextIO

from ...match import Match
from ...netlink.nftrace import TraceSocket, own_identity
from .events import Packet, Tracker
from .render import packet_json, packet_text
from .rulebook import RuleBook
from .selection import Selection, TraceError, describe, selection_from_args
from .table import (
    TRACE_FAMILY,
    TRACE_TABLE,
    TraceTable,
    open_session,
    removed_by_others,
    ssh_flow,
    trace_comment,
    trace_rules,
)

log = logging.getLogger(__package__)  # the command's one logger, whichever module logs

EXIT_OK = 0
EXIT_NOT_REACHED = 1
EXIT_ERROR = 2


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
                if removed_by_others(sock, table):
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
