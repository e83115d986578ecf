"""Exact counters through a deletion of mirrord's table by another process (issue 14, item 3).

The copies are counted twice: by the daemon (status) and, independently, in
the collector's kernel (a netdev ingress counter of the lab). The table is
deleted while copies counted since the daemon's last reading sit in its named
counter, and status is not read before: the totals must still equal the
collector's count, exactly, once the heal is done and more copies were made.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any, Callable

import pytest

from tests.harness.lab import WAN_HOST, Lab, have_root_netns
from tests.harness.stream import STREAM_PORT

from .test_heal import spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

# Only the stream's datagrams match the mirror (udp to STREAM_PORT, in on
# br-lan); the collector counts exactly those copies, nothing of its own.
COPIES = f"ip daddr {WAN_HOST} udp dport {STREAM_PORT}"
BEFORE, AFTER = 300, 200


def wait_until(what: str, ok: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def copies(lab: Lab) -> int:
    return lab.collector_counts()["copies"]


def copies_and_bytes(lab: Lab) -> tuple[int, int]:
    out = lab.col.run("nft", "-j", "list", "counters", "table", "netdev", "lab").stdout
    c = next(o["counter"] for o in json.loads(out)["nftables"]
             if o.get("counter", {}).get("name") == "copies")
    return int(c["packets"]), int(c["bytes"])


def send(lab: Lab, n: int, expect: int) -> None:
    lab.udp_send(lab.lan, WAN_HOST, STREAM_PORT, n, rate=1000)
    wait_until(f"{expect} copies at the collector", lambda: copies(lab) >= expect)
    assert copies(lab) == expect


def healed(lab: Lab) -> bool:
    out = lab.rtr.run("nft", "list", "table", "ip", "mirrord", check=False).stdout
    return "dup to" in out


@pytest.mark.parametrize("disrupt", [("delete", "table", "ip", "mirrord"),
                                     ("flush", "ruleset")])
def test_totals_survive_another_process_deleting_the_table(disrupt: tuple[str, ...]) -> None:
    with Lab() as lab:
        lab.count_at_collector({"copies": COPIES})
        lab.start_daemon(lab.write_spec(spec()))  # its wait reads status: counters at 0
        lab.wait_for_status(lambda s: bool(s) and s["mirrors"][0]["state"] == "active")
        send(lab, BEFORE, BEFORE)
        # Not a status read in between: these copies are only in the kernel's counter.
        lab.rtr.run("nft", *disrupt)
        wait_until("the heal", lambda: healed(lab))
        send(lab, AFTER, BEFORE + AFTER)

        def st() -> dict[str, Any]:
            s = lab.status()
            assert s is not None
            return s

        status = st()
        m = status["mirrors"][0]
        assert status["reapplies"] >= 1, "the deletion was not healed"
        assert (m["packets"], copies(lab)) == (BEFORE + AFTER, BEFORE + AFTER), status
        assert (m["packets"], m["bytes"]) == copies_and_bytes(lab), status
        # What left toward the collector (counted after every firewall chain) too.
        (point,) = m["delivery"]
        assert (point["left"], point["left_bytes"]) == copies_and_bytes(lab), status
        assert not [f for f in status["findings"] if f["code"] == "counters-inexact"], status


def inexact(status: dict[str, Any]) -> list[str]:
    return [f["what"] for f in status["findings"] if f["code"] == "counters-inexact"]


def test_a_deletion_that_cannot_be_counted_is_said_in_status() -> None:
    """Counters adopted from an earlier run (a restart keeps the rules): what their
    rules had counted before this start is unknown, so a deletion cannot be made
    exact. Status must say so, not show a silently lower total."""
    with Lab() as lab:
        lab.count_at_collector({"copies": COPIES})
        path = lab.write_spec(spec())
        old = lab.start_daemon(path)
        lab.wait_for_status(lambda s: bool(s) and s["mirrors"][0]["state"] == "active")
        send(lab, BEFORE, BEFORE)
        old.send_signal(signal.SIGUSR2)  # a restart: the rules stay for the next start
        assert old.wait(timeout=15) == 0
        lab.daemons.remove(old)
        lab.start_daemon(path)
        first = lab.wait_for_status(lambda s: bool(s) and s["mirrors"][0]["state"] == "active")
        assert first["mirrors"][0]["packets"] == BEFORE, "the adopted counter's total"
        assert not inexact(first), first
        send(lab, AFTER, BEFORE + AFTER)
        lab.rtr.run("nft", "delete", "table", "ip", "mirrord")
        wait_until("the heal", lambda: healed(lab))
        status = lab.wait_for_status(lambda s: bool(s) and bool(inexact(s)))
        # The mirror's counter, and the delivery point's (also adopted).
        notes = inexact(status)
        assert any("mirror m (in)" in n and "were not counted" in n for n in notes), notes
        assert status["mirrors"][0]["packets"] <= copies(lab)


def test_iptables_says_a_flush_by_another_process_may_cost_counts() -> None:
    """iptables rule counters are not named objects and their deletion notifies no
    values: the heal of a flush by another process says what may be missing."""
    if "nf_tables" not in subprocess.run(["iptables", "--version"], capture_output=True,
                                         text=True).stdout:
        pytest.skip("`iptables` here is not iptables-nft")
    with Lab() as lab:
        lab.count_at_collector({"copies": COPIES})
        lab.start_daemon(lab.write_spec(spec(backend="iptables")))
        before = lab.wait_for_status(lambda s: bool(s) and s["mirrors"][0]["state"] == "active")
        assert not inexact(before), before
        send(lab, BEFORE, BEFORE)
        lab.rtr.run("iptables", "-t", "mangle", "-F")
        status = lab.wait_for_status(lambda s: bool(s) and s["reapplies"] >= 1
                                     and bool(inexact(s)))
        (note,) = inexact(status)
        assert "copies of m between" in note and "backend iptables" in note, note
