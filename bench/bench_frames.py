"""What do whole-frame copies (span, vxlan) cost, against hand-written rules, clone
and tzsp? Prints figures; not a test.

The lab and method are bench_rules.py's (tests/harness/lab.py): the LAN host
sends 64-byte UDP frames through the router to the WAN host, which counts and
drops them at ingress; the collector host counts and drops the copies at its
eth0 (span: the frames themselves out of the router's port `col`; vxlan: UDP
4789 to 203.0.113.10; clone: the packets; tzsp: UDP 37008). Mirrors copy
br-lan's input (direction in).

Cases (the hand-written references in brackets):
  none        no mirror
  span        mirrord, transport span to the port `col`         [hand-span:
              netdev ingress of br-lan, priority -300: `dup to "col"`]
  vxlan       mirrord, transport vxlan; mirrord's device mvx-ids [hand-vxlan:
              the same `dup` into a hand-made VXLAN device `hvx` (next VNI)]
  clone       mirrord, transport clone                           [hand-clone:
              bench_rules' `iifname "br-lan" dup to 203.0.113.10` in prerouting]
  tzsp        mirrord, transport tzsp (userspace: the real daemon runs)
  span50      50 span mirrors on br-lan, 50 distinct `udp dport` filters, the
              traffic matching one                               [hand-span-port:
              one rule `meta protocol ip udp dport 5555 dup to "col"`]
  clone50     the same with clone                               [hand-clone-port:
              `iifname "br-lan" udp dport 5555 dup to 203.0.113.10`]

Phase `max`: one trafgen flood at its maximum (one worker, CPU 0) for the
whole phase while the router's ruleset is switched under it; each case is
measured between two slots of its reference (ref, A, ref, B, ref; groups and
cases rotated each cycle), `--settle` s after the load, for `--slot` s. A
case's ratios are to the mean of its two neighbouring reference slots; the
medians of those ratios and their interquartile range are printed. tzsp's
reference is `none`: its slot starts the daemon (after loading `none`) and
stops it afterwards.

Phase `rate`: below saturation, for CPU per copy. trafgen's rate option
busy-waits (CPU 0 stays busy whatever the rules cost), so a paced sender
(AF_PACKET, qdisc bypass, the same frame; batches every millisecond, sleeping
between them) runs on CPU 0 in the LAN namespace; the bench, nft and the
daemon run on the other CPUs. On veth the whole forwarding path, the copies
and the collector's drops run in the softirq the sender's send() runs on
return, charged (tick accounting, no IRQ time accounting here) to the sender;
what is left over runs in ksoftirqd/0. Other work on the shared machine is
not counted: the CPU figures are the tasks' own schedstat run times (ns).
Each slot sends exactly rate x slot frames; every mirror case and every
reference is measured between two `none` slots. For the mirrord cases the
real daemon (`mirrord run`) runs in that slot (started before, stopped after,
outside the counted window); the hand cases are loaded with nft. Per slot:
  send   = run time of the sender + ksoftirqd/0 during the send
  daemon = run time of the daemon and its children (all threads), from the
           send's start until every copy has arrived
  CPU per copy = (send - mean send of the two neighbouring `none` slots
                  + daemon) / copies
  delivered = copies counted at the collector / packets counted at the WAN
              host (nft counters read once nothing more arrives: exact)
The daemon's CPU is also printed alone (% of one CPU over the slot, ns per
copy): for span and vxlan it must be ~0 (no userspace CPU per copy).

mirrord's rules come from mirrord's own plan -> render in the router namespace
(the vxlan device made with mirrord's links.ensure), loaded as the backend's
JSON batch; at start the bench checks per mirrord case that this is exactly
the table `mirrord run` installs.

Run as root from the repository root:
  python3 bench/bench_frames.py [--cycles 5] [--slot 1.0] [--rate 50000] [--cases ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_rules import HAND, PORT
from bench.benchlab import (
    Rulesets,
    daemon_running,
    flood,
    mac,
    mirror_spec,
    sample,
    spread,
    stop_flood,
)
from tests.harness.lab import COLLECTOR, LAN_HOST, WAN_HOST, Lab, Netns, have_root_netns

VNI = 4242
TZSP_PORT = 37008
VXLAN_PORT = 4789
FLOOD_CPU = 0
OTHERS = 49  # span50 / clone50: ports 10001..10049, and PORT

COUNT_DROP = """\
table netdev bench {{
  counter n {{ }}
  chain in {{
    type filter hook ingress device "eth0" priority 0; policy accept;
    {match} counter name "n" drop
  }}
}}
"""


def netdev(rule: str) -> str:
    return f"""\
table netdev hand {{
  chain in {{
    type filter hook ingress device "br-lan" priority -300; policy accept;
    {rule}
  }}
}}
"""


COLLECTORS = {
    "span": "transport: span\ninterface: col",
    "vxlan": f"transport: vxlan\naddress: {COLLECTOR}\nvni: {VNI}",
    "clone": f"transport: clone\naddress: {COLLECTOR}",
    "tzsp": f"transport: tzsp\naddress: {COLLECTOR}\nport: {TZSP_PORT}",
}
FIFTY = [(f"m{i}", "br-lan", 10000 + i) for i in range(1, OTHERS + 1)] + [("m0", "br-lan", PORT)]

NFT = {
    "none": "",
    "hand-span": netdev('dup to "col"'),
    "hand-span-port": netdev(f'meta protocol ip udp dport {PORT} dup to "col"'),
    "hand-vxlan": netdev('dup to "hvx"'),
    "hand-clone": HAND,
    "hand-clone-port": HAND.replace('iifname "br-lan"', f'iifname "br-lan" udp dport {PORT}'),
}
SPECS = {
    "span": mirror_spec([("m0", "br-lan", None)], COLLECTORS["span"]),
    "vxlan": mirror_spec([("m0", "br-lan", None)], COLLECTORS["vxlan"]),
    "clone": mirror_spec([("m0", "br-lan", None)], COLLECTORS["clone"]),
    "tzsp": mirror_spec([("m0", "br-lan", None)], COLLECTORS["tzsp"]),
    "span50": mirror_spec(FIFTY, COLLECTORS["span"]),
    "clone50": mirror_spec(FIFTY, COLLECTORS["clone"]),
}
DAEMON_ONLY = {"tzsp"}  # userspace copies: no rules to load, the daemon must run
# case -> its reference in the max phase
REFERENCE = {"none": "hand-span", "span": "hand-span", "vxlan": "hand-vxlan",
             "clone": "hand-clone", "span50": "hand-span-port", "clone50": "hand-clone-port",
             "tzsp": "none"}
CASES = ["none", "span", "vxlan", "clone", "tzsp", "span50", "clone50"]

# The paced sender: on "N" sends N frames at `rate`, answers "done SECONDS".
SENDER = r"""
import socket, sys, time
dev, rate, frame = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS: as trafgen sends
send, batch = s.send, max(1, rate // 1000)
print("ready", flush=True)
for line in sys.stdin:
    count, sent, t0 = int(line), 0, time.monotonic()
    while sent < count:
        n = min(batch, count - sent)
        for _ in range(n):
            send(frame)
        sent += n
        d = t0 + sent / rate - time.monotonic()
        if d > 0:
            time.sleep(d)
    print("done", time.monotonic() - t0, flush=True)
"""


def frame_hex(lab: Lab) -> str:
    """The flood's 60-byte frame (64 on the wire), as trafgen's config builds it."""
    def ip4(a: str) -> bytes:
        return bytes(int(x) for x in a.split("."))

    eth = (bytes.fromhex(mac(lab.rtr, "br-lan").replace(":", ""))
           + bytes.fromhex(mac(lab.lan, "eth0").replace(":", "")) + b"\x08\x00")
    payload = b"A" * 18
    udp = (40000).to_bytes(2, "big") + PORT.to_bytes(2, "big") + (8 + len(payload)).to_bytes(
        2, "big") + b"\0\0"
    head = (b"\x45\x00" + (20 + len(udp) + len(payload)).to_bytes(2, "big") + b"\0\0\0\0"
            + bytes([64, 17]) + b"\0\0" + ip4(LAN_HOST) + ip4(WAN_HOST))
    words = sum(int.from_bytes(head[i:i + 2], "big") for i in range(0, 20, 2))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    head = head[:10] + (~words & 0xFFFF).to_bytes(2, "big") + head[12:]
    return (eth + head + udp + payload).hex()


def setup(lab: Lab, cfg_path: str) -> None:
    lab.wan.run("nft", "-f", "-", input=COUNT_DROP.format(match=f"udp dport {PORT}"))
    lab.col.run("nft", "-f", "-", input=COUNT_DROP.format(
        match=f"udp dport {{ {PORT}, {VXLAN_PORT}, {TZSP_PORT} }}"))
    # The hand-made tunnel: what mirrord's links.create makes, by `ip`; another
    # VNI, as the kernel takes one device per VNI and UDP port.
    lab.rtr.sh(f"ip link add hvx mtu 65535 type vxlan id {VNI + 1} remote {COLLECTOR} "
               f"dstport {VXLAN_PORT} nolearning ttl 64 df unset; "
               "ip link set hvx addrgenmode none; "
               "sysctl -qw net.ipv6.conf.hvx.disable_ipv6=1; ip link set hvx up")
    Path(cfg_path).write_text(
        f"{{ eth(da={mac(lab.rtr, 'br-lan')}, sa={mac(lab.lan, 'eth0')}), "
        f"ipv4(sa={LAN_HOST}, da={WAN_HOST}, ttl=64), udp(sp=40000, dp={PORT}), "
        "fill(0x41, 18) }\n")


def counted(ns: Netns) -> int:
    """Packets the bench table of `ns` counted (and dropped)."""
    out = ns.run("nft", "list", "counter", "netdev", "bench", "n").stdout
    return int(out.split("packets")[1].split()[0])


# -- CPU ---------------------------------------------------------------------------------


def runtime_ns(pids: set[int]) -> int:
    """CPU time the tasks of `pids` ran so far, in nanoseconds (schedstat: exact, and
    with this kernel's tick accounting it includes the softirqs run in their context)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                pass  # ended meanwhile
    return total


def tree(pid: int) -> set[int]:
    """`pid` and its live descendants."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += [c for c, pp in parent.items() if pp == p and c not in out]
    return out


def softirq_thread(cpu: int) -> int:
    """The pid of ksoftirqd/cpu, which runs the softirqs a task's context left over."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    return int(d.name)
            except OSError:
                continue
    raise RuntimeError(f"no ksoftirqd/{cpu}")


# -- slots ---------------------------------------------------------------------------------


def cycle_plan(groups: list[tuple[str, list[str]]], r: int) -> list[tuple[str, Optional[str]]]:
    """One cycle's slots as (case, its reference or None for a reference slot):
    per group ref, A, ref, B, ..., ref; groups and cases rotated by `r`."""
    def rot(xs: list[Any]) -> list[Any]:
        return xs[r % len(xs):] + xs[:r % len(xs)] if xs else []

    out: list[tuple[str, Optional[str]]] = []
    for ref, cases in rot(groups):
        out.append((ref, None))
        for c in rot(cases):
            out += [(c, ref), (ref, None)]
    return out


class Router:
    """The router's state per case: rules loaded, or the real daemon running."""

    def __init__(self, lab: Lab, rs: Rulesets, daemon_cases: set[str], restore: bool) -> None:
        self.lab, self.rs, self.daemon_cases, self.restore = lab, rs, daemon_cases, restore
        self.pid: Optional[int] = None

    @contextmanager
    def case(self, case: str) -> Iterator[None]:
        if case not in self.daemon_cases:
            self.rs.load(case)
            self.pid = None
            yield
            return
        self.rs.load("none")
        try:
            with daemon_running(self.lab, self.rs.specs[case]) as d:
                self.pid = d.pid
                yield
        finally:
            self.pid = None
            # A daemon deletes its tunnel devices when it stops, and one whose
            # spec has none deletes them when it starts: the rules need them back.
            if self.restore:
                self.rs.restore_tunnels()


@dataclass
class Slot:
    case: str
    ref: Optional[str]
    fwd: float  # packets the WAN host received (rate phase: in the slot; max: per second)
    copies: float  # copies the collector received (the same)
    send: float = 0.0  # rate phase: ns the sender and ksoftirqd/0 ran during the send
    daemon: float = 0.0  # rate phase: ns the daemon and its children ran
    sent_rate: float = 0.0  # rate phase: the rate the sender kept (pkt/s)


def max_phase(lab: Lab, router: Router, groups: list[tuple[str, list[str]]], cfg: str,
              args: argparse.Namespace) -> list[Slot]:
    plans = [cycle_plan(groups, r) for r in range(args.cycles)]
    daemon_slots = sum(1 for p in plans for c, _ in p if c in router.daemon_cases)
    total = (sum(len(p) for p in plans) * (args.slot + args.settle + 0.3)
             + daemon_slots * 20 + 10)  # ended when done
    slots: list[Slot] = []
    flooder = flood(lab, cfg, total)
    try:
        for r, plan in enumerate(plans):
            for case, ref in plan:
                with router.case(case):
                    fwd, copies = sample(lab, flooder, args.settle, args.slot)
                slots.append(Slot(case, ref, fwd, copies))
                if args.verbose:
                    print(f"max  cycle {r + 1:>2} {case:<16} forwarded {fwd:>9.0f} pkt/s  "
                          f"copies {copies:>9.0f} /s", flush=True)
    finally:
        stop_flood(flooder, 30)
    return slots


def wait_quiet(read: Callable[[], tuple[int, int]], timeout: float = 5.0) -> tuple[int, int]:
    """The counts once they stopped growing (what is on its way has landed)."""
    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.15)
        now = read()
        if now == last:
            return now
        last = now
    return last


def rate_phase(lab: Lab, router: Router, cases: list[str], args: argparse.Namespace
               ) -> list[Slot]:
    sender = lab.lan.popen("taskset", "-c", str(FLOOD_CPU), sys.executable, "-c", SENDER,
                           "eth0", str(args.rate), frame_hex(lab), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert sender.stdin is not None and sender.stdout is not None
    count = int(args.rate * args.slot)
    sending = {sender.pid, softirq_thread(FLOOD_CPU)}

    def read() -> tuple[int, int]:
        return counted(lab.wan), counted(lab.col)

    slots: list[Slot] = []
    try:
        if sender.stdout.readline().strip() != "ready":
            raise RuntimeError("the paced sender did not start")
        for r, plan in enumerate(cycle_plan([("none", cases)], r) for r in range(args.cycles)):
            for case, ref in plan:
                with router.case(case):
                    time.sleep(args.settle)
                    f0, c0 = read()
                    daemon = tree(router.pid) if router.pid else set()
                    d0, s0 = runtime_ns(daemon), runtime_ns(sending)
                    sender.stdin.write(f"{count}\n")
                    sender.stdin.flush()
                    answer = sender.stdout.readline().split()
                    if answer[:1] != ["done"]:
                        raise RuntimeError("the paced sender stopped")
                    s1 = runtime_ns(sending)
                    f1, c1 = wait_quiet(read)
                    d1 = runtime_ns(daemon)
                slots.append(Slot(case, ref, f1 - f0, c1 - c0, s1 - s0, d1 - d0,
                                  count / float(answer[1])))
                if args.verbose:
                    print(f"rate cycle {r + 1:>2} {case:<16} forwarded {f1 - f0:>8} "
                          f"copies {c1 - c0:>8}  send CPU {(s1 - s0) / 1e6:>7.1f} ms  "
                          f"daemon {(d1 - d0) / 1e6:>6.1f} ms", flush=True)
    finally:
        sender.stdin.close()
        try:
            sender.wait(timeout=10)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    return slots


# -- figures -------------------------------------------------------------------------------


def neighbours(slots: list[Slot], i: int) -> tuple[Slot, Slot]:
    a, b = slots[i - 1], slots[i + 1]
    assert a.case == b.case == slots[i].ref, (a, slots[i], b)
    return a, b


def report_max(slots: list[Slot], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    ratios: dict[str, tuple[list[float], list[float]]] = {}
    for i, s in enumerate(slots):
        if s.ref is None:
            continue
        a, b = neighbours(slots, i)
        hf, hc = (a.fwd + b.fwd) / 2, (a.copies + b.copies) / 2
        fr, cr = ratios.setdefault(s.case, ([], []))
        fr.append(s.fwd / hf if hf else 0.0)
        if s.case != "none" and hc and s.ref != "none":
            cr.append(s.copies / hc)
    print(f"\nphase max: {args.cycles} cycles x {args.slot:g} s per slot under one trafgen "
          "flood (64-byte frames, one CPU); pkt/s are medians; ratios are medians of the "
          "ratios to the mean of the two neighbouring reference slots [interquartile range]")
    print(f"{'case':<16} {'reference':<16} {'fwd pkt/s':>10} {'copies/s':>10} {'copied':>7} "
          f"{'fwd ratio':>20} {'copy ratio':>20}")
    verdict: dict[str, tuple[float, float]] = {}
    for case in dict.fromkeys(s.case for s in slots):
        rows = [s for s in slots if s.case == case]
        fwd = statistics.median(s.fwd for s in rows)
        copies = statistics.median(s.copies for s in rows)
        fr, cr = ratios.get(case, ([], []))
        ref = REFERENCE.get(case, "") if case in ratios else "(reference)"
        if fr:
            verdict[case] = (statistics.median(fr), statistics.median(cr) if cr else 1.0)
        print(f"{case:<16} {ref:<16} {fwd:>10.0f} {copies:>10.0f} "
              f"{copies / fwd if fwd else 0:>7.3f} {spread(fr):>20} {spread(cr):>20}")
    return verdict


@dataclass
class Cost:
    fwd: float  # packets per slot (median)
    sent_rate: float  # pkt/s the sender kept (median)
    delivered: list[float]  # copies / forwarded, per slot
    per_copy: list[float]  # ns of CPU per copy, per slot
    daemon_pct: list[float]  # the daemon's CPU, % of one CPU, per slot
    daemon_per_copy: list[float]  # ns of the daemon's CPU per copy


def report_rate(slots: list[Slot], args: argparse.Namespace) -> dict[str, Cost]:
    costs: dict[str, Cost] = {}
    for i, s in enumerate(slots):
        if s.ref is None:
            continue
        a, b = neighbours(slots, i)
        c = costs.setdefault(s.case, Cost(0.0, 0.0, [], [], [], []))
        extra = s.send - (a.send + b.send) / 2 + s.daemon
        c.delivered.append(s.copies / s.fwd if s.fwd else 0.0)
        if s.copies:
            c.per_copy.append(extra / s.copies)
            c.daemon_per_copy.append(s.daemon / s.copies)
        c.daemon_pct.append(s.daemon / 1e7 / args.slot)
    for case, c in costs.items():
        c.fwd = statistics.median(s.fwd for s in slots if s.case == case)
        c.sent_rate = statistics.median(s.sent_rate for s in slots if s.case == case)
    base = statistics.median(s.send for s in slots if s.case == "none")
    print(f"\nphase rate: {args.cycles} cycles, {int(args.rate * args.slot)} frames per slot "
          f"at {args.rate} pkt/s (paced sender on CPU {FLOOD_CPU}); `none` slots: the send "
          f"ran {base / 1e6:.1f} ms ({base / (args.rate * args.slot):.0f} ns a frame, median). "
          "CPU per copy = (the send's CPU - the neighbouring `none` slots' mean + the "
          "daemon's) / copies, median [min..max]")
    print(f"{'case':<16} {'forwarded':>9} {'pkt/s':>7} {'delivered (min)':>18} {'CPU ns/copy':>24} "
          f"{'daemon % CPU':>13} {'daemon ns/copy':>15}")
    for case, c in costs.items():
        dpc = f"{statistics.median(c.daemon_per_copy):.0f}" if c.daemon_per_copy else "-"
        pc = (f"{statistics.median(c.per_copy):.0f} [{min(c.per_copy):.0f}..{max(c.per_copy):.0f}]"
              if c.per_copy else "-")
        print(f"{case:<16} {c.fwd:>9.0f} {c.sent_rate:>7.0f} {statistics.median(c.delivered):>10.4f} "
              f"({min(c.delivered):.4f}) {pc:>24} {statistics.median(c.daemon_pct):>13.2f} "
              f"{dpc:>15}")
    return costs


def targets(verdict: dict[str, tuple[float, float]], costs: dict[str, Cost]) -> None:
    def say(what: str, ok: Optional[bool]) -> None:
        print(f"target {what}: " + ("not measured" if ok is None else "met" if ok else "MISSED"))

    print()
    for case in ("span", "vxlan", "span50", "clone50"):
        if case in verdict:
            say(f"{case}: forwarding and copies >= 0.95 x {REFERENCE[case]}",
                min(verdict[case]) >= 0.95)
    for case in ("span", "vxlan", "span50"):
        if case in costs:
            c = costs[case]
            say(f"{case}: 100% of copies delivered at the fixed rate",
                min(c.delivered) >= 1.0)
            say(f"{case}: no userspace CPU (daemon < 0.5% of a CPU)",
                statistics.median(c.daemon_pct) < 0.5)

    def cost(case: str) -> Optional[float]:
        c = costs.get(case)
        return statistics.median(c.per_copy) if c and c.per_copy else None

    for case in ("span", "vxlan"):
        mine, clone, tzsp = cost(case), cost("clone"), cost("tzsp")
        if mine is not None:
            say(f"{case}: CPU per copy < clone's", None if clone is None else mine < clone)
            say(f"{case}: CPU per copy <= 1/2 tzsp's",
                None if tzsp is None else mine <= tzsp / 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--slot", type=float, default=1.0, help="seconds counted per slot")
    ap.add_argument("--settle", type=float, default=0.15,
                    help="seconds between loading a ruleset (or the daemon being active) "
                         "and counting")
    ap.add_argument("--rate", type=int, default=50000,
                    help="packets/s of the fixed-rate phase (below saturation)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    ap.add_argument("--phases", nargs="+", choices=["max", "rate"], default=["max", "rate"])
    ap.add_argument("-v", "--verbose", action="store_true", help="print every slot")
    args = ap.parse_args()
    why = have_root_netns()
    for tool in ("trafgen", "taskset"):
        if not why and shutil.which(tool) is None:
            why = f"needs {tool}"
    if not why and (os.cpu_count() or 1) < 2:
        why = "needs two CPUs (one for the traffic, one for the rest)"
    if not why and not Path("/proc/self/schedstat").exists():
        why = "needs /proc/PID/schedstat (CONFIG_SCHED_INFO)"
    if why:
        print(f"bench_frames: {why}", file=sys.stderr)
        return 2
    # The bench, nft and the daemon keep off the traffic's CPU.
    os.sched_setaffinity(0, set(range(os.cpu_count() or 2)) - {FLOOD_CPU})
    cases: list[str] = args.cases
    mirrors = [c for c in cases if c != "none"]
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(REFERENCE[c], []).append(c)
    used = set(cases) | set(groups) | {"none"}  # "none" also clears the router for a daemon
    tmp = tempfile.mkdtemp(prefix="mirrord-bench-")
    verdict: dict[str, tuple[float, float]] = {}
    costs: dict[str, Cost] = {}
    try:
        with Lab(ipv6=False) as lab:
            cfg = f"{tmp}/flood.cfg"
            setup(lab, cfg)
            rs = Rulesets(lab, {c: t for c, t in NFT.items() if c in used},
                          {c: t for c, t in SPECS.items() if c in used and c not in DAEMON_ONLY},
                          tmp, daemon_only={c: SPECS[c] for c in DAEMON_ONLY & used})
            checked = [c for c in cases if c in SPECS and c not in DAEMON_ONLY]
            for case in checked:
                rs.check_against_daemon(case)
            if checked:
                print("the loaded tables equal what `mirrord run` installs for: "
                      + ", ".join(checked), flush=True)
            if "max" in args.phases:
                router = Router(lab, rs, DAEMON_ONLY, restore=True)
                verdict = report_max(max_phase(lab, router, list(groups.items()), cfg, args),
                                     args)
            if "rate" in args.phases and mirrors:
                order = list(dict.fromkeys(x for c in mirrors for x in (REFERENCE[c], c)
                                           if x != "none"))
                router = Router(lab, rs, set(SPECS), restore=False)
                costs = report_rate(rate_phase(lab, router, order, args), args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    targets(verdict, costs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
