"""Collector groups (issue 13): the bucket assignment, the plan's liveness, the
rendering's shape, status. The kernel side: tests/e2e/test_groups.py; the
goldens: golden/frames/groups.* and golden/errors/group_errors.*."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord import plan, spec
from mirrord.backends import create
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology
from mirrord.observe.status import RateMeter, build_status, format_prometheus, format_table
from mirrord.plan.groups import (
    BUCKETS,
    assign,
    bucket_ranges,
    groups_of,
    member_changes,
    weight,
)
from mirrord.reconcile.snapshot import Reading, Snapshot

_names = st.lists(st.from_regex(r"192\.0\.2\.[1-9][0-9]?", fullmatch=True),
                  min_size=1, max_size=8, unique=True)


# -- the rendezvous assignment ----------------------------------------------------------------
def test_weight_is_stable_across_runs() -> None:
    # Fixed values: a change of the hash would move every flow on an upgrade.
    # (A Python hash() would differ per process with PYTHONHASHSEED.)
    assert [weight("192.0.2.50", b) for b in range(3)] == [1066454382, 919110533, 859914167]
    held = assign(["192.0.2.50", "192.0.2.51", "192.0.2.52"],
                  {"192.0.2.50", "192.0.2.51", "192.0.2.52"})
    assert {m: len(b) for m, b in held.items()} == {
        "192.0.2.50": 19, "192.0.2.51": 22, "192.0.2.52": 23}


@settings(max_examples=200, deadline=None)
@given(_names, st.data())
def test_every_bucket_to_exactly_one_live_member(names: list[str], data: Any) -> None:
    live = set(data.draw(st.lists(st.sampled_from(names), unique=True)))
    held = assign(names, live)
    owned = [b for m in names for b in held[m]]
    if live:
        assert sorted(owned) == list(range(BUCKETS))
    else:
        assert owned == []
    assert all(not held[m] for m in names if m not in live)


@settings(max_examples=200, deadline=None)
@given(_names, st.data())
def test_a_member_dying_moves_only_its_buckets(names: list[str], data: Any) -> None:
    dead = data.draw(st.sampled_from(names))
    before = assign(names, set(names))
    after = assign(names, set(names) - {dead})
    for m in names:
        if m != dead:
            assert set(before[m]) <= set(after[m])  # kept every bucket it had
    assert set().union(*(set(after[m]) - set(before[m]) for m in names)) == (
        set(before[dead]) if len(names) > 1 else set())
    # It comes back: everything returns to where it was.
    assert assign(names, set(names)) == before


@settings(max_examples=200, deadline=None)
@given(_names, st.from_regex(r"198\.51\.100\.[1-9]", fullmatch=True))
def test_adding_a_member_moves_only_buckets_to_it(names: list[str], new: str) -> None:
    before = assign(names, set(names))
    after = assign([*names, new], {*names, new})
    for m in names:
        assert set(after[m]) <= set(before[m])  # lost some to the new member, gained none
    moved = {b for m in names for b in set(before[m]) - set(after[m])}
    assert moved == set(after[new])
    # Deterministic, whatever the order of the list.
    assert assign(list(reversed([*names, new])), {*names, new}) == after


def test_bucket_ranges_merge_contiguous_runs() -> None:
    assert bucket_ranges([5, 0, 1, 2, 7, 8, 63]) == [(0, 2), (5, 5), (7, 8), (63, 63)]
    assert bucket_ranges([]) == []


# -- the plan ---------------------------------------------------------------------------------
SPEC = """\
collectors:
  sensors:
    transport: clone
    members: [192.0.2.50, 192.0.2.51, 192.0.2.52]
    balance: flow
mirrors:
  - {name: lan, interfaces: [wan], collector: sensors}
  - {name: dmz, interfaces: [dmz], direction: in, collector: sensors}
"""
MEMBERS = ("192.0.2.50", "192.0.2.51", "192.0.2.52")


def topo(**neighbour: str) -> Topology:
    links = {n: Link(n, i, True, None, ARPHRD_ETHER, 1500)
             for i, n in enumerate(("wan", "dmz", "eth2"), 2)}
    reach = {(ipaddress.ip_address(a), None): Reach(
        ipaddress.ip_address(a), oif="eth2", neighbour=neighbour.get(a.replace(".", "_"),
                                                                     "REACHABLE"))
        for a in MEMBERS}
    return Topology(links, reach)


def test_collector_keys_look_up_every_member() -> None:
    s = spec.parse(SPEC, "t.yaml")
    assert sorted(str(a) for a, _ in plan.collector_keys(s)) == list(MEMBERS)


def test_a_failed_member_degrades_and_its_buckets_move_to_the_others() -> None:
    s = spec.parse(SPEC, "t.yaml")
    ok = plan.build(s, topo(), "nftables")
    assert [mp.state for mp in ok.mirrors] == ["active", "active"]
    failed = plan.build(s, topo(**{"192_0_2_51": "FAILED"}), "nftables")
    assert [mp.state for mp in failed.mirrors] == ["degraded", "degraded"]
    assert "192.0.2.51" in failed.mirrors[0].reason
    g0, g1 = groups_of(ok.mirrors)["sensors"], groups_of(failed.mirrors)["sensors"]
    for a, b in zip(g0.members, g1.members):
        if a.name != "192.0.2.51":
            assert set(a.buckets) <= set(b.buckets)
    assert not g1.members[1].buckets and not g1.members[1].alive
    since, lines = member_changes(groups_of(ok.mirrors), groups_of(failed.mirrors),
                                  {("sensors", m): 1.0 for m in MEMBERS}, 2.0)
    assert since == {("sensors", "192.0.2.50"): 1.0, ("sensors", "192.0.2.51"): 2.0,
                     ("sensors", "192.0.2.52"): 1.0}
    assert len(lines) == 1 and lines[0].startswith(
        f"collector sensors: member 192.0.2.51 FAILED (192.0.2.51 does not answer ARP/ND "
        f"(neighbour FAILED on eth2)): buckets {len(g0.members[1].buckets)} moved to ")
    back, lines = member_changes(groups_of(failed.mirrors), groups_of(ok.mirrors), since, 3.0)
    assert back[("sensors", "192.0.2.51")] == 3.0 and "is back" in lines[0]
    dead = plan.build(s, topo(**{a.replace(".", "_"): "FAILED" for a in MEMBERS}), "nftables")
    assert [mp.state for mp in dead.mirrors] == ["error", "error"]
    assert "every member unreachable" in dead.mirrors[0].reason
    assert dead.clones == ()


def test_one_lookup_per_packet_whatever_the_number_of_members() -> None:
    """A group of 2 or of 8: the same rules on the mirrored chains, one map each."""
    def rules(n: int) -> list[Any]:
        members = ", ".join(f"192.0.2.{50 + k}" for k in range(n))
        s = spec.parse(f"collectors:\n  g:\n    transport: clone\n    members: [{members}]\n"
                       "mirrors:\n  - {name: m, interfaces: [wan], collector: g}\n", "t.yaml")
        reach = {(a, None): Reach(a, oif="eth2", neighbour="REACHABLE")
                 for a, _ in plan.collector_keys(s)}
        p = plan.build(s, Topology({"wan": Link("wan", 2, True, None, 1, 1500)}, reach),
                       "nftables")
        objs = create("nftables").render(p).payload["ip"]
        return [o["rule"]["expr"] for o in objs if "rule" in o and o["rule"]["chain"] in
                ("in_wan", "out_wan")]
    for n in (2, 8):
        chain_rules = rules(n)
        assert len(chain_rules) == 2  # one rule per direction's chain
        for expr in chain_rules:
            maps = [e for e in expr if "vmap" in e]
            assert len(maps) == 1 and maps[0]["vmap"]["key"] == {"symhash": {"mod": BUCKETS}}
            jumps = {v["jump"]["target"] for _, v in maps[0]["vmap"]["data"]["set"]}
            assert len(jumps) == n


# -- status -----------------------------------------------------------------------------------
def test_status_json_table_and_prometheus_show_each_member() -> None:
    s = spec.parse(SPEC, "t.yaml")
    p = plan.build(s, topo(**{"192_0_2_51": "FAILED"}), "nftables")
    snap = Snapshot(spec=s, started=0.0, plan=p, topology=topo(), backend="nftables",
                    member_since={("sensors", "192.0.2.51"): 1_700_000_000.0})
    counts = {("_member_sensors_192.0.2.50", "member"): (7, 700),
              ("_member_sensors_192.0.2.52", "member"): (5, 500)}
    doc = build_status(snap, Reading(counts, {}), RateMeter())
    rows = doc["mirrors"][0]["members"]
    assert [(r["name"], r["state"], r["packets"]) for r in rows] == [
        ("192.0.2.50", "alive", 7), ("192.0.2.51", "dead", 0), ("192.0.2.52", "alive", 5)]
    assert rows[1]["since"] == "2023-11-14T22:13:20Z" and rows[1]["buckets"] == 0
    assert sum(r["buckets"] for r in rows) == BUCKETS
    table = format_table(doc)
    assert "member 192.0.2.51 dead since 2023-11-14T22:13:20Z" in table
    prom = format_prometheus(doc)
    assert 'mirrord_member_packets_total{collector="sensors",member="192.0.2.50"} 7' in prom
    assert 'mirrord_member_alive{collector="sensors",member="192.0.2.51"} 0' in prom
    # Two mirrors share the group: each member once.
    assert prom.count("mirrord_member_packets_total{") == 3
    assert any(f["code"] == "members-dead" for f in doc["findings"])


# -- the reconciler ---------------------------------------------------------------------------
def test_reconciler_applies_a_member_failure_once_logs_it_and_probes_the_dead(
        monkeypatch: Any, caplog: Any) -> None:
    import dataclasses
    import logging

    from mirrord.commands import offline_topology
    from mirrord.netlink import probe as probe_mod
    from mirrord.reconcile.ledger import CounterLedger
    from mirrord.reconcile.reconciler import PROBE_DEAD_EVERY, Reconciler
    from mirrord.reconcile.taps import TapPool
    from tests.unit.test_reconciler import FakeKernel

    probed: list[list[str]] = []
    monkeypatch.setattr(probe_mod, "probe", lambda addrs: probed.append([str(a) for a in addrs]))
    state = {"51": "REACHABLE"}

    def topology(sp: spec.Spec) -> Topology:
        t = offline_topology(sp)
        reach = {k: dataclasses.replace(r, oif="eth2", neighbour=state["51"]
                                        if str(k[0]) == "192.0.2.51" else "REACHABLE")
                 for k, r in t.reach.items()}
        return dataclasses.replace(t, reach=reach)

    class GroupKernel(FakeKernel):
        """The fake kernel, whose rendering also holds the buckets of each member."""

        def render(self, plan: Any) -> Any:
            out = super().render(plan)
            buckets = "\n".join(f"{m.name}: {m.buckets}" for r in plan.clones if r.group
                                for m in r.group.members)
            return dataclasses.replace(out, text=out.text + "\n" + buckets)

    s = spec.parse(SPEC, "t.yaml")
    k = GroupKernel()
    ledger = CounterLedger()
    r = Reconciler(s, topology, lambda _name: (k, ""), TapPool(ledger, watch=lambda fd, on: None),
                   ledger, make_tunnels=k.make_tunnels)
    out = r.reconcile(["start"], refresh_topology=True, force=True)
    assert out.look_again_in is None and probed == [[]]
    assert set(out.snapshot.member_since) == {("sensors", m) for m in MEMBERS}
    started = out.snapshot.member_since[("sensors", "192.0.2.51")]
    state["51"] = "FAILED"
    with caplog.at_level(logging.WARNING):
        out = r.reconcile(["neighbour: 192.0.2.51 FAILED"], refresh_topology=True)
    assert len(k.applied) == 2  # the failure: one apply
    assert out.look_again_in == PROBE_DEAD_EVERY and probed[-1] == ["192.0.2.51"]
    assert out.snapshot.member_since[("sensors", "192.0.2.51")] > started
    assert "member 192.0.2.51 FAILED" in caplog.text and "moved to 192.0.2." in caplog.text
    out = r.reconcile(["a fresh look"], refresh_topology=True)
    assert len(k.applied) == 2 and probed[-1] == []  # at most once a second
    state["51"] = "REACHABLE"
    out = r.reconcile(["neighbour: 192.0.2.51 REACHABLE"], refresh_topology=True)
    assert len(k.applied) == 3 and out.look_again_in is None
    assert k.applied[2] == k.applied[0]  # the buckets are back where they were


# -- TZSP groups: a tap per interface and live member, its share swapped in place ------------
TZSP_SPEC = SPEC.replace("transport: clone", "transport: tzsp")


def test_tzsp_group_taps_share_the_buckets_and_swap_filters_in_place(
        monkeypatch: Any) -> None:
    from mirrord.reconcile.ledger import CounterLedger
    from mirrord.reconcile.reconciler import Reconciler
    from mirrord.reconcile.taps import TapPool
    from mirrord.tzsp.job import TzspJob
    from tests.unit.test_reconciler import FakeHandle, FakeKernel

    monkeypatch.setattr("mirrord.netlink.probe.probe", lambda addrs: None)
    state = {"51": "REACHABLE"}

    def topology(sp: spec.Spec) -> Topology:
        return topo(**{"192_0_2_51": state["51"]})

    handles: list[FakeHandle] = []

    def make(tap: Any) -> FakeHandle:
        handles.append(FakeHandle(tap))
        return handles[-1]

    ledger = CounterLedger()
    pool = TapPool(ledger, watch=lambda fd, on: None, make_handle=make)
    k = FakeKernel()
    r = Reconciler(spec.parse(TZSP_SPEC, "t.yaml"), topology, lambda _name: (k, ""), pool,
                   ledger, make_tunnels=k.make_tunnels)
    out = r.reconcile(["start"], refresh_topology=True, force=True)
    p = out.snapshot.plan
    assert p is not None and p.clones == () and not k.applied
    # lan (wan, both ways) and dmz (in): one tap per interface and member.
    assert sorted((t.interface, str(t.destination)) for t in p.tzsp) == sorted(
        (i, m) for i in ("wan", "dmz") for m in MEMBERS)
    held = assign(MEMBERS, MEMBERS)
    for t in p.tzsp:
        assert t.member == str(t.destination) and t.buckets == held[t.member]
        assert TzspJob.from_tap(t).buckets == held[t.member]
    assert len(handles) == 6 and all(mp.state == "active" for mp in p.mirrors)
    for h in handles:
        h.sent, h.nbytes = 10, 1000
    # Member .51 dies: its taps stop, the others' filters take its buckets; no new tap.
    state["51"] = "FAILED"
    out = r.reconcile(["neighbour: 192.0.2.51 FAILED"], refresh_topology=True)
    gone = [h for h in handles if h.tap.member == "192.0.2.51"]
    assert len(handles) == 6 and all(h.stopped for h in gone)
    after = assign(MEMBERS, {"192.0.2.50", "192.0.2.52"})
    for h in handles:
        if h.tap.member != "192.0.2.51":
            assert not h.stopped and [j.buckets for j in h.retargets] == [after[h.tap.member]]
    assert {mp.state for mp in out.snapshot.plan.mirrors} == {"degraded"}  # type: ignore[union-attr]
    # Counts per member (both its taps): the dead member's banked when they stopped.
    doc = build_status(out.snapshot, r.read(), RateMeter())
    rows = {mb["name"]: mb for mb in doc["mirrors"][0]["members"]}  # type: ignore[typeddict-item]
    assert rows["192.0.2.51"]["state"] == "dead" and rows["192.0.2.50"]["packets"] == 20
    assert rows["192.0.2.51"]["packets"] == 20  # banked when its taps stopped
    # It comes back: new taps for it, the others get their old share back.
    state["51"] = "REACHABLE"
    r.reconcile(["neighbour: 192.0.2.51 REACHABLE"], refresh_topology=True)
    assert len(handles) == 8
    assert {h.tap.buckets for h in handles[6:]} == {held["192.0.2.51"]}
    for h in handles[:6]:
        if h.tap.member != "192.0.2.51":
            assert h.retargets[-1].buckets == held[h.tap.member]


def test_tzsp_group_members_run_in_one_capture_process_per_cpu() -> None:
    from mirrord.reconcile.ledger import CounterLedger
    from mirrord.reconcile.taps import TapPool

    pool = TapPool(CounterLedger(), watch=lambda fd, on: None)
    pool.lanes = 2
    p = plan.build(spec.parse(TZSP_SPEC, "t.yaml"), topo(), None)
    assert sorted({pool.lane(t) for t in p.tzsp}) == [0, 1]
    assert {pool.lane(t) for t in p.tzsp if t.member_index == 2} == {0}
    pool.lanes = 1
    assert {pool.lane(t) for t in p.tzsp} == {0}


def test_tzsp_group_reload_to_three_members_only_shrinks_the_old_members_shares() -> None:
    from mirrord.reconcile.ledger import CounterLedger
    from mirrord.reconcile.reconciler import Reconciler
    from mirrord.reconcile.taps import TapPool
    from tests.unit.test_reconciler import FakeHandle, FakeKernel

    handles: list[FakeHandle] = []

    def make(tap: Any) -> FakeHandle:
        handles.append(FakeHandle(tap))
        return handles[-1]

    two = TZSP_SPEC.replace(", 192.0.2.52]", "]")
    ledger = CounterLedger()
    k = FakeKernel()
    r = Reconciler(spec.parse(two, "t.yaml"), lambda sp: topo(), lambda _name: (k, ""),
                   TapPool(ledger, watch=lambda fd, on: None, make_handle=make), ledger,
                   make_tunnels=k.make_tunnels)
    r.reconcile(["start"], refresh_topology=True, force=True)
    assert len(handles) == 4  # 2 interfaces x 2 members
    before = {h.tap.member: set(h.tap.buckets or ()) for h in handles}
    r.reconcile(["reload"], refresh_topology=True, new_spec=spec.parse(TZSP_SPEC, "t.yaml"))
    new = handles[4:]
    assert len(new) == 2 and {h.tap.member for h in new} == {"192.0.2.52"}
    gained = set(new[0].tap.buckets or ())
    for h in handles[:4]:
        assert not h.stopped and h.retargets, "an old member's tap was replaced"
        after = set(h.retargets[-1].buckets)
        assert after <= before[h.tap.member]  # lost buckets, gained none
        assert before[h.tap.member] - after <= gained  # and only to the new member
    assert len(gained) == len(assign(MEMBERS, MEMBERS)["192.0.2.52"])
