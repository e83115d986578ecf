"""Shared pieces of the benchmarks: a sequenced stream, a timestamping capture, statistics.

The sender (in the LAN namespace) sends datagrams "hx SEQ T_SEND" at a fixed
rate and, when told to stop, writes every (seq, send time) it sent. The
capture (in the collector namespace) receives on all its interfaces through
AF_PACKET with SO_TIMESTAMPNS, so each copy carries the kernel's receive time
on CLOCK_REALTIME, the clock the router namespace stamps its disruptions
with. Both run as separate processes and write files the bench reads after.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.lab import Lab, Netns  # noqa: E402 - after the path set-up above

STREAM_PORT = 5555

# argv: port, out file. Stops when stdin closes. Rows: [seq, t_send, t_rx].
CAPTURE = r"""
import json, select, socket, struct, sys
port, path = int(sys.argv[1]), sys.argv[2]
SO_TIMESTAMPNS = 35
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
s.setblocking(False)
rows = []
print("ready", flush=True)
done = False
while not done:
    r, _, _ = select.select([s, sys.stdin], [], [], 1.0)
    if sys.stdin in r:
        done = True  # drain what is queued, then stop
    while True:
        try:
            frame, anc, _, addr = s.recvmsg(2048, 64)
        except BlockingIOError:
            break
        if addr[0] == "lo" or addr[2] == socket.PACKET_OUTGOING or len(frame) < 42:
            continue
        off = 14 + (frame[14] & 15) * 4
        if frame[23] != 17 or struct.unpack_from("!H", frame, off + 2)[0] != port:
            continue
        parts = frame[off + 8:].split()
        if len(parts) != 3 or parts[0] != b"hx":
            continue
        t = None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", data[:16])
                t = sec + nsec / 1e9
        rows.append([int(parts[1]), float(parts[2]), t])
with open(path, "w") as f:
    json.dump(rows, f)
print(len(rows), flush=True)
"""

# argv: dst, port, rate, max seconds, out file. Stops when stdin closes (or
# at max seconds) and writes [[seq, t_send], ...] of what it sent.
SENDER = r"""
import json, select, socket, sys, time
dst, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[5]
rate, limit = float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = []
print("go", flush=True)
t0 = time.monotonic()
i = 0
while time.monotonic() - t0 < limit:
    if i % 100 == 0 and select.select([sys.stdin], [], [], 0)[0]:
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
with open(path, "w") as f:
    json.dump(sent, f)
print(len(sent), flush=True)
"""


@dataclass
class StreamData:
    sent: dict[int, float]  # seq -> send time (CLOCK_REALTIME)
    copies: list[tuple[int, float, float]]  # (seq, send time, receive time), in arrival order

    def copied(self) -> dict[int, float]:
        """seq -> first receive time."""
        out: dict[int, float] = {}
        for seq, _, t in self.copies:
            out.setdefault(seq, t)
        return out


class Stream:
    """A sequenced stream LAN -> WAN and a capture at the collector, for one measurement."""

    def __init__(self, lab: Lab, dst: str, rate: float, limit: float, workdir: str,
                 src: Optional[Netns] = None, port: int = STREAM_PORT) -> None:
        self.lab, self.dst, self.rate, self.limit = lab, dst, rate, limit
        self.src = src or lab.lan
        self.port = port
        self.cap_path = os.path.join(workdir, f"capture-{id(self)}.json")
        self.snd_path = os.path.join(workdir, f"sent-{id(self)}.json")
        self.capture: Optional[subprocess.Popen[str]] = None
        self.sender: Optional[subprocess.Popen[str]] = None
        self.data: Optional[StreamData] = None

    def __enter__(self) -> Stream:
        self.capture = self.lab.col.popen(sys.executable, "-c", CAPTURE, str(self.port),
                                          self.cap_path, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True)
        assert self.capture.stdout is not None
        if self.capture.stdout.readline().strip() != "ready":
            raise RuntimeError("capture did not start")
        self.sender = self.src.popen(sys.executable, "-c", SENDER, self.dst, str(self.port),
                                     str(self.rate), str(self.limit), self.snd_path,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.sender.stdout is not None
        if self.sender.stdout.readline().strip() != "go":
            raise RuntimeError("sender did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.sender is not None and self.capture is not None
        try:
            self.sender.communicate("", timeout=30)
        finally:
            if self.sender.poll() is None:
                self.sender.kill()
                self.sender.wait()
        time.sleep(0.3)  # copies still in flight land before the capture stops
        try:
            self.capture.communicate("", timeout=30)
        finally:
            if self.capture.poll() is None:
                self.capture.kill()
                self.capture.wait()
        if exc[0] is not None:
            return
        sent = {int(a): float(b) for a, b in json.loads(Path(self.snd_path).read_text())}
        copies = [(int(a), float(b), float(c) if c is not None else float(b))
                  for a, b, c in json.loads(Path(self.cap_path).read_text())]
        self.data = StreamData(sent, copies)

    @property
    def result(self) -> StreamData:
        assert self.data is not None
        return self.data


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


def analyse(data: StreamData, trials: list[Trial], end: Optional[float] = None) -> None:
    """Attribute each lost copy to the disruption it followed; time the first copy after."""
    copied = data.copied()
    order = sorted(data.sent.items(), key=lambda kv: kv[1])
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
