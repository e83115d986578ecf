"""`mirrord trace` against the real kernel, in the namespace lab.

The router runs the real daemon (its nft rules, comments and dup), the LAN host
pings the WAN host, and `mirrord trace` runs in the router namespace. Every
test also checks that the router's ruleset afterwards is exactly what it was
before, whichever way the trace ended.
"""

from __future__ import annotations

import json
import signal
from typing import Any, Iterator

import pytest

from tests.harness.lab import (
    COLLECTOR,
    LAN_HOST,
    RTR_LAN,
    WAN_HOST,
    WAN_HOST6,
    Lab,
    have_root_netns,
)
from tests.harness.trace import finish, has_table, start_trace
from tests.harness.wait import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

SPEC = f"""
collectors:
  ids:
    address: {COLLECTOR}
    transport: clone
mirrors:
  - name: lan-icmp
    interfaces: br-lan
    direction: both
    collector: ids
    match:
      protocol: icmp
"""


def ruleset(lab: Lab) -> str:
    # Stateless: the mirror's counters move while we ping; the rules must not.
    return lab.rtr.run("nft", "-s", "list", "ruleset").stdout


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        spec = lab.write_spec(SPEC)
        lab.start_daemon(spec, wait_active=False)
        wait_until(lambda: has_table(lab, "ip", "mirrord"), 20,
                   what=lambda: f"the daemon to create table ip mirrord:\n{lab.daemon_log()}")
        yield lab


@pytest.fixture
def before(lab: Lab) -> Iterator[str]:
    """The ruleset before the test, compared with the one after it."""
    assert not has_table(lab, "inet", "mirrord_trace")
    rules = ruleset(lab)
    assert "mirrord lan-icmp in" in rules
    yield rules
    assert not has_table(lab, "inet", "mirrord_trace")
    assert ruleset(lab) == rules


def packets(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_matching_packet_shows_the_mirror_rule(lab: Lab, before: str) -> None:
    p = start_trace(lab, "-c", lab.write_spec(SPEC), "--mirror", "lan-icmp", "--count", "1",
                    "--timeout", "20", "--json")
    lab.ping(lab.lan, WAN_HOST, 3, interval=0.2)
    rc, out, err = finish(p)
    assert rc == 0, err
    (pkt,) = packets(out)
    assert pkt["in"] == "br-lan" and pkt["out"] == "wan"
    assert pkt["headers"]["src"] == LAN_HOST and pkt["headers"]["dst"] == WAN_HOST
    assert pkt["headers"]["protocol"] == "icmp"
    assert pkt["headers"]["info"].startswith("echo-request")
    assert pkt["mirrored"] == [{"mirror": "lan-icmp", "direction": "in", "to": COLLECTOR,
                                "device": None}]
    dup = [e for e in pkt["events"] if e.get("mirror")]
    assert len(dup) == 1
    assert (dup[0]["table"], dup[0]["family"], dup[0]["verdict"]) == ("mirrord", "ip", "continue")
    assert "dup to " + COLLECTOR in dup[0]["rule"]
    # The clone the rule made leaves towards the collector.
    assert dup[0]["copy"]["out"] == "col"
    assert "1 packet(s) traced (count reached)" in err


def test_text_output_marks_the_copy(lab: Lab, before: str) -> None:
    p = start_trace(lab, "--protocol", "icmp", "--interface", "br-lan", "--direction", "in",
                    "--count", "2", "--timeout", "20")
    lab.ping(lab.lan, WAN_HOST, 4, interval=0.2)
    rc, out, err = finish(p)
    assert rc == 0, err
    heads = [line for line in out.splitlines() if line.startswith("#")]
    assert len(heads) == 2
    for n, head in enumerate(heads, 1):
        assert head.startswith(f"#{n} ")
        assert f"IN=br-lan OUT=wan {LAN_HOST} > {WAN_HOST} ICMP echo-request" in head
        assert head.endswith("=> mirrored by lan-icmp (in)")
    assert out.count(f"[mirror lan-icmp in: copied to {COLLECTOR}]") == 2
    assert out.count("copy out col:") == 2
    # Replies come in on wan: not selected by `in on br-lan`.
    assert "echo-reply" not in out


def test_non_matching_traffic_shows_nothing(lab: Lab, before: str) -> None:
    p = start_trace(lab, "--protocol", "udp", "--dport", "9", "--count", "1", "--timeout", "3")
    lab.ping(lab.lan, WAN_HOST, 3, interval=0.2)
    lab.udp_send(lab.lan, WAN_HOST, 10, 3, rate=20)
    rc, out, err = finish(p)
    assert out == ""
    assert "0 packet(s) traced (timeout)" in err
    assert rc == 1  # --count not reached


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_the_trace_and_removes_the_table(lab: Lab, before: str, sig: int) -> None:
    p = start_trace(lab, "--protocol", "icmp", "--timeout", "60", "--json")
    lab.ping(lab.lan, WAN_HOST, 2, interval=0.2)
    p.send_signal(sig)
    rc, out, err = finish(p, timeout=10)
    assert rc == 0, err
    assert len(packets(out)) == 4  # two requests, two replies
    assert f"({signal.Signals(sig).name})" in err


def test_killed_trace_is_cleaned_up_by_the_next(lab: Lab, before: str) -> None:
    p = start_trace(lab, "--protocol", "icmp", "--timeout", "60")
    p.kill()
    finish(p)
    assert has_table(lab, "inet", "mirrord_trace")
    rc, _, err = finish(start_trace(lab, "--protocol", "icmp", "--timeout", "1", wait=False))
    assert rc == 0, err
    assert f"left behind by an earlier trace (pid {p.pid}, no longer running)" in err


def test_second_trace_leaves_a_running_one_alone(lab: Lab, before: str) -> None:
    first = start_trace(lab, "--protocol", "icmp", "--timeout", "60")
    try:
        rc, out, err = finish(start_trace(lab, "--protocol", "udp", "--timeout", "1",
                                          wait=False))
        assert rc == 2
        assert f"another mirrord trace (pid {first.pid}) is running" in err
        assert has_table(lab, "inet", "mirrord_trace")
        lab.ping(lab.lan, WAN_HOST, 1)
    finally:
        first.send_signal(signal.SIGINT)
        rc, out, err = finish(first, timeout=10)
    assert rc == 0, err
    assert "echo-request" in out


def test_ipv6_out_direction(lab: Lab, before: str) -> None:
    p = start_trace(lab, "--family", "ipv6", "--protocol", "icmpv6", "--interface", "wan",
                    "--direction", "out", "--count", "1", "--timeout", "20", "--json")
    lab.ping(lab.lan, WAN_HOST6, 3, interval=0.2)
    rc, out, err = finish(p)
    assert rc == 0, err
    (pkt,) = packets(out)
    assert (pkt["in"], pkt["out"]) == ("br-lan", "wan")
    assert pkt["headers"]["version"] == 6 and pkt["headers"]["dst"] == WAN_HOST6
    assert pkt["headers"]["info"].startswith("echo-request")
    # The mirror copies IPv4 ICMP only.
    assert pkt["mirrored"] == []


CONNECT = """
import socket, sys
for port in map(int, sys.argv[2:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.settimeout(2)
    try:
        s.connect((sys.argv[1], 22))
    except OSError:
        pass
    s.close()
"""


def test_own_ssh_session_is_not_traced(lab: Lab, before: str) -> None:
    # As if the user were logged in from the LAN host, source port 40000.
    p = start_trace(lab, "--protocol", "tcp", "--count", "2", "--timeout", "20", "--json",
                    ssh=f"{LAN_HOST} 40000 {RTR_LAN} 22")
    # Nothing listens on port 22: each attempt is a SYN in and a RST out.
    lab.lan.python(CONNECT, RTR_LAN, "40000", "40001")
    rc, out, err = finish(p)
    assert rc == 0, err
    flows = [(x["headers"]["src"], x["headers"]["sport"], x["headers"]["dport"])
             for x in packets(out)]
    assert flows == [(LAN_HOST, 40001, 22), (RTR_LAN, 22, 40001)]


def test_trace_stops_when_its_table_is_removed(lab: Lab, before: str) -> None:
    p = start_trace(lab, "--protocol", "icmp", "--timeout", "60")
    lab.rtr.run("nft", "delete", "table", "inet", "mirrord_trace")
    rc, _, err = finish(p, timeout=10)
    assert rc == 2
    assert "was removed by someone else" in err
