"""A sequenced UDP stream across the lab, and the capture of its copies at the collector.

The sender (in the LAN namespace, or any) sends datagrams "hx SEQ T_SEND" at a
fixed rate, T_SEND on CLOCK_REALTIME; a send that fails (the route is gone for
a moment) is skipped, not retried. The capture (in the collector namespace)
receives on all its interfaces through AF_PACKET, bound to no interface so it
keeps seeing copies when eth0 is re-created, and records every copy of the
stream, whether a kernel clone (the original UDP packet) or TZSP-wrapped, with
the kernel's receive time (SO_TIMESTAMPNS, the clock the router namespace
stamps its disruptions with); VXLAN copies (UDP 4789) are unwrapped too.
Both run as separate processes and write files that `Stream` reads when the
`with` block ends.

Tests prove a heal by these copies (tests/e2e/test_heal.py); the benchmarks
time it (bench/bench_heal.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tests.harness.lab import WAN_HOST, Lab, Netns

STREAM_PORT = 5555
TZSP_PORT = 37008
RATE = 500.0  # packets/s: one every 2 ms, fine enough to see a 10 ms gap

# argv: stream port, TZSP port, out file. Prints "ready", then records until
# stdin closes (what is queued by then is still read) and writes
# [[seq, t_send, t_rx, kind], ...] in arrival order.
CAPTURE = r"""
import json, select, socket, struct, sys, time
port, tzsp_port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
SO_TIMESTAMPNS = 35
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
s.setblocking(False)
out = []

def udp(frame, off):
    if len(frame) < off + 20 or frame[off - 2:off] != b"\x08\x00" or frame[off + 9] != 17:
        return None
    ihl = (frame[off] & 15) * 4
    sport, dport = struct.unpack_from("!HH", frame, off + ihl)
    return dport, frame[off + ihl + 8:]

def stream(payload):
    parts = payload.split()
    if len(parts) == 3 and parts[0] == b"hx":
        return int(parts[1]), float(parts[2])
    return None

def record(frame, anc, addr):
    if addr[0] == "lo" or addr[2] == socket.PACKET_OUTGOING:
        return
    u = udp(frame, 14)
    if u is None:
        return
    kind, payload = "clone", u[1]
    if u[0] == tzsp_port:
        # version, type, encapsulation, then tags up to END (1); PAD (0) is one byte.
        body, i = u[1], 4
        while i < len(body) and body[i] not in (1,):
            i += 1 if body[i] == 0 else 2 + body[i + 1]
        inner = udp(body[i + 1:], 14)
        if inner is None:
            return
        kind, payload = "tzsp", inner[1]
    elif u[0] == 4789 and len(u[1]) > 8 and u[1][0] & 8:
        inner = udp(u[1][8:], 14)  # VXLAN: 8-byte header, then the whole frame
        if inner is None:
            return
        kind, payload = "vxlan", inner[1]
    elif u[0] != port:
        return
    got = stream(payload)
    if got is None:
        return
    t = time.time()
    for level, kind_, data in anc:
        if level == socket.SOL_SOCKET and kind_ == SO_TIMESTAMPNS:
            sec, nsec = struct.unpack("qq", data[:16])
            t = sec + nsec / 1e9
    out.append([got[0], got[1], t, kind])

print("ready", flush=True)
done = False
while not done:
    r, _, _ = select.select([s, sys.stdin], [], [], 1.0)
    if sys.stdin in r:
        done = True  # drain what is queued, then stop
    while True:
        try:
            frame, anc, _, addr = s.recvmsg(65535, 64)
        except BlockingIOError:
            break
        record(frame, anc, addr)
with open(path, "w") as f:
    json.dump(out, f)
print(len(out), flush=True)
"""

# argv: dst, port, count, rate [, out file [, "stoppable"]]. Sends `count`
# datagrams "hx SEQ T_SEND", paced; "stoppable": stops early once stdin is
# readable (closed). Writes {"attempted": N, "sent": [[seq, t_send], ...]}.
SENDER = r"""
import json, select, socket, sys, time
dst, port, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
path = sys.argv[5] if len(sys.argv) > 5 else None
stoppable = len(sys.argv) > 6 and sys.argv[6] == "stoppable"
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
sent = []
print("go", flush=True)
t0 = time.monotonic()
i = 0
while i < count:
    if stoppable and i % 100 == 0 and select.select([sys.stdin], [], [], 0)[0]:
        break
    t = time.time()
    try:
        s.sendto(b"hx %d %.6f" % (i, t), (dst, port))
        sent.append((i, t))
    except OSError:
        pass
    i += 1
    d = t0 + i / rate - time.monotonic()
    if d > 0:
        time.sleep(d)
if path:
    with open(path, "w") as f:
        json.dump({"attempted": i, "sent": sent}, f)
print(i - len(sent), flush=True)
"""


@dataclass
class Copies:
    """What the collector received of one stream of `sent` packets (sequence numbers 0 .. sent-1)."""

    sent: int
    rate: float
    rows: list[tuple[int, float, float, str]] = field(default_factory=list)  # seq, t_send, t_rx, kind
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> send time, of every sent one

    def per_seq(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for seq, *_ in self.rows:
            out[seq] = out.get(seq, 0) + 1
        return out

    def copied(self) -> dict[int, float]:
        """seq -> the receive time of its first copy."""
        out: dict[int, float] = {}
        for seq, _, t, _ in self.rows:
            out.setdefault(seq, t)
        return out

    def missing(self) -> list[int]:
        got = self.per_seq()
        return [i for i in range(self.sent) if i not in got]

    def duplicated(self, start: int = 0) -> list[int]:
        return [s for s, n in self.per_seq().items() if n > 1 and s >= start]

    def gaps(self) -> list[tuple[int, int]]:
        """Runs of missing sequence numbers, as (first, last)."""
        runs: list[tuple[int, int]] = []
        for s in self.missing():
            if runs and runs[-1][1] == s - 1:
                runs[-1] = (runs[-1][0], s)
            else:
                runs.append((s, s))
        return runs

    def gap_seconds(self, run: tuple[int, int]) -> float:
        """Send-time span of a gap: last copy before it to first copy after it."""
        sent_at = {seq: ts for seq, ts, _, _ in self.rows}
        before = sent_at.get(run[0] - 1, run[0] / self.rate)
        after = sent_at.get(run[1] + 1, (run[1] + 1) / self.rate)
        return after - before

    def first_sent_after(self, t: float) -> int:
        """The first sequence number copied among those sent at wall time `t` or later."""
        return min((seq for seq, ts, _, _ in self.rows if ts >= t), default=self.sent)

    def complete_from(self, first: int) -> bool:
        """Every packet from `first` to the end copied exactly once."""
        per = self.per_seq()
        return first < self.sent and all(per.get(s) == 1 for s in range(first, self.sent))

    def kinds(self, first: int) -> set[str]:
        return {k for seq, _, _, k in self.rows if seq >= first}

    def summary(self) -> str:
        return (f"sent {self.sent}, copies {len(self.rows)}, gaps {self.gaps()[:5]}, "
                f"duplicates {len(self.duplicated())}")


class Stream:
    """A paced UDP stream from `src` (the LAN host) to `dst`, with a capture at the collector.

    `seconds` at `rate` packets/s. By default the end of the `with` block waits
    for the whole stream; `open_ended=True` stops it there instead (`seconds`
    is then only its upper bound).
    """

    def __init__(self, lab: Lab, seconds: float, src: Optional[Netns] = None,
                 dst: str = WAN_HOST, rate: float = RATE, port: int = STREAM_PORT,
                 tzsp_port: int = TZSP_PORT, open_ended: bool = False) -> None:
        self.lab, self.src, self.dst, self.rate = lab, src or lab.lan, dst, rate
        self.port, self.tzsp_port, self.open_ended = port, tzsp_port, open_ended
        self.count = int(seconds * rate)
        self.capture: Optional[subprocess.Popen[str]] = None
        self.sender: Optional[subprocess.Popen[str]] = None
        self.copies: Optional[Copies] = None
        self.t0 = self.wall0 = 0.0
        self.workdir = tempfile.TemporaryDirectory(prefix="mirrord-stream-")
        self.cap_path = str(Path(self.workdir.name, "capture.json"))
        self.snd_path = str(Path(self.workdir.name, "sent.json"))

    def __enter__(self) -> Stream:
        self.capture = self.lab.col.popen(sys.executable, "-c", CAPTURE, str(self.port),
                                          str(self.tzsp_port), self.cap_path,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.capture.stdout is not None
        assert self.capture.stdout.readline().strip() == "ready", "the capture did not start"
        self.sender = self.src.popen(sys.executable, "-c", SENDER, self.dst, str(self.port),
                                     str(self.count), str(self.rate), self.snd_path,
                                     "stoppable" if self.open_ended else "-",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.sender.stdout is not None
        assert self.sender.stdout.readline().strip() == "go", "the sender did not start"
        self.t0, self.wall0 = time.monotonic(), time.time()
        return self

    def at(self, seconds: float) -> None:
        """Sleep until `seconds` after the stream started."""
        time.sleep(max(0.0, self.t0 + seconds - time.monotonic()))

    def wall(self, seconds: float) -> float:
        """The wall-clock time `seconds` after the stream started (send stamps use it)."""
        return self.wall0 + seconds

    def __exit__(self, *exc: object) -> None:
        assert self.sender is not None and self.capture is not None
        try:
            if self.open_ended:
                self.sender.communicate("", timeout=30)
            else:
                self.sender.communicate(timeout=self.count / self.rate + 20)
        finally:
            if self.sender.poll() is None:
                self.sender.kill()
                self.sender.wait()
            # Copies in flight (TZSP batches, queued ARP) still land.
            time.sleep(0.3)
            try:
                self.capture.communicate("", timeout=30)
            finally:
                if self.capture.poll() is None:
                    self.capture.kill()
                    self.capture.wait()
        try:
            if exc[0] is None:
                sent = json.loads(Path(self.snd_path).read_text())
                rows = json.loads(Path(self.cap_path).read_text())
                self.copies = Copies(
                    int(sent["attempted"]), self.rate,
                    [(int(a), float(b), float(c), str(d)) for a, b, c, d in rows],
                    {int(a): float(b) for a, b in sent["sent"]})
        finally:
            self.workdir.cleanup()

    @property
    def result(self) -> Copies:
        assert self.copies is not None
        return self.copies
