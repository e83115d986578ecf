"""The TZSP taps the plan asks for, kept running.

Every tap runs in one capture process (tzsp.supervisor.CaptureProcess). A tap
that ends (its interface went away, the process was killed) is marked exited
and restarted after 1 s; only a tap that is really crash-looping (a fifth end
within a minute) waits longer, doubling up to 30 s. Each second waited is
copies lost: a backoff that doubled from the second kill lost thousands of
copies to five kills. The restart itself is a reconcile (`sync`), so a tap
comes back only if the plan, read again, still wants it. A tap's final counters go to the ledger
once it is stopped, never before: frames still being sent would be lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..plan import Plan, TzspTap
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
        self._capture: Any = None

    # -- what the reconciler calls ---------------------------------------------
    def sync(self, p: Plan, now: float) -> None:
        """Run exactly the plan's taps; restart those whose delay has passed."""
        wanted = set(p.tzsp)
        for tap, t in list(self._taps.items()):
            if tap not in wanted or (t.exited and now >= t.restart_at):
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
        if self._capture is None:
            return []
        ended, _gone = self._capture.read_events()
        return self.collect_exits(ended)

    def collect_exits(self, slots: list[int]) -> list[str]:
        """Mark the taps in `slots`, and those whose process went away, exited."""
        orphans = set(map(id, self._capture.take_orphans())) if self._capture is not None else set()
        if not slots and not orphans:
            return []
        reasons = []
        for t in self._taps.values():
            if t.exited is not None or not (id(t.handle) in orphans or t.handle.slot_index in slots):
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
            live.append((t.tap.mirror, c.sent, c.bytes))
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
                else None))
        return self.ledger.tzsp_totals(live), tuple(rows)

    # -- the taps -------------------------------------------------------------
    def _capture_process(self) -> Any:
        if self._capture is None:
            from ..tzsp.supervisor import CaptureProcess

            self._capture = CaptureProcess(watch=self._watch)
        return self._capture

    def _stop_capture_if_idle(self) -> None:
        """No tap left: no capture process either (it costs its interpreter)."""
        if self._capture is not None and not self._taps:
            self._capture.stop()

    def _capture_handle(self, tap: TzspTap) -> Any:
        from ..tzsp.job import TzspJob
        from ..tzsp.supervisor import TapHandle

        return TapHandle(self._capture_process(), TzspJob.from_tap(tap))

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
                 tap.collector.address, tap.collector.port,
                 extra={"MIRROR": tap.mirror, "ACTION": "worker-start"})

    def _stop(self, tap: TzspTap) -> None:
        t = self._taps.pop(tap)
        t.handle.stop()  # returns once the tap is closed: its counters are final
        c = t.handle.counters()
        self.ledger.bank_tap(tap.mirror, c.sent, c.bytes)

    def _restart_delay(self, t: _Tap) -> float:
        now = time.monotonic()
        ends = [e for e in self._failures.get(t.tap, []) if now - e < CRASH_WINDOW] + [now]
        self._failures[t.tap] = ends
        looping = len(ends) - CRASH_LOOP + 1
        if looping <= 0:
            return RESTART_DELAY
        return float(min(RESTART_MAX, RESTART_DELAY * 2 ** looping))
