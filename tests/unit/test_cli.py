"""What a person meets first: --help, and the commands run without root."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mirrord(*args: str, pre: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*pre, sys.executable, "-m", "mirrord", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd="/")


def test_status_help_gives_exit_codes_and_examples() -> None:
    out = mirrord("status", "--help").stdout
    assert "exit status:" in out
    for code, meaning in (("0", "every mirror is active"), ("1", "not active"),
                          ("2", "no daemon")):
        assert any(line.strip().startswith(code) and meaning in line for line in out.splitlines()), out
    assert "mirrord status --json" in out and "mirrord status --prometheus" in out


def test_top_level_help_has_examples() -> None:
    out = mirrord("--help").stdout
    assert "examples:" in out
    for command in ("check", "render", "run", "status", "flush", "trace", "receive"):
        assert f"  mirrord {command} " in out, command


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_receive_names_the_file_it_cannot_write() -> None:
    r = mirrord("receive", "--listen", f"127.0.0.1:{free_udp_port()}",
                "--write", "/nonexistent/x.pcap")
    assert r.returncode == 1
    assert r.stderr.strip() == ("mirrord receive: /nonexistent/x.pcap: No such file or directory"), r


def test_receive_says_where_it_listens_and_writes(tmp_path: Path) -> None:
    out = tmp_path / "x.pcap"
    listen = f"127.0.0.1:{free_udp_port()}"
    r = mirrord("receive", "--listen", listen, "--write", str(out), "--timeout", "0.2")
    assert r.returncode == 0, r
    first = r.stderr.splitlines()[0]
    assert first == (f"mirrord receive: listening for TZSP on {listen} (from any sender), "
                     f"writing to {out}; Ctrl-C ends it"), r
    assert out.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")  # a pcap file, even if empty
