"""sd_notify: tell the service manager when mirrord is ready, reloading, alive, stopping.

systemd-python's `systemd.daemon.notify` is used when it is importable; routers
(OpenWrt) and minimal images do not have it, so a few lines of AF_UNIX datagram
code do the same job. Everything is inert when NOTIFY_SOCKET is unset, so the
daemon calls these methods unconditionally.

A failed notification never raises: losing one STATUS= line must not take the
mirror down. It is logged at debug level and reported by the return value.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Mapping, Optional

log = logging.getLogger(__name__)

SendFunc = Callable[[str], bool]


def _systemd_sender() -> Optional[SendFunc]:
    try:
        from systemd import daemon as sd_daemon
    except ImportError:
        return None

    def send(message: str) -> bool:
        # sd_notify() reads NOTIFY_SOCKET itself; from_env() only picks this
        # path when the variable names the same socket this Notifier targets.
        return bool(sd_daemon.notify(message))

    return send


def _socket_address(path: str) -> str:
    # '@' marks a Linux abstract socket; the kernel wants a leading NUL instead.
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


def _socket_sender(path: str) -> SendFunc:
    address = _socket_address(path)

    def send(message: str) -> bool:
        # A fresh socket per message, as sd_notify does: nothing stays open
        # across fork() into TZSP workers, and a restarted manager is found again.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode("utf-8"), address)
        return True

    return send


def _one_line(text: str) -> str:
    # The protocol is newline separated: a newline inside STATUS= would start
    # a bogus assignment.
    return " ".join(text.split())


class Notifier:
    """The sd_notify messages mirrord sends. Inert when `path` is None."""

    def __init__(
        self,
        path: Optional[str],
        watchdog_usec: Optional[int] = None,
        use_systemd: bool = False,
    ) -> None:
        self.path = path or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._send: Optional[SendFunc] = None
        self.backend = "off"
        if self.path is None:
            return
        sender = _systemd_sender() if use_systemd else None
        if sender is not None:
            self._send, self.backend = sender, "systemd-python"
        else:
            self._send, self.backend = _socket_sender(self.path), "socket"

    @classmethod
    def from_env(
        cls, environ: Optional[Mapping[str, str]] = None, prefer_systemd: bool = True
    ) -> Notifier:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or None
        # systemd-python only ever talks to os.environ's NOTIFY_SOCKET, so it is
        # usable only when that is the socket we were asked to use.
        use_systemd = (
            prefer_systemd and path is not None and os.environ.get("NOTIFY_SOCKET") == path
        )
        return cls(path, _watchdog_usec(env), use_systemd=use_systemd)

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False when off or not delivered."""
        if self._send is None:
            return False
        message = "\n".join(assignments)
        try:
            return self._send(message)
        except OSError as e:
            log.debug("sd_notify to %s failed: %s", self.path, e)
            return False

    def ready(self, status: str = "") -> bool:
        if status:
            return self.send("READY=1", f"STATUS={_one_line(status)}")
        return self.send("READY=1")

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) matches RELOADING=1 to the reload
        # request by this CLOCK_MONOTONIC timestamp; older managers ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None."""
        if self._send is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000


def _watchdog_usec(env: Mapping[str, str]) -> Optional[int]:
    """WATCHDOG_USEC when it is meant for this process (sd_watchdog_enabled semantics)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        # The variables are inherited: a child of the service must not ping
        # on the main process's behalf.
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec
