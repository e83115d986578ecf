"""Helpers for the TZSP tests: pcap reading, namespace probes, a worker runner.

Run inside a namespace as `python -m tests.tzsp_helpers COMMAND ...`:

- `bpf-probe JSON`: open an unfiltered and a filtered packet socket on an
  interface, send the given frames in both directions, print which markers
  each socket saw (JSON).
- `run-worker JOB_JSON`: start a TzspWorker, print "ready PID" once it is
  capturing, stop it on SIGTERM (or when it exits by itself) and print its
  counters and exit reason (JSON).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
MARK_RE = re.compile(rb"MRK(\d{4})")


def marker(i: int) -> bytes:
    return b"MRK%04d" % i


def markers_in(data: bytes) -> list[int]:
    return [int(m.group(1)) for m in MARK_RE.finditer(data)]


# -- pcap ----------------------------------------------------------------------

def read_pcap(path: str) -> tuple[int, list[tuple[bytes, int]]]:
    """(linktype, [(frame, original length)]) of a classic pcap file."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file ({len(data)} bytes)")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = ">"
    else:
        raise ValueError(f"{path}: bad pcap magic {magic.hex()}")
    linktype = struct.unpack_from(e + "I", data, 20)[0]
    out = []
    pos = 24
    while pos + 16 <= len(data):
        _s, _us, incl, orig = struct.unpack_from(e + "IIII", data, pos)
        pos += 16
        out.append((data[pos:pos + incl], orig))
        pos += incl
    return linktype, out


def udp_payloads(frames: list[tuple[bytes, int]], dport: int) -> list[bytes]:
    """Payloads of unfragmented IPv4/UDP datagrams to `dport` in Ethernet frames."""
    out = []
    for f, _orig in frames:
        if len(f) < 42 or f[12:14] != b"\x08\x00":
            continue
        ihl = (f[14] & 0x0F) * 4
        if f[23] != 17 or struct.unpack_from("!H", f, 20)[0] & 0x3FFF:
            continue
        l4 = 14 + ihl
        if struct.unpack_from("!H", f, l4 + 2)[0] != dport:
            continue
        ulen = struct.unpack_from("!H", f, l4 + 4)[0]
        out.append(f[l4 + 8:l4 + ulen])
    return out


# -- namespaces for unit-level kernel tests -------------------------------------

_ns_counter = iter(range(1 << 30))


@contextmanager
def veth_namespace(mtu: int = 1500, tun: bool = False) -> Iterator[str]:
    """A namespace with a veth pair va <-> vb (both up) and optionally a tun t0."""
    name = f"mrdt{os.getpid() % 100000}x{next(_ns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        script = (f"ip link set lo up; ip link add va mtu {mtu} type veth peer name vb mtu {mtu};"
                  " ip link set va up; ip link set vb up;"
                  " sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        if tun:
            script += "; ip tuntap add mode tun name t0; ip link set t0 up"
        subprocess.run(["ip", "netns", "exec", name, "sh", "-ec", script], check=True,
                       capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_netns(ns: str, *args: str, input: Optional[str] = None, timeout: float = 60) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.tzsp_helpers",
                        *args], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=str(ROOT), input=input)
    if p.returncode != 0:
        raise RuntimeError(f"tzsp_helpers {args[:1]} in {ns} -> {p.returncode}\n"
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
    program = compile_filter(match, exclude, directions=tuple(spec.get("directions", ("in", "out"))),
                             link=link, snaplen=int(spec.get("snaplen", 65535)))
    attach(filtered, program)
    filtered.bind((dev, 3))
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
    _drain({control: seen_control, filtered: seen_filtered}, 0.3)
    # markers each socket saw, and the captured length of each filtered one
    return {"control": sorted(m for m, _ in seen_control),
            "filtered": sorted(m for m, _ in seen_filtered),
            "lengths": {str(m): n for m, n in seen_filtered},
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

        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.errfile = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the run
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.tzsp_helpers", "run-worker",
             job_json, str(timeout)],
            stdout=subprocess.PIPE, stderr=self.errfile, text=True, env=env, cwd=str(ROOT))
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


class Background:
    """A process in a namespace that says on stderr when it is ready."""

    def __init__(self, ns: str, argv: list[str], ready: str, timeout: float = 15) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        assert self.proc.stderr is not None
        self.early = b""
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stderr.fileno(), False)
        while ready.encode() not in self.early:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"{argv[:3]} not ready: {self.early.decode(errors='replace')}")
            select.select([self.proc.stderr], [], [], 0.1)
            chunk = self.proc.stderr.read()
            if chunk:
                self.early += chunk
        os.set_blocking(self.proc.stderr.fileno(), True)
        self.stdout = b""
        self.stderr = ""

    def wait(self, timeout: float = 30) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout = out
        self.stderr = (self.early + err).decode(errors="replace")
        return self.proc.returncode

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def tcpdump(ns: str, iface: str, path: str, bpf: str = "") -> Background:
    argv = ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-s", "0", "-w", path]
    return Background(ns, argv + ([bpf] if bpf else []), "listening on")


def receiver(ns: str, *args: str) -> Background:
    """`mirrord receive ARGS` (through the real CLI), once it is listening."""
    return Background(ns, [sys.executable, "-m", "mirrord", "receive", "-v", *args],
                      "listening for TZSP")


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
