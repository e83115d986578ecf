"""One daemon per router: the instance lock.

An abstract unix socket is scoped to the network namespace (the router whose
firewall the rules live in) and vanishes with its process, so there is no
stale lock file, no writable /run needed, and the holder's PID comes with a
connect (SO_PEERCRED).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Optional

INSTANCE_LOCK = b"\0mirrord/instance"


def take_instance_lock() -> tuple[Optional[socket.socket], str]:
    """The lock of this network namespace, or None and who holds it."""
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(INSTANCE_LOCK)
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRINUSE:
                return None, f"cannot take the instance lock: {e}"
            pid = _lock_holder()
            if pid == 0:
                continue  # the holder just went away: try again
            who = f"pid {pid}" if pid > 0 else "pid unknown"
            return None, (f"another mirrord is already running in this network namespace "
                          f"({who}); not starting, nothing was changed")
        s.listen(16)
        s.setblocking(False)
        return s, ""
    return None, "cannot take the instance lock: it keeps changing hands"


def _lock_holder() -> int:
    """The holder's PID; 0 when nobody holds the lock any more, -1 when unknown."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(2.0)
        try:
            c.connect(INSTANCE_LOCK)
        except ConnectionRefusedError:
            return 0
        except OSError:
            return -1
        pid, _uid, _gid = struct.unpack("3i", c.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return int(pid)


def answer_probe(lock: socket.socket) -> None:
    """A second instance connected to learn our PID (it has it): let it go."""
    try:
        conn, _ = lock.accept()
    except OSError:
        return
    conn.close()
