"""The daemon's control socket: one JSON request, one JSON answer, per connection.

A unix stream socket (mode 0600: status reveals the network's layout) served
from the daemon's main loop without a thread and without ever blocking it:
every connection is a small non-blocking state machine in the daemon's
selector (read a request, answer, close). A client that connects and says
nothing, trickles bytes, never reads its answer or floods the socket with
connections costs the loop a few microseconds per event, never a wait, so a
heal is as fast with such clients as without them:

- at most MAX_CLIENTS connections are kept; beyond that the oldest that has
  sent nothing yet (else the oldest) is dropped;
- each connection has REQUEST_DEADLINE seconds, from its accept, to send its
  request and take its answer; the deadline is enforced whenever the control
  socket has an event (a silent client alone costs nothing but its slot);
- a request is at most MAX_REQUEST bytes;
- at most HANDLER_BURST requests are answered per HANDLER_WINDOW seconds;
  the others wait their turn in the selector (writability of their socket
  wakes the loop) while the loop gets on with heals in between.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import struct
import time
from typing import Any, Callable, Optional

log = logging.getLogger("mirrord")

DEFAULT_SOCKET = "/run/mirrord.sock"
# Where the packaged services put it: systemd's RuntimeDirectory, and
# OpenWrt's init script (/var/run: some OpenWrt images have no /run).
SOCKET_CANDIDATES = ("/run/mirrord/mirrord.sock", "/var/run/mirrord/mirrord.sock", DEFAULT_SOCKET)
MAX_REQUEST = 4096
REQUEST_DEADLINE = 2.0  # seconds from accept for a client to send its request and take the answer
MAX_CLIENTS = 16
# Room for a burst of `status` callers while the loop is busy healing; a
# full backlog makes connect() fail with EAGAIN, which request() retries.
LISTEN_BACKLOG = 128
ACCEPT_BURST = 32  # connections accepted per event: a flood cannot hold the loop
HANDLER_BURST = 4
HANDLER_WINDOW = 0.01
CONNECT_RETRY = 0.01  # first pause after EAGAIN/ECONNREFUSED, doubling to 0.1 s
REFUSED_GRACE = 0.5  # how long ECONNREFUSED is retried (a daemon restarting), not the whole timeout


def default_socket() -> str:
    env = os.environ.get("MIRRORD_SOCKET")
    if env:
        return env
    for path in SOCKET_CANDIDATES:
        if os.path.exists(path):
            return path
    return DEFAULT_SOCKET


class _Conn:
    __slots__ = ("deadline", "events", "inbuf", "out", "request", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out: Optional[memoryview] = None  # the answer, once there is one
        self.request: Optional[bytes] = None  # complete, waiting for a handler slot
        self.events = selectors.EVENT_READ


class ControlServer:
    def __init__(self, path: str, handler: Callable[[dict[str, Any]], dict[str, Any]],
                 max_clients: int = MAX_CLIENTS, deadline: float = REQUEST_DEADLINE) -> None:
        self.path = path
        self.handler = handler
        self.max_clients = max_clients
        self.deadline = deadline
        self.conns: dict[int, _Conn] = {}  # fd -> connection, in accept order
        self.sel: Optional[selectors.BaseSelector] = None
        self.data: Any = None
        self.dropped = 0  # connections closed for the bound or the deadline
        self._window = 0.0
        self._calls = 0
        if os.path.exists(path):
            _refuse_if_live(path)
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(LISTEN_BACKLOG)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def attach(self, sel: selectors.BaseSelector, data: Any) -> None:
        """Serve from `sel`: the listener and every connection carry `data`;
        call ready(fileobj) for each of their events."""
        self.sel, self.data = sel, data
        sel.register(self.sock, selectors.EVENT_READ, data)

    def next_deadline(self) -> Optional[float]:
        """When the oldest connection runs out of time: the loop wakes for it,
        so a lone silent client does not keep its slot until someone else comes."""
        return min((c.deadline for c in self.conns.values()), default=None)

    def expire(self) -> None:
        self._expire(time.monotonic())

    def ready(self, fileobj: Any) -> None:
        """One event on the listener or a connection; never blocks."""
        now = time.monotonic()
        self._expire(now)
        if fileobj is self.sock or fileobj == self.sock.fileno():
            self._accept(now)
            return
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        conn = self.conns.get(fd)
        if conn is not None:
            self._step(conn, now)

    # -- the state machine ---------------------------------------------------
    def _accept(self, now: float) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next event
                log.warning("control socket: accept: %s", e.strerror)
                return
            sock.setblocking(False)
            conn = _Conn(sock, now + self.deadline)
            self.conns[sock.fileno()] = conn
            if self.sel is not None:
                self.sel.register(sock, selectors.EVENT_READ, self.data)
            # `mirrord status` writes its request right after connect: it is
            # usually there already, and answered before the bound is applied.
            self._step(conn, now)
            while len(self.conns) > self.max_clients:
                self._drop(self._victim(conn))

    def _victim(self, newest: _Conn) -> _Conn:
        """The oldest connection that has sent nothing, else the oldest: never
        the one just accepted, so clients that hold slots cannot lock others out."""
        for conn in self.conns.values():
            if conn is not newest and not conn.inbuf and conn.request is None \
                    and conn.out is None:
                return conn
        return next(c for c in self.conns.values() if c is not newest)

    def _step(self, conn: _Conn, now: float) -> None:
        try:
            if conn.out is None and conn.request is None and not self._read(conn):
                return
            if conn.out is None:
                if not self._budget(now):
                    self._want(conn, selectors.EVENT_WRITE)  # wakes the loop again at once
                    return
                conn.out = memoryview(self._answer(conn.request or b""))
                conn.request = None
                # The answer's own time to be taken, counted from now: a status
                # of thousands of mirrors (megabytes) takes longer to build
                # than the request deadline, and was cut off mid-send.
                conn.deadline = time.monotonic() + self.deadline
            self._write(conn)
        except OSError:
            self._close(conn)  # a client that went away is its own problem

    def _read(self, conn: _Conn) -> bool:
        """Read what is there; True once the request is complete."""
        while True:
            try:
                chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbuf))
            except (BlockingIOError, InterruptedError):
                return False
            if not chunk:  # the client is done writing: what it sent is the request
                if not conn.inbuf:
                    # Nothing at all: no answer is wanted, and a connect-and-close
                    # flood must not cost a status build per connection.
                    self._close(conn)
                    return False
                break
            conn.inbuf += chunk
            if b"\n" in chunk:
                break
            if len(conn.inbuf) > MAX_REQUEST:
                conn.out = memoryview(_encode(
                    {"error": f"bad request: longer than {MAX_REQUEST} bytes"}))
                return True
        conn.request = bytes(conn.inbuf.split(b"\n", 1)[0])
        conn.inbuf.clear()
        return True

    def _answer(self, data: bytes) -> bytes:
        try:
            request = json.loads(data.decode() or "{}")
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
        except (ValueError, RecursionError) as e:
            return _encode({"error": f"bad request: {e}"})
        try:
            return _encode(self.handler(request))
        except Exception as e:  # a status bug must not stop the daemon
            log.exception("control request failed")
            return _encode({"error": f"internal error: {e}"})

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                self._want(conn, selectors.EVENT_WRITE)
                return
            conn.out = conn.out[n:]
        self._close(conn)

    def _budget(self, now: float) -> bool:
        if now - self._window >= HANDLER_WINDOW:
            self._window, self._calls = now, 0
        if self._calls >= HANDLER_BURST:
            return False
        self._calls += 1
        return True

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.events != events and self.sel is not None:
            self.sel.modify(conn.sock, events, self.data)
        conn.events = events

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self.dropped += 1
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is None:
            return
        if self.sel is not None:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        if self.sel is not None:
            try:
                self.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def _refuse_if_live(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # stale socket of a dead daemon
    finally:
        probe.close()
    raise RuntimeError(f"another mirrord is already serving {path}")


def _connect(path: str, timeout: float) -> socket.socket:
    """A connected socket, retrying while the backlog is full (EAGAIN) or, briefly, refused."""
    start = time.monotonic()
    pause = CONNECT_RETRY
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect with a send timeout queues in the kernel for room
        # in a full backlog and is woken by the daemon's accept(): first come,
        # first served, where polling with retries loses to a flood of connects.
        left = max(0.001, timeout - (time.monotonic() - start))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                     struct.pack("ll", int(left), int((left % 1) * 1_000_000)))
        try:
            s.connect(path)
            s.settimeout(timeout)
            return s
        except OSError as e:
            s.close()
            if e.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                raise
            limit = REFUSED_GRACE if e.errno == errno.ECONNREFUSED else timeout
            if time.monotonic() - start + pause > limit:
                raise
        time.sleep(pause)
        pause = min(0.1, pause * 2)


def request(path: str, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        with _connect(path, max(0.1, end - time.monotonic())) as s:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        # Closed without an answer: the daemon shed this connection under a
        # flood of others (it keeps a bounded number); ask again.
        if data or time.monotonic() + CONNECT_RETRY >= end:
            break
        time.sleep(CONNECT_RETRY)
    reply: dict[str, Any] = json.loads(data.decode())
    return reply


def try_request(path: str, cmd: str) -> tuple[Optional[dict[str, Any]], str]:
    try:
        return request(path, cmd), ""
    except FileNotFoundError:
        return None, f"no daemon socket at {path} (is mirrord running?)"
    except ConnectionRefusedError:
        return None, f"nothing listens on {path} (stale socket: is mirrord running?)"
    except (OSError, ValueError) as e:
        return None, f"cannot talk to the daemon at {path}: {e}"
