"""Delivery points, the copied/left comparison, and the search for the rule that drops copies."""

from __future__ import annotations

import copy as copying
import ipaddress
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord import plan, spec
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology
from mirrord.observe.delivery import IN_FLIGHT, SETTLE, DeliveryMeter
from mirrord.observe.dropscan import Copy, find_drop
from mirrord.plan.model import DeliveryPoint

DATA = Path(__file__).parent / "data"
FW4 = json.loads((DATA / "fw4_output_reject.json").read_text())
A = ipaddress.ip_address


def build(tmp_path: Path, text: str, reach: dict[str, Reach]) -> plan.Plan:
    path = tmp_path / "mirrord.yaml"
    path.write_text(text)
    s = spec.load(str(path))
    names = ["br-lan", "wan", "col", "eth9"]
    links = {n: Link(n, i, True, None, ARPHRD_ETHER, 1500) for i, n in enumerate(names, 2)}
    topo = Topology(links, {(c.address, c.interface): reach[c.name]
                            for c in s.collectors.values() if c.address is not None})
    return plan.build(s, topo, "nftables")


SPEC = """\
collectors:
  near: {address: 203.0.113.10, transport: clone}
  near-too: {address: 203.0.113.11, transport: clone}
  far: {address: 198.51.100.77, transport: clone}
mirrors:
  - {name: a, interfaces: [br-lan], direction: both, collector: near}
  - {name: b, interfaces: [wan], direction: in, collector: near}
  - {name: c, interfaces: [wan], direction: out, collector: near-too}
  - {name: d, interfaces: [br-lan], direction: in, collector: far}
"""
REACH = {"near": Reach(A("203.0.113.10"), oif="col", neighbour="REACHABLE"),
         "near-too": Reach(A("203.0.113.11"), oif="col", neighbour="REACHABLE"),
         "far": Reach(A("198.51.100.77"), oif="eth9", gateway="192.0.2.254")}


def test_points_group_the_copies_that_leave_by_one_next_hop(tmp_path: Path) -> None:
    p = build(tmp_path, SPEC, REACH)
    by_name = {d.name: d for d in p.deliveries}
    # A clone collector behind a gateway is an error of its own (no rules): no point.
    assert set(by_name) == {"_clone_203.0.113.10", "_clone_203.0.113.11"}
    near = by_name["_clone_203.0.113.10"]
    assert near.feeds == (("a", "in"), ("a", "out"), ("b", "in")) and near.collectors == ("near",)
    assert by_name["_clone_203.0.113.11"].feeds == (("c", "out"),)
    assert near.describe() == "clones routed to 203.0.113.10"


def test_no_point_where_the_next_hop_is_unknown(tmp_path: Path) -> None:
    reach = {"near": Reach(A("203.0.113.10"), error="no route to host"),
             "near-too": Reach(A("203.0.113.11"), local=True),
             "far": REACH["far"]}
    assert build(tmp_path, SPEC, reach).deliveries == ()


# -- the meter ---------------------------------------------------------------------------
POINT = DeliveryPoint("clone", A("203.0.113.10"), feeds=(("m", "in"), ("m", "out")))


def counts(copied_in: int, copied_out: int, left: int) -> dict[tuple[str, str], tuple[int, int]]:
    return {("m", "in"): (copied_in, 0), ("m", "out"): (copied_out, 0), POINT.key: (left, left * 10)}


def test_meter_judges_the_copies_since_the_last_query_that_saw_any() -> None:
    m = DeliveryMeter()
    (d,) = m.assess((POINT,), counts(0, 0, 0), 100.0, 50.0).values()
    assert d.verdict == "idle"
    (d,) = m.assess((POINT,), counts(60, 40, 100), 101.0, 50.0).values()
    assert (d.verdict, d.copied, d.left, d.left_bytes) == ("leaving", 100, 100, 1000)
    (d,) = m.assess((POINT,), counts(160, 40, 101), 102.0, 50.0).values()
    assert (d.verdict, d.lost, d.window_copied, d.since) == ("dropped", 99, 100, 101.0)
    # No new copies: the last verdict stands (the firewall may still drop).
    (d,) = m.assess((POINT,), counts(160, 40, 101), 103.0, 50.0).values()
    assert d.verdict == "dropped"
    (d,) = m.assess((POINT,), counts(170, 40, 111), 104.0, 50.0).values()
    assert d.verdict == "leaving" and d.lost == 0


def test_meter_allows_copies_still_on_their_way() -> None:
    m = DeliveryMeter()
    (d,) = m.assess((POINT,), counts(10, 0, 10 - IN_FLIGHT), 1.0, 0.0).values()
    assert d.verdict == "leaving"
    (d,) = m.assess((POINT,), counts(20, 0, 20 - IN_FLIGHT - 1 - 10), 2.0, 0.0).values()
    assert d.verdict == "dropped"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=12))
def test_meter_never_reports_a_drop_when_every_copy_left(steps: list[tuple[int, int]]) -> None:
    m = DeliveryMeter()
    copied = 0
    for t, (more, _) in enumerate(steps):
        copied += more
        (d,) = m.assess((POINT,), counts(copied, 0, copied), float(t), 0.0).values()
        assert d.verdict in ("leaving", "idle") and d.lost == 0


# -- the rule that drops them ---------------------------------------------------------
CLONE = Copy(4, "col", ct_state="untracked")


def test_fw4_zone_reject_is_named_with_its_zone() -> None:
    c = find_drop(FW4, CLONE, 500)
    assert c is not None and c.certain
    assert (c.table, c.chain, c.handle, c.verdict, c.zone) == (
        "fw4", "reject_to_collector", 9, "reject", "collector")
    assert c.describe().startswith("table inet fw4 chain reject_to_collector rule handle 9 (reject)")


def test_other_devices_and_tracked_replies_are_not_dropped() -> None:
    assert find_drop(FW4, Copy(4, "wan", ct_state="untracked"), 500) is None
    # An established flow is accepted by the ct state vmap before the zone jump.
    assert find_drop(FW4, Copy(4, "col", ct_state="established"), 500) is None
    assert find_drop(FW4, Copy(4, "col", ct_state="untracked"), -10) is None  # chain too late


def _rule(chain: str, handle: int, *expr: Any, family: str = "inet",
          table: str = "t") -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": chain, "handle": handle,
                     "expr": list(expr)}}


def _base(name: str, hook: str, prio: int, policy: str = "accept", family: str = "inet",
          table: str = "t") -> dict[str, Any]:
    return {"chain": {"family": family, "table": table, "name": name, "type": "filter",
                      "hook": hook, "prio": prio, "policy": policy}}


def _oif(name: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": "oifname"}}, "right": name}}


def test_a_policy_drop_of_postrouting_is_named() -> None:
    rs = {"nftables": [_base("post", "postrouting", 100, "drop"),
                       _rule("post", 2, _oif("wan"), {"accept": None})]}
    c = find_drop(rs, CLONE, 500)
    assert c is not None and c.handle is None and c.verdict == "policy drop" and c.certain
    assert "policy drop" in c.describe()


def test_unknown_matches_make_a_possible_culprit_only() -> None:
    mark = {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 5}}
    named = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": "@blocked"}}
    rs = {"nftables": [_base("out", "output", 0),
                       _rule("out", 3, mark, {"drop": None}),
                       _rule("out", 4, named, {"drop": None})]}
    c = find_drop(rs, Copy(4, "col", "new", 17, "192.0.2.5", 4789), 500)
    assert c is not None and not c.certain and c.handle == 3
    assert c.describe().startswith("probably ")


def test_hooks_in_kernel_order_and_chains_of_the_other_family_ignored() -> None:
    rs = {"nftables": [
        _base("late", "postrouting", 0, family="ip"),
        _rule("late", 2, {"drop": None}, family="ip"),
        _base("early", "output", 10, family="ip"),
        _rule("early", 5, {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                                     "right": "udp"}}, {"reject": None}, family="ip"),
        _base("six", "output", -100, family="ip6"),
        _rule("six", 7, {"drop": None}, family="ip6"),
    ]}
    c = find_drop(rs, Copy(4, "col", "new", 17, "192.0.2.5", 4789), 500)
    assert c is not None and (c.chain, c.handle, c.certain) == ("early", 5, True)
    c = find_drop(rs, Copy(4, "col", "new", 6, "192.0.2.5", 80), 500)
    assert c is not None and (c.chain, c.handle) == ("late", 2)


def test_vmap_goto_return_and_prefixes() -> None:
    rs = {"nftables": [
        _base("out", "output", 0),
        _rule("out", 2, {"vmap": {"key": {"meta": {"key": "oifname"}}, "data": {"set": [
            ["lan*", {"accept": None}], ["col", {"goto": {"target": "to_col"}}]]}}}),
        _rule("out", 3, {"drop": None}),
        {"chain": {"family": "inet", "table": "t", "name": "to_col"}},
        _rule("to_col", 4, {"match": {"op": "==", "left": {"payload": {
            "protocol": "ip", "field": "daddr"}}, "right": {"prefix": {
                "addr": "203.0.113.0", "len": 24}}}}, {"return": None}),
        _rule("to_col", 5, {"reject": None}),
    ]}
    # goto: the return in to_col ends `out` as well, the drop after it is not reached.
    assert find_drop(rs, Copy(4, "col", "new", 17, "203.0.113.10", 4789), 500) is None
    c = find_drop(rs, Copy(4, "col", "new", 17, "198.51.100.10", 4789), 500)
    assert c is not None and c.handle == 5
    assert find_drop(rs, Copy(4, "lan1", "new", 17, "198.51.100.10", 4789), 500) is None
    c = find_drop(rs, Copy(4, "wan", "new", 17, "198.51.100.10", 4789), 500)
    assert c is not None and c.handle == 3


def test_jump_loops_and_garbage_end() -> None:
    rs = {"nftables": [_base("out", "output", 0),
                       _rule("out", 2, {"jump": {"target": "out"}}),
                       {"rule": {"family": "inet", "table": "t", "chain": "out", "expr": None}},
                       {"rule": "x"}, 7, {"chain": {"family": "inet", "hook": "output",
                                                     "prio": "x", "name": "odd", "table": "t"}}]}
    assert find_drop(rs, CLONE, 500) is None


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["match", "left", "right", "op", "meta", "key", "vmap", "data", "set",
                         "jump", "goto", "target", "drop", "prefix", "payload", "ct"]),
        inner, max_size=4), max_leaves=20))
def test_any_rule_expression_is_survived(expr: Any) -> None:
    rs = copying.deepcopy(FW4)
    rs["nftables"].append(_rule("output", 99, expr, table="fw4"))
    rs["nftables"].append(_rule("output", 100, *(expr if isinstance(expr, list) else [expr]),
                                table="fw4"))
    find_drop(rs, CLONE, 500)
    find_drop(rs, Copy(6, None, None, None, None, None), 500)


def test_a_window_never_spans_an_apply_of_mirrords_own() -> None:
    m = DeliveryMeter()
    (d,) = m.assess((POINT,), counts(10, 0, 10), 1.0, 0.0, epoch=1).values()
    assert d.verdict == "leaving"
    # Rules gone for a while (a deleted tunnel, a flushed table): copies were
    # counted and lost; the heal (epoch 2) explains them, not a firewall.
    (d,) = m.assess((POINT,), counts(50, 0, 20), 2.0, 0.0, epoch=2).values()
    assert d.verdict == "idle"
    # The new rules settle (a tunnel device comes up): losses are the heal's.
    (d,) = m.assess((POINT,), counts(55, 0, 21), 2.0 + SETTLE / 2, 0.0, epoch=2).values()
    assert d.verdict == "idle"
    (d,) = m.assess((POINT,), counts(65, 0, 31), 3.0 + SETTLE, 0.0, epoch=2).values()
    assert d.verdict == "leaving" and d.window_copied == 10
    (d,) = m.assess((POINT,), counts(75, 0, 31), 4.0 + SETTLE, 0.0, epoch=2).values()
    assert d.verdict == "dropped" and d.lost == 10


def test_the_settling_after_an_apply_is_timed_on_the_monotonic_clock() -> None:
    m = DeliveryMeter()
    m.assess((POINT,), counts(10, 0, 10), 1000.0, 0.0, epoch=1, mono=5.0)
    (d,) = m.assess((POINT,), counts(50, 0, 20), 1001.0, 0.0, epoch=2, mono=6.0).values()
    assert d.verdict == "idle"
    # The wall clock steps back an hour (NTP at boot) while the new rules
    # settle: still settling, and the windows' `since` stays wall clock.
    (d,) = m.assess((POINT,), counts(60, 0, 30), 1002.0 - 3600, 0.0, epoch=2,
                    mono=6.0 + SETTLE / 2).values()
    assert d.verdict == "idle"
    (d,) = m.assess((POINT,), counts(70, 0, 30), 1003.0 - 3600, 0.0, epoch=2,
                    mono=7.0 + SETTLE).values()
    assert d.verdict == "dropped" and d.lost == 10 and d.since == 1002.0 - 3600
    # Stepping forward does not cut the settling short either.
    m.assess((POINT,), counts(80, 0, 40), 9999.0, 0.0, epoch=3, mono=20.0)
    (d,) = m.assess((POINT,), counts(90, 0, 40), 99999.0, 0.0, epoch=3,
                    mono=20.0 + SETTLE / 2).values()
    assert d.verdict == "idle"
