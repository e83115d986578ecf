"""TZSP and BPF probes that run inside a namespace, and a worker runner.

Run inside a namespace as `python -m tests.harness.tzsp COMMAND ...`:

- `bpf-probe JSON`: open an unfiltered and a filtered packet socket on an
  interface, send the given frames in both directions, print which markers
  each socket saw (JSON).
- `run-worker JOB_JSON`: start a TzspWorker, print "ready PID" once it is
  capturing, stop it on SIGTERM (or when it exits by itself) and print its
  counters and exit reason (JSON).
- `send-frames IFACE HEX...`, `send-udp ADDR PORT HEX...`, `tun-write TUN HEX...`:
  put the given frames, datagrams or packets on the wire.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, Optional

from tests.harness.capture import markers_in
from tests.harness.lab import ROOT, python_env


def in_netns(ns: str, *args: str, input: Optional[str] = None, timeout: float = 60) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.harness.tzsp",
                        *args], capture_output=True, text=True, timeout=timeout, env=python_env(),
                       cwd=str(ROOT), input=input)
    if p.returncode != 0:
        raise RuntimeError(f"tests.harness.tzsp {args[:1]} in {ns} -> {p.returncode}\n"
                           f"{p.stdout}\n{p.stderr}")
    return p.stdout


def bpf_probe(ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `bpf-probe` in `ns`; see `_bpf_probe`."""
    out: dict[str, Any] = json.loads(in_netns(ns, "bpf-probe", input=json.dumps(spec)))
    return out


def _drain(socks: dict[socket.socket, list[tuple[int, int]]], quiet: float) -> None:
    """Read every socket until none has had anything for `quiet` seconds."""
    while True:
        r, _, _ = select.select(list(socks), [], [], quiet)
        if not r:
            return
        for sock in r:
            data = sock.recv(65535)
            socks[sock].extend((m, len(data)) for m in markers_in(data))


def _bpf_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Frames "in" are sent from the peer (they arrive on `dev`), frames "out"
    are sent on `dev` itself (outgoing there). `dev` t0 means a tun device:
    "in" frames are written to its fd, "out" frames sent through it."""
    from mirrord.tzsp.bpf import attach, compile_filter
    from mirrord.tzsp.job import match_from_dict
    from mirrord.tzsp.ring import link_kind

    dev = spec.get("dev", "vb")
    match = match_from_dict(spec.get("match", {}))
    import ipaddress

    exclude = tuple(ipaddress.ip_address(a) for a in spec.get("exclude", ()))
    control = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    control.bind((dev, 3))
    filtered = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    filtered.bind((dev, 0))
    link = link_kind(filtered.getsockname()[3])
    directions = tuple(spec.get("directions", ("in", "out")))
    program = compile_filter(match, exclude, directions=directions,
                             link=link, snaplen=int(spec.get("snaplen", 65535)))
    attach(filtered, program)
    filtered.bind((dev, 3))
    # A group's members: one more filtered socket per bucket list.
    shares: list[socket.socket] = []
    for held in spec.get("partitions", ()):
        share = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        share.bind((dev, 0))
        attach(share, compile_filter(match, exclude, directions=directions, link=link,
                                     buckets=held))
        share.bind((dev, 3))
        shares.append(share)
    if dev == "t0":
        import fcntl

        tun = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH", b"t0", 0x0001 | 0x1000))
        # Attaching the fd turns the carrier on, but the kernel activates the
        # device's qdisc later, from linkwatch (up to a second on a busy
        # machine); until then outgoing frames are dropped unseen by taps.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/sys/class/net/{dev}/operstate") as f:
                if f.read().strip() != "down":
                    break
            time.sleep(0.01)
        for hexframe in spec.get("in", ()):
            os.write(tun, bytes.fromhex(hexframe))
        out_sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        for hexframe in spec.get("out", ()):
            pkt = bytes.fromhex(hexframe)
            proto = 0x0800 if pkt[0] >> 4 == 4 else 0x86DD
            out_sock.sendto(pkt, (dev, proto))
    else:
        peer = spec.get("peer", "va")
        in_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        in_sock.bind((peer, 0))
        out_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        out_sock.bind((dev, 0))
        for hexframe in spec.get("in", ()):
            in_sock.send(bytes.fromhex(hexframe))
        for hexframe in spec.get("out", ()):
            out_sock.send(bytes.fromhex(hexframe))
    seen_control: list[tuple[int, int]] = []
    seen_filtered: list[tuple[int, int]] = []
    seen_shares: list[list[tuple[int, int]]] = [[] for _ in shares]
    _drain({control: seen_control, filtered: seen_filtered,
            **dict(zip(shares, seen_shares))}, 0.3)
    # markers each socket saw, and the captured length of each filtered one
    return {"control": sorted(m for m, _ in seen_control),
            "filtered": sorted(m for m, _ in seen_filtered),
            "lengths": {str(m): n for m, n in seen_filtered},
            "partitions": [sorted(m for m, _ in seen) for seen in seen_shares],
            "program_len": len(program)}


# -- running a worker through the daemon's handle ---------------------------------

def _run_worker(job_json: str, timeout: float) -> int:
    from mirrord.tzsp.job import TzspJob
    from mirrord.tzsp.worker import TzspWorker

    job = TzspJob.from_json(job_json)
    w = TzspWorker(job)
    stop = {"flag": False}

    def on_term(*_: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    w.start()
    deadline = time.monotonic() + timeout
    announced = False
    while not stop["flag"] and time.monotonic() < deadline:
        if not announced and w.state() == "running":
            print(f"ready {w.pid}", flush=True)
            announced = True
        r, _, _ = select.select([w.sentinel] if w.sentinel >= 0 else [], [], [], 0.05)
        # Readable: an event (a log line too); poll() says whether the tap ended.
        if (r or w.sentinel < 0) and w.poll() is not None:
            break
    if not announced:
        print(f"ready {w.pid}", flush=True)  # exited before running: report anyway
    reason_before_stop = w.poll()
    w.stop()
    c = w.counters()
    result = {"reason": w.poll(), "exited_by_itself": reason_before_stop, **asdict(c)}
    print(json.dumps(result), flush=True)
    w.close()
    return 0


class WorkerRun:
    """A TZSP worker running (through TzspWorker) inside a namespace."""

    def __init__(self, ns: str, job_json: str, timeout: float = 120) -> None:
        import tempfile

        self.errfile = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the run
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.harness.tzsp", "run-worker",
             job_json, str(timeout)],
            stdout=subprocess.PIPE, stderr=self.errfile, text=True, env=python_env(), cwd=str(ROOT))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.kill()
            raise RuntimeError(f"worker did not start: {line!r}\n{self._stderr()}")
        self.pid = int(line.split()[1])
        self.result: Optional[dict[str, Any]] = None
        self.stderr = ""

    def _stderr(self) -> str:
        self.errfile.seek(0)
        return self.errfile.read().decode(errors="replace")

    def _collect(self, timeout: float) -> dict[str, Any]:
        # Read through the same buffered stream readline() used: it may
        # already hold the result line.
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        out = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"worker runner did not finish:\n{out}\n{self._stderr()}")
            line = self.proc.stdout.readline()
            if not line:
                break
            out += line
        self.proc.wait(max(0.1, deadline - time.monotonic()))
        self.stderr = self._stderr()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"worker runner printed no result:\n{out}\n{self.stderr}")
        self.result = json.loads(lines[-1])
        return self.result

    def stop(self, timeout: float = 20) -> dict[str, Any]:
        if self.result is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            self._collect(timeout)
        assert self.result is not None
        return self.result

    def wait_exit(self, timeout: float = 20) -> dict[str, Any]:
        """Wait for the worker to exit by itself (the runner then reports)."""
        if self.result is None:
            self._collect(timeout)
        assert self.result is not None
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _send_frames(iface: str, frames: list[str]) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((iface, 0))
    for f in frames:
        s.send(bytes.fromhex(f))


def _send_udp(addr: str, port: int, datagrams: list[str]) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    for d in datagrams:
        s.sendto(bytes.fromhex(d), (addr, port))
        time.sleep(0.01)


def _tun_write(name: str, packets: list[str]) -> None:
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
    for p in packets:
        os.write(fd, bytes.fromhex(p))
        time.sleep(0.01)
    os.close(fd)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "bpf-probe":
        print(json.dumps(_bpf_probe(json.loads(sys.stdin.read()))))
        return 0
    if cmd == "run-worker":
        return _run_worker(argv[1], float(argv[2]) if len(argv) > 2 else 120.0)
    if cmd == "send-frames":
        _send_frames(argv[1], argv[2:])
        return 0
    if cmd == "send-udp":
        _send_udp(argv[1], int(argv[2]), argv[3:])
        return 0
    if cmd == "tun-write":
        _tun_write(argv[1], argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
