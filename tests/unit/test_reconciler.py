"""The reconciler against fakes: an in-memory backend (what a kernel would hold)
and TZSP tap handles. Pure: no root, no kernel.

What is checked is the contract the daemon relies on: apply only what changed
or drifted, commit only after the kernel agreed, never let a total go down,
and restart taps through the same path.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any, Optional

import pytest

from mirrord import spec
from mirrord.backends.base import ApplyError, Backend, Capabilities, Counts, Rendered
from mirrord.commands import offline_topology
from mirrord.netlink.links import Tunnel
from mirrord.plan import FrameSupport, Plan, TzspTap
from mirrord.reconcile.ledger import CounterLedger
from mirrord.reconcile.reconciler import Reconciler
from mirrord.reconcile.taps import TapPool

CLONE = """\
collectors:
  ids: {address: 192.0.2.10, interface: col, transport: clone}
mirrors:
  - {name: lan, interfaces: [br-lan], direction: both, collector: ids}
"""
TZSP = """\
collectors:
  far: {address: 198.51.100.7, transport: tzsp}
mirrors:
  - {name: ports, interfaces: [lan1, lan2], direction: in, collector: far}
"""


class FakeKernel(Backend):
    """What a kernel would hold: the applied text and counters that count on."""

    name = "fake"
    capabilities = Capabilities(versions=frozenset({4, 6}), watch_tables=frozenset(),
                                event_driven=True, kernel_owner="fake", removes="nothing")

    def __init__(self) -> None:
        self.listing = ""
        self.counts: Counts = {}
        self.applied: list[str] = []
        self.refuse: Optional[str] = None
        self.tamper_after_apply = ""  # what someone else writes right after our commit
        self.tunnel_calls: list[tuple[Tunnel, ...]] = []
        self.tunnel_errors: dict[str, str] = {}

    def make_tunnels(self, wanted: Sequence[Tunnel]) -> dict[str, str]:
        self.tunnel_calls.append(tuple(wanted))
        return {t.name: e for t in wanted if (e := self.tunnel_errors.get(t.name))}

    def frame_support(self) -> FrameSupport:
        return FrameSupport()

    def unsupported(self) -> Optional[str]:
        return None

    def render(self, plan: Plan) -> Rendered:
        text = "\n".join([f"{r.mirror} {r.direction} -> {r.gateway}" for r in plan.clones]
                         + [f"{r.mirror} {r.direction} {r.interface} => {r.target}"
                            for r in plan.frames])
        binds = tuple(sorted({(r.target, r.target_index) for r in plan.frames}))
        return Rendered(text=text, payload=(*plan.clones, *plan.frames), binds=binds)

    def apply(self, rendered: Rendered, carry: Counts) -> None:
        if self.refuse:
            raise ApplyError(self.refuse)
        self.listing = rendered.text
        self.counts = {(r.mirror, r.direction): carry.get((r.mirror, r.direction), (0, 0))
                       for r in rendered.payload}
        self.applied.append(rendered.text)
        if self.tamper_after_apply:
            self.listing = self.tamper_after_apply

    def snapshot(self) -> str:
        return self.listing

    def verify(self, rendered: Rendered, snapshot: str) -> Optional[str]:
        return None if snapshot == rendered.text else "listing differs"

    def counters(self) -> Counts:
        return dict(self.counts)

    def flush(self) -> None:
        self.listing, self.counts = "", {}

    # what traffic and other people do
    def count(self, key: tuple[str, str], packets: int) -> None:
        p, b = self.counts.get(key, (0, 0))
        self.counts[key] = (p + packets, b + 100 * packets)

    def delete_everything(self) -> None:  # `nft flush ruleset`
        self.listing, self.counts = "", {}


def reconciler(text: str, kernel: Optional[FakeKernel] = None,
               pool: Optional[TapPool] = None) -> tuple[Reconciler, FakeKernel]:
    s = spec.parse(text)
    k = kernel or FakeKernel()
    ledger = pool.ledger if pool else CounterLedger()
    r = Reconciler(s, offline_topology, lambda _name: (k, ""),
                   pool or TapPool(ledger, watch=lambda fd, on: None), ledger,
                   make_tunnels=k.make_tunnels)
    return r, k


def test_applies_once_then_only_on_change_or_drift() -> None:
    r, k = reconciler(CLONE)
    out = r.reconcile(["start"], refresh_topology=True, force=True)
    assert out.snapshot.applies == 1 and len(k.applied) == 1
    assert out.snapshot.summary() == "1 mirror(s): 1 active"
    r.reconcile(["link changed"], refresh_topology=True)
    assert len(k.applied) == 1  # nothing changed: nothing applied
    k.delete_everything()
    out = r.reconcile(["table deleted"], refresh_topology=False)
    assert len(k.applied) == 2 and out.snapshot.reapplies == 1
    heal = out.snapshot.heals["lan"]
    assert heal.why == "rules restored after: table deleted"


def test_refused_apply_changes_nothing_and_keeps_the_snapshot() -> None:
    r, k = reconciler(CLONE)
    before = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    k.refuse = "no"
    new = spec.parse(CLONE.replace("192.0.2.10", "192.0.2.11"))
    with pytest.raises(ApplyError):
        r.reconcile(["reload"], refresh_topology=True, force=True, new_spec=new)
    assert r.snapshot is before and k.listing == k.applied[0]
    failed = r.failed("no")
    assert failed.apply_error == "no" and before.apply_error == ""  # snapshots are values
    k.refuse = None
    after = r.reconcile(["retry"], refresh_topology=True).snapshot
    assert after.apply_error == "" and after.spec is before.spec


def test_snapshot_is_immutable() -> None:
    r, _ = reconciler(CLONE)
    snap = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.applies = 7  # type: ignore[misc]
    assert isinstance(snap.heals, types.MappingProxyType)


def test_totals_survive_replacement_and_deletion() -> None:
    r, k = reconciler(CLONE)
    r.reconcile(["start"], refresh_topology=True, force=True)
    k.count(("lan", "in"), 5)
    assert r.read().clones[("lan", "in")] == (5, 500)
    k.count(("lan", "in"), 2)
    k.delete_everything()  # the two were counted, then the table went
    assert r.read().clones[("lan", "in")] == (5, 500)  # seen last: 5 (never lower)
    k.counts = {("lan", "in"): (1, 100)}  # a rule someone re-created, counting from zero
    assert r.read().clones[("lan", "in")] == (5, 500)
    r.reconcile(["table deleted"], refresh_topology=False)
    assert k.counts[("lan", "in")] == (5, 500)  # the new rules start from the total
    k.count(("lan", "in"), 1)
    assert r.read().clones[("lan", "in")] == (6, 600)


def test_listing_that_is_not_ours_is_not_adopted() -> None:
    r, k = reconciler(CLONE)
    k.tamper_after_apply = "someone else's rules"
    out = r.reconcile(["start"], refresh_topology=True, force=True)
    assert out.again_in == 0.0  # apply again right away
    out = r.reconcile([out.why_again], refresh_topology=False)
    assert len(k.applied) == 2
    assert out.again_in is not None and out.again_in > 0  # the same listing again: back off
    k.tamper_after_apply = ""
    out = r.reconcile(["again"], refresh_topology=False)
    assert out.again_in is None and len(k.applied) == 3


class FakeHandle:
    def __init__(self, tap: TzspTap) -> None:
        self.tap, self.slot_index, self.serial, self.pid = tap, 0, 1, 4242
        self.sent = self.nbytes = self.send_errors = 0
        self.stopped = False
        self.ended: Optional[str] = None
        self.tap_state = "running"  # what the capture process put in the tap's slot
        self.retargets: list[Any] = []  # the jobs of filter swaps (a group member's share)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True

    def detach(self) -> None:
        pass

    def retarget(self, job: Any) -> None:
        self.retargets.append(job)

    def poll(self) -> Optional[str]:
        return self.ended

    def state(self) -> str:
        return "exited" if self.ended is not None else self.tap_state

    def counters(self) -> Any:
        return types.SimpleNamespace(sent=self.sent, bytes=self.nbytes, captured=self.sent,
                                     send_errors=self.send_errors)


def fake_tap_reconciler() -> tuple[Reconciler, TapPool, list[FakeHandle]]:
    """The TZSP spec's reconciler, its taps fake handles (listed as they are made)."""
    handles: list[FakeHandle] = []

    def make(tap: TzspTap) -> FakeHandle:
        handles.append(FakeHandle(tap))
        return handles[-1]

    pool = TapPool(CounterLedger(), watch=lambda fd, on: None, make_handle=make)
    r, _ = reconciler(TZSP, pool=pool)
    return r, pool, handles


def test_taps_restart_through_the_reconciler_and_totals_never_go_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    r, pool, handles = fake_tap_reconciler()
    r.reconcile(["start"], refresh_topology=True, force=True)
    assert sorted(h.tap.interface for h in handles) == ["lan1", "lan2"]
    first = handles[0]
    first.sent, first.nbytes = 10, 1000
    assert r.read().tzsp["ports"] == (10, 1000)
    first.ended = "interface went away"
    first.slot_index = 3
    assert pool.collect_exits([3]) == ["worker exited: interface went away"]
    row = next(t for t in r.read().taps if t.interface == first.tap.interface)
    assert row.state == "exited" and not row.running
    restart = pool.next_restart()
    assert restart is not None
    r.reconcile(["TZSP tap restart"], refresh_topology=True)
    assert not first.stopped and len(handles) == 2  # not before its delay
    monkeypatch.setattr("time.monotonic", lambda: restart + 0.01)
    r.reconcile(["TZSP tap restart"], refresh_topology=True)
    assert first.stopped and len(handles) == 3  # a new handle for the same tap
    assert r.read().tzsp["ports"] == (10, 1000)  # banked after stop: nothing lost
    handles[-1].sent, handles[-1].nbytes = 1, 100
    assert r.read().tzsp["ports"] == (11, 1100)
    r.stop()
    assert all(h.stopped for h in handles)


# -- whole-frame transports: tunnel devices, bound ifindexes -------------------------
VXLAN = """\
collectors:
  ids: {address: 203.0.113.10, transport: vxlan, vni: 7}
mirrors:
  - {name: lan, interfaces: [br-lan], direction: in, collector: ids}
"""


def test_tunnels_are_made_before_the_rules_and_removed_after_them() -> None:
    r, k = reconciler(VXLAN)
    r.reconcile(["start"], refresh_topology=True, force=True)
    (wanted,) = k.tunnel_calls
    assert [(t.name, t.kind, str(t.remote), t.vni, t.port, t.owner) for t in wanted] == [
        ("mvx-ids", "vxlan", "203.0.113.10", 7, 4789, "ids")]
    assert k.applied[-1] == "lan in br-lan => mvx-ids"
    # Only a fresh look at the kernel makes tunnels again (a link event, a reload).
    r.reconcile(["nft event"], refresh_topology=False)
    assert len(k.tunnel_calls) == 1
    r.stop()
    assert k.tunnel_calls[-1] == () and k.listing == ""


def test_a_refused_reload_leaves_the_running_rules_their_tunnels() -> None:
    """A reload to another vxlan collector the kernel refuses: the old rules
    still copy into mvx-ids, so it is never deleted; the next accepted apply
    of the new spec removes it, and only then."""
    r, k = reconciler(VXLAN)
    r.reconcile(["start"], refresh_topology=True, force=True)
    new = spec.parse(VXLAN.replace("ids", "nsm").replace("203.0.113.10", "203.0.113.11"))
    k.refuse = "no"
    with pytest.raises(ApplyError):
        r.reconcile(["reload"], refresh_topology=True, force=True, new_spec=new)
    assert all("mvx-ids" in {t.name for t in call} for call in k.tunnel_calls)
    assert {t.name for t in k.tunnel_calls[-1]} == {"mvx-ids", "mvx-nsm"}
    # A link event: the old spec is what runs; committed, it prunes the new device.
    r.reconcile(["link"], refresh_topology=True)
    assert {t.name for t in k.tunnel_calls[-2]} == {"mvx-ids", "mvx-nsm"}
    assert {t.name for t in k.tunnel_calls[-1]} == {"mvx-ids"}
    k.refuse = None
    r.reconcile(["reload"], refresh_topology=True, force=True, new_spec=new)
    assert k.applied[-1] == "lan in br-lan => mvx-nsm"
    assert [t.name for t in k.tunnel_calls[-1]] == ["mvx-nsm"]  # pruned after the commit
    assert {t.name for t in k.tunnel_calls[-2]} == {"mvx-ids", "mvx-nsm"}  # before it


def test_a_spec_without_tunnels_removes_leftovers_once() -> None:
    """The first reconcile asks for none (a mirrord that died left some?), then never again."""
    r, k = reconciler(CLONE)
    r.reconcile(["start"], refresh_topology=True, force=True)
    r.reconcile(["link"], refresh_topology=True)
    assert k.tunnel_calls == [()]


def test_a_tunnel_the_kernel_cannot_make_is_the_mirrors_error() -> None:
    r, k = reconciler(VXLAN)
    k.tunnel_errors["mvx-ids"] = "cannot create vxlan device mvx-ids: no (install kmod-vxlan)"
    snap = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    assert snap.plan is not None
    (mp,) = snap.plan.mirrors
    assert (mp.state, mp.reason) == ("error", k.tunnel_errors["mvx-ids"])
    assert k.applied == []  # no rule copies into a device that is not there


def test_the_same_rules_over_a_device_made_again_are_loaded_again() -> None:
    """nft binds `dup to "mvx-ids"` to an ifindex: a new device, a new load, a heal."""
    s = spec.parse(VXLAN)
    shift = {"n": 0}

    def topology(sp: spec.Spec) -> Any:
        topo = offline_topology(sp)
        links = {n: dataclasses.replace(lk, index=lk.index + shift["n"])
                 if n == "mvx-ids" else lk for n, lk in topo.links.items()}
        return dataclasses.replace(topo, links=links)

    k = FakeKernel()
    ledger = CounterLedger()
    r = Reconciler(s, topology, lambda _name: (k, ""), TapPool(ledger, watch=lambda fd, on: None),
                   ledger, make_tunnels=k.make_tunnels)
    r.reconcile(["start"], refresh_topology=True, force=True)
    r.reconcile(["link added: br-lan"], refresh_topology=True)
    assert len(k.applied) == 1  # nothing changed
    shift["n"] = 100
    snap = r.reconcile(["link deleted: mvx-ids"], refresh_topology=True).snapshot
    assert len(k.applied) == 2 and k.applied[0] == k.applied[1]
    assert snap.heals["lan"].why == "rules restored after: link deleted: mvx-ids"


def test_a_killed_tap_comes_back_in_a_second_unless_it_is_crash_looping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Four ends within a minute: each restart after 1 s (the old backoff doubled from
    the second end: 1, 2, 4, 8 s, each second copies lost); the fifth backs off."""
    from mirrord.reconcile import taps as taps_module

    handles: list[FakeHandle] = []

    def make(tap: TzspTap) -> FakeHandle:
        handles.append(FakeHandle(tap))
        return handles[-1]

    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    pool = TapPool(CounterLedger(), watch=lambda fd, on: None, make_handle=make)
    r, _ = reconciler(TZSP, pool=pool)
    r.reconcile(["start"], refresh_topology=True, force=True)
    delays = []
    for _ in range(taps_module.CRASH_LOOP + 1):
        h = next(h for h in reversed(handles) if h.tap.interface == "lan1")
        h.ended, h.slot_index = "killed", 7
        pool.collect_exits([7])
        due = pool.next_restart()
        assert due is not None
        delays.append(due - now[0])
        now[0] = due + 0.01
        r.reconcile(["TZSP tap restart"], refresh_topology=True)
        now[0] += 2  # it ran two seconds
    assert delays == [1.0, 1.0, 1.0, 1.0, 2.0, 4.0]
    now[0] += taps_module.CRASH_WINDOW  # a minute of quiet: forgiven
    h = next(h for h in reversed(handles) if h.tap.interface == "lan1")
    h.ended, h.slot_index = "killed", 7
    pool.collect_exits([7])
    assert pool.next_restart() == now[0] + 1.0


def test_status_is_not_active_while_a_tap_waits_for_its_restart() -> None:
    from mirrord.observe import status

    r, pool, handles = fake_tap_reconciler()
    snap = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    doc = status.build_status(snap, r.read(), status.RateMeter())
    assert doc["mirrors"][0]["state"] == "active"
    handles[0].ended, handles[0].slot_index = "capture process killed by SIGKILL", 3
    pool.collect_exits([3])
    m = status.build_status(snap, r.read(), status.RateMeter())["mirrors"][0]
    assert m["state"] == "degraded"
    assert m["reason"] == (f"TZSP capture on {handles[0].tap.interface} stopped (capture "
                           "process killed by SIGKILL), restarting in 1.0 s")
    assert m["tzsp"][0]["restart_in"] == pytest.approx(1.0, abs=0.05)
    handles[1].ended, handles[1].slot_index = "killed", 4
    pool.collect_exits([4])
    assert status.build_status(snap, r.read(), status.RateMeter())["mirrors"][0]["state"] == "error"


def test_tzsp_mirror_is_starting_until_every_ring_captures_and_after_a_restart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`active` only once the capture process marked every tap running: the
    plan alone said `active` while the rings were still being opened, and
    again as soon as a restarted tap was handed to the process."""
    from mirrord.observe import status

    r, pool, handles = fake_tap_reconciler()
    snap = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    for h in handles:
        h.tap_state = "starting"

    def doc() -> Any:
        return status.build_status(snap, r.read(), status.RateMeter())

    d = doc()
    (m,) = d["mirrors"]
    assert m["state"] == "starting", m
    assert m["reason"] == ("TZSP capture on lan1 starting (not capturing yet); "
                           "TZSP capture on lan2 starting (not capturing yet)")
    assert d["summary"] == "1 mirror(s): 1 starting"
    assert not status.healthy(d) and not status.all_active(d)  # `mirrord status` exits 1
    prom = status.format_prometheus(d).splitlines()
    assert 'mirrord_mirror_state{mirror="ports",state="starting"} 1' in prom
    assert 'mirrord_mirror_state{mirror="ports",state="active"} 0' in prom
    handles[0].tap_state = "running"  # one ring open, the other not yet
    m = doc()["mirrors"][0]
    assert m["state"] == "starting" and m["reason"] == (
        "TZSP capture on lan2 starting (not capturing yet)")
    handles[1].tap_state = "running"
    d = doc()
    assert d["mirrors"][0]["state"] == "active" and d["mirrors"][0]["reason"] == ""
    assert status.healthy(d) and d["summary"] == "1 mirror(s): 1 active"
    # Killed: degraded until its restart, with when; then starting, then active.
    handles[0].ended, handles[0].slot_index = "capture process killed by SIGKILL", 3
    m = doc()["mirrors"][0]  # the end not read yet from the events pipe
    assert (m["state"], m["reason"]) == ("degraded", "TZSP capture on lan1 stopped (capture "
                                         "process killed by SIGKILL), restarting")
    pool.collect_exits([3])
    restart = pool.next_restart()
    assert restart is not None
    monkeypatch.setattr("time.monotonic", lambda: restart - 0.3)
    m = doc()["mirrors"][0]
    assert m["state"] == "degraded" and m["reason"].endswith("restarting in 0.3 s"), m
    monkeypatch.setattr("time.monotonic", lambda: restart + 0.01)
    assert doc()["mirrors"][0]["reason"].endswith("restarting now")
    r.reconcile(["TZSP tap restart"], refresh_topology=True)
    assert len(handles) == 3
    handles[2].tap_state = "starting"
    m = doc()["mirrors"][0]
    assert m["state"] == "starting" and "lan1 starting" in m["reason"], m
    handles[2].tap_state = "running"
    assert doc()["mirrors"][0]["state"] == "active"


def test_a_tunnel_that_failed_is_tried_again_only_after_a_while(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A device made and deleted again (it would not come up) sends link events: they
    must not start it over for ever; the outcome asks for a fresh look later."""
    from mirrord.reconcile import reconciler as rec

    now = [500.0]
    monkeypatch.setattr(rec.time, "monotonic", lambda: now[0])
    r, k = reconciler(VXLAN)
    k.tunnel_errors["mvx-ids"] = "cannot create vxlan device mvx-ids: configuring it failed"
    out = r.reconcile(["start"], refresh_topology=True, force=True)
    assert out.look_again_in == rec.LOOK_AGAIN and len(k.tunnel_calls) == 1
    for _ in range(5):  # its own link events
        now[0] += 1
        r.reconcile(["link deleted: mvx-ids"], refresh_topology=True)
    assert len(k.tunnel_calls) == 1
    now[0] += rec.LOOK_AGAIN
    del k.tunnel_errors["mvx-ids"]
    out = r.reconcile(["a fresh look"], refresh_topology=True)
    assert len(k.tunnel_calls) == 2 and out.look_again_in is None
    assert out.snapshot.plan is not None and out.snapshot.plan.mirrors[0].state == "active"


def test_rtnetlink_failing_is_the_tunnels_error_not_a_traceback() -> None:
    r, _ = reconciler(VXLAN)

    def broken(wanted: Sequence[Tunnel]) -> dict[str, str]:
        raise OSError(105, "No buffer space available")

    r._make_tunnels = broken
    snap = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    assert snap.plan is not None
    (mp,) = snap.plan.mirrors
    assert mp.state == "error" and "No buffer space available" in mp.reason


def test_status_is_not_active_while_every_tzsp_send_fails() -> None:
    from mirrord.observe import status

    r, _, handles = fake_tap_reconciler()
    snap = r.reconcile(["start"], refresh_topology=True, force=True).snapshot
    for h in handles:
        h.send_errors = 7  # nothing sent: the kernel refused every datagram
    m = status.build_status(snap, r.read(), status.RateMeter())["mirrors"][0]
    assert m["state"] == "error", m
    assert "every TZSP datagram from lan1 to 198.51.100.7 failed to send (7 so far)" in m["reason"]
    handles[0].sent = 3  # one tap gets through
    m = status.build_status(snap, r.read(), status.RateMeter())["mirrors"][0]
    assert m["state"] == "degraded" and "lan1" not in m["reason"]
