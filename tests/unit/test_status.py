"""Status rendering and health helpers (the control socket: test_control.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirrord.observe.health import _has_flow_add, uci_offloading
from mirrord.observe.status import format_prometheus, format_table, healthy
from mirrord.service.daemon import summarize

STATUS: dict[str, Any] = {
    "version": "0.1.0", "pid": 42, "backend": "nftables", "summary": "2 mirror(s)",
    "reapplies": 3,
    "mirrors": [
        {"name": "lan", "state": "active", "reason": "", "transport": "clone",
         "direction": "both", "packets": 30, "bytes": 3000,
         "collector": {"name": "ids", "address": "192.0.2.50", "reach": "on-link dev br-lan"},
         "directions": {"in": {"packets": 10, "bytes": 1000}, "out": {"packets": 20, "bytes": 2000}},
         "tzsp": [], "rate": {"interval": 2.0, "pps": 5.0, "bps": 400.0}, "last_heal": None},
        {"name": 'odd"name', "state": "waiting", "reason": "interface eth9 does not exist",
         "transport": "tzsp", "direction": "in", "packets": 7, "bytes": 700,
         "collector": {"name": "far", "address": "203.0.113.5", "reach": "routed via x"},
         "directions": {},
         "tzsp": [{"interface": "wan", "captured": 8, "sent": 7, "ring_drops": 1,
                   "send_errors": 0, "truncated": 0, "oversize": 2},
                  {"interface": "wan", "member": "192.0.2.51", "captured": 3, "sent": 3,
                   "ring_drops": 0, "send_errors": 0, "truncated": 0, "oversize": 0}],
         "rate": None, "last_heal": None},
    ],
    "findings": [{"code": "interface-absent", "severity": "warning", "what": "eth9 absent",
                  "fix": "check it"}],
}


def test_prometheus_exposition() -> None:
    text = format_prometheus(STATUS)
    lines = text.splitlines()
    assert "mirrord_up 1" in lines
    assert 'mirrord_mirror_packets_total{mirror="lan",direction="in",transport="clone"} 10' in lines
    assert 'mirrord_mirror_bytes_total{mirror="lan",direction="out",transport="clone"} 2000' in lines
    # TZSP mirrors have one total; label values are escaped.
    assert 'mirrord_mirror_packets_total{mirror="odd\\"name",direction="in",transport="tzsp"} 7' in lines
    assert 'mirrord_mirror_state{mirror="odd\\"name",state="waiting"} 1' in lines
    assert 'mirrord_tzsp_errors_total{mirror="odd\\"name",interface="wan",cause="ring_drops"} 1' in lines
    assert 'mirrord_tzsp_oversize_total{mirror="odd\\"name",interface="wan"} 2' in lines
    # A group member's tap on the same interface: its own series, by member.
    assert ('mirrord_tzsp_errors_total{mirror="odd\\"name",interface="wan",member="192.0.2.51",'
            'cause="ring_drops"} 0') in lines
    samples = [ln.rsplit(" ", 1)[0] for ln in lines if not ln.startswith("#")]
    assert len(samples) == len(set(samples)), "a series twice"
    assert "mirrord_reapplies_total 3" in lines
    assert 'mirrord_findings{code="interface-absent"} 1' in lines
    # Every sample's metric has exactly one HELP and one TYPE line before it.
    for metric in {ln.split("{")[0].split(" ")[0] for ln in lines if not ln.startswith("#")}:
        assert lines.count(f"# TYPE {metric} counter") + lines.count(f"# TYPE {metric} gauge") == 1
    assert text.endswith("\n")


def test_prometheus_when_the_daemon_is_down() -> None:
    assert format_prometheus(None).splitlines()[-1] == "mirrord_up 0"


def test_table_and_health() -> None:
    text = format_table(STATUS)
    assert "lan" in text and "active" in text and "interface eth9 does not exist" in text
    assert "tzsp wan: captured 8, sent 7, ring drops 1" in text and "oversize 2" in text
    assert "tzsp wan -> 192.0.2.51: captured 3" in text
    assert "5.0 pkt/s over 2.0s" in text and "ring drops 1" in text
    assert "WARNING: eth9 absent" in text and "fix: check it" in text
    assert not healthy(STATUS)  # a mirror waits
    ok = {**STATUS, "mirrors": [STATUS["mirrors"][0]]}
    assert healthy(ok)  # a warning finding alone does not fail monitoring
    bad = {**ok, "findings": [{"code": "x", "severity": "error", "what": "w", "fix": "f"}]}
    assert not healthy(bad)


def test_uci_flow_offloading(tmp_path: Path) -> None:
    f = tmp_path / "firewall"
    f.write_text("config defaults\n\toption syn_flood\t1\n\toption flow_offloading '1'\n"
                 "\toption flow_offloading_hw \"1\"\n\nconfig zone\n\toption flow_offloading '1'\n")
    assert uci_offloading(str(f)) == ["flow_offloading", "flow_offloading_hw"]
    f.write_text("config defaults\n\toption flow_offloading '0'\n")
    assert uci_offloading(str(f)) == []
    assert uci_offloading(str(tmp_path / "missing")) == []


def test_flow_add_statement_detection() -> None:
    # The JSON nft prints for `meta l4proto { tcp, udp } flow add @ft` (fw4).
    rule = [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                       "right": {"set": ["tcp", "udp"]}}},
            {"flow": {"op": "add", "flowtable": "@ft"}}]
    assert _has_flow_add(rule)
    assert not _has_flow_add([{"counter": {"packets": 1, "bytes": 2}}, {"accept": None}])


def test_summarize_folds_bursts() -> None:
    assert summarize(["a"]) == "a"
    assert summarize(["rule deleted: ip mirrord", "chain deleted: ip mirrord",
                      "table deleted: ip mirrord", "chain deleted: ip mirrord"]) == (
        "table deleted: ip mirrord, chain deleted: ip mirrord (+1 more)")




def test_ring_drops_are_a_finding_naming_the_fix() -> None:
    from mirrord.observe.health import tzsp_findings

    row = {"name": "wan", "collector": {"name": "ids"},
           "tzsp": [{"interface": "wan", "ring_drops": 0}, {"interface": "lan1", "ring_drops": 37}]}
    (f,) = tzsp_findings([row])
    assert (f.code, f.severity, f.mirror) == ("tzsp-ring-drops", "warning", "wan")
    assert "lan1 dropped 37 frame(s)" in f.what and "ring_mib on collector ids" in f.fix
    assert tzsp_findings([{**row, "tzsp": [{"interface": "wan", "ring_drops": 0}]}]) == []


def _worker(interface: str, state: str, **counters: int) -> Any:
    return {"interface": interface, "id": 1, "pid": 7, "state": state,
            "running": state != "exited", "exit_reason": "killed" if state == "exited" else None,
            "restart_in": 0.5 if state == "exited" else None, **counters}


@pytest.mark.parametrize(("plan", "taps", "want"), [
    ("active", [("a", "running", 3, 0), ("b", "running", 1, 0)], "active"),
    ("active", [("a", "starting", 0, 0)], "starting"),
    ("active", [("a", "not started", 0, 0)], "starting"),
    ("active", [("a", "running", 3, 0), ("b", "starting", 0, 0)], "starting"),
    ("degraded", [("a", "starting", 0, 0)], "degraded"),  # the plan's degraded stays
    ("active", [("a", "exited", 0, 0)], "error"),
    ("active", [("a", "exited", 0, 0), ("b", "starting", 0, 0)], "degraded"),
    ("active", [("a", "exited", 0, 0), ("b", "running", 5, 0)], "degraded"),
    ("active", [("a", "running", 0, 4)], "error"),  # every send refused
    ("active", [("a", "running", 0, 4), ("b", "running", 2, 0)], "degraded"),
    ("active", [("a", "running", 2, 4)], "active"),  # some get through: a finding, not a state
])
def test_tzsp_state_from_the_taps(plan: Any, taps: list[tuple[str, str, int, int]],
                                  want: str) -> None:
    from mirrord.observe.status import tzsp_state

    workers = [_worker(i, s, sent=sent, send_errors=errors) for i, s, sent, errors in taps]
    state, reason = tzsp_state(plan, "the plan's reason" if plan != "active" else "", workers,
                               "192.0.2.9:37008")
    assert state == want, reason
    assert (reason == "") == (state == "active")
    if plan != "active":
        assert reason.endswith("the plan's reason")
    for i, s, sent, errors in taps:
        if s == "exited":
            assert f"TZSP capture on {i} stopped (killed), restarting in 0.5 s" in reason
        elif s != "running":
            assert f"TZSP capture on {i} starting (not capturing yet)" in reason
        elif errors and not sent:
            assert f"every TZSP datagram from {i} to 192.0.2.9:37008 failed to send" in reason
