"""sd_notify (mirrord.service.notify) against a real AF_UNIX datagram socket this test owns,
through systemd-python and through the fallback, and where logs go (mirrord.service.logsetup):
journal fields, syslog, stderr.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.service import logsetup
from mirrord.service.notify import Notifier

ROOT = Path(__file__).resolve().parent.parent.parent

try:
    import systemd.daemon  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False

BACKENDS = ["socket", pytest.param("systemd-python", marks=pytest.mark.skipif(
    not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed"))]


class NotifySocket:
    """The service manager's end: a datagram socket that also learns the sender's pid."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        # Like systemd: credentials on every datagram, to see who sent it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(2.0)

    def recv(self) -> tuple[list[str], int]:
        data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data.decode().split("\n"), pid

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        s = NotifySocket(path, path)
    else:
        name = f"mirrord-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        s = NotifySocket("@" + name, "\0" + name)
    yield s
    s.close()


def make(manager: NotifySocket, backend: str, monkeypatch: pytest.MonkeyPatch,
         **env: str) -> Notifier:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    n = Notifier.from_env(prefer_systemd=(backend == "systemd-python"))
    assert n.backend == backend
    return n


@pytest.mark.parametrize("backend", BACKENDS)
def test_protocol_messages(manager: NotifySocket, backend: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    n = make(manager, backend, monkeypatch)
    assert n.enabled

    assert n.ready("2 mirror(s): 2 active")
    lines, pid = manager.recv()
    assert lines == ["READY=1", "STATUS=2 mirror(s): 2 active"]
    assert pid == os.getpid()

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines, _ = manager.recv()
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=", 1)[1]) <= after

    # One assignment per line: a newline in the text must not forge another.
    assert n.status("waiting for br-lan\nREADY=1")
    assert manager.recv()[0] == ["STATUS=waiting for br-lan READY=1"]

    assert n.watchdog()
    assert manager.recv()[0] == ["WATCHDOG=1"]
    assert n.stopping()
    assert manager.recv()[0] == ["STOPPING=1"]
    assert n.ready()
    assert manager.recv()[0] == ["READY=1"]
    assert not manager.pending()


def test_inert_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    n = Notifier.from_env()
    assert not n.enabled and n.backend == "off"
    assert n.ready("x") is False and n.reloading() is False and n.status("x") is False
    assert n.watchdog() is False and n.stopping() is False
    # No manager to ping, whatever the inherited WATCHDOG_USEC says.
    assert n.watchdog_interval() is None


@pytest.mark.parametrize(("env", "expect"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(env: dict[str, str], expect: object, tmp_path: Path) -> None:
    environ = {k: (str(os.getpid()) if v == "self" else v) for k, v in env.items()}
    environ["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    assert Notifier.from_env(environ, prefer_systemd=False).watchdog_interval() == expect


def test_systemd_python_only_for_the_processes_own_socket(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """sd_notify() reads os.environ; a different socket must go through the fallback."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "elsewhere.sock"))
    path = str(tmp_path / "notify.sock")
    s = NotifySocket(path, path)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert n.backend == "socket"
        assert n.ready("ok")
        assert s.recv()[0] == ["READY=1", "STATUS=ok"]
    finally:
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vanished_manager_does_not_raise(tmp_path: Path, backend: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    s = NotifySocket(path, path)
    n = make(s, backend, monkeypatch)
    s.close()
    os.unlink(path)
    assert n.watchdog() is False
    assert n.ready("x") is False


def test_fallback_is_used_without_systemd_python(tmp_path: Path) -> None:
    """The router case: systemd-python absent (hidden by a meta-path blocker)."""
    path = str(tmp_path / "notify.sock")
    s = NotifySocket(path, path)
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "systemd" or name.startswith("systemd."):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        from mirrord.service.notify import Notifier
        n = Notifier.from_env()
        print(n.backend, n.ready("from a router"))
    """)
    try:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(ROOT)))
        out, err = p.communicate(timeout=60)
        assert out.split() == ["socket", "True"], err
        lines, pid = s.recv()
        assert lines == ["READY=1", "STATUS=from a router"]
        assert pid == p.pid
    finally:
        s.close()


# -- logsetup ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        if h not in handlers:
            h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _pipe_stream() -> tuple[io.TextIOWrapper, int]:
    """A text stream over a pipe: it has a fileno and is not a terminal."""
    r, w = os.pipe()
    return io.TextIOWrapper(os.fdopen(w, "wb"), write_through=True), r


def test_levels() -> None:
    assert logsetup.level_for(0) == logging.INFO
    assert logsetup.level_for(1) == logging.INFO
    assert logsetup.level_for(2) == logging.DEBUG
    assert logsetup.level_for(0, daemon=False) == logging.WARNING


def test_stderr_in_the_foreground_with_fields() -> None:
    buf = io.StringIO()
    assert logsetup.setup_logging(0, env={}, stream=buf, syslog_socket="/nonexistent") == "stderr"
    log = logging.getLogger("mirrord")
    log.debug("hidden")
    log.info("applied nftables rules", extra={"MIRROR": "lan", "ACTION": "apply"})
    assert buf.getvalue() == (
        "INFO mirrord: applied nftables rules [mirror=lan action=apply]\n")


def test_journal_stream_must_be_our_stderr(tmp_path: Path) -> None:
    stream, r = _pipe_stream()
    try:
        st = os.fstat(stream.fileno())
        ours = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logsetup.choose_target(ours, stream, "/nonexistent") == "journal"
        # Inherited from a session (a terminal opened from the desktop): not ours.
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert logsetup.choose_target(other, stream, "/nonexistent") == "stderr"
        assert logsetup.choose_target({"INVOCATION_ID": "ab"}, stream, "/nonexistent") == "journal"
        # Without journald's socket, stderr (= the journal) with <N> priority prefixes.
        assert logsetup.setup_logging(0, env=ours, stream=stream,
                                      journal_socket=str(tmp_path / "none")) == "journal"
        logging.getLogger("mirrord").warning("link gone\nsecond line", extra={"MIRROR": "m"})
        stream.flush()
        out = os.read(r, 4096).decode()
        assert out == "<4>mirrord: link gone\n<4>second line [mirror=m]\n"
    finally:
        stream.close()
        os.close(r)


def test_syslog_on_request(tmp_path: Path) -> None:
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    stream, r = _pipe_stream()
    try:
        env = {"MIRRORD_SYSLOG": "1"}
        assert logsetup.setup_logging(0, env=env, stream=stream, syslog_socket=path) == "syslog"
        logging.getLogger("mirrord").info("applied", extra={"MIRROR": "lan", "ACTION": "apply"})
        msg = sock.recv(4096).decode()
        # LOG_DAEMON (3) * 8 + LOG_INFO (6) = 30; ident with pid as syslog(3) sends it.
        assert msg == f"<30>mirrord[{os.getpid()}]: applied [mirror=lan action=apply]"
        # OpenWrt is recognised by its release file only; elsewhere a pipe stays a pipe.
        if not os.path.exists(logsetup.OPENWRT_RELEASE):
            assert logsetup.choose_target({}, stream, path) == "stderr"
        assert logsetup.choose_target({"MIRRORD_SYSLOG": "0"}, stream, path) == "stderr"
    finally:
        sock.close()
        stream.close()
        os.close(r)
