#!/usr/bin/env python3
"""Benchmark the TZSP worker against a naive recv/sendto loop. Prints figures.

Topology (namespaces created and deleted here; needs root):

    gen (g0) --veth--> (m0) rtr (c0) --veth--> (eth0) col
    trafgen              mirrored      TZSP         counts rx, drops at ingress

trafgen (pinned to CPU 0) offers 64-byte or 1400-byte frames at fixed rates
and at its maximum, for a bounded time, to m0; they are addressed to no one,
so the router's stack drops them after the capture taps. The mirroring
process (pinned to CPU 1) copies m0's input to the collector. Per case:

- offered: frames m0 received (its rx counter);
- copies: frames the collector's eth0 received (its rx counter, not a capture);
- delivery %: copies / offered;
- CPU %: the mirroring process's utime+stime (/proc/PID/stat) over the
  traffic's duration, as % of one core.

The "lossless rate" of an implementation is the highest offered rate it
delivered at >= 99.99 %; the ratio compares both in the same run.

    sudo python3 bench/bench_tzsp.py [--seconds 3] [--rates 50000,200000,400000,max]

With --two-taps: two mirrored links (m0, m1) both busy, their taps in one
capture process or in one process each (the choice docs/DESIGN.md records).

With --group: a collector group (issue 13) of 1 member against 2 members
(one capture process each, as the daemon runs them on 2 CPUs; neither
pinned), m0 offered 256 UDP flows (source ports 3840-4095); each member's
socket filter takes its buckets' flows only (plan.groups.assign), and sends
to its own address on the collector.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness.lab import Netns, python_env  # noqa: E402 - after the path set-up above

COLLECTOR = "203.0.113.2"
COLLECTOR2 = "203.0.113.3"  # a group's second member, on the same collector host
ROUTER = "203.0.113.1"
PORT = 37008
LOSSLESS = 99.99

NAIVE = r"""
import signal, socket, sys
from mirrord.tzsp import codec as tzsp
collector, port = sys.argv[1], int(sys.argv[2])
stop = False
def on_term(*_):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, on_term)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("m0", 3))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
header = tzsp.HEADER
while True:
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    u.sendto(header + frame, (collector, port))
"""


def sh(ns: str, script: str, check: bool = True) -> str:
    return Netns(ns).sh(script, check=check, timeout=60)


def counter(ns: str, dev: str, what: str = "rx_packets") -> int:
    return int(sh(ns, f"cat /sys/class/net/{dev}/statistics/{what}"))


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def frame_bytes(size: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of `size` bytes, to nobody on the segment."""
    import struct

    ip_len = size - 14
    udp_len = ip_len - 20
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0, 64, 17, 0,
                               bytes([192, 0, 2, 10]), bytes([198, 51, 100, 99])))
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    struct.pack_into("!H", ip, 10, ~csum & 0xFFFF)
    udp = struct.pack("!HHHH", 4000, 9, udp_len, 0)
    eth = bytes.fromhex("020000000099" "020000000010" "0800")
    return eth + bytes(ip) + udp + b"A" * (udp_len - 8)


@dataclass
class Result:
    impl: str
    size: int
    rate: str
    offered: int
    copies: int
    seconds: float
    cpu: float
    extra: str = ""

    @property
    def delivery(self) -> float:
        return 100.0 * self.copies / self.offered if self.offered else 0.0

    @property
    def offered_pps(self) -> float:
        return self.offered / self.seconds if self.seconds else 0.0


class Bench:
    def __init__(self, seconds: float, ring_mib: int) -> None:
        tag = f"tzb{os.getpid() % 100000}"
        self.gen, self.rtr, self.col = f"{tag}-gen", f"{tag}-rtr", f"{tag}-col"
        self.seconds = seconds
        self.ring_mib = ring_mib
        self.tmp = tempfile.mkdtemp(prefix="bench-tzsp-")
        self.env = python_env()

    def __enter__(self) -> Bench:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        for ns in (self.gen, self.rtr, self.col):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            sh(ns, "ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        subprocess.run(["ip", "link", "add", "tzbg0", "netns", self.gen, "type", "veth", "peer",
                        "name", "tzbm0", "netns", self.rtr], check=True)
        subprocess.run(["ip", "link", "add", "tzbc0", "netns", self.rtr, "type", "veth", "peer",
                        "name", "tzbe0", "netns", self.col], check=True)
        # A second mirrored link (g1 -> m1) for the two-tap cases.
        subprocess.run(["ip", "link", "add", "tzbg1", "netns", self.gen, "type", "veth", "peer",
                        "name", "tzbm1", "netns", self.rtr], check=True)
        sh(self.gen, "ip link set tzbg0 name g0; ip link set g0 up; "
                     "ip link set tzbg1 name g1; ip link set g1 up")
        sh(self.rtr, f"ip link set tzbm0 name m0; ip link set m0 up; ip link set tzbc0 name c0;"
                     f" ip link set c0 up; ip addr add {ROUTER}/24 dev c0; "
                     f"ip link set tzbm1 name m1; ip link set m1 up")
        sh(self.col, f"ip link set tzbe0 name eth0; ip link set eth0 up;"
                     f" ip addr add {COLLECTOR}/24 dev eth0; ip addr add {COLLECTOR2}/24 dev eth0")
        # Copies are counted by the device and dropped at once, so the
        # collector's own stack costs nothing and sends no ICMP back.
        sh(self.col, "nft add table netdev sink; nft add chain netdev sink in "
                     "'{ type filter hook ingress device eth0 priority 0; }'; "
                     f"nft add rule netdev sink in udp dport {PORT} drop")
        sh(self.rtr, f"ping -c1 -W2 {COLLECTOR} >/dev/null; ping -c1 -W2 {COLLECTOR2} >/dev/null")

    def __exit__(self, *exc: object) -> None:
        for ns in (self.gen, self.rtr, self.col):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def start_worker(self, interfaces: tuple[str, ...] = ("m0",), cpus: str = "1",
                     collector: str = COLLECTOR, buckets: Optional[str] = None
                     ) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", self.rtr, "taskset", "-c", cpus, sys.executable, "-m",
                "mirrord.tzsp.worker", "--direction", "in",
                "--collector", collector, "--port", str(PORT), "--log-level", "WARNING"]
        for name in interfaces:
            argv += ["--interface", name]
        if buckets is not None:
            argv += ["--buckets", buckets]
        if self.ring_mib:
            argv += ["--ring-mib", str(self.ring_mib)]
        p = subprocess.Popen(argv, env=self.env, cwd=str(ROOT), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.8)  # import + socket setup; no ready line in standalone mode
        if p.poll() is not None:
            raise RuntimeError(f"worker exited: {p.communicate()[1]}")
        return p

    def start_naive(self) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", self.rtr, "taskset", "-c", "1", sys.executable, "-c", NAIVE,
                COLLECTOR, str(PORT)]
        p = subprocess.Popen(argv, env=self.env, cwd=str(ROOT), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"naive loop failed: {p.communicate()[1]}")
        return p

    def trafgen(self, size: int, rate: Optional[int], dev: str = "g0",
                also: tuple[str, ...] = (), flows: bool = False) -> float:
        """trafgen on `dev` (and, at the same time and rate, on each of `also`);
        `flows`: 256 flows, the source port's low byte counting up per frame."""
        cfg = Path(self.tmp, f"frame{size}{'-flows' if flows else ''}.cfg")
        if not cfg.exists():
            data = [f"0x{b:02x}" for b in frame_bytes(size)]
            if flows:
                data[14 + 20 + 1] = "dinc(0, 255, 1)"
            cfg.write_text("{ " + ", ".join(data) + " }\n")
        others = []
        for other in also:
            argv = ["ip", "netns", "exec", self.gen, "taskset", "-c", "0", "trafgen", "-o", other,
                    "-i", str(cfg), "-P", "1", "--no-sock-mem", "-Q", "-C"]
            argv += (["-n", str(int(rate * self.seconds)), "-b", f"{rate}pps"] if rate
                     else ["-n", "1000000000"])
            others.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
        try:
            return self._trafgen(cfg, dev, rate)
        finally:
            for p in others:
                try:
                    p.wait(5 if rate else 0.1)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGINT)
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()

    def _trafgen(self, cfg: Path, dev: str, rate: Optional[int]) -> float:
        argv = ["ip", "netns", "exec", self.gen, "taskset", "-c", "0", "trafgen", "-o", dev,
                "-i", str(cfg), "-P", "1", "--no-sock-mem", "-Q", "-C"]
        if rate:
            argv += ["-n", str(int(rate * self.seconds)), "-b", f"{rate}pps"]
        else:
            argv += ["-n", "1000000000"]
        t0 = time.monotonic()
        # trafgen forks its sender: signal the whole (own) process group.
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            p.wait(self.seconds + 5 if rate else self.seconds)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return time.monotonic() - t0

    def case(self, impl: str, proc: subprocess.Popen[str], size: int,
             rate: Optional[int]) -> Result:
        time.sleep(0.3)
        m0, col = counter(self.rtr, "m0"), counter(self.col, "eth0")
        cpu0 = cpu_ticks(proc.pid)
        seconds = self.trafgen(size, rate)
        time.sleep(0.5)  # the last ring block retires; queued copies go out
        cpu1 = cpu_ticks(proc.pid)
        offered = counter(self.rtr, "m0") - m0
        copies = counter(self.col, "eth0") - col
        cpu = 100.0 * (cpu1 - cpu0) / os.sysconf("SC_CLK_TCK") / seconds
        return Result(impl, size, f"{rate // 1000}k" if rate else "max", offered, copies,
                      seconds, cpu)

    def two_taps(self, mode: str, size: int, rate: Optional[int]) -> Result:
        """Two busy taps (m0, m1): in one process, or one process each; the capture is
        not pinned (either CPU), trafgen on CPU 0 for both links."""
        if mode == "1 proc":
            procs = [self.start_worker(("m0", "m1"), cpus="0,1")]
        else:
            procs = [self.start_worker(("m0",), cpus="0,1"), self.start_worker(("m1",), cpus="0,1")]
        return self._measure(mode, procs, ("m0", "m1"), size, rate, also=("g1",))

    def _measure(self, impl: str, procs: list[subprocess.Popen[str]], links: tuple[str, ...],
                 size: int, rate: Optional[int], also: tuple[str, ...] = (),
                 flows: bool = False) -> Result:
        """Offer traffic to `links` (trafgen on g0, and on `also`), count what
        they received and what reached the collector, then stop `procs`."""
        try:
            time.sleep(0.3)
            rx0 = sum(counter(self.rtr, link) for link in links)
            col0 = counter(self.col, "eth0")
            cpu0 = sum(cpu_ticks(p.pid) for p in procs)
            seconds = self.trafgen(size, rate, "g0", also=also, flows=flows)
            time.sleep(0.5)
            cpu1 = sum(cpu_ticks(p.pid) for p in procs)
            offered = sum(counter(self.rtr, link) for link in links) - rx0
            copies = counter(self.col, "eth0") - col0
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                try:
                    p.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
        cpu = 100.0 * (cpu1 - cpu0) / os.sysconf("SC_CLK_TCK") / seconds
        return Result(impl, size, f"{rate // 1000}k" if rate else "max", offered, copies,
                      seconds, cpu)

    def group(self, members: int, size: int, rate: Optional[int]) -> Result:
        """A group of `members` (1 or 2): a capture process per member, each
        with its buckets' filter, sending to its own collector address."""
        from mirrord.plan.groups import assign, bucket_ranges

        names = [COLLECTOR, COLLECTOR2][:members]
        held = assign(names, set(names))
        procs = [self.start_worker(("m0",), cpus="0,1", collector=a, buckets=",".join(
            f"{lo}-{hi}" for lo, hi in bucket_ranges(held[a]))) for a in names]
        return self._measure(f"{members} member{'s' if members > 1 else ''}", procs, ("m0",),
                             size, rate, flows=True)

    def run(self, impl: str, sizes: list[int], rates: list[Optional[int]]) -> list[Result]:
        proc = self.start_worker() if impl == "mirrord" else self.start_naive()
        out = []
        try:
            for size in sizes:
                for rate in rates:
                    r = self.case(impl, proc, size, rate)
                    print_row(r)
                    out.append(r)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if impl == "mirrord" and err.strip():
                print("   worker:", err.strip().splitlines()[-1], flush=True)
        return out


SEND_FLOOR = r"""
import ctypes, resource, sys, time
from mirrord.tzsp.send import IOV_PAIR, IOV_PAIR_SIZE, UdpBatchSender
s = UdpBatchSender(sys.argv[1], int(sys.argv[2]))
buf = ctypes.create_string_buffer(b"\x01\x00\x00\x01\x01" + b"A" * 64)
a = ctypes.addressof(buf)
for i in range(s.capacity):
    IOV_PAIR.pack_into(s.iov, i * IOV_PAIR_SIZE, a, 5, a + 5, 64)
n, t0, r0 = 0, time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
while time.monotonic() - t0 < float(sys.argv[3]):
    n += s.flush(s.capacity)[0]
dt, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(f"{n / dt:.0f} {100 * cpu / dt:.1f} {1e9 * cpu / max(n, 1):.0f}")
"""


def send_floor(b: Bench) -> str:
    """What the kernel alone costs: sendmmsg of 69-byte datagrams, no capture."""
    p = subprocess.run(["ip", "netns", "exec", b.rtr, "taskset", "-c", "1", sys.executable, "-c",
                        SEND_FLOOR, COLLECTOR, str(PORT), str(min(b.seconds, 2.0))],
                       capture_output=True, text=True, env=b.env, cwd=str(ROOT), timeout=60)
    if p.returncode != 0:
        return f"send floor: failed: {p.stderr.strip()}"
    rate, cpu, ns = p.stdout.split()
    return (f"# send floor (sendmmsg only, 69-byte datagrams, no capture): {float(rate):,.0f}/s "
            f"at {cpu}% CPU = {ns} ns CPU per datagram")


def print_header() -> None:
    print(f"{'impl':8} {'frame':>5} {'rate':>5} {'offered':>9} {'offered/s':>10} "
          f"{'copies':>9} {'delivery':>9} {'CPU%':>6}", flush=True)


def print_row(r: Result) -> None:
    print(f"{r.impl:8} {r.size:5d} {r.rate:>5} {r.offered:9d} {r.offered_pps:10.0f} "
          f"{r.copies:9d} {r.delivery:8.2f}% {r.cpu:6.1f}", flush=True)


def lossless(results: list[Result], size: int, impl: Optional[str] = None) -> float:
    ok = [r.offered_pps for r in results if r.size == size and r.delivery >= LOSSLESS
          and (impl is None or r.impl == impl)]
    return max(ok) if ok else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="traffic per case (default 3)")
    p.add_argument("--rates", default="50000,200000,400000,max",
                   help="comma-separated pps, 'max' = trafgen's maximum")
    p.add_argument("--sizes", default="64,1400")
    p.add_argument("--ring-mib", type=int, default=0,
                   help="worker ring size (default: mirrord's, 512 KiB)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--two-taps", action="store_true",
                   help="instead: two busy taps, in one process vs one process each")
    p.add_argument("--group", action="store_true",
                   help="instead: a collector group of 1 member vs 2 (a process each)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("trafgen", "taskset", "nft", "ip"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    rates: list[Optional[int]] = [None if r == "max" else int(r) for r in args.rates.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.seconds:g} s per case; trafgen on CPU 0, mirroring process on CPU 1")
    if args.two_taps:
        return two_taps_main(args.seconds, args.ring_mib, sizes, rates)
    if args.group:
        return group_main(args.seconds, args.ring_mib, sizes, rates)
    with Bench(args.seconds, args.ring_mib) as b:
        print(send_floor(b), flush=True)
        print_header()
        ours = b.run("mirrord", sizes, rates)
        naive: list[Result] = []
        if not args.skip_naive:
            naive = b.run("naive", sizes, rates)
            slow = [r for r in rates if r] or [50000]
            # Find the naive loop's lossless rate when it is below the lowest tried.
            for size in sizes:
                rate = min(slow)
                while lossless(naive, size) == 0 and rate > 5000:
                    rate //= 2
                    naive += b.run("naive", [size], [rate])
    print()
    for size in sizes:
        summarize(size, ours, naive)
    return 0


def side_by_side(seconds: float, ring_mib: int, sizes: list[int], rates: list[Optional[int]],
                 variants: tuple[str, ...],
                 one: Callable[[Bench, str, int, Optional[int]], Result]) -> list[Result]:
    """Every variant at each size and rate, one after the other: ratios from one run."""
    print_header()
    results = []
    with Bench(seconds, ring_mib) as b:
        for size in sizes:
            for rate in rates:
                for variant in variants:
                    r = one(b, variant, size, rate)
                    print_row(r)
                    results.append(r)
    print()
    return results


def two_taps_main(seconds: float, ring_mib: int, sizes: list[int],
                  rates: list[Optional[int]]) -> int:
    """Does a process per tap buy throughput? Rates are per link (two links)."""
    print(f"# two taps: m0 and m1 each offered the rate; trafgen for both on CPU 0; the "
          f"capture on either CPU; {seconds:g} s per case")
    results = side_by_side(seconds, ring_mib, sizes, rates, ("1 proc", "2 procs"),
                           lambda b, mode, size, rate: b.two_taps(mode, size, rate))
    for size in sizes:
        for mode in ("1 proc", "2 procs"):
            rs = [r for r in results if r.size == size and r.impl == mode]
            best = max((r.copies / r.seconds for r in rs), default=0.0)
            print(f"{size}-byte frames, {mode}: lossless up to "
                  f"{lossless(results, size, mode):,.0f} pps offered (both links), "
                  f"most copies/s {best:,.0f}")
    return 0


def group_main(seconds: float, ring_mib: int, sizes: list[int],
               rates: list[Optional[int]]) -> int:
    """Does a second member (a second capture process) carry more? Side by
    side, rate by rate: 1 member, then 2."""
    print(f"# group: m0 offered 256 flows; 1 member (one capture process) against 2 "
          f"(one each); trafgen on CPU 0, captures on either CPU; {seconds:g} s per case")
    results = side_by_side(seconds, ring_mib, sizes, rates, ("1", "2"),
                           lambda b, n, size, rate: b.group(int(n), size, rate))
    for size in sizes:
        one, two = (lossless(results, size, m) for m in ("1 member", "2 members"))
        best = {m: max((r.copies / r.seconds for r in results
                        if r.size == size and r.impl == m), default=0.0)
                for m in ("1 member", "2 members")}
        ratio = f"{two / one:.2f}x" if one else "-"
        print(f"{size}-byte frames: lossless up to {one:,.0f} pps with 1 member, {two:,.0f} "
              f"with 2 ({ratio}; target >= 1.5x); most copies/s {best['1 member']:,.0f} vs "
              f"{best['2 members']:,.0f}")
    return 0


def summarize(size: int, ours: list[Result], naive: list[Result]) -> None:
    ol = lossless(ours, size)
    print(f"{size}-byte frames:")
    print(f"  mirrord lossless (>= {LOSSLESS}%) up to {ol:,.0f} pps" if ol else
          "  mirrord not lossless at any rate tried")
    if not naive:
        return
    nl = lossless(naive, size)
    if nl:
        print(f"  naive lossless up to {nl:,.0f} pps; ratio of lossless rates "
              f"{ol / nl:.1f}x")
    else:
        low = min(r.offered_pps for r in naive if r.size == size)
        print(f"  naive not lossless at any rate tried (down to {low:,.0f} pps): ratio of "
              f"lossless rates > {ol / low:.1f}x" if ol else
              f"  naive not lossless at any rate tried (down to {low:,.0f} pps)")
    # Throughput and cost, case by case (same offered rate label).
    for r in (r for r in ours if r.size == size):
        n = next((x for x in naive if x.size == size and x.rate == r.rate), None)
        if n is None or not n.copies or not r.copies:
            continue
        ours_ns = 1e7 * r.cpu * r.seconds / r.copies
        naive_ns = 1e7 * n.cpu * n.seconds / n.copies
        print(f"  {r.rate:>4}: copies/s mirrord {r.copies / r.seconds:9,.0f} naive "
              f"{n.copies / n.seconds:9,.0f} ({r.copies / r.seconds / (n.copies / n.seconds):4.1f}x)"
              f"; CPU per copy {ours_ns:5.0f} ns vs {naive_ns:5.0f} ns")


if __name__ == "__main__":
    sys.exit(main())
