"""The control socket: protocol, and clients that must not be able to hold up the daemon."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirrord.service import control
from mirrord.service.control import ControlServer, request, try_request


class Loop:
    """The daemon's use of the server: one selector, ready() per event, in a thread."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.sel = selectors.DefaultSelector()
        server.attach(self.sel, "control")
        self.stop = False
        self.longest = 0.0  # the longest any one ready() call took
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop:
            for key, _ in self.sel.select(0.05):
                t0 = time.monotonic()
                self.server.ready(key.fileobj)
                self.longest = max(self.longest, time.monotonic() - t0)

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "ctl.sock")


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def test_control_socket_roundtrip_and_mode(path: str) -> None:
    seen: list[dict[str, Any]] = []

    def echo(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        return {"echo": req}

    server = ControlServer(path, echo)
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    with Loop(server):
        assert request(path, "status", x=1) == {"echo": {"cmd": "status", "x": 1}}
        # A request ended by EOF rather than a newline is still one.
        with connect(path) as s:
            s.sendall(b'{"cmd": "x"}')
            s.shutdown(socket.SHUT_WR)
            assert json.loads(s.makefile().readline()) == {"echo": {"cmd": "x"}}
        # Connected and closed without a byte: nothing to answer, nothing computed.
        calls = len(seen)
        for _ in range(20):
            connect(path).close()
        assert request(path, "status") == {"echo": {"cmd": "status"}}
        assert len(seen) == calls + 1
    reply, err = try_request(path, "status")
    assert reply is None and "no daemon socket" in err


def test_second_server_on_a_live_socket_is_refused(path: str) -> None:
    first = ControlServer(path, lambda req: {})
    try:
        with pytest.raises(RuntimeError, match="already serving"):
            ControlServer(path, lambda req: {})
    finally:
        first.close()
    # A stale socket file (its daemon died) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    ControlServer(path, lambda req: {}).close()


def test_silent_trickling_and_bad_clients_never_block_the_loop(path: str) -> None:
    with Loop(ControlServer(path, lambda req: {"ok": True})) as loop:
        silent = [connect(path) for _ in range(8)]
        trickle = connect(path)
        for ch in b'{"cmd": ':
            trickle.send(bytes([ch]))
            time.sleep(0.005)
        bomb = connect(path)
        bomb.sendall(b"[" * 3000 + b"\n")
        assert json.loads(bomb.makefile().readline())["error"].startswith("bad request")
        big = connect(path)
        big.sendall(b" " * (control.MAX_REQUEST + 10))
        assert "bad request: longer than" in json.loads(big.makefile().readline())["error"]
        t0 = time.monotonic()
        assert request(path, "status") == {"ok": True}
        assert time.monotonic() - t0 < 0.5
        trickle.send(b'"status"}\n')
        assert json.loads(trickle.makefile().readline()) == {"ok": True}
        for s in (*silent, trickle, bomb, big):
            s.close()
    assert loop.longest < 0.05, f"one event held the loop {loop.longest:.3f} s"


def test_clients_are_bounded_oldest_idle_dropped_first(path: str) -> None:
    server = ControlServer(path, lambda req: {"ok": True}, max_clients=4)
    with Loop(server):
        started = connect(path)
        started.send(b"{")  # has sent something: kept over idle ones
        time.sleep(0.05)
        idle = [connect(path) for _ in range(6)]
        deadline = time.monotonic() + 2
        while len(server.conns) > 4 or server.dropped < 3:
            assert time.monotonic() < deadline, (len(server.conns), server.dropped)
            time.sleep(0.01)
        # The three oldest idle ones were closed; the one that started a request was not.
        for s in idle[:3]:
            assert s.recv(10) == b""
        started.send(b"}\n")
        assert json.loads(started.makefile().readline()) == {"ok": True}
        for s in (started, *idle):
            s.close()


def test_clients_holding_every_slot_cannot_lock_others_out(path: str) -> None:
    server = ControlServer(path, lambda req: {"ok": True}, max_clients=4)
    with Loop(server):
        holders = []
        for _ in range(4):  # each has started a request it never finishes
            h = connect(path)
            h.send(b"{")
            holders.append(h)
        deadline = time.monotonic() + 2
        while sum(bool(c.inbuf) for c in list(server.conns.values())) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(3):  # answered at once, no slot needed for long
            assert request(path, "status", timeout=2) == {"ok": True}
        # A client slow to send its request: the oldest holder makes room for it.
        slow = connect(path)
        assert holders[0].recv(10) == b""
        slow.sendall(b"{}\n")
        assert json.loads(slow.makefile().readline()) == {"ok": True}
        for h in (*holders, slow):
            h.close()


def test_deadline_closes_a_silent_client(path: str) -> None:
    server = ControlServer(path, lambda req: {"ok": True}, deadline=0.2)
    with Loop(server):
        silent = connect(path)
        time.sleep(0.3)
        # Enforced on the next control event: another client's request.
        assert request(path, "status") == {"ok": True}
        assert silent.recv(10) == b""
        assert server.dropped == 1
        silent.close()


def test_the_next_deadline_lets_the_loop_expire_a_lone_silent_client(path: str) -> None:
    server = ControlServer(path, lambda req: {"ok": True}, deadline=0.2)
    sel = selectors.DefaultSelector()
    server.attach(sel, "control")
    try:
        assert server.next_deadline() is None  # nothing to wake for: zero wake-ups at idle
        silent = connect(path)
        for key, _ in sel.select(5):
            server.ready(key.fileobj)  # the accept
        due = server.next_deadline()
        assert len(server.conns) == 1 and due is not None
        # No other client comes: the loop's timer alone (what the daemon does) expires it.
        assert sel.select(max(0.0, due - time.monotonic())) == []
        server.expire()
        assert silent.recv(10) == b""
        assert server.dropped == 1 and server.next_deadline() is None
        silent.close()
    finally:
        server.close()
        sel.close()


def test_a_client_that_never_reads_a_big_answer_does_not_block(path: str) -> None:
    big: dict[str, Any] = {"blob": "x" * (8 << 20)}

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        return big if req.get("cmd") == "big" else {"ok": True}

    server = ControlServer(path, handler)
    with Loop(server) as loop:
        lazy = connect(path)
        lazy.sendall(b'{"cmd": "big"}\n')
        time.sleep(0.2)
        t0 = time.monotonic()
        assert request(path, "status") == {"ok": True}
        assert time.monotonic() - t0 < 0.5
        assert len(server.conns) == 1  # the lazy one, its answer half sent
        lazy.close()
    assert loop.longest < 0.5


def test_request_retries_while_the_backlog_is_full(path: str) -> None:
    """connect() fails with EAGAIN on a full backlog; the client waits its turn."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    while True:  # fill the backlog
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
        assert len(fillers) < 100

    def serve() -> None:
        time.sleep(0.3)
        for _ in range(len(fillers) + 1):
            conn, _ = listener.accept()
            conn.settimeout(5)
            data = conn.recv(4096)
            if data:
                conn.sendall(b'{"ok": true}\n')
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for s in fillers:
            s.close()  # their accept() still succeeds; the first real request waits
        reply, err = try_request(path, "status")
        assert reply == {"ok": True}, err
    finally:
        t.join(5)
        listener.close()


def test_refused_is_retried_briefly_then_reported(path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    t0 = time.monotonic()
    reply, err = try_request(path, "status")
    assert reply is None and "nothing listens" in err
    assert control.REFUSED_GRACE - 0.2 <= time.monotonic() - t0 < control.REFUSED_GRACE + 1


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before + 1
