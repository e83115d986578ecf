"""The daemon's loop around the reconciler: what it asks for, and how often.
Pure: a fake reconciler and fake TZSP tap handles, no sockets opened."""

from __future__ import annotations

import time
from typing import Any

from mirrord import spec
from mirrord.backends.base import ApplyError
from mirrord.plan import TzspTap
from mirrord.reconcile.snapshot import Snapshot
from mirrord.service.daemon import Daemon
from mirrord.service.notify import Notifier
from tests.unit.test_reconciler import TZSP, FakeHandle, reconciler


def _started_daemon() -> tuple[Daemon, Any, list[FakeHandle]]:
    """A daemon (no sockets) whose reconciler started the TZSP spec's taps as fakes."""
    handles: list[FakeHandle] = []

    def make(tap: TzspTap) -> FakeHandle:
        handles.append(FakeHandle(tap))
        return handles[-1]

    d = Daemon(spec.parse(TZSP), "/nonexistent/mirrord.sock", Notifier(None))
    d.taps._make_handle = make
    r, _ = reconciler(TZSP, pool=d.taps)
    r.reconcile(["start"], refresh_topology=True, force=True)
    return d, r, handles


class RefusingReconciler:
    """Every reconcile is refused by the kernel, as in a long apply failure."""

    def __init__(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.backend = None
        self.failed_neighbours: set[Any] = set()
        self.calls = 0

    def reconcile(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise ApplyError("refused")

    def failed(self, error: str) -> Snapshot:
        return self.snapshot


def test_a_due_tap_restart_is_asked_once_while_reconciles_fail() -> None:
    d, r, handles = _started_daemon()
    first = handles[0]
    first.ended, first.slot_index = "interface went away", 3
    assert d.taps.collect_exits([3])
    d.taps._taps[first.tap].restart_at = time.monotonic() - 1  # its delay has passed
    fake = RefusingReconciler(r.snapshot)
    d.reconciler = fake  # type: ignore[assignment]
    for _ in range(20):
        d._due(time.monotonic())
    assert fake.calls == 1  # asked once; the retry after the failure takes it from here
    timeout = d._timeout()
    assert timeout is not None and timeout > 0.5  # no busy loop: the next thing is the retry


class _DeadCapture:
    """A capture process found dead by a tap's start: the tap is orphaned, no event comes."""

    def __init__(self, orphans: list[FakeHandle]) -> None:
        self.orphans = orphans

    def take_orphans(self) -> list[FakeHandle]:
        out, self.orphans = self.orphans, []
        return out


def test_taps_orphaned_without_an_event_are_noticed_on_the_next_turn() -> None:
    d, r, handles = _started_daemon()
    d.reconciler = r
    handles[0].ended = "capture process exited with status 1"
    d.taps._captures[0] = _DeadCapture([handles[0]])
    d._due(time.monotonic())
    assert "worker exited: capture process exited with status 1" in d.pending.reasons
    assert d.taps.next_restart() is not None  # and it will be restarted after its delay


def test_a_fresh_look_is_taken_when_the_reconciler_asks_for_one() -> None:
    """A mirror waiting on the kernel (a module missing, a tunnel refused) is looked at
    again without any event: installing the module is enough."""
    from tests.unit.test_reconciler import VXLAN

    d = Daemon(spec.parse(VXLAN), "/nonexistent/mirrord.sock", Notifier(None))
    r, k = reconciler(VXLAN)
    k.tunnel_errors["mvx-ids"] = "cannot create vxlan device mvx-ids: no (install kmod-vxlan)"
    d.reconciler = r
    d._after(r.reconcile(["start"], refresh_topology=True, force=True))
    assert d.look_at is not None
    timeout = d._timeout()
    assert timeout is not None and 0 < timeout <= 30
    del k.tunnel_errors["mvx-ids"]
    r._tunnels_tried -= 60  # the wait has passed
    d._due(d.look_at + 0.01)
    assert d.look_at is None and len(k.tunnel_calls) == 2
    assert r.snapshot.plan is not None and r.snapshot.plan.mirrors[0].state == "active"


def test_a_crash_leaves_the_rules_for_the_next_start(monkeypatch: Any) -> None:
    """An exception in the loop exits without removing the kernel's rules (a respawn
    adopts them); before, the cleanup removed them first and the respawn's wait was
    a gap in the copies."""
    import signal

    from tests.unit.test_reconciler import CLONE

    d = Daemon(spec.parse(CLONE), "/nonexistent/mirrord.sock", Notifier(None))
    r, k = reconciler(CLONE, pool=d.taps)
    r.reconcile(["start"], refresh_topology=True, force=True)
    d.reconciler = r
    assert k.listing

    def crash(wake: int) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(d, "_run", crash)
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
                                               signal.SIGUSR2)}
    try:
        assert d.run() == 1
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(-1)
    assert k.listing, "the rules were removed"
