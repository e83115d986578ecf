"""Every health finding, provoked once against the real kernel and reported by status."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.lab import COLLECTOR, LAN_HOST, WAN_HOST, Lab, have_root_netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]


def spec(collector: str, interfaces: str = "[br-lan]", extra: str = "", transport: str = "auto",
         backend: str = "auto") -> str:
    return f"""\
backend: {backend}
collectors:
  ids:
    address: {collector}
    transport: {transport}
mirrors:
  - name: m
    interfaces: {interfaces}
    direction: both
    collector: ids
{extra}"""


def status_with_code(lab: Lab) -> tuple[int, dict[str, Any]]:
    p = lab.mirrord("status", "--json", "--socket", lab.socket_path())
    return p.returncode, json.loads(p.stdout)


def codes(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["code"]: f for f in status["findings"]}


def test_flow_offloading_in_openwrt_config(tmp_path: Path) -> None:
    uci = tmp_path / "firewall"
    uci.write_text("config defaults\n\toption input 'ACCEPT'\n\toption flow_offloading '1'\n"
                   "\toption flow_offloading_hw '0'\n")
    with Lab() as lab:
        lab.start_daemon(lab.write_spec(spec(COLLECTOR)), env={"MIRRORD_UCI_FIREWALL": str(uci)})
        rc, st = status_with_code(lab)
        f = codes(st)["flow-offload"]
        assert "flow_offloading" in f["what"] and str(uci) in f["what"]
        assert "flow_offloading='0'" in f["fix"]
        # A warning: the mirror itself is active, monitoring does not fail on it.
        assert st["mirrors"][0]["state"] == "active" and rc == 0
        human = lab.mirrord("status", "--socket", lab.socket_path()).stdout
        assert "WARNING: flow offloading is enabled" in human and "fix: uci set" in human
        uci.write_text("config defaults\n\toption flow_offloading '0'\n")
        assert "flow-offload" not in codes(status_with_code(lab)[1])


def test_missing_kernel_support_names_what_to_install() -> None:
    # This kernel has no ROUTE target: the real refusal of a missing module.
    with Lab() as lab:
        lab.start_daemon(lab.write_spec(spec(COLLECTOR, backend="route-tee")))
        rc, st = status_with_code(lab)
        f = codes(st)["backend-missing"]
        assert f["severity"] == "error" and "ROUTE" in f["what"]
        assert st["mirrors"][0]["state"] == "error" and "ROUTE" in st["mirrors"][0]["reason"]
        assert rc == 1
        prom = lab.mirrord("status", "--prometheus", "--socket", lab.socket_path()).stdout
        assert 'mirrord_findings{code="backend-missing"} 1' in prom
        assert 'mirrord_mirror_state{mirror="m",state="error"} 1' in prom


def test_interface_absent_is_reported_and_clears() -> None:
    with Lab() as lab:
        lab.start_daemon(lab.write_spec(spec(COLLECTOR, interfaces="[br-lan, eth7]")))
        rc, st = status_with_code(lab)
        f = codes(st)["interface-absent"]
        assert "eth7 does not exist" in f["what"] and "ip link" in f["fix"]
        assert st["mirrors"][0]["state"] == "degraded" and rc == 1
        lab.rtr.sh("ip link add eth7 type veth peer name eth7p; ip link set eth7 up; "
                   "ip link set eth7p up")
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active")
        assert "interface-absent" not in codes(st)


def test_collector_neighbour_failed_degrades_the_mirror() -> None:
    ghost = "203.0.113.99"  # on the collector's segment, answered by nobody
    with Lab() as lab:
        # Resolution gives up after one probe of 100 ms instead of three of 1 s.
        lab.rtr.sh("sysctl -qw net.ipv4.neigh.col.mcast_solicit=1 "
                   "net.ipv4.neigh.col.retrans_time_ms=100")
        lab.start_daemon(lab.write_spec(spec(ghost, transport="clone")))
        # (No "active" check here: the new LAN host's own IGMP reports are
        # cloned too and may already have made the kernel give up on the ghost.)
        # Copies to the ghost make the kernel try to resolve it, and fail.
        lab.ping(lab.lan, WAN_HOST, 5, interval=0.05)
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "degraded",
                                 timeout=10)
        assert "neighbour FAILED" in st["mirrors"][0]["reason"]
        f = codes(st)["collector-neighbour-failed"]
        assert ghost in f["what"] and f"ip neigh show {ghost}" in f["fix"]
        assert status_with_code(lab)[0] == 1


def test_collector_reached_through_a_mirrored_interface() -> None:
    with Lab() as lab:
        lab.start_daemon(lab.write_spec(spec(LAN_HOST)))
        rc, st = status_with_code(lab)
        f = codes(st)["collector-via-mirrored-interface"]
        assert "br-lan" in f["what"] and f["severity"] == "warning"
        assert st["mirrors"][0]["state"] == "active" and rc == 0
        # The collector's own traffic is not copied back to it.
        lab.count_at_collector({"own": f"ip saddr {LAN_HOST} icmp type echo-request"},
                               ns=lab.lan)
        lab.ping(lab.lan, WAN_HOST, 5, interval=0.02)
        time.sleep(0.2)
        assert lab.collector_counts(ns=lab.lan)["own"] == 0


def test_clone_mirror_on_a_bridge_port_is_an_error_with_its_fix() -> None:
    # lan0 is a port of br-lan (as lan1..lan4 are on OpenWrt with DSA).
    with Lab() as lab:
        lab.start_daemon(lab.write_spec(spec(COLLECTOR, interfaces="[lan0]", transport="clone")))
        rc, st = status_with_code(lab)
        m = st["mirrors"][0]
        assert m["state"] == "error" and "port of br-lan" in m["reason"] and rc == 1
        f = codes(st)["bridge-port"]
        assert "lan0 is a port of br-lan" in f["what"] and "transport: tzsp" in f["fix"]
        # And it really copies nothing, which is why it is an error.
        lab.count_at_collector({"req": "icmp type echo-request"})
        lab.ping(lab.lan, WAN_HOST, 5, interval=0.02)
        time.sleep(0.2)
        assert lab.collector_counts()["req"] == 0
