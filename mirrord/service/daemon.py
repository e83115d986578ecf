"""`mirrord run`: the daemon's main loop.

Signal handlers only set flags (and wake the loop through the wakeup fd); the
loop blocks on its sockets (netlink events, the control socket, the TZSP
capture process's events), folds bursts of events into one pending change,
and calls the reconciler (mirrord.reconcile), which does everything else:

    spec + topology -> plan -> render -> compare with the kernel -> apply -> snapshot

A reload commits the new spec only after the kernel accepted its rules; a
refused or invalid one leaves the running rules and spec untouched.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from .. import backends, plan, spec
from ..cli import add_config_argument
from ..netlink import topology
from ..netlink.watch import Change, NftEvents, RouteEvents
from ..observe.delivery import DeliveryMeter
from ..observe.status import RateMeter, build_status
from ..reconcile.ledger import CounterLedger
from ..reconcile.reconciler import Outcome, Reconciler, summarize
from ..reconcile.snapshot import Snapshot
from ..reconcile.taps import TapPool
from .control import DEFAULT_SOCKET, ControlServer
from .heap import heap_trimmer
from .instance import answer_probe, take_instance_lock
from .notify import Notifier
from .spec_reader import load_apart

__all__ = ["Daemon", "Pending", "add_arguments", "run", "summarize"]

log = logging.getLogger("mirrord")

# Long enough to fold one firewall reload's burst of netlink messages into a
# single reconcile, short enough that healing stays in the tens of ms.
DEBOUNCE = 0.01
GC_THRESHOLDS = (50_000, 50, 100)
RETRY_MAX = 30.0  # seconds between attempts to re-apply rules the kernel refused
LOG_FIELD_MAX = 300  # a rejected reload's message, as logged: one bounded line
REJECTED_PROBLEMS_SHOWN = 20


def bounded(text: str, limit: int = LOG_FIELD_MAX) -> str:
    """One printable line of at most `limit` characters, whatever the input held."""
    flat = " ".join(text.split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_error(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:  # a str() that itself fails must not take the daemon down
        text = ""
    return bounded(f"{type(e).__name__}: {text}" if text else type(e).__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"control socket for `mirrord status` (default {DEFAULT_SOCKET})")


def _load_spec(path: str) -> spec.Spec | tuple[int, str]:
    """The spec, or what is wrong with it: (problems, "") after logging each
    problem, or (0, why) when it cannot be read at all (never a traceback)."""
    try:
        return load_apart(path)
    except spec.SpecError as e:
        for problem in e.problems[:REJECTED_PROBLEMS_SHOWN]:
            log.error("%s", bounded(str(problem)))
        return len(e.problems), ""
    except Exception as e:  # MemoryError, RecursionError included
        return 0, describe_error(e)


def run(args: argparse.Namespace) -> int:
    from .logsetup import setup_logging

    setup_logging(args.verbose)
    # A reconcile of thousands of mirrors allocates hundreds of thousands of
    # short-lived containers (none cyclic); at the default thresholds the
    # collector scanned the live heap over and over, doubling the work.
    gc.set_threshold(*GC_THRESHOLDS)
    path = args.config or spec.default_path()
    initial = _load_spec(path)
    if not isinstance(initial, spec.Spec):
        if initial[1]:
            log.error("%s: cannot read the spec: %s", bounded(str(path)), initial[1])
        return 1
    # Before anything touches the kernel (even the backend probes): a second
    # instance must change nothing, not even the control socket's path.
    lock, why = take_instance_lock()
    if lock is None:
        log.error("%s", why)
        return 1
    daemon = Daemon(initial, args.socket, Notifier.from_env(), lock=lock)
    return daemon.run()


@dataclass
class Flags:
    hup: bool = False
    term: bool = False
    signum: int = 0
    # SIGUSR2: going away to be started again at once (a restart): the rules
    # stay and the next start adopts them, so no copy is lost in between.
    keep: bool = False


@dataclass
class Pending:
    """Changes seen since the last reconcile, folded until `due`."""

    due: Optional[float] = None
    reasons: list[str] = field(default_factory=list)
    topology: bool = False
    # What `reasons` holds: a flood of events has thousands of distinct
    # reasons, and a list search per event made reading them quadratic.
    seen: set[str] = field(default_factory=set)

    def add(self, change: Change, topology_changed: bool) -> None:
        if self.due is None:
            self.due = time.monotonic() + DEBOUNCE
        if change.what not in self.seen:
            self.seen.add(change.what)
            self.reasons.append(change.what)
        self.topology = self.topology or topology_changed or change.resync


def _read_topology(s: spec.Spec) -> topology.Topology:
    return topology.read(plan.collector_keys(s))


class Daemon:
    def __init__(self, spec_: spec.Spec, socket_path: str, notifier: Notifier,
                 lock: Optional[socket.socket] = None) -> None:
        self.lock = lock
        self.socket_path = socket_path
        self.notifier = notifier
        self.flags = Flags()
        self.sel = selectors.DefaultSelector()
        self.ledger = CounterLedger()
        self.taps = TapPool(self.ledger, watch=self._watch_capture)
        self._initial = spec_
        self.reconciler: Optional[Reconciler] = None
        self.rates = RateMeter()
        self.deliveries = DeliveryMeter()
        self.pending = Pending()
        self.retry_at: Optional[float] = None
        self.look_at: Optional[float] = None  # a fresh look the reconciler asked for
        self.retry_delay = 0.0
        self.last_summary = ""
        self.route_events: Optional[RouteEvents] = None
        self.nft_events: Optional[NftEvents] = None
        self.control: Optional[ControlServer] = None
        self.trim_heap = heap_trimmer()
        self.answered = False  # a control request was answered since the last trim
        self.restart_asked: Optional[float] = None  # the tap restart deadline already asked for
        self.next_poll: Optional[float] = None
        self.next_watchdog: Optional[float] = None

    @property
    def snapshot(self) -> Snapshot:
        if self.reconciler is None:
            return Snapshot(spec=self._initial, started=time.time())
        return self.reconciler.snapshot

    def _watch_tables(self) -> frozenset[tuple[str, str]]:
        backend = self.reconciler.backend if self.reconciler is not None else None
        if backend is None:
            return backends.WATCHABLE_TABLES
        return backend.capabilities.watch_tables

    # -- set-up ------------------------------------------------------------
    def _open_sources(self) -> None:
        self.route_events = RouteEvents()
        self.sel.register(self.route_events.fileno(), selectors.EVENT_READ, "route")
        # Opened once; a reload changes its table filter in place (see reload),
        # since a socket closed and reopened drops what happens in between.
        try:
            self.nft_events = NftEvents(self._watch_tables())
        except OSError as e:  # no nf_tables in this kernel (iptables-legacy only)
            log.info("no nftables events (%s); relying on the poll", e)
            return
        self.sel.register(self.nft_events.fileno(), selectors.EVENT_READ, "nft")

    def _install_signals(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)

        def on_hup(signum: int, _frame: Any) -> None:
            self.flags.hup = True

        def on_term(signum: int, _frame: Any) -> None:
            self.flags.term = True
            self.flags.signum = signum
            self.flags.keep = self.flags.keep or signum == signal.SIGUSR2

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGUSR2, on_term)
        self.sel.register(rfd, selectors.EVENT_READ, "signal")
        return rfd

    def _watch_capture(self, fd: int, on: bool) -> None:
        if on:
            self.sel.register(fd, selectors.EVENT_READ, "worker")
        else:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    # -- the loop ----------------------------------------------------------
    def run(self) -> int:
        # Handlers first: a SIGHUP that arrives while backends are probed (a
        # firewall include at boot) must not kill the process.
        wake = self._install_signals()
        try:
            return self._run(wake)
        except Exception:
            # The rules stay: the service manager starts mirrord again, and the
            # next start adopts them in one transaction. Removing them here
            # lost every copy until the respawn (5 s under procd); a kill -9
            # lost none. `mirrord flush` removes them when nobody comes back.
            log.exception("mirrord failed; its rules stay for the next start "
                          "(`mirrord flush` removes them)")
            self._shutdown(keep_rules=True)
            return 1

    def _run(self, wake: int) -> int:
        if self.lock is not None:
            self.sel.register(self.lock.fileno(), selectors.EVENT_READ, "lock")
        # The control socket before the first apply: a path that cannot be
        # served (a directory, a dangling symlink) must leave the kernel as it was.
        try:
            self.control = ControlServer(self.socket_path, self.handle_request)
        except (OSError, RuntimeError) as e:
            log.error("control socket %s: %s", self.socket_path, e)
            self._shutdown()
            return 1
        self.reconciler = Reconciler(self._initial, _read_topology, backends.select,
                                     self.taps, self.ledger)
        self.reconciler.drain = self._read_nft
        first = self.reconciler.snapshot
        if first.backend_error and any(True for _ in first.spec.mirrors):
            log.warning("%s", first.backend_error)
        self._open_sources()
        try:
            self._after(self.reconciler.reconcile(["start"], refresh_topology=True, force=True))
        except backends.ApplyError as e:
            log.error("could not apply the mirror rules at start: %s", e)
            self._shutdown()
            return 1
        self.control.attach(self.sel, "control")
        interval = self.notifier.watchdog_interval()
        if interval:
            self.next_watchdog = time.monotonic() + interval
        self.notifier.ready(self.snapshot.summary())
        log.info("running: %s", self.snapshot.summary(), extra={"ACTION": "ready"})
        self.trim_heap()
        while not self.flags.term:
            for key, _ in self.sel.select(self._timeout()):
                self._dispatch(key.data, key.fileobj, wake)
            if self.answered:
                # A status answer's JSON and health's listings are garbage now.
                self.answered = False
                self.trim_heap()
            if self.flags.term:
                break
            if self.flags.hup:
                self.flags.hup = False
                self.reload()
            self._due(time.monotonic())
        keep = self.flags.keep
        log.info("stopping on signal %d: %s", self.flags.signum,
                 "keeping the rules for the next start" if keep else "removing mirror rules",
                 extra={"ACTION": "stop"})
        self.notifier.stopping()
        return self._shutdown(keep_rules=keep)

    def _due(self, now: float) -> None:
        """Whatever the clock made due: a pending change, a poll, a retry, a tap restart."""
        if self.control is not None:
            self.control.expire()
        # A tap start may have found the capture process dead before its EOF
        # was read: those taps end without an event.
        for reason in self.taps.collect_exits([]):
            self.pending.add(Change(reason), topology_changed=True)
        restart = self._restart_due(now)
        if restart is not None:
            # Asked once per deadline: if this reconcile fails, the retry
            # after a failed apply restarts the tap, not a loop of asks.
            self.restart_asked = restart
            self.pending.add(Change("TZSP tap restart"), topology_changed=True)
            self.pending.due = now
        if self.pending.due is not None and now >= self.pending.due:
            p, self.pending = self.pending, Pending()
            self._reconcile_logged(p.reasons, p.topology)
        if self.next_poll is not None and now >= self.next_poll:
            self._reconcile_logged(["poll"], refresh_topology=False)
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            self._reconcile_logged(["retry after a failed apply"], refresh_topology=True)
        if self.look_at is not None and now >= self.look_at:
            self.look_at = None
            self._reconcile_logged(["a fresh look at what the kernel can do"],
                                   refresh_topology=True)
        if self.next_watchdog is not None and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + (self.notifier.watchdog_interval() or 1.0)

    def _restart_due(self, now: Optional[float]) -> Optional[float]:
        """The next TZSP tap restart not asked for yet (with `now`: only if it is due)."""
        due = self.taps.next_restart()
        if due is None or due == self.restart_asked or (now is not None and now < due):
            return None
        return due

    def _timeout(self) -> Optional[float]:
        control = self.control.next_deadline() if self.control is not None else None
        deadlines = [d for d in (self.pending.due, self.next_poll, self.next_watchdog,
                                 self.retry_at, self.look_at, control, self._restart_due(None))
                     if d]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _dispatch(self, what: str, fileobj: Any, wake: int) -> None:
        if what == "signal":
            try:
                while os.read(wake, 512):
                    pass
            except BlockingIOError:
                pass
        elif what == "route" and self.route_events is not None:
            for change in self.route_events.read():
                if change.neighbour_failed and change.neighbour_failed != "?" and self.reconciler:
                    self.reconciler.failed_neighbours.add(
                        ipaddress.ip_address(change.neighbour_failed))
                self.pending.add(change, topology_changed=True)
        elif what == "nft":
            self._read_nft()
        elif what == "control" and self.control is not None:
            self.control.ready(fileobj)
        elif what == "lock" and self.lock is not None:
            answer_probe(self.lock)
        elif what == "worker":
            for reason in self.taps.read_events():
                # The interface may be gone or changed: look again.
                self.pending.add(Change(reason), topology_changed=True)

    def _read_nft(self) -> None:
        """Waiting nftables notifications: changes, and deleted rules' counts (also the reconciler's)."""
        if self.nft_events is None:
            return
        for change in self.nft_events.read():
            self.pending.add(change, topology_changed=False)
        events = self.nft_events.take_counter_events()
        if events and self.reconciler is not None:
            self.reconciler.counter_events(events)

    # -- after a reconcile ---------------------------------------------------
    def _after(self, outcome: Outcome) -> None:
        """What a reconcile asks of the loop: apply again soon, poll, tell the manager."""
        if outcome.again_in is not None:
            self.pending.add(Change(outcome.why_again), topology_changed=False)
            if outcome.again_in:
                self.pending.due = max(self.pending.due or 0.0, time.monotonic() + outcome.again_in)
        self.look_at = (time.monotonic() + outcome.look_again_in
                        if outcome.look_again_in is not None else None)
        if self.route_events is not None and self.reconciler is not None:
            self.route_events.failed_neighbours = {
                a.packed for a in self.reconciler.failed_neighbours}
        self._schedule_poll()
        self._notify_summary()

    def _schedule_poll(self) -> None:
        # iptables-legacy changes produce no event at all: only a poll sees them.
        r = self.reconciler
        needs = r is not None and r.backend is not None and not (
            r.backend.capabilities.event_driven) and bool(r.snapshot.plan and r.snapshot.plan.clones)
        self.next_poll = time.monotonic() + self.snapshot.spec.poll_interval if needs else None

    def _notify_summary(self) -> None:
        summary = self.snapshot.summary()
        if summary != self.last_summary:
            if self.last_summary:
                self.notifier.status(summary)
            self.last_summary = summary

    def _reconcile_logged(self, reasons: list[str], refresh_topology: bool) -> None:
        """A reconcile from the loop: a failure is recorded, shown and retried, never fatal."""
        assert self.reconciler is not None
        had_error = bool(self.snapshot.apply_error)
        try:
            self._after(self.reconciler.reconcile(reasons, refresh_topology))
        except Exception as e:
            if not isinstance(e, backends.BackendError):
                log.exception("reconcile failed unexpectedly")
            self.reconciler.failed(str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.retry_delay = min(RETRY_MAX, self.retry_delay * 2) if self.retry_delay else 1.0
            self.retry_at = time.monotonic() + self.retry_delay
            log.error("re-applying failed (%s); retrying in %.0f s: %s", summarize(reasons),
                      self.retry_delay, e, extra={"ACTION": "apply-failed"})
            self._schedule_poll()
            self._notify_summary()
        else:
            if had_error:
                log.info("rules applied again after the earlier failure",
                         extra={"ACTION": "apply-recovered"})
            self.retry_delay = 0.0
        self.trim_heap()

    # -- reload, stop --------------------------------------------------------
    def reload(self) -> None:
        assert self.reconciler is not None
        self.notifier.reloading()
        path = self.snapshot.spec.path
        log.info("SIGHUP: reloading %s", path, extra={"ACTION": "reload"})
        new = _load_spec(path)
        if not isinstance(new, spec.Spec):
            # Whatever the new file does to the reader, the running rules and
            # the daemon stay: a reload must never cost the mirrors.
            problems, why = new
            if why:
                log.error("reload rejected: cannot read %s: %s; the running mirrors stay as they "
                          "were", bounded(str(path)), why, extra={"ACTION": "reload-rejected"})
            else:
                log.error("reload rejected: %d problem(s); the running mirrors stay as they were",
                          problems, extra={"ACTION": "reload-rejected"})
            self.notifier.ready(self.snapshot.summary() + " (last reload rejected)")
            return
        # Events of whichever tables the new spec may move to count from now
        # on, during the apply too; narrowed to the chosen backend's after.
        watched_before = self._watch_tables()
        if self.nft_events is not None:
            self.nft_events.tables = backends.WATCHABLE_TABLES
        try:
            self._after(self.reconciler.reconcile(["reload"], refresh_topology=True, force=True,
                                                  new_spec=new))
        except Exception as e:
            if not isinstance(e, backends.BackendError):
                log.exception("reload failed unexpectedly")
            log.error("reload rejected; the running mirrors stay as they were: %s",
                      e, extra={"ACTION": "reload-rejected"})
            if self.nft_events is not None:
                self.nft_events.tables = watched_before
            self.notifier.ready(self.snapshot.summary() + " (last reload rejected)")
            return
        if self.nft_events is not None:
            self.nft_events.tables = self._watch_tables()
        self.notifier.ready(self.snapshot.summary())
        self.trim_heap()
        log.info("reloaded: %s", self.snapshot.summary(), extra={"ACTION": "reloaded"})

    def _shutdown(self, keep_rules: bool = False) -> int:
        rc = 0
        try:
            if self.reconciler is not None and not keep_rules:
                self.reconciler.stop()
            else:
                self.taps.stop_all()  # TZSP copies need this process; the kernel's do not
        except backends.BackendError as e:
            log.error("could not remove the mirror rules: %s", e)
            rc = 1
        if self.control is not None:
            self.control.close()
        for src in (self.route_events, self.nft_events):
            if src is not None:
                src.close()
        if self.lock is not None:
            # Last: until the rules are gone, a new instance must not start.
            self.lock.close()
        return rc

    # -- status ----------------------------------------------------------------
    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd", "status")
        if cmd != "status":
            return {"error": f"unknown command {cmd!r}"}
        self.answered = True
        reading = self.reconciler.read() if self.reconciler is not None else None
        # The control socket answers plain JSON objects (service/control.py).
        return cast("dict[str, Any]", build_status(self.snapshot, reading, self.rates, self.deliveries))
