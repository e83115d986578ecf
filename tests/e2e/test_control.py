"""Hostile control-socket clients against the real daemon: heals stay fast, status answers.

Each case measures heals the way a user would see them: `nft flush ruleset`
in the router namespace, then the time until the daemon's table is back
(polled through libnftables every millisecond). The same measurement without
any client is the baseline. The hostile clients keep up their pressure for
the whole measurement: a connection the daemon closes is opened again.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.lab import ROOT, Lab, have_root_netns, spec_text

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

ROUNDS = 5
SPEC = spec_text("nftables", direction="in", name="lan")

# Runs in the router namespace: ROUNDS heals, one JSON list of seconds (None: no heal in 5 s).
PROBE = r"""
import json, sys, time
from mirrord.backends.libnft import open_nftables
rounds = int(sys.argv[1])
nft = open_nftables()
out = []
for _ in range(rounds):
    t0 = time.monotonic()
    nft.cmd("flush ruleset")
    took = None
    while time.monotonic() - t0 < 5:
        if nft.cmd("list table ip mirrord")[0] == 0:
            took = time.monotonic() - t0
            break
        time.sleep(0.001)
    out.append(took)
    time.sleep(0.3)  # let the daemon settle after its own apply
print(json.dumps(out))
"""

# Runs in the router namespace until stdin closes (or 60 s): the hostile clients.
HOSTILE = r"""
import errno, os, select, socket, sys, time
mode, path = sys.argv[1], sys.argv[2]
end = time.monotonic() + 60

def connect(block=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not block:
        s.setblocking(False)
    s.connect(path)
    return s

def stdin_closed(timeout):
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(r) and not os.read(sys.stdin.fileno(), 1)

stats = {"connects": 0, "eagain": 0}
if mode == "silent":
    # 8 connections that never send; any the daemon closes is replaced.
    conns = [connect() for _ in range(8)]
    stats["connects"] = 8
    print("ready", flush=True)
    while time.monotonic() < end and not stdin_closed(0):
        r, _, _ = select.select(conns + [sys.stdin], [], [], 0.05)
        for s in r:
            if s is sys.stdin:
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                conns.remove(s)
                s.close()
                conns.append(connect())
                stats["connects"] += 1
elif mode == "trickle":
    # One client sending a byte every 20 ms and never finishing its request.
    s = connect()
    stats["connects"] = 1
    print("ready", flush=True)
    while time.monotonic() < end and not stdin_closed(0.02):
        try:
            s.send(b" ")
        except OSError:
            s.close()
            s = connect()
            stats["connects"] += 1
elif mode == "flood":
    # Connections as fast as the daemon takes them, never a byte sent; up to
    # 256 held open at once (the oldest closed first).
    held = []
    print("ready", flush=True)
    while time.monotonic() < end and not stdin_closed(0):
        for _ in range(64):
            try:
                held.append(connect(block=False))
                stats["connects"] += 1
            except BlockingIOError:
                stats["eagain"] += 1
                time.sleep(0.001)
                break
            if len(held) > 256:
                held.pop(0).close()
print(stats, file=sys.stderr, flush=True)
"""


def env() -> dict[str, str]:
    import os

    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def heals(lab: Lab, rounds: int = ROUNDS) -> list[float]:
    p = lab.rtr.run(sys.executable, "-c", PROBE, str(rounds), timeout=60)
    got: list[Any] = json.loads(p.stdout)
    assert all(t is not None for t in got), f"a heal never came: {got}\n{lab.daemon_log()}"
    return [float(t) for t in got]


class Hostile:
    def __init__(self, lab: Lab, mode: str) -> None:
        self.proc = lab.rtr.popen(sys.executable, "-c", HOSTILE, mode, lab.socket_path(),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env())

    def __enter__(self) -> Hostile:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", self.proc.communicate(timeout=5)
        time.sleep(0.2)  # pressure on before the first heal
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            _, self.stats = self.proc.communicate("", timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def daemon_lab() -> Iterator[Lab]:
    with Lab(ipv6=False) as lab:
        d = lab.start_daemon(lab.write_spec(SPEC))
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active")
        yield lab
        assert d.poll() is None, lab.daemon_log()
        assert lab.stop_daemon(d) == 0


def budget(base: list[float]) -> float:
    """Tens of ms like the baseline, with room for a loaded 2-core machine."""
    return max(0.15, 3 * statistics.median(base))


# A client that held the loop would delay a heal by its whole deadline (5 s)
# or for ever; one heal of five slower than this is the machine, not a client
# (a baseline taken seconds apart on a busy 2-core machine had one at 0.78 s).
WORST = 1.0


@pytest.mark.parametrize("mode", ["silent", "trickle", "flood"])
def test_hostile_control_clients_do_not_delay_heals(daemon_lab: Lab, mode: str) -> None:
    lab = daemon_lab
    # The baseline right before the pressure, under the same load of the machine.
    base = heals(lab)
    with Hostile(lab, mode) as hostile:
        got = heals(lab)
        # `mirrord status` still answers, and quickly, while the pressure is on.
        t0 = time.monotonic()
        st = lab.mirrord("status", "--json", "--socket", lab.socket_path(), timeout=30)
        status_took = time.monotonic() - t0
    print(f"{mode}: baseline {[round(t * 1000) for t in base]} ms, "
          f"with clients {[round(t * 1000) for t in got]} ms, status {status_took:.2f} s, "
          f"clients {hostile.stats.strip()}")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["mirrors"][0]["state"] == "active"
    assert statistics.median(got) <= budget(base), (mode, base, got)
    assert max(got) <= max(WORST, 2 * budget(base)), (mode, base, got)
    assert status_took < 10  # rc 0 already says it answered within its 5 s; this is the CLI start under load
