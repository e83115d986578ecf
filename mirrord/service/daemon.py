"""`mirrord run`: the daemon's main loop.

Signal handlers only set flags (and wake the loop through the wakeup fd); the
loop blocks on its sockets: netlink events, the control socket, TZSP worker
exits. Start-up, SIGHUP and every heal go through `reconcile`:

    spec + topology -> plan -> render -> compare with the kernel -> apply if different

A reload commits the new spec only after the kernel accepted its rules; a
refused or invalid one leaves the running rules and spec untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import ipaddress
import logging
import os
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import backends, plan, spec
from ..backends.base import Backend, Counts, Rendered
from ..cli import add_config_argument
from ..match import Address
from ..netlink import topology
from ..netlink.watch import Change, NftEvents, RouteEvents
from .control import DEFAULT_SOCKET, ControlServer
from .notify import Notifier

log = logging.getLogger("mirrord")

# Long enough to fold one firewall reload's burst of netlink messages into a
# single reconcile, short enough that healing stays in the tens of ms.
DEBOUNCE = 0.01
GC_THRESHOLDS = (50_000, 50, 100)
WORKER_RESTART_DELAY = 1.0
WORKER_STEADY = 30.0  # a worker that ran this long before exiting was not crash-looping
RETRY_MAX = 30.0  # seconds between attempts to re-apply rules the kernel refused
# Neighbour states that mean the collector answered (or needs no answer).
GOOD_NEIGHBOUR = frozenset({"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"})
# One daemon per router: an abstract unix socket is scoped to the network
# namespace (the router whose firewall the rules live in) and vanishes with
# its process, so there is no stale lock file, no writable /run needed, and
# the holder's PID comes with a connect (SO_PEERCRED).
INSTANCE_LOCK = b"\0mirrord/instance"
LOG_FIELD_MAX = 300  # a rejected reload's message, as logged: one bounded line
REJECTED_PROBLEMS_SHOWN = 20
NFT_TABLES = frozenset({("ip", "mirrord"), ("ip6", "mirrord")})
XT_TABLES = frozenset({("ip", "mangle"), ("ip6", "mangle")})  # iptables-nft's
ALL_WATCHED = NFT_TABLES | XT_TABLES


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


def take_instance_lock() -> tuple[Optional[socket.socket], str]:
    """The lock of this network namespace, or None and who holds it."""
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(INSTANCE_LOCK)
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRINUSE:
                return None, f"cannot take the instance lock: {e}"
            pid = _lock_holder()
            if pid == 0:
                continue  # the holder just went away: try again
            who = f"pid {pid}" if pid > 0 else "pid unknown"
            return None, (f"another mirrord is already running in this network namespace "
                          f"({who}); not starting, nothing was changed")
        s.listen(16)
        s.setblocking(False)
        return s, ""
    return None, "cannot take the instance lock: it keeps changing hands"


def _lock_holder() -> int:
    """The holder's PID; 0 when nobody holds the lock any more, -1 when unknown."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(2.0)
        try:
            c.connect(INSTANCE_LOCK)
        except ConnectionRefusedError:
            return 0
        except OSError:
            return -1
        pid, _uid, _gid = struct.unpack("3i", c.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return int(pid)


def summarize(reasons: list[str], keep: int = 2) -> str:
    """One log-friendly line: a flush of a table is five events, not five lines."""
    unique = list(dict.fromkeys(reasons))
    # What tells most comes first: a link or a table coming or going; then
    # the rest, latest first (the table went, after its chains and rules).
    def rank(r: str) -> int:
        return 0 if r.startswith(("link", "table", "worker")) else 1

    shown = sorted(reversed(unique), key=rank)[:keep]
    more = len(unique) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _heap_trimmer() -> Callable[[], object]:
    """glibc's malloc_trim(0), or nothing where there is none (musl on OpenWrt).

    glibc keeps the heap that start-up, a reconcile or a status request freed
    (imports, JSON, the kernel's answers): about 1.7 MiB of an idle daemon's
    23 MiB (bench/bench_memory.py). Giving it back after each piece of work
    costs some 15 us.
    """
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"control socket for `mirrord status` (default {DEFAULT_SOCKET})")


def run(args: argparse.Namespace) -> int:
    from .logsetup import setup_logging

    setup_logging(args.verbose)
    # A reconcile of thousands of mirrors allocates hundreds of thousands of
    # short-lived containers (none cyclic); at the default thresholds the
    # collector scanned the live heap over and over, doubling the work.
    gc.set_threshold(*GC_THRESHOLDS)
    path = args.config or spec.default_path()
    try:
        initial = spec.load(path)
    except spec.SpecError as e:
        for problem in e.problems[:REJECTED_PROBLEMS_SHOWN]:
            log.error("%s", bounded(str(problem)))
        return 1
    except Exception as e:  # unreadable input is an error line, never a traceback
        log.error("%s: cannot read the spec: %s", bounded(str(path)), describe_error(e))
        return 1
    # Before anything touches the kernel (even the backend probes): a second
    # instance must change nothing, not even the control socket's path.
    lock, why = take_instance_lock()
    if lock is None:
        log.error("%s", why)
        return 1
    daemon = Daemon(initial, args.socket, Notifier.from_env(), lock=lock)
    return daemon.run()


# What a mirror's plan says for status only; everything else may shape the rules.
_STATE_ONLY = frozenset({"state", "reason", "taps"})


def _render_key(p: plan.Plan) -> tuple[Any, ...]:
    """What a backend's rendering of `p` can depend on: the plan without the
    mirrors' states. Generic over the fields, so a field added later counts."""
    names = [f.name for f in dataclasses.fields(plan.MirrorPlan) if f.name not in _STATE_ONLY]
    return (
        tuple(getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "mirrors"),
        tuple(tuple(getattr(mp, n) for n in names) for mp in p.mirrors),
    )


@dataclass
class Heal:
    when: float
    why: str


@dataclass
class MirrorRecord:
    """What the daemon remembers about a mirror across reconciles."""

    last_change: Optional[Heal] = None
    last_state: str = ""


@dataclass
class Flags:
    hup: bool = False
    term: bool = False
    signum: int = 0


@dataclass
class Worker:
    tap: plan.TzspTap
    handle: Any  # tzsp_worker.TapHandle; imported only when a TZSP mirror exists
    exited: Optional[str] = None
    restart_at: float = 0.0
    started: float = field(default_factory=time.monotonic)


@dataclass
class Pending:
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


class Daemon:
    def __init__(self, spec_: spec.Spec, socket_path: str, notifier: Notifier,
                 lock: Optional[socket.socket] = None) -> None:
        self.spec = spec_
        self.lock = lock
        self.socket_path = socket_path
        self.notifier = notifier
        self.flags = Flags()
        self.backend: Optional[Backend] = None
        self.backend_error = ""
        self.topo: Optional[topology.Topology] = None
        self.plan: Optional[plan.Plan] = None
        self.rendered: Optional[Rendered] = None
        # The kernel's listing right after the last apply, verified to hold
        # what was rendered; None: not verified, so the next reconcile applies.
        self.applied_snapshot: Optional[str] = ""
        self.verify_failures = 0
        self.repeated_failures = 0  # ... with the very same listing each time
        self.unverified_listing = ""
        self._render_cache: Optional[tuple[Backend, tuple[Any, ...], Rendered]] = None
        self.apply_error = ""
        self.applies = 0
        self.reapplies = 0
        self.last_counts: Counts = {}
        self.tzsp_banked: dict[str, tuple[int, int]] = {}
        self.rate_sample: Optional[tuple[float, dict[str, tuple[int, int]]]] = None
        self.last_summary = ""
        self.failed_neighbours: set[Address] = set()
        self.retry_at: Optional[float] = None
        self.retry_delay = 0.0
        self.records: dict[str, MirrorRecord] = {}
        self.workers: dict[plan.TzspTap, Worker] = {}
        self.worker_failures: dict[plan.TzspTap, int] = {}
        self.capture: Any = None  # tzsp_worker.CaptureProcess, once a TZSP tap exists
        self.pending = Pending()
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self.route_events: Optional[RouteEvents] = None
        self.nft_events: Optional[NftEvents] = None
        self.control: Optional[ControlServer] = None
        self.trim_heap = _heap_trimmer()
        self.next_poll: Optional[float] = None
        self.next_watchdog: Optional[float] = None

    # -- set-up ------------------------------------------------------------
    def _choose_backend(self, s: spec.Spec) -> tuple[Optional[Backend], str]:
        """The backend for `s`, keeping the running one whenever it still fits.

        nftables -> auto resolving to nftables must keep the same object (its
        state, and above all: no "switch" that removes the old rules, which
        are the new ones). Different backends that own the same kernel
        objects (iptables -> iptables-legacy on a legacy system) are not
        flushed on a switch either: see kernel_owner in reconcile.
        """
        cur = self.backend
        if cur is not None and (s.backend == cur.name or (
                s.backend == "auto" and self.spec.backend == "auto")):
            return cur, ""
        chosen, why = backends.select(s.backend)
        if cur is not None and chosen is not None and chosen.name == cur.name:
            return cur, ""
        return chosen, why

    @staticmethod
    def _watch_tables(backend: Optional[Backend]) -> frozenset[tuple[str, str]]:
        if backend is None or backend.name == "nftables":
            return NFT_TABLES
        return XT_TABLES

    def _open_sources(self) -> None:
        self.route_events = RouteEvents()
        self.sel.register(self.route_events.fileno(), selectors.EVENT_READ, "route")
        self._open_nft_events()

    def _open_nft_events(self) -> None:
        """Opened once; a reload changes its table filter in place (see reload),
        since a socket closed and reopened drops what happens in between."""
        try:
            self.nft_events = NftEvents(self._watch_tables(self.backend))
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

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        self.sel.register(rfd, selectors.EVENT_READ, "signal")
        return rfd

    # -- the loop ----------------------------------------------------------
    def run(self) -> int:
        # Handlers first: a SIGHUP that arrives while backends are probed (a
        # firewall include at boot) must not kill the process.
        wake = self._install_signals()
        try:
            return self._run(wake)
        except Exception:
            # Whatever went wrong, the kernel must not keep rules nobody runs.
            log.exception("mirrord failed; removing its rules")
            self._shutdown()
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
        self.backend, self.backend_error = self._choose_backend(self.spec)
        if self.backend_error and any(True for _ in self.spec.mirrors):
            log.warning("%s", self.backend_error)
        self._open_sources()
        try:
            self.reconcile(["start"], refresh_topology=True, force=True)
        except backends.ApplyError as e:
            log.error("could not apply the mirror rules at start: %s", e)
            self._shutdown()
            return 1
        self.control.attach(self.sel, "control")
        interval = self.notifier.watchdog_interval()
        if interval:
            self.next_watchdog = time.monotonic() + interval
        self.notifier.ready(self.summary())
        log.info("running: %s", self.summary(), extra={"ACTION": "ready"})
        self.trim_heap()
        while not self.flags.term:
            for key, _ in self.sel.select(self._timeout()):
                self._dispatch(key.data, key.fileobj, wake)
            if self.flags.term:
                break
            if self.flags.hup:
                self.flags.hup = False
                self.reload()
            now = time.monotonic()
            if self.control is not None:
                self.control.expire()
            if self.pending.due is not None and now >= self.pending.due:
                p, self.pending = self.pending, Pending()
                self._reconcile_logged(p.reasons, p.topology)
            if self.next_poll is not None and now >= self.next_poll:
                self._reconcile_logged(["poll"], refresh_topology=False)
                self._schedule_poll()
            if self.retry_at is not None and now >= self.retry_at:
                self.retry_at = None
                self._reconcile_logged(["retry after a failed apply"], refresh_topology=True)
            self._tend_workers(now)
            if self.next_watchdog is not None and now >= self.next_watchdog:
                self.notifier.watchdog()
                self.next_watchdog = now + (self.notifier.watchdog_interval() or 1.0)
        log.info("stopping on signal %d: removing mirror rules", self.flags.signum,
                 extra={"ACTION": "stop"})
        self.notifier.stopping()
        return self._shutdown()

    def _timeout(self) -> Optional[float]:
        control = self.control.next_deadline() if self.control is not None else None
        deadlines = [d for d in (self.pending.due, self.next_poll, self.next_watchdog,
                                 self.retry_at, control) if d]
        deadlines += [w.restart_at for w in self.workers.values() if w.exited and w.restart_at]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _schedule_poll(self) -> None:
        # iptables-legacy changes produce no event at all: only a poll sees them.
        needs = self.backend is not None and not self.backend.event_driven and bool(
            self.plan and self.plan.clones)
        self.next_poll = time.monotonic() + self.spec.poll_interval if needs else None

    def _dispatch(self, what: str, fileobj: Any, wake: int) -> None:
        if what == "signal":
            try:
                while os.read(wake, 512):
                    pass
            except BlockingIOError:
                pass
        elif what == "route" and self.route_events is not None:
            for change in self.route_events.read():
                if change.neighbour_failed and change.neighbour_failed != "?":
                    self.failed_neighbours.add(ipaddress.ip_address(change.neighbour_failed))
                self.pending.add(change, topology_changed=True)
        elif what == "nft" and self.nft_events is not None:
            for change in self.nft_events.read():
                self.pending.add(change, topology_changed=False)
        elif what == "control" and self.control is not None:
            self.control.ready(fileobj)
        elif what == "lock" and self.lock is not None:
            self._answer_lock_probe()
        elif what == "worker":
            self._capture_events()

    def _answer_lock_probe(self) -> None:
        """A second instance connected to learn our PID (it has it): let it go."""
        assert self.lock is not None
        try:
            conn, _ = self.lock.accept()
        except OSError:
            return
        conn.close()

    # -- reconcile -----------------------------------------------------------
    def _reconcile_logged(self, reasons: list[str], refresh_topology: bool) -> None:
        """A reconcile from the loop: a failure is recorded, shown and retried, never fatal."""
        try:
            self.reconcile(reasons, refresh_topology)
        except Exception as e:
            if not isinstance(e, backends.BackendError):
                log.exception("reconcile failed unexpectedly")
            self.apply_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.retry_delay = min(RETRY_MAX, self.retry_delay * 2) if self.retry_delay else 1.0
            self.retry_at = time.monotonic() + self.retry_delay
            log.error("re-applying failed (%s); retrying in %.0f s: %s", summarize(reasons),
                      self.retry_delay, e, extra={"ACTION": "apply-failed"})
            self._notify_summary()
        else:
            if self.apply_error:
                log.info("rules applied again after the earlier failure",
                         extra={"ACTION": "apply-recovered"})
            self.apply_error = ""
            self.retry_delay = 0.0
        self.trim_heap()

    def _read_topology(self, s: spec.Spec) -> topology.Topology:
        return self._remember_failures(topology.read(plan.collector_keys(s)))

    def _remember_failures(self, topo: topology.Topology) -> topology.Topology:
        """A collector seen FAILED stays failed until the kernel sees it answer.

        Under traffic the kernel re-probes a FAILED entry on the next clone,
        so a moment later it reads INCOMPLETE: that is the same dead host,
        not a recovery.
        """
        reach = dict(topo.reach)
        for key, r in topo.reach.items():
            if r.neighbour == "FAILED":
                self.failed_neighbours.add(r.address)
            elif r.neighbour in GOOD_NEIGHBOUR:
                self.failed_neighbours.discard(r.address)
            elif r.address in self.failed_neighbours and r.onlink:
                reach[key] = dataclasses.replace(r, neighbour="FAILED")
        if self.route_events is not None:
            self.route_events.failed_neighbours = {a.packed for a in self.failed_neighbours}
        return dataclasses.replace(topo, reach=reach)

    def reconcile(self, reasons: list[str], refresh_topology: bool, force: bool = False,
                  new_spec: Optional[spec.Spec] = None) -> None:
        """The one path from spec to kernel. Commits state only after the kernel agreed."""
        s = new_spec or self.spec
        topo = self.topo if (self.topo is not None and not refresh_topology
                             and new_spec is None) else self._read_topology(s)
        backend, backend_error = (self.backend, self.backend_error)
        if new_spec is not None:
            backend, backend_error = self._choose_backend(new_spec)
        p = self._build_plan(s, topo, backend, backend_error)
        if new_spec is not None and backend is None and p.clones == () and any(
            m.transport == "clone" for m in p.mirrors
        ) and self.backend is not None and self.applies:
            # The new spec asks for a backend this kernel cannot use: keep the
            # running one rather than leave mirrors without rules.
            raise backends.ApplyError(backend_error or "no usable backend for the new spec")
        rendered = self._render(backend, p) if backend is not None else None
        snapshot = backend.snapshot() if backend is not None else ""
        changed_rules = rendered is not None and (
            self.rendered is None or rendered.text != self.rendered.text or backend is not self.backend
        )
        drift = backend is not None and snapshot != self.applied_snapshot
        applied = False
        switching = self.backend is not None and backend is not self.backend and bool(self.applies)
        if backend is not None and rendered is not None and (force or changed_rules or drift):
            carry = self._carry()
            if rendered.text or snapshot:
                backend.apply(rendered, carry)  # raises: nothing below runs
                applied = True
            self._record_snapshot(backend, rendered)
        if switching and self.backend is not None:
            # Only now that the new backend's rules are in: for a moment
            # both copy (a duplicate), never neither (a gap).
            self._refresh_counts()
            if backend is None or backend.kernel_owner != self.backend.kernel_owner:
                self.backend.flush()
        # The kernel agreed (or nothing needed doing): commit.
        why = summarize(reasons)
        if applied:
            self.applies += 1
            if self.applies > 1:
                self.reapplies += 1
            what = "rules changed" if changed_rules else "rules were altered outside mirrord"
            log.info("applied %s rules (%s; %s)", backend.name if backend else "", what, why,
                     extra={"ACTION": "apply"})
        self.spec, self.topo, self.plan = s, topo, p
        self.backend, self.backend_error = backend, backend_error
        if rendered is not None:
            self.rendered = rendered
        self._note_changes(p, why, drift and applied and not force)
        self._sync_workers(p)
        self._schedule_poll()
        self._notify_summary()

    def _record_snapshot(self, backend: Backend, rendered: Rendered) -> None:
        """Take the post-apply listing as the drift reference only if it is ours.

        Someone else's change landing between our commit and this listing
        (a second `nft flush ruleset` a few ms after the first) would
        otherwise become "what mirrord applied", and the rules would stay
        gone while status says active. A listing that does not hold what was
        rendered is not adopted: the next reconcile applies again.
        """
        after = backend.snapshot()
        problem = backend.verify(rendered, after)
        if problem is None:
            self.applied_snapshot = after
            self.verify_failures = self.repeated_failures = 0
            self.unverified_listing = ""
            return
        self.applied_snapshot = None
        self.verify_failures += 1
        # Someone else's change shows as a listing with pieces missing, and
        # the answer is to apply again right away, however often it lands in
        # the window. The same non-empty listing failing again and again is
        # more likely this code misreading the kernel: back off, so that it
        # cannot turn into a busy loop of applies.
        repeated = bool(after) and after == self.unverified_listing
        self.unverified_listing = after
        self.repeated_failures = self.repeated_failures + 1 if repeated else 0
        delay = min(RETRY_MAX, DEBOUNCE * 2 ** min(self.repeated_failures, 12))
        level = logging.WARNING if self.repeated_failures in (4, 9) else logging.INFO
        log.log(level, "rules changed right after the apply (%s); applying again%s", problem,
                 f" ({self.verify_failures} times in a row)" if self.verify_failures > 1 else "",
                 extra={"ACTION": "apply-unverified"})
        self.pending.add(Change("rules changed during the apply"), topology_changed=False)
        if self.repeated_failures:
            self.pending.due = max(self.pending.due or 0.0, time.monotonic() + delay)

    def _build_plan(self, s: spec.Spec, topo: topology.Topology, backend: Optional[Backend],
                    backend_error: str) -> plan.Plan:
        """plan.build, skipped when none of its inputs changed (a reconcile on nft
        events alone): with thousands of mirrors a plan costs a good part of a heal."""
        if (self.plan is not None and s is self.spec and topo is self.topo
                and backend is self.backend and backend_error == self.backend_error):
            return self.plan
        return plan.build(s, topo, backend.name if backend else None, backend_error,
                          backend.versions if backend else frozenset({4, 6}))

    def _render(self, backend: Backend, p: plan.Plan) -> Rendered:
        """backend.render(p), or the last rendering when it cannot differ.

        Rendering thousands of mirrors costs far more than comparing plans;
        link events change mirrors' states (what status shows), rarely the
        rules. Everything of the plan but those states is compared.
        """
        key = _render_key(p)
        cached = self._render_cache
        if cached is not None and cached[0] is backend and cached[1] == key:
            return cached[2]
        rendered = backend.render(p)
        self._render_cache = (backend, key, rendered)
        return rendered

    def _notify_summary(self) -> None:
        summary = self.summary()
        if summary != self.last_summary:
            if self.last_summary:
                self.notifier.status(summary)
            self.last_summary = summary

    def _refresh_counts(self) -> None:
        """Fold the running backend's totals into last_counts (which never go down).

        Called before anything replaces or removes rules, so copies counted
        since the last status query are not lost with them.
        """
        if self.backend is None or not self.applies:
            return
        try:
            current = self.backend.counters()
        except backends.BackendError as e:
            log.warning("could not read the counters: %s", e)
            return
        for key, (p, b) in current.items():
            lp, lb = self.last_counts.get(key, (0, 0))
            self.last_counts[key] = (max(p, lp), max(b, lb))

    def _carry(self) -> Counts:
        """Counter totals to seed new rules with: never let a total go down."""
        self._refresh_counts()
        return dict(self.last_counts)

    def _note_changes(self, p: plan.Plan, why: str, healed_drift: bool) -> None:
        now = time.time()
        for mp in p.mirrors:
            name = mp.mirror.name
            rec = self.records.setdefault(name, MirrorRecord())
            state = f"{mp.state}:{mp.transport}:{mp.reason}"
            if rec.last_state and rec.last_state != state:
                rec.last_change = Heal(now, why)
                log.info("mirror %s: %s%s (%s)", name, mp.state,
                         f" ({mp.reason})" if mp.reason else "", why,
                         extra={"MIRROR": name, "ACTION": "state"})
            elif healed_drift and mp.transport == "clone":
                rec.last_change = Heal(now, f"rules restored after: {why}")
            rec.last_state = state
        planned = {mp.mirror.name for mp in p.mirrors}
        for name in list(self.records):
            if name not in planned:
                del self.records[name]

    # -- TZSP workers ----------------------------------------------------------
    # Every tap runs in one capture process (tzsp_worker.CaptureProcess); a
    # Worker is one tap's supervision: restarted with backoff when it ends,
    # its totals banked once its counters are final.
    def _sync_workers(self, p: plan.Plan) -> None:
        wanted = set(p.tzsp)
        for tap in list(self.workers):
            if tap not in wanted:
                self._stop_worker(tap)
        for tap in wanted:
            if tap not in self.workers:
                self._start_worker(tap)
        self._stop_capture_if_idle()

    def _stop_capture_if_idle(self) -> None:
        """No TZSP tap left: no capture process either (it costs its interpreter)."""
        if self.capture is not None and not self.workers:
            self.capture.stop()

    def _capture_process(self) -> Any:
        if self.capture is None:
            from ..tzsp.supervisor import CaptureProcess

            self.capture = CaptureProcess(watch=self._watch_capture)
        return self.capture

    def _watch_capture(self, fd: int, on: bool) -> None:
        if on:
            self.sel.register(fd, selectors.EVENT_READ, "worker")
        else:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _capture_events(self) -> None:
        """Taps that ended, or the whole process gone: each is restarted after its delay."""
        if self.capture is None:
            return
        ended, _gone = self.capture.read_events()
        self._taps_ended(ended)

    def _taps_ended(self, slots: list[int]) -> None:
        """Mark the taps in `slots`, and those whose process went away, exited."""
        orphans = set(map(id, self.capture.take_orphans())) if self.capture is not None else set()
        if not slots and not orphans:
            return
        for w in self.workers.values():
            if w.exited is not None or not (
                    id(w.handle) in orphans or w.handle.slot_index in slots):
                continue
            reason = w.handle.poll()
            if reason is None:
                continue  # an event of the slot's previous tap
            w.exited = reason
            w.restart_at = time.monotonic() + self._restart_delay(w)
            log.warning("TZSP capture for %s on %s stopped: %s", w.tap.mirror,
                        w.tap.interface, w.exited,
                        extra={"MIRROR": w.tap.mirror, "ACTION": "worker-exit"})
            # The interface may be gone or changed: look again.
            self.pending.add(Change(f"worker exited: {w.exited}"), topology_changed=True)

    def _start_worker(self, tap: plan.TzspTap) -> None:
        from ..tzsp.supervisor import TapHandle, TzspJob

        job = TzspJob(
            mirror=tap.mirror, interface=tap.interface, ifindex=tap.ifindex,
            directions=tap.directions, match=tap.match, collector=tap.collector.address,
            port=tap.collector.port, snaplen=tap.collector.snaplen,
            ring_bytes=tap.collector.ring_mib << 20, exclude=tap.exclude,
        )
        handle = TapHandle(self._capture_process(), job)
        w = Worker(tap, handle)
        self.workers[tap] = w
        try:
            handle.start()
        except OSError as e:
            w.exited = f"could not start: {e}"
            w.restart_at = time.monotonic() + self._restart_delay(w)
            log.error("TZSP worker for %s on %s: %s", tap.mirror, tap.interface, w.exited,
                      extra={"MIRROR": tap.mirror, "ACTION": "worker-start"})
            return
        log.info("TZSP capture on %s (%s) -> %s:%d", tap.interface, "+".join(tap.directions),
                 tap.collector.address, tap.collector.port,
                 extra={"MIRROR": tap.mirror, "ACTION": "worker-start"})

    def _restart_delay(self, w: Worker) -> float:
        """1 s, doubling up to 30 s while a worker keeps failing; a steady run resets it."""
        if time.monotonic() - w.started >= WORKER_STEADY:
            self.worker_failures.pop(w.tap, None)
        n = self.worker_failures.get(w.tap, 0)
        self.worker_failures[w.tap] = n + 1
        return float(min(RETRY_MAX, WORKER_RESTART_DELAY * 2 ** n))

    def _stop_worker(self, tap: plan.TzspTap) -> None:
        w = self.workers.pop(tap)
        w.handle.stop()  # returns once the tap is closed: its counters are final
        self._bank_worker(w)

    def _bank_worker(self, w: Worker) -> None:
        """Keep a stopped worker's final totals so they survive its replacement.
        Only after handle.stop(): before it, frames still being sent are lost."""
        c = w.handle.counters()
        p, b = self.tzsp_banked.get(w.tap.mirror, (0, 0))
        self.tzsp_banked[w.tap.mirror] = (p + c.sent, b + c.bytes)

    def _tend_workers(self, now: float) -> None:
        self._taps_ended([])  # a start may have found the process dead before its EOF was read
        for tap, w in list(self.workers.items()):
            if w.exited and w.restart_at and now >= w.restart_at:
                w.handle.stop()
                self._bank_worker(w)
                del self.workers[tap]
                if self.plan is not None and tap in self.plan.tzsp:
                    self._start_worker(tap)
                else:
                    self._stop_capture_if_idle()

    # -- reload, stop --------------------------------------------------------
    def reload(self) -> None:
        self.notifier.reloading()
        path = self.spec.path
        log.info("SIGHUP: reloading %s", path, extra={"ACTION": "reload"})
        try:
            new = spec.load(path)
        except spec.SpecError as e:
            for problem in e.problems[:REJECTED_PROBLEMS_SHOWN]:
                log.error("%s", bounded(str(problem)))
            log.error("reload rejected: %d problem(s); the running mirrors stay as they were",
                      len(e.problems), extra={"ACTION": "reload-rejected"})
            self.notifier.ready(self.summary() + " (last reload rejected)")
            return
        except Exception as e:  # MemoryError, RecursionError included
            # Whatever the new file does to the reader, the running rules and
            # the daemon stay: a reload must never cost the mirrors.
            log.error("reload rejected: cannot read %s: %s; the running mirrors stay as they "
                      "were", bounded(str(path)), describe_error(e),
                      extra={"ACTION": "reload-rejected"})
            self.notifier.ready(self.summary() + " (last reload rejected)")
            return
        # Events of whichever tables the new spec may move to count from now
        # on, during the apply too; narrowed to the chosen backend's after.
        watched_before = self._watch_tables(self.backend)
        if self.nft_events is not None:
            self.nft_events.tables = ALL_WATCHED
        try:
            self.reconcile(["reload"], refresh_topology=True, force=True, new_spec=new)
        except Exception as e:
            if not isinstance(e, backends.BackendError):
                log.exception("reload failed unexpectedly")
            log.error("reload rejected; the running mirrors stay as they were: %s",
                      e, extra={"ACTION": "reload-rejected"})
            if self.nft_events is not None:
                self.nft_events.tables = watched_before
            self.notifier.ready(self.summary() + " (last reload rejected)")
            return
        if self.nft_events is not None:
            self.nft_events.tables = self._watch_tables(self.backend)
        self._schedule_poll()
        self.notifier.ready(self.summary())
        self.trim_heap()
        log.info("reloaded: %s", self.summary(), extra={"ACTION": "reloaded"})

    def _shutdown(self) -> int:
        rc = 0
        for tap in list(self.workers):
            self._stop_worker(tap)
        self._stop_capture_if_idle()
        if self.backend is not None and self.applies:
            try:
                self.backend.flush()
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
    def counts(self) -> Counts:
        """(mirror, direction) -> kernel clone totals, across every replacement."""
        self._refresh_counts()
        return dict(self.last_counts)

    def tzsp_counts(self) -> dict[str, tuple[int, int]]:
        """mirror -> (packets, bytes) sent as TZSP, including stopped workers'."""
        out = dict(self.tzsp_banked)
        for w in self.workers.values():
            c = w.handle.counters()
            p, b = out.get(w.tap.mirror, (0, 0))
            out[w.tap.mirror] = (p + c.sent, b + c.bytes)
        return out

    def summary(self) -> str:
        if self.plan is None:
            return "starting"
        states: dict[str, int] = {}
        for m in self.plan.mirrors:
            states[m.state] = states.get(m.state, 0) + 1
        parts = [f"{n} {s}" for s, n in sorted(states.items())]
        return f"{len(self.plan.mirrors)} mirror(s): " + ", ".join(parts)

    def status(self) -> dict[str, Any]:
        from ..observe.status import build_status

        return build_status(self)

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd", "status")
        if cmd == "status":
            return self.status()
        return {"error": f"unknown command {cmd!r}"}
