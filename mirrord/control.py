"""The daemon's control socket: one JSON request, one JSON answer, per connection.

A unix stream socket (mode 0600: status reveals the network's layout) served
from the daemon's main loop; requests are tiny and answered from memory plus
one counter read, so no thread is needed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Callable, Optional

log = logging.getLogger("mirrord")

DEFAULT_SOCKET = "/run/mirrord.sock"
# Where the packaged services put it: systemd's RuntimeDirectory, and
# OpenWrt's init script (/var/run: some OpenWrt images have no /run).
SOCKET_CANDIDATES = ("/run/mirrord/mirrord.sock", "/var/run/mirrord/mirrord.sock", DEFAULT_SOCKET)
MAX_REQUEST = 4096
REQUEST_DEADLINE = 0.5  # seconds for a client to send its request and take the answer


def default_socket() -> str:
    env = os.environ.get("MIRRORD_SOCKET")
    if env:
        return env
    for path in SOCKET_CANDIDATES:
        if os.path.exists(path):
            return path
    return DEFAULT_SOCKET


class ControlServer:
    def __init__(self, path: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self.handler = handler
        if os.path.exists(path):
            _refuse_if_live(path)
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            # One deadline for the whole request: the main loop serves this,
            # and a client trickling bytes must not hold up a heal.
            deadline = time.monotonic() + REQUEST_DEADLINE
            try:
                data = b""
                while b"\n" not in data and len(data) < MAX_REQUEST:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    conn.settimeout(left)
                    chunk = conn.recv(MAX_REQUEST)
                    if not chunk:
                        break
                    data += chunk
                try:
                    request = json.loads(data.decode() or "{}")
                    if not isinstance(request, dict):
                        raise ValueError("request must be a JSON object")
                except (ValueError, RecursionError) as e:
                    reply: dict[str, Any] = {"error": f"bad request: {e}"}
                else:
                    try:
                        reply = self.handler(request)
                    except Exception as e:  # a status bug must not stop the daemon
                        log.exception("control request failed")
                        reply = {"error": f"internal error: {e}"}
                # The answer's own time to be taken, counted from now: a status
                # of thousands of mirrors (megabytes) takes longer to build
                # than the request deadline, and was cut off mid-send.
                conn.settimeout(REQUEST_DEADLINE)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass  # a client that went away or stalled is its own problem

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _refuse_if_live(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # stale socket of a dead daemon
    finally:
        probe.close()
    raise RuntimeError(f"another mirrord is already serving {path}")


def request(path: str, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
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
