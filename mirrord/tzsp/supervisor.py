"""The daemon's side of the TZSP data path: the capture process and its taps.

Every TZSP tap (one per mirror and interface) runs in one capture process
(mirrord.tzsp.capture), not one process each: an interpreter costs far more
memory than a tap (docs/DESIGN.md, "TZSP: one capture process"). The daemon
makes a `TzspJob` per tap (job.TzspJob.from_tap) and hands it to a
`TapHandle`; the handles share one `CaptureProcess`, which

- sends the whole set of taps (job.tap_line: each job's match compiled to
  classic BPF here, so the capture process needs neither the match nor the
  compiler) over the process's stdin whenever it changes: taps in both sets
  keep capturing, untouched;
- starts the process when the first tap is added; the daemon stops it once
  no tap is left, so no TZSP mirror means no process;
- reads each tap's counters, state and exit reason from its slot of a shared
  memory block, and the process's events (a tap ended, log lines) from a pipe
  whose EOF also says the process is gone.

A TapHandle is one run of one tap: its counters are that run's, from zero,
and final once stop() returned. Totals across runs (a tap restarted, replaced,
its process gone) are kept by whoever makes the next handle: the daemon.

The job travels over a pipe, never in argv or the environment, which other
users can read. mirrord.tzsp.worker runs one job in a capture process of its
own (tests, bench, by hand).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Callable, Optional

from .job import SharedCounters, TzspCounters, TzspJob, tap_line
from .protocol import MAX_TAPS, STATE_EXITED, STATE_RUNNING, new_block

# Not __name__: a log line should say which part of mirrord it is from.
log = logging.getLogger("mirrord.tzsp.supervisor")

__all__ = ["STOP_TIMEOUT", "CaptureProcess", "TapHandle", "TzspJob"]


def _package_root() -> str:
    """The directory that holds the `mirrord` package (this file is mirrord/tzsp/...)."""
    import mirrord

    return os.path.dirname(os.path.dirname(os.path.abspath(mirrord.__file__)))


# -I: no environment, no user site, no cwd in sys.path; -S: no site (about
# 3 MiB of a process that needs nothing outside the standard library).
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from mirrord.tzsp.capture import main; sys.exit(main(sys.argv[2:]))")
F_SETPIPE_SZ = 1031
STOP_TIMEOUT = 3.0


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return f"capture process killed by {name}"
    return f"capture process exited with status {rc}"


class CaptureProcess:
    """The one capture process and its taps, seen from the daemon.

    `watch(fd, on)` (optional) is told when the events pipe to watch changes:
    on=True after a start, on=False just before the daemon's end of it closes.
    When it is readable, call read_events().
    """

    def __init__(self, watch: Optional[Callable[[int, bool], None]] = None) -> None:
        self.watch = watch
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._shm_fd = -1
        self._buf: Optional[mmap.mmap] = None
        self._control = -1
        self.events = -1
        self._inbuf = b""
        self.taps: dict[int, TapHandle] = {}  # slot -> the tap there, in the running set
        # Taps that ended with their process, until the daemon took note (take_orphans).
        self.orphans: list[TapHandle] = []
        self._free = list(range(MAX_TAPS - 1, -1, -1))
        self.starts = 0
        self._held = 0  # open batch() blocks
        self._dirty = False  # the set changed inside one
        # Handles taken out of the set while a process had them open -> that
        # process's start number: remove() waits for those to close, only.
        self._closing: dict[int, int] = {}

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def returncode(self) -> Optional[int]:
        """The exit status once the process ended, else None."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- slots ---------------------------------------------------------------
    def slot(self, index: int) -> SharedCounters:
        if self._buf is None:
            self._shm_fd, self._buf = new_block()
        return SharedCounters(self._buf, index)

    def add(self, handle: TapHandle) -> None:
        """Give `handle` a slot and put it in the set (starting the process if needed)."""
        if not self._free:
            raise OSError(errno.ENOSPC, f"more than {MAX_TAPS} TZSP taps")
        if self._proc is not None and not self.running():
            # Dead, and its EOF not read yet: its taps end now, not in the new process
            # (which would count their slots from zero again).
            self.read_events()
        index = self._free.pop()
        slot = self.slot(index)
        slot.reset()
        handle._attach(index, slot)
        self.taps[index] = handle
        try:
            if not self.running():
                self._spawn()
            else:
                self._changed()
        except BaseException:
            self.taps.pop(index, None)
            handle._orphan("could not start")
            raise

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Changes of the set inside go to the process as one set, on the way
        out: a group's failover closes the dead member's taps and swaps the
        others' filters in one step of the process."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._dirty:
                self._dirty = False
                self.resend()

    def _changed(self) -> None:
        if self._held:
            self._dirty = True
        elif self.running():
            self._send_set()

    def detach(self, handle: TapHandle) -> None:
        """Take `handle` out of the set (the process closes it: see remove)."""
        if self.taps.get(handle.slot_index) is not handle:
            return
        del self.taps[handle.slot_index]
        if self.running():
            # This process has it open: remove() waits for it to close it.
            self._closing[id(handle)] = self.starts
        # An empty set too: the process stays (stop() ends it), so that a tap
        # replaced by another does not cost a new interpreter.
        self._changed()

    def remove(self, handle: TapHandle, timeout: float = STOP_TIMEOUT) -> None:
        """Take `handle` out of the set and wait until the process closed it (its
        counters are final then); the last one stops the process."""
        self.detach(handle)
        started = self._closing.pop(id(handle), None)
        # Not open in this process (an orphan of one that died, whose slot
        # stays RUNNING for ever): nothing will close it, so nothing to wait
        # for. Waiting killed the next process, and its taps with it.
        if started is None or started != self.starts or not self.running():
            return
        if self._dirty:  # inside a batch: the set must go now, or nothing closes it
            self._dirty = False
            self._send_set()
        deadline = time.monotonic() + timeout
        while handle.slot_state() != STATE_EXITED and self.running():
            if time.monotonic() >= deadline:
                # A process that does not answer may still write the slot,
                # which must not go to another tap: replace the process.
                log.warning("TZSP capture process pid %s did not close %s on %s in %.0f s; "
                            "killing it", self.pid, handle.job.mirror, handle.job.interface,
                            timeout)
                self._kill()
                break
            time.sleep(0.002)

    def resend(self) -> None:
        """A tap's line changed in place: the running process gets the new set."""
        self._changed()

    def release(self, index: int) -> None:
        if index not in self.taps and index not in self._free:
            self._free.append(index)

    # -- the process -------------------------------------------------------------
    def _spawn(self) -> None:
        self._retire_events()
        if self._buf is None:
            self._shm_fd, self._buf = new_block()
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        ev_r, ev_w = os.pipe2(os.O_CLOEXEC)
        level = logging.getLevelName(logging.getLogger("mirrord").getEffectiveLevel())
        argv = [sys.executable, "-I", "-S", "-c", _BOOT, _package_root(),
                "--shm-fd", str(self._shm_fd), "--events-fd", str(ev_w),
                "--parent", str(os.getpid()), "--log-level", str(level)]
        try:
            # Own session: a terminal's ^C goes to the daemon, which stops us.
            self._proc = subprocess.Popen(argv, pass_fds=(self._shm_fd, ev_w), stdin=ctl_r,
                                          close_fds=True, start_new_session=True)
        except BaseException:
            for fd in (ctl_w, ev_r):
                os.close(fd)
            raise
        finally:
            os.close(ctl_r)
            os.close(ev_w)
        os.set_blocking(ev_r, False)
        os.set_blocking(ctl_w, False)  # _send_set waits, bounded, when the pipe is full
        self._control, self.events, self._inbuf = ctl_w, ev_r, b""
        self.starts += 1
        log.debug("started TZSP capture process pid %d", self._proc.pid)
        if self.watch is not None:
            self.watch(ev_r, True)
        self._send_set()

    def _send_set(self) -> None:
        """The whole set, then E: the process diffs it against what it runs."""
        data = ("".join(h.line for h in self.taps.values()) + "E\n").encode()
        if len(data) > 65536:
            try:
                fcntl.fcntl(self._control, F_SETPIPE_SZ, 2 * len(data))
            except OSError:
                pass  # then the write below waits for the process to read
        view = memoryview(data)
        deadline = time.monotonic() + STOP_TIMEOUT
        while view:
            try:
                view = view[os.write(self._control, view):]
            except BlockingIOError:
                if time.monotonic() >= deadline or not self.running():
                    raise OSError(errno.EPIPE, "the TZSP capture process is not reading") from None
                select.select([], [self._control], [], 0.05)
            except BrokenPipeError:
                return  # it died: its events pipe says so

    def _kill(self) -> None:
        p = self._proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """EOF on its stdin: the process closes every tap (final counters) and exits."""
        p = self._proc
        if self._control >= 0:
            os.close(self._control)
            self._control = -1
        if p is not None and p.poll() is None:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("TZSP capture process pid %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()
        if p is not None:
            # Its last lines (each tap's final counters as it closed) are in the
            # pipe: into the daemon's log with them, before the pipe goes.
            self.read_events()
        self._orphan_all()

    def _orphan_all(self) -> None:
        p = self._proc
        rc = p.poll() if p is not None else None
        reason = _describe_exit(rc) if rc is not None else "capture process gone"
        for h in list(self.taps.values()):
            h._orphan(reason)
            self.orphans.append(h)
        self.taps.clear()
        self._closing.clear()  # nothing of that process will close now

    def take_orphans(self) -> list[TapHandle]:
        out, self.orphans = self.orphans, []
        return out

    def _retire_events(self) -> None:
        if self.events >= 0:
            if self.watch is not None:
                self.watch(self.events, False)
            os.close(self.events)
            self.events = -1
        if self._control >= 0:
            os.close(self._control)
            self._control = -1

    def read_events(self) -> tuple[list[int], bool]:
        """(slots whose tap ended, whether the process is gone); log lines are logged."""
        ended: list[int] = []
        eof = False
        while self.events >= 0:
            try:
                chunk = os.read(self.events, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self._inbuf += chunk
        *lines, self._inbuf = self._inbuf.split(b"\n")
        for raw in lines:
            kind, _, rest = raw.decode("utf-8", "replace").partition(" ")
            if kind == "X":
                try:
                    ended.append(int(rest))
                except ValueError:
                    pass
            elif kind == "L":
                level, _, text = rest.partition(" ")
                log.log(int(level) if level.isdigit() else logging.WARNING, "%s", text)
        if eof:
            p = self._proc
            if p is not None:
                try:
                    p.wait(5)  # EOF comes as it closes its files, just before the exit
                except subprocess.TimeoutExpired:
                    pass
            self._orphan_all()
            self._retire_events()
        return ended, eof

    def close(self) -> None:
        self.stop()
        self._retire_events()
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        if self._shm_fd >= 0:
            os.close(self._shm_fd)
            self._shm_fd = -1


class TapHandle:
    """One run of one tap in the shared capture process: what the daemon's
    supervision holds per tap. start() once; after stop() the counters are
    final. The next run of the same tap is a new TapHandle."""

    _serials = itertools.count(1)

    def __init__(self, process: CaptureProcess, job: TzspJob) -> None:
        self.process = process
        self.job = job
        # Which tap this is, across the daemon's life: status shows it, so that a
        # replaced tap (same interface, new match) can be told from the old one.
        self.serial = next(TapHandle._serials)
        self.slot_index = -1
        self.line = ""
        self._slot: Optional[SharedCounters] = None
        self._started = False
        # The slot's counters when it was given back (slots are reused).
        self._final = TzspCounters()
        self._dead: Optional[str] = None

    # called by CaptureProcess
    def _attach(self, index: int, slot: SharedCounters) -> None:
        self.slot_index, self._slot = index, slot
        self.line = tap_line(self.job, index).encode()

    def _orphan(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.events

    def slot_state(self) -> int:
        return self._slot.meta()[1] if self._slot is not None else STATE_EXITED

    def start(self) -> None:
        """Add the tap to the capture process's set (starting the process if needed).
        Once per handle: a run that ended is followed by a new handle."""
        if self._started:
            raise RuntimeError(f"{self!r} was started already; a new run is a new TapHandle")
        self._started = True
        try:
            self.process.add(self)
        except BaseException as e:
            self._orphan(f"could not start: {e}")
            raise

    def retarget(self, job: TzspJob) -> None:
        """The same tap with another filter (a group member's share of the
        flows): the process swaps it on the open socket, ring and counters kept."""
        if job == self.job:
            return
        self.job = job
        if self._slot is not None:
            self.line = tap_line(job, self.slot_index).encode()
            self.process.resend()

    def running(self) -> bool:
        return self._slot is not None and self.poll() is None

    def state(self) -> str:
        """"not started", "starting" (socket not open yet), "running" or "exited"."""
        if self._slot is None:
            return "exited" if self._started else "not started"
        if self.poll() is not None:
            return "exited"
        return "running" if self.slot_state() == STATE_RUNNING else "starting"

    def poll(self) -> Optional[str]:
        """None while the tap runs; else why it ended."""
        if self._slot is None:
            return self._dead or ("stopped" if self._started else "not started")
        state = self._slot.meta()[1]
        if state == STATE_EXITED:
            reason = self._slot.reason() or "ended"
        elif self._dead is not None:
            reason = self._dead
        elif self.process.taps.get(self.slot_index) is not self:
            reason = "stopped"
        elif not self.process.running():
            rc = self.process.returncode()
            reason = _describe_exit(rc) if rc is not None else "capture process gone"
        else:
            return None
        return reason

    def detach(self) -> None:
        """Out of the set, without waiting: stop() waits (inside a batch, the
        set with it goes to the process as the batch ends)."""
        if self._slot is not None:
            self.process.detach(self)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Out of the set, and wait until the process closed it (or is gone): the
        counters are final after this. Idempotent."""
        if self._slot is None:
            return
        self.process.remove(self, timeout)
        self._dead = self.poll() or "stopped"
        # Keep the final counters, then give the slot back for another tap.
        self._final = self._slot.read()
        self._slot = None
        self.process.release(self.slot_index)

    def counters(self) -> TzspCounters:
        """This run's counters: live while it runs, final after stop()."""
        return self._slot.read() if self._slot is not None else self._final

    def close(self) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TapHandle({self.job.mirror!r} on {self.job.interface}, slot {self.slot_index})"
