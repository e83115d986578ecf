"""Statistics of the benchmarks: disruption trials against a sequenced stream's copies.

The stream and its capture are the test harness's (tests/harness/stream.py):
each copy carries the kernel's receive time on CLOCK_REALTIME, the clock the
router namespace stamps its disruptions with.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

_TOP = str(Path(__file__).resolve().parent.parent)
if _TOP not in sys.path:
    sys.path.insert(0, _TOP)

from tests.harness.lab import COLLECTOR, ROOT, Lab, Netns  # noqa: E402 - after the path set-up above
from tests.harness.stream import Copies  # noqa: E402


@dataclass
class Trial:
    start: float  # the disruptive command began (CLOCK_REALTIME)
    done: float  # ... and returned: the kernel state is disrupted from here
    rules_back: Optional[float] = None  # the router saw mirrord's rules back
    extra: dict[str, Any] = field(default_factory=dict)
    # filled by analyse()
    heal: Optional[float] = None  # first copy after the loss, minus `done`
    outage: Optional[float] = None  # first copy after the loss, minus the last copy before it
    uncopied: int = 0
    window: int = 0


def analyse(data: Copies, trials: list[Trial], end: Optional[float] = None) -> None:
    """Attribute each lost copy to the disruption it followed; time the first copy after."""
    copied = data.copied()
    order = sorted(data.sent_at.items(), key=lambda kv: kv[1])
    for i, tr in enumerate(trials):
        hi = trials[i + 1].start if i + 1 < len(trials) else (end or float("inf"))
        # Packets sent from shortly before the command (it may act before it
        # returns) up to the next disruption belong to this trial.
        window = [seq for seq, ts in order if tr.start - 0.002 <= ts < hi]
        tr.window = len(window)
        lost = [seq for seq in window if seq not in copied]
        tr.uncopied = len(lost)
        if not window:
            continue
        if not lost:
            tr.heal = 0.0
            tr.outage = 0.0
            continue
        # The first run of lost sequence numbers is the disruption's; a
        # later stray loss (if any) is counted but does not stretch the heal.
        end_run = 0
        while end_run + 1 < len(lost) and lost[end_run + 1] == lost[end_run] + 1:
            end_run += 1
        tr.extra["runs"] = 1 + sum(1 for a, b in zip(lost, lost[1:]) if b != a + 1)
        after = [seq for seq in window if seq > lost[end_run] and seq in copied]
        if not after:
            continue  # never healed within the window
        first_back = min(copied[seq] for seq in after)
        tr.heal = first_back - tr.done
        before = [t for seq, t in copied.items() if lost[0] - 50 <= seq < lost[0]]
        tr.outage = first_back - max(before) if before else None


def ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def summarize(values: list[float]) -> dict[str, float]:
    vs = sorted(values)
    if not vs:
        return {}
    p90 = vs[min(len(vs) - 1, round(0.9 * (len(vs) - 1)))]
    return {"n": len(vs), "min": vs[0], "median": statistics.median(vs), "p90": p90,
            "worst": vs[-1]}


# -- forwarding benches: rulesets switched under a flood (bench_rules, bench_frames) --------

# Runs in the router namespace: mirrord's plan and render for a spec, printed
# as the JSON batch the nftables backend would apply. The tunnel devices the
# spec copies into are made first with mirrord's own links.ensure, as the
# daemon does (with `--tunnels` that is all it does).
RENDER = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from mirrord import backends, plan, spec
from mirrord.netlink import links, topology
from mirrord.backends.nftables import batch
s = spec.load(sys.argv[1])
wanted = plan.tunnels(s)
errors = links.ensure(wanted) if wanted else {}
assert not errors, errors
if sys.argv[3:] == ["--tunnels"]:
    sys.exit(0)
backend, why = backends.select(s.backend)
assert backend is not None and backend.name == "nftables", why
frames = (backend.frame_support() if any(c.copies_frames for c in s.collectors.values())
          else plan.FrameSupport())
p = plan.build(s, topology.read(plan.collector_keys(s)), backend.name, None,
               backend.capabilities.versions, frames, errors)
assert all(m.state == "active" for m in p.mirrors), [(m.mirror.name, m.reason) for m in p.mirrors]
print(json.dumps({"nftables": batch(backend.render(p).payload, {})}))
"""


def mirror_spec(mirrors: Sequence[tuple[str, str, Optional[int]]],
                collector: str = "") -> str:
    """(name, interface, dport or None) -> a spec of mirrors (direction in) to the
    collector `ids`, whose fields are `collector` (default: clone to the lab's)."""
    fields = collector or f"address: {COLLECTOR}\ntransport: clone"
    lines = ["backend: nftables", "collectors:", "  ids:"]
    lines += [f"    {ln}" for ln in fields.splitlines()] + ["mirrors:"]
    for name, ifname, dport in mirrors:
        lines += [f"  - name: {name}", f"    interfaces: [{ifname}]", "    direction: in",
                  "    collector: ids"]
        if dport is not None:
            lines += ["    match:", "      protocol: udp", f"      dport: {dport}"]
    return "\n".join(lines) + "\n"


def mac(ns: Netns, dev: str) -> str:
    return str(json.loads(ns.run("ip", "-j", "link", "show", dev).stdout)[0]["address"])


def rx_packets(ns: Netns, dev: str = "eth0") -> int:
    out = subprocess.run(["ip", "-n", ns.name, "-j", "-s", "link", "show", dev],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def ruleset(lab: Lab) -> str:
    """The router's tables without handles and counts, to compare two loads."""
    data = json.loads(lab.rtr.run("nft", "-j", "list", "ruleset").stdout)

    def strip(o: object) -> object:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("handle", "packets", "bytes")}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    return json.dumps(strip([o for o in data["nftables"] if "metainfo" not in o]),
                      sort_keys=True)


@contextmanager
def daemon_running(lab: Lab, spec_path: str) -> Iterator[subprocess.Popen[str]]:
    """The real daemon on `spec_path` until the block ends, every mirror active."""
    daemon = lab.start_daemon(spec_path)
    try:
        lab.wait_for_status(lambda s: bool(s) and len(s["mirrors"]) > 0 and all(
            m["state"] == "active" for m in s["mirrors"]), timeout=30)
        yield daemon
    finally:
        rc = lab.stop_daemon(daemon)
    if rc != 0:
        raise RuntimeError(f"daemon exited {rc}:\n{lab.daemon_log()}")


class Rulesets:
    """Each case's ruleset as a file `nft` loads in one transaction, flushing the last.

    `nft`: case -> hand-written nft text; `specs`: case -> a mirrord spec, whose
    rules are mirrord's own plan -> render in the router namespace; `daemon_only`:
    case -> a spec only the running daemon serves (tzsp)."""

    def __init__(self, lab: Lab, nft: Mapping[str, str], specs: Mapping[str, str],
                 tmp: str, daemon_only: Optional[Mapping[str, str]] = None) -> None:
        self.lab = lab
        self.files: dict[str, tuple[str, bool]] = {}  # case -> (path, is_json)
        self.specs: dict[str, str] = {}  # case -> spec path
        for case, text in (daemon_only or {}).items():  # run by the daemon, nothing to load
            self.specs[case] = f"{tmp}/{case}.yaml"
            Path(self.specs[case]).write_text(text)
        for case, text in nft.items():
            path = f"{tmp}/{case}.nft"
            Path(path).write_text("flush ruleset\n" + text)
            self.files[case] = (path, False)
        for case, text in specs.items():
            self.specs[case] = f"{tmp}/{case}.yaml"
            Path(self.specs[case]).write_text(text)
            doc = json.loads(self._render(case))
            doc["nftables"].insert(0, {"flush": {"ruleset": None}})
            path = f"{tmp}/{case}.json"
            Path(path).write_text(json.dumps(doc))
            self.files[case] = (path, True)

    def _render(self, case: str, *extra: str) -> str:
        return self.lab.rtr.run(sys.executable, "-c", RENDER, self.specs[case], str(ROOT),
                                *extra).stdout

    def restore_tunnels(self) -> None:
        """mirrord's tunnel devices as the rendering needs them: a daemon that
        stops (or starts on a spec without them) deletes its own."""
        for case, path in self.specs.items():
            if case in self.files and "transport: vxlan" in Path(path).read_text():
                self._render(case, "--tunnels")

    def load(self, case: str) -> None:
        path, is_json = self.files[case]
        self.lab.rtr.run("nft", *(["-j"] if is_json else []), "-f", path)

    def check_against_daemon(self, case: str) -> None:
        """The loaded table must be the daemon's own, or the figures mean nothing."""
        self.lab.rtr.run("nft", "flush", "ruleset")
        with daemon_running(self.lab, self.specs[case]):
            by_daemon = ruleset(self.lab)
        self.restore_tunnels()
        self.load(case)
        if ruleset(self.lab) != by_daemon:
            raise RuntimeError(f"{case}: the loaded rules differ from the daemon's")
        self.lab.rtr.run("nft", "flush", "ruleset")


def flood(lab: Lab, cfg_path: str, seconds: float) -> subprocess.Popen[bytes]:
    """trafgen at its maximum, one worker (trafgen pins it to CPU 0)."""
    # `timeout` ends trafgen (and its worker) with SIGINT when the time is up.
    return lab.lan.popen("timeout", "-s", "INT", f"{seconds:.1f}", "trafgen", "-o", "eth0",
                         "-c", cfg_path, "-P", "1", "-Q", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


def stop_flood(flooder: subprocess.Popen[bytes], timeout: float) -> None:
    """End the flood now: `timeout` passes SIGINT on to trafgen's process group."""
    if flooder.poll() is None:
        flooder.send_signal(signal.SIGINT)
    try:
        flooder.wait(timeout=timeout)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()


def sample(lab: Lab, flooder: subprocess.Popen[bytes], settle: float,
           seconds: float) -> tuple[float, float]:
    """(forwarded pkt/s, copies/s) in the next `seconds`, after `settle`: what
    the WAN host's and the collector's eth0 received."""
    time.sleep(settle)
    f0, c0, t0 = rx_packets(lab.wan), rx_packets(lab.col), time.monotonic()
    time.sleep(seconds)
    f1, c1, t1 = rx_packets(lab.wan), rx_packets(lab.col), time.monotonic()
    if flooder.poll() is not None:
        raise RuntimeError("trafgen stopped before the measurement ended")
    return (f1 - f0) / (t1 - t0), (c1 - c0) / (t1 - t0)


def spread(vals: list[float]) -> str:
    """Median [interquartile range]."""
    if not vals:
        return "-"
    q = statistics.quantiles(vals, n=4) if len(vals) > 1 else [vals[0]] * 3
    return f"{statistics.median(vals):.3f} [{q[0]:.2f}-{q[2]:.2f}]"
