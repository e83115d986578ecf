"""What reaches a collector: pcap files, tcpdump and `mirrord receive` in a namespace, markers.

Counting copies in the collector's own kernel (a netdev ingress counter) is
`Lab.count_at_collector`; recording a sequenced stream's copies is stream.py.
"""

from __future__ import annotations

import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.lab import ROOT, python_env

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


# -- processes that capture or receive, in a namespace ---------------------------

class Background:
    """A process in a namespace that says on stderr when it is ready."""

    def __init__(self, ns: str, argv: list[str], ready: str, timeout: float = 15) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=python_env(), cwd=str(ROOT))
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
    # A 16 MiB buffer (tcpdump's default is 2 MiB): a burst of full-size
    # fragments overflowed the default while tcpdump wrote to disk.
    argv = ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-B", "16384", "-s", "0",
            "-w", path]
    return Background(ns, argv + ([bpf] if bpf else []), "listening on")


def receiver(ns: str, *args: str) -> Background:
    """`mirrord receive ARGS` (through the real CLI), once it is listening."""
    return Background(ns, [sys.executable, "-m", "mirrord", "receive", "-v", *args],
                      "listening for TZSP")
