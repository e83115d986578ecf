"""The TZSP taps the plan asks for, kept running.

Every tap runs in one capture process (tzsp.supervisor.CaptureProcess), but
for the members of a collector group: member k's taps run in capture process
k mod (the CPUs mirrord may use), so that a group's flows are sent from as
many cores as it has members (bench/bench_tzsp.py measures what that buys).
A tap whose filter alone changed (a group member's share of the flows, when
another member died, came back or was added; the spec's collectors, never
captured) keeps its tap, ring and counters: only its filter is swapped. A tap
that ends (its interface went away, the process was killed) is marked exited
and restarted after 1 s; only a tap that is really crash-looping (a fifth end
within a minute) waits longer, doubling up to 30 s. Each second waited is
copies lost: a backoff that doubled from the second kill lost thousands of
copies to five kills. The restart itself is a reconcile (`sync`), so a tap
comes back only if the plan, read again, still wants it. A tap's final counters go to the ledger
once it is stopped, never before: frames still being sent would be lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..plan import Plan, TzspTap
from ..plan.groups import member_counter_name
from .ledger import CounterLedger
from .snapshot import TapReading

log = logging.getLogger("mirrord")

RESTART_DELAY = 1.0
RESTART_MAX = 30.0
CRASH_WINDOW = 60.0  # seconds: the ends counted towards a crash loop
CRASH_LOOP = 5  # this many ends within the window: back off
COUNTER_FIELDS = ("captured", "sent", "bytes", "ring_drops", "send_errors", "truncated",
                  "oversize")


@dataclass
class _Tap:
    tap: TzspTap
    handle: Any  # tzsp.supervisor.TapHandle; imported only when a TZSP mirror exists
    exited: Optional[str] = None
    restart_at: float = 0.0
    started: float = field(default_factory=time.monotonic)


class TapPool:
    """`watch(fd, on)`: the capture process's events pipe to wait on (or not any more)."""

    def __init__(self, ledger: CounterLedger, watch: Callable[[int, bool], None],
                 make_handle: Optional[Callable[[TzspTap], Any]] = None) -> None:
        self.ledger = ledger
        self._watch = watch
        # A tap's handle; the default runs it in the shared capture process.
        self._make_handle = make_handle or self._capture_handle
        self._taps: dict[TzspTap, _Tap] = {}
        self._failures: dict[TzspTap, list[float]] = {}  # when each recent end was
        self._captures: dict[int, Any] = {}  # lane -> its CaptureProcess
        self.lanes = _usable_cpus()

    # -- what the reconciler calls ---------------------------------------------
    def sync(self, p: Plan, now: float) -> None:
        """Run exactly the plan's taps; restart those whose delay has passed."""
        wanted = set(p.tzsp)
        stopping = [tap for tap, t in self._taps.items()
                    if tap not in wanted or (t.exited and now >= t.restart_at)]
        # One set per capture process: taps leaving, taps added and filters
        # swapped together, so that a group member's flows move in one step
        # (the wait for the closed taps' final counters comes after, then the
        # restarts of ended taps, whose slots those free).
        with contextlib.ExitStack() as batch:
            for capture in self._captures.values():
                batch.enter_context(capture.batch())
            for tap in stopping:
                self._taps[tap].handle.detach()
            for tap in p.tzsp:
                running = self._taps.get(tap)
                if running is None:
                    self._start(tap)
                elif tap not in stopping and not running.tap.same_filter(tap):
                    self._retarget(running, tap)
        for tap in stopping:
            self._stop(tap)
        for tap in p.tzsp:
            if tap not in self._taps:
                self._start(tap)
        self._stop_capture_if_idle()

    def stop_all(self) -> None:
        for tap in list(self._taps):
            self._stop(tap)
        self._stop_capture_if_idle()

    # -- what the main loop calls ----------------------------------------------
    def next_restart(self) -> Optional[float]:
        due = [t.restart_at for t in self._taps.values() if t.exited]
        return min(due) if due else None

    def read_events(self) -> list[str]:
        """Taps that ended since the last call, as log-friendly reasons."""
        reasons: list[str] = []
        for capture in list(self._captures.values()):
            ended, _gone = capture.read_events()
            reasons += self.collect_exits(ended, capture)
        return reasons

    def collect_exits(self, slots: list[int], process: Any = None) -> list[str]:
        """Mark the taps in `slots` (of `process`; None: any), and those whose
        process went away, exited."""
        orphans = {id(h) for c in self._captures.values() for h in c.take_orphans()}
        if not slots and not orphans:
            return []
        reasons = []
        for t in self._taps.values():
            if t.exited is not None:
                continue
            mine = t.handle.slot_index in slots and (
                process is None or getattr(t.handle, "process", None) is process)
            if not (mine or id(t.handle) in orphans):
                continue
            reason = t.handle.poll()
            if reason is None:
                continue  # an event of the slot's previous tap
            t.exited = reason
            t.restart_at = time.monotonic() + self._restart_delay(t)
            log.warning("TZSP capture for %s on %s stopped: %s", t.tap.mirror, t.tap.interface,
                        reason, extra={"MIRROR": t.tap.mirror, "ACTION": "worker-exit"})
            reasons.append(f"worker exited: {reason}")
        return reasons

    # -- readings -------------------------------------------------------------
    def reading(self) -> tuple[dict[str, tuple[int, int]], tuple[TapReading, ...]]:
        """Per-mirror totals (stopped taps' included) and one row per running tap."""
        live, rows = [], []
        now = time.monotonic()
        for t in self._taps.values():
            c = t.handle.counters()
            live += [(key, c.sent, c.bytes) for key in _totals_of(t.tap)]
            state = "exited" if t.exited is not None else t.handle.state()
            # Ended, but its event not read yet (a status query came first): the
            # handle knows why; the restart is planned once the event is read.
            reason = t.exited if t.exited is not None else (
                t.handle.poll() if state == "exited" else None)
            rows.append(TapReading(
                mirror=t.tap.mirror, interface=t.tap.interface,
                id=getattr(t.handle, "serial", None), pid=getattr(t.handle, "pid", None),
                state=state, exit_reason=reason,
                counters={k: getattr(c, k) for k in COUNTER_FIELDS if hasattr(c, k)},
                restart_in=round(max(0.0, t.restart_at - now), 3) if t.exited is not None
                else None, member=t.tap.member))
        return self.ledger.tzsp_totals(live), tuple(rows)

    # -- the taps -------------------------------------------------------------
    def _capture_process(self, lane: int) -> Any:
        capture = self._captures.get(lane)
        if capture is None:
            from ..tzsp.supervisor import CaptureProcess

            capture = self._captures[lane] = CaptureProcess(watch=self._watch)
        return capture

    def _stop_capture_if_idle(self) -> None:
        """A lane with no tap left: no capture process either (it costs its interpreter)."""
        busy = {self.lane(t.tap) for t in self._taps.values()}
        for lane, capture in self._captures.items():
            if lane not in busy:
                capture.stop()

    def lane(self, tap: TzspTap) -> int:
        """Which capture process serves `tap`: a group's member k, k mod the CPUs."""
        return tap.member_index % self.lanes

    def _capture_handle(self, tap: TzspTap) -> Any:
        from ..tzsp.job import TzspJob
        from ..tzsp.supervisor import TapHandle

        return TapHandle(self._capture_process(self.lane(tap)), TzspJob.from_tap(tap))

    def _retarget(self, t: _Tap, tap: TzspTap) -> None:
        """The tap's filter changed (a group member's share of the flows, the
        spec's collectors): its filter is swapped, the tap stays."""
        del self._taps[t.tap]
        t.tap = tap
        self._taps[tap] = t
        if t.exited is None:
            from ..tzsp.job import TzspJob

            t.handle.retarget(TzspJob.from_tap(tap))

    def _start(self, tap: TzspTap) -> None:
        handle = self._make_handle(tap)
        t = _Tap(tap, handle)
        self._taps[tap] = t
        try:
            handle.start()
        except OSError as e:
            t.exited = f"could not start: {e}"
            t.restart_at = time.monotonic() + self._restart_delay(t)
            log.error("TZSP worker for %s on %s: %s", tap.mirror, tap.interface, t.exited,
                      extra={"MIRROR": tap.mirror, "ACTION": "worker-start"})
            return
        log.info("TZSP capture on %s (%s) -> %s:%d", tap.interface, "+".join(tap.directions),
                 tap.destination, tap.collector.port,
                 extra={"MIRROR": tap.mirror, "ACTION": "worker-start"})

    def _stop(self, tap: TzspTap) -> None:
        t = self._taps.pop(tap)
        t.handle.stop()  # returns once the tap is closed: its counters are final
        c = t.handle.counters()
        for key in _totals_of(tap):
            self.ledger.bank_tap(key, c.sent, c.bytes)

    def _restart_delay(self, t: _Tap) -> float:
        now = time.monotonic()
        ends = [e for e in self._failures.get(t.tap, []) if now - e < CRASH_WINDOW] + [now]
        self._failures[t.tap] = ends
        looping = len(ends) - CRASH_LOOP + 1
        if looping <= 0:
            return RESTART_DELAY
        return float(min(RESTART_MAX, RESTART_DELAY * 2 ** looping))


def _totals_of(tap: TzspTap) -> tuple[str, ...]:
    """The totals a tap's copies count towards: its mirror's, and a group
    member's (under the member's counter name, which is never a mirror's)."""
    if tap.member is None:
        return (tap.mirror,)
    return (tap.mirror, member_counter_name(tap.collector.name, tap.member))


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
