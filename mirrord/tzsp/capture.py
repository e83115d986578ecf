"""The TZSP capture process: every tap of the daemon in one process.

Started by the daemon (mirrord.tzsp.supervisor.CaptureProcess) as
`python -I -S -c ...`, it reads the set of taps on stdin (see protocol.py),
and for each tap opens an AF_PACKET socket with its classic BPF program
(compiled by the daemon: direction, match, never a collector) attached before
any packet can be queued, and a TPACKET_V3 ring (ring.py). One poll(2) loop
serves every ring: each tap's Forwarder (forward.py, the hot loop) wraps its
frames in TZSP and sends them in batches with sendmmsg (send.py) to the tap's
collector; the kernel routes them, through any interface.

Counters go to the tap's slot of the shared block; a tap that ends (its
interface down or gone, or removed from the set) says so with an `X` event
and a one-line reason in its slot. The process blocks in poll(2) with no
timeout when there is nothing to do: no wake-ups at idle.

Memory is the point of this module's imports: the interpreter runs without
site, and only os, struct, select, mmap, _signal, errno, ctypes and _socket are
loaded (no logging, typing, dataclasses, socket, signal, json or argparse); log
lines go to the daemon, which logs them where its own lines go.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import sys

from .forward import Forwarder, StopFlag
from .protocol import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_INTERFACE,
    EXIT_STOPPED,
    STATE_EXITED,
    STATE_RUNNING,
    STATE_STARTING,
    Slot,
    TapLine,
    map_block,
)
from .ring import DEFAULT_RING_BYTES, CaptureError, RxRing, libc
from .send import UdpBatchSender

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    import signal
    from collections.abc import Callable, Iterable
    from typing import Any, Optional
else:
    # The signal module wraps _signal's numbers in enums: 0.8 MiB of imports.
    import _signal as signal

# logging's levels, without logging.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVELS = {"DEBUG": DEBUG, "INFO": INFO, "WARNING": WARNING, "ERROR": ERROR, "CRITICAL": 50}


def _interface_state(ifindex: int, name: str) -> Optional[str]:
    """Why the interface cannot be captured (gone, renamed, re-created), or None."""
    try:
        now = _socket.if_indextoname(ifindex)
    except OSError:
        return f"interface {name} went away (ENXIO)"
    if now != name:
        return f"interface {name} went away (ifindex {ifindex} is now {now})"
    return None


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


class Tap:
    """One open tap: its ring, its (possibly shared) sender, its forwarder."""

    __slots__ = ("fwd", "idle_published", "line", "ring", "sender_key", "slot")

    def __init__(self, line: TapLine, ring: RxRing, sender_key: tuple[str, int, str],
                 fwd: Forwarder, slot: Optional[Slot]) -> None:
        self.line, self.ring, self.sender_key, self.fwd, self.slot = (
            line, ring, sender_key, fwd, slot)
        self.idle_published = True


class CaptureLoop:
    """Every tap's ring in one poll(2) loop; the set of taps changes as the daemon says."""

    def __init__(self, shm: Optional[mmap.mmap], events_fd: int, control_fd: int,
                 wakeup_fd: int, stop: StopFlag, level: int = INFO,
                 log_to: Optional[Callable[[int, str], None]] = None) -> None:
        self.shm, self.events_fd, self.control_fd = shm, events_fd, control_fd
        self.wakeup_fd, self.stop, self.level = wakeup_fd, stop, level
        self.log_to = log_to
        self.taps: dict[int, Tap] = {}
        self.by_fd: dict[int, Tap] = {}
        self.senders: dict[tuple[str, int, str], list[Any]] = {}  # key -> [sender, users]
        self.poller = select.poll()
        for fd in (wakeup_fd, control_fd):
            if fd >= 0:
                self.poller.register(fd, select.POLLIN)
        self._pending: list[TapLine] = []
        self._inbuf = b""
        self.pid = os.getpid()
        self.sets = 0

    # -- to the daemon ----------------------------------------------------------
    def log(self, level: int, text: str) -> None:
        if level < self.level:
            return
        if self.log_to is not None:
            self.log_to(level, text)
        else:
            self._event(f"L {level} {text}")

    def _event(self, text: str) -> None:
        if self.events_fd < 0:
            return
        data = (text.replace("\n", " ") + "\n").encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self.events_fd, data):]
        except OSError:
            pass  # the daemon is gone; stdin's EOF stops us

    def _slot(self, index: int) -> Optional[Slot]:
        return Slot(self.shm, index) if self.shm is not None else None

    # -- the set of taps -----------------------------------------------------------
    def apply(self, lines: Iterable[TapLine]) -> None:
        """Make the open taps those of `lines`: close the others, open the new
        ones, then swap the filters of those whose filter alone changed (a
        member back: its taps capture before the others let its flows go)."""
        wanted = {t.slot: t for t in lines}
        self.sets += 1
        for index in [i for i in self.taps
                      if i not in wanted or not wanted[i].same_tap(self.taps[i].line)]:
            self.close_tap(self.taps[index], EXIT_STOPPED, "stopped")
        for index, line in wanted.items():
            if index not in self.taps:
                self.open_tap(line)
        for index, line in wanted.items():
            tap = self.taps.get(index)
            if tap is not None and tap.line is not line and line.programs != tap.line.programs:
                self.refilter(tap, line)

    def refilter(self, tap: Tap, line: TapLine) -> None:
        """A new filter on the open socket (a group member's share moved): the
        kernel swaps it atomically, and the ring, its frames and the counters stay."""
        try:
            tap.ring.set_filter(line.programs)
        except OSError as e:
            self.close_tap(tap, EXIT_ERROR, f"cannot change the filter on {line.interface}: "
                                            f"{e.strerror} ({_errname(e)})")
            return
        tap.line = line
        self.log(INFO, f"{line.mirror}: {line.interface} -> {line.collector}:{line.port}: "
                       "filter changed (the flows it takes)")

    def _ended(self, line: TapLine, slot: Optional[Slot], code: int, reason: str) -> None:
        if slot is not None:
            slot.set_reason(reason)
            slot.set_meta(self.pid, STATE_EXITED, code)
        self._event(f"X {line.slot}")

    def open_tap(self, line: TapLine) -> None:
        slot = self._slot(line.slot)
        if slot is not None:
            slot.set_meta(self.pid, STATE_STARTING)
        why = _interface_state(line.ifindex, line.interface)
        if why:
            self._ended(line, slot, EXIT_INTERFACE, why)
            return
        key = (line.collector, line.port, line.source or "")
        entry = self.senders.get(key)
        if entry is None:
            try:
                entry = [UdpBatchSender(line.collector, line.port, line.source), 0]
            except OSError as e:
                self._ended(line, slot, EXIT_CONFIG, f"cannot send to {line.collector}:"
                            f"{line.port}: {e.strerror} ({_errname(e)})")
                return
            self.senders[key] = entry
        sender: UdpBatchSender = entry[0]
        entry[1] += 1
        try:
            ring = RxRing(line.ifindex, line.programs, ignore_outgoing=line.directions == ("in",),
                          ring_bytes=line.ring_bytes or DEFAULT_RING_BYTES)
        except CaptureError as e:
            self._release_sender(key)
            self._ended(line, slot, EXIT_CONFIG, f"interface {line.interface}: {e.strerror}")
            return
        except OSError as e:
            self._release_sender(key)
            if e.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                gone = _interface_state(line.ifindex, line.interface)
                self._ended(line, slot, EXIT_INTERFACE,
                            gone or f"interface {line.interface} is down (ENETDOWN)")
            else:
                self._ended(line, slot, EXIT_ERROR, f"cannot capture on {line.interface}: "
                            f"{e.strerror} ({_errname(e)})")
            return
        tap = Tap(line, ring, key, Forwarder(ring, sender, slot, self.stop), slot)
        self.taps[line.slot] = tap
        self.by_fd[ring.fileno()] = tap
        self.poller.register(ring.fileno(), select.POLLIN | select.POLLERR)
        if not sender.connected:
            self.log(WARNING, f"{line.mirror}: collector {line.collector}:{line.port} not "
                              f"reachable yet ({sender.last_error}); counting send errors")
        self.log(INFO, f"{line.mirror}: capturing {'/'.join(line.directions)} on "
                       f"{line.interface} ({ring.link} link, {ring.block_nr} x "
                       f"{ring.block_size >> 10} KiB ring"
                       f"{', ignoring outgoing' if ring.ignore_outgoing else ''}) -> "
                       f"{line.collector}:{line.port} via "
                       f"{'sendmmsg' if sender.batched else 'sendmsg'}")
        if slot is not None:
            slot.write(tap.fwd.counters())
            slot.set_meta(self.pid, STATE_RUNNING)

    def _release_sender(self, key: tuple[str, int, str]) -> None:
        entry = self.senders[key]
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del self.senders[key]

    def close_tap(self, tap: Tap, code: int, reason: str) -> None:
        fwd, line = tap.fwd, tap.line
        try:
            fwd.publish(force=True)
        except OSError:
            pass
        c = fwd.counters()
        if tap.slot is not None:
            tap.slot.write(c)
        sender = fwd.sender
        self.log(INFO if code in (EXIT_STOPPED,) else WARNING,
                 f"{line.mirror}: {line.interface}: {reason}; captured {c[0]}, sent {c[1]}, "
                 f"ring drops {c[3]}, send errors {c[4]}, truncated {c[5]}, oversize {c[6]}, "
                 f"checksums completed {fwd.checksummed}"
                 + (f" (last error {sender.last_error})" if sender.last_error else ""))
        fd = tap.ring.fileno()
        self.poller.unregister(fd)
        del self.by_fd[fd]
        del self.taps[line.slot]
        tap.ring.close()
        self._release_sender(tap.sender_key)
        self._ended(line, tap.slot, code, reason)

    def _ring_error(self, tap: Tap) -> None:
        try:
            tap.ring.check_error()
            return
        except OSError as e:
            err = e
        tap.fwd.pump()  # frames captured before the error still go out
        line = tap.line
        gone = _interface_state(line.ifindex, line.interface)
        if gone:
            self.close_tap(tap, EXIT_INTERFACE, gone)
        elif err.errno == errno.ENETDOWN:
            self.close_tap(tap, EXIT_INTERFACE, f"interface {line.interface} went down (ENETDOWN)")
        else:
            self.close_tap(tap, EXIT_ERROR, f"capture on {line.interface} failed: "
                                            f"{err.strerror} ({_errname(err)})")

    def _read_control(self) -> None:
        try:
            chunk = os.read(self.control_fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.stop.set = True  # the daemon closed our stdin (or went away)
            return
        self._inbuf += chunk
        *lines, self._inbuf = self._inbuf.split(b"\n")
        for raw in lines:
            text = raw.decode("utf-8", "replace")
            if text == "E":
                pending, self._pending = self._pending, []
                self.apply(pending)
            elif text:
                try:
                    self._pending.append(TapLine.decode(text))
                except (ValueError, UnicodeDecodeError) as e:
                    self.log(ERROR, f"ignoring a tap the daemon sent: {e}")

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        taps, stop = self.taps, self.stop
        while not stop.set:
            busy = False
            for tap in list(taps.values()):
                fwd = tap.fwd
                if fwd.pump():
                    fwd.publish()
                    tap.idle_published = False
                    busy = True
                elif not tap.idle_published:
                    fwd.publish(force=True)
                    tap.idle_published = True
            # Busy: only look whether the daemon spoke or a ring failed.
            # Idle: sleep until a block is ready, a signal, or the daemon.
            for fd, ev in self.poller.poll(0 if busy else -1):
                if fd == self.wakeup_fd:
                    try:
                        os.read(fd, 512)
                    except OSError:
                        pass
                elif fd == self.control_fd:
                    self._read_control()
                elif ev & (select.POLLERR | select.POLLHUP):
                    tap_ = self.by_fd.get(fd)
                    if tap_ is not None:
                        self._ring_error(tap_)

    def close(self) -> None:
        for tap in list(self.taps.values()):
            self.close_tap(tap, EXIT_STOPPED, "stopped")
        for sender, _users in self.senders.values():
            sender.close()
        self.senders.clear()


def _die_with_parent(parent: int) -> None:
    try:
        libc().prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        return
    if parent and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def serve(shm: Optional[mmap.mmap], events_fd: int, control_fd: int, level: int = INFO,
          initial: Iterable[TapLine] = (),
          log_to: Optional[Callable[[int, str], None]] = None) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP or EOF on `control_fd`; 0, or 1 on a crash."""
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    stop = StopFlag()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if control_fd >= 0:
        os.set_blocking(control_fd, False)
    loop = CaptureLoop(shm, events_fd, control_fd, rfd, stop, level, log_to)
    rc = 0
    try:
        loop.apply(initial)
        loop.run()
    except Exception as e:  # every tap's slot says why
        rc = 1
        loop.log(ERROR, f"capture process failed: {type(e).__name__}: {e}")
        for tap in list(loop.taps.values()):
            try:
                loop.close_tap(tap, EXIT_ERROR, f"capture process failed: {type(e).__name__}: {e}")
            except Exception:
                pass
    finally:
        loop.close()
    return rc


def main(argv: list[str]) -> int:
    """`--shm-fd N --events-fd N --parent PID --log-level NAME`; the set of taps on stdin."""
    opts = dict(zip(argv[::2], argv[1::2]))
    try:
        shm_fd = int(opts.get("--shm-fd", "-1"))
        events_fd = int(opts.get("--events-fd", "-1"))
        parent = int(opts.get("--parent", "0"))
    except ValueError:
        print(f"mirrord capture process: bad arguments {argv}", file=sys.stderr)
        return 2
    level = _LEVELS.get(opts.get("--log-level", "INFO").upper(), INFO)
    if parent:
        _die_with_parent(parent)
    shm = None
    if shm_fd >= 0:
        shm = map_block(shm_fd)
        os.close(shm_fd)
    return serve(shm, events_fd, 0, level)
