"""Batched UDP sends: datagrams of a header and a frame, with sendmmsg(2).

Each datagram is two iovecs: a TZSP header, and the frame where it lies (in
the capture ring, ring.py), so the kernel copies a frame once, into the
datagram; a batch goes out in one syscall.
"""

from __future__ import annotations

# _socket, not socket: see ring.py (the capture process imports this).
import _socket
import ctypes
import errno
import os
import struct
import time

from .ring import libc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


IOV_PAIR = struct.Struct("PNPN")  # two struct iovec, native layout
IOV_PAIR_SIZE = IOV_PAIR.size
SCRATCH_SLOT = 32  # TZSP header with tag 41 (9) + MACs and VLAN tag (16) or Ethernet (14)
UIO_MAXIOV = 1024
SO_SNDBUFFORCE = 32
# Errors that say "the collector cannot be reached right now": counted, not fatal.
SEND_ERRORS = frozenset({
    errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
    errno.ENOBUFS, errno.EAGAIN, errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENXIO,
    errno.EMSGSIZE, errno.ENOTCONN, errno.EDESTADDRREQ, errno.EADDRNOTAVAIL,
})


class UdpBatchSender:
    """Datagrams of two parts each (a header, a frame), sent with sendmmsg(2).

    Slot i owns iovecs 2i and 2i+1 and a scratch area for a per-frame header;
    callers fill iovecs with IOV_PAIR.pack_into(sender.iov, i * IOV_PAIR_SIZE, ...)
    and call flush(n). Without sendmmsg (old libc) each slot is sent with
    sendmsg, one syscall per datagram.
    """

    def __init__(self, collector: str, port: int, source: Optional[str] = None,
                 capacity: int = UIO_MAXIOV, sndbuf: int = 4 << 20) -> None:
        self.collector, self.port, self.source = collector, port, source
        self.family = _socket.AF_INET6 if ":" in collector else _socket.AF_INET
        self.capacity = capacity
        self.sock = _socket.socket(self.family, _socket.SOCK_DGRAM)
        try:
            # A send buffer that holds a whole batch, so sendmmsg does not
            # sleep (with the ring filling) while the device drains; FORCE
            # goes past net.core.wmem_max, which needs CAP_NET_ADMIN.
            try:
                self.sock.setsockopt(_socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            except OSError:
                self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, sndbuf)
            if source:
                self.sock.bind((source, 0))
        except BaseException:
            self.sock.close()
            raise
        self.connected = False
        self._next_connect = 0.0
        self.last_error: Optional[str] = None
        self.unexpected = 0
        self.msgs = (_Mmsghdr * capacity)()
        self.iov = (_Iovec * (2 * capacity))()
        self.scratch = ctypes.create_string_buffer(SCRATCH_SLOT * capacity)
        self.scratch_addr = ctypes.addressof(self.scratch)
        iov_addr = ctypes.addressof(self.iov)
        for i in range(capacity):
            self.msgs[i].msg_hdr.msg_iov = iov_addr + i * IOV_PAIR_SIZE
            self.msgs[i].msg_hdr.msg_iovlen = 2
        self.msgs_addr = ctypes.addressof(self.msgs)
        self.msg_size = ctypes.sizeof(_Mmsghdr)
        self._sendmmsg = getattr(libc(), "sendmmsg", None)
        if self._sendmmsg is not None:
            self._sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
            self._sendmmsg.restype = ctypes.c_int
        self.connect()

    @property
    def batched(self) -> bool:
        return self._sendmmsg is not None

    def connect(self) -> bool:
        """Connect (route lookup once, ICMP errors reported); retried at most once a second."""
        if self.connected:
            return True
        now = time.monotonic()
        if now < self._next_connect:
            return False
        self._next_connect = now + 1.0
        try:
            self.sock.connect((self.collector, self.port))
        except OSError as e:
            self.last_error = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
            return False
        self.connected = True
        return True

    def datagram_bytes(self, n: int) -> int:
        """UDP payload bytes of slots 0..n-1 (for a partly sent batch)."""
        iov = self.iov
        return sum(iov[2 * i].iov_len + iov[2 * i + 1].iov_len for i in range(n))

    def flush(self, n: int) -> tuple[int, int]:
        """Send slots 0..n-1: (datagrams sent, send errors)."""
        if n == 0:
            return 0, 0
        if not self.connect():
            return 0, n
        if self._sendmmsg is None:
            return self._flush_slow(n)
        fd = self.sock.fileno()
        sent = errors = 0
        retried = False
        while sent < n:
            r = self._sendmmsg(fd, self.msgs_addr + sent * self.msg_size, n - sent, 0)
            if r > 0:
                sent += r
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            self.last_error = f"{errno.errorcode.get(err, err)}: {os.strerror(err)}"
            if err == errno.ECONNREFUSED and not retried:
                # The error belongs to an earlier datagram (ICMP port
                # unreachable); this one was not sent: try it once more.
                errors += 1
                retried = True
                continue
            if err not in SEND_ERRORS:
                self.unexpected += 1  # reported by the caller, which has a logger
            # The destination is the same for every slot: the rest would fail too.
            errors += n - sent
            break
        return sent, errors

    def _flush_slow(self, n: int) -> tuple[int, int]:
        sent = errors = 0
        for i in range(n):
            a, b = self.iov[2 * i], self.iov[2 * i + 1]
            parts = [ctypes.string_at(a.iov_base or 0, a.iov_len),
                     ctypes.string_at(b.iov_base or 0, b.iov_len)]
            try:
                self.sock.sendmsg(parts)
                sent += 1
            except OSError as e:
                errors += 1
                self.last_error = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
        return sent, errors

    def close(self) -> None:
        self.sock.close()
