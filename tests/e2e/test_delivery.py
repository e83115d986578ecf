"""Delivery truth: status counts what left the router, next to what was copied.

A firewall rule in the output path (fw4's zone output REJECT towards the
collector's zone, here written as fw4 writes it) drops every clone after
mirrord's rule counted it. Status must say `degraded` with a finding naming
the rule, and count what left exactly as the collector's own kernel counts
what arrived.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.e2e.test_frames import frames_spec
from tests.harness.lab import WAN_HOST, Lab, have_root_netns, spec_text

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

PORT = 5555
BATCH = 100

# fw4's shape for a zone "collector" on device col with `option output REJECT`
# (the chain names, the jump from output, the reject rule in reject_to_*).
FW4_REJECT = """\
table inet fw4 {
  chain output {
    type filter hook output priority filter; policy accept;
    oif "lo" accept comment "!fw4: Accept traffic towards loopback"
    ct state vmap { established : accept, related : accept } comment "!fw4: Handle outbound flows"
    oifname "col" jump output_collector comment "!fw4: Handle collector IPv4/IPv6 output traffic"
  }
  chain output_collector {
    jump reject_to_collector
  }
  chain reject_to_collector {
    oifname "col" counter reject comment "!fw4: reject collector IPv4/IPv6 traffic"
  }
}
"""


def mirror(st: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = st["mirrors"][0]
    return m


def delivery(st: dict[str, Any]) -> dict[str, Any]:
    (d,) = mirror(st)["delivery"]
    return dict(d)


def send(lab: Lab, first: int) -> None:
    lab.udp_send(lab.lan, WAN_HOST, PORT, BATCH, rate=1000, payload=f"b{first}")


def wait_copied(lab: Lab, n: int) -> dict[str, Any]:
    return lab.wait_for_status(lambda s: delivery(s)["copied"] >= n)


def handle_of(lab: Lab, chain: str) -> int:
    out = lab.rtr.run("nft", "-a", "list", "chain", "inet", "fw4", chain).stdout
    m = re.search(r"counter packets.* reject .*# handle (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_clones_rejected_by_a_zone_output_policy_are_reported(lab: Lab) -> None:
    lab.count_at_collector({"every": f"udp dport {PORT}"})
    lab.start_daemon(lab.write_spec(spec_text("nftables", direction="in",
                                              match=f"{{protocol: udp, dport: {PORT}}}")))
    # Positive control: without the reject every copy leaves, and status's
    # count of what left is the collector's count of what arrived.
    send(lab, 0)
    st = wait_copied(lab, BATCH)
    lab.wait_for_status(lambda s: delivery(s)["left"] == lab.collector_counts()["every"] == BATCH)
    st = lab.status() or {}
    d = delivery(st)
    assert (d["copied"], d["left"], d["verdict"]) == (BATCH, BATCH, "leaving")
    assert d["via"] == f"clones routed to {lab.collector}" and d["collectors"] == ["ids"]
    assert mirror(st)["state"] == "active" and st["reapplies"] == 0
    assert "copies-dropped" not in {f["code"] for f in st["findings"]}

    lab.rtr.run("nft", "-f", "-", input=FW4_REJECT)
    handle = handle_of(lab, "reject_to_collector")
    send(lab, BATCH)
    # The first query that sees the new copies says what happened to them.
    st = wait_copied(lab, 2 * BATCH)
    d = delivery(st)
    assert d["verdict"] == "dropped" and d["lost"] >= BATCH - 2, d
    assert d["left"] == BATCH == lab.collector_counts()["every"]
    m = mirror(st)
    assert m["state"] == "degraded" and "did not leave through col" in m["reason"], m
    (f,) = [f for f in st["findings"] if f["code"] == "copies-dropped"]
    assert f["severity"] == "error" and f["mirror"] == "m"
    assert (f"table inet fw4 chain reject_to_collector rule handle {handle} (reject)"
            in f["what"]), f["what"]
    assert "fw4 zone collector" in f["what"] and "probably" not in f["what"]
    assert "zone's output to ACCEPT" in f["fix"]
    code = lab.mirrord("status", "--socket", lab.socket_path()).returncode
    assert code != 0
    prom = lab.mirrord("status", "--prometheus", "--socket", lab.socket_path()).stdout
    assert f"mirrord_delivery_left_packets_total{{via=\"clones routed to {lab.collector}\"," \
           f"collectors=\"ids\"}} {BATCH}" in prom, prom

    # The firewall lets them through again: the next copies leave, the
    # mirror is active again, and the counts still match the collector's.
    lab.rtr.run("nft", "delete", "table", "inet", "fw4")
    send(lab, 2 * BATCH)
    st = wait_copied(lab, 3 * BATCH)
    st = lab.wait_for_status(lambda s: delivery(s)["left"] == 2 * BATCH)
    assert delivery(st)["verdict"] == "leaving" and mirror(st)["state"] == "active"
    assert lab.collector_counts()["every"] == 2 * BATCH
    assert "copies-dropped" not in {f["code"] for f in st["findings"]}


def test_vxlan_outer_packets_dropped_in_output_are_reported(lab: Lab) -> None:
    lab.count_at_collector({"outer": "udp dport 4789"})
    lab.start_daemon(lab.write_spec(frames_spec("vxlan", direction="in",
                                                match=f"{{protocol: udp, dport: {PORT}}}")))
    send(lab, 0)
    st = lab.wait_for_status(
        lambda s: delivery(s)["left"] == lab.collector_counts()["outer"] == BATCH)
    assert mirror(st)["state"] == "active" and st["reapplies"] == 0
    lab.rtr.run("nft", "-f", "-", input=(
        "table inet filter {\n chain out {\n  type filter hook output priority 0; "
        "policy accept;\n  udp dport 4789 counter drop\n }\n}\n"))
    send(lab, BATCH)
    st = wait_copied(lab, 2 * BATCH)
    d = delivery(st)
    assert d["verdict"] == "dropped" and d["via"] == f"VXLAN datagrams to {lab.collector} port 4789"
    assert d["left"] == BATCH == lab.collector_counts()["outer"]
    assert mirror(st)["state"] == "degraded"
    (f,) = [f for f in st["findings"] if f["code"] == "copies-dropped"]
    assert "table inet filter chain out rule handle" in f["what"] and "(drop)" in f["what"]
    assert "nft insert rule inet filter out ip daddr" in f["fix"]
