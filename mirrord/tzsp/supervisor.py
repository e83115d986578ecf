"""The daemon's side of the TZSP data path: jobs, the capture process, per-tap handles.

Every TZSP tap (one per mirror and interface) runs in one capture process
(mirrord.tzsp.capture), not one process each: an interpreter costs far more
memory than a tap (docs/DESIGN.md, "TZSP: one capture process"). The daemon
builds a `TzspJob` per tap and hands it to a `TapHandle`; the handles share
one `CaptureProcess`, which

- compiles each job's match to classic BPF here, in the daemon (the capture
  process then needs neither the match nor the compiler), and sends the whole
  set of taps over the process's stdin whenever it changes: taps in both sets
  keep capturing, untouched;
- starts the process when the first tap is added and stops it when the last
  one goes, so no TZSP mirror means no process;
- reads each tap's counters, state and exit reason from its slot of a shared
  memory block, and the process's events (a tap ended, log lines) from a pipe
  whose EOF also says the process is gone.

The job travels over a pipe, never in argv or the environment, which other
users can read. `TzspWorker` runs one job in a capture process of its own
(tests, `python -m mirrord.tzsp.supervisor` by hand, bench_tzsp).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import ipaddress
import itertools
import json
import logging
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

from ..match import Address, Match, PortRange
from . import codec as tzsp
from .protocol import (
    COUNTER_NAMES,
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_INTERFACE,
    EXIT_STOPPED,
    MAX_TAPS,
    SHM_SIZE,
    STATE_EXITED,
    STATE_RUNNING,
    STATE_STARTING,
    Slot,
    TapLine,
    new_block,
)

# Not __name__: a log line should say which part of mirrord it is from.
log = logging.getLogger("mirrord.tzsp.supervisor")

__all__ = [
    "COUNTER_NAMES", "EXIT_CONFIG", "EXIT_ERROR", "EXIT_INTERFACE", "EXIT_STOPPED", "SHM_SIZE",
    "STATE_EXITED", "STATE_RUNNING", "STATE_STARTING", "CaptureProcess", "SharedCounters",
    "TapHandle", "TzspCounters", "TzspJob", "TzspWorker", "match_from_dict", "match_to_dict",
]


@dataclass(frozen=True)
class TzspJob:
    mirror: str
    interface: str
    ifindex: int
    directions: tuple[str, ...]  # ("in",), ("out",) or ("in", "out")
    match: Match
    collector: Address
    port: int
    snaplen: int
    source: Optional[Address] = None
    # Capture ring size; 0 = the default (512 KiB). Bigger rides out longer
    # stalls (a busy CPU, bursts of large frames) at the cost of memory: the
    # whole ring is resident.
    ring_bytes: int = 0
    # Other addresses whose traffic is never captured: every collector of the
    # spec (the daemon's plan.exclusions), so that no worker copies another
    # worker's datagrams (or their fragments, or the collectors' ICMP errors).
    exclude: tuple[Address, ...] = ()

    def never_captured(self) -> tuple[Address, ...]:
        """The collector and `exclude`, each once: traffic to or from them is dropped."""
        return tuple(dict.fromkeys((self.collector, *self.exclude)))

    def to_json(self) -> str:
        return json.dumps(_encode(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TzspJob:
        job = _decode(cls, json.loads(text), "job")
        assert isinstance(job, cls)
        return job


# -- the job's wire form -------------------------------------------------------
# Generic over the dataclass's fields and their annotations, so a field added
# to TzspJob travels to the worker without touching this code. A Match keeps
# its own form (the one the standalone --match option reads).

def _encode(v: Any) -> Any:
    if isinstance(v, Match):
        return match_to_dict(v)
    if is_dataclass(v) and not isinstance(v, type):
        return {f.name: _encode(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address,
                      ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(v)
    if isinstance(v, (tuple, list, frozenset, set)):
        return [_encode(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    raise TypeError(f"cannot send a {type(v).__name__} to the worker")


_ADDRESSES = frozenset({ipaddress.IPv4Address, ipaddress.IPv6Address})
_NETWORKS = frozenset({ipaddress.IPv4Network, ipaddress.IPv6Network})


def _decode(tp: Any, v: Any, where: str) -> Any:
    """`v` (from JSON) as a value of type `tp`; ValueError names the field."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Match:
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected a match object")
        return match_from_dict(v)
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected an object")
        hints = _hints(tp)
        known = {f.name: f for f in fields(tp)}
        unknown = sorted(set(v) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        kw = {name: _decode(hints[name], v[name], f"{where}.{name}")
              for name in known if name in v}
        try:
            return tp(**kw)
        except TypeError as e:  # a field without a default is missing
            raise ValueError(f"{where}: {e}") from None
    if origin is Union:
        if v is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: missing")
        members = frozenset(a for a in args if a is not type(None))
        if members <= _ADDRESSES:
            return ipaddress.ip_address(_need(str, v, where))
        if members <= _NETWORKS:
            return ipaddress.ip_network(_need(str, v, where))
        if len(members) == 1:
            return _decode(next(iter(members)), v, where)
        raise TypeError(f"{where}: cannot decode {tp}")
    if origin in (tuple, list, frozenset, set):
        items = _need(list, v, where)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ValueError(f"{where}: expected {len(args)} items")
            return tuple(_decode(a, x, f"{where}[{i}]")
                         for i, (a, x) in enumerate(zip(args, items)))
        out = [_decode(args[0] if args else Any, x, f"{where}[{i}]") for i, x in enumerate(items)]
        return origin(out)
    if tp in _ADDRESSES:
        return tp(_need(str, v, where))
    if tp in _NETWORKS:
        return tp(_need(str, v, where))
    if tp is float:
        return float(_need((int, float), v, where))
    if tp in (int, str, bool):
        return _need(tp, v, where)
    if tp is Any:
        return v
    raise TypeError(f"{where}: cannot decode {tp}")


@functools.cache
def _hints(tp: type) -> dict[str, Any]:
    return get_type_hints(tp)


def _need(tp: Any, v: Any, where: str) -> Any:
    if not isinstance(v, tp) or (isinstance(v, bool) and tp is not bool):
        raise ValueError(f"{where}: unexpected value {v!r}")
    return v


def match_to_dict(m: Match) -> dict[str, Any]:
    def ranges(rs: tuple[PortRange, ...]) -> list[list[int]]:
        return [[r.low, r.high] for r in rs]

    return {
        "family": m.family, "protocols": list(m.protocols), "ports": ranges(m.ports),
        "sports": ranges(m.sports), "dports": ranges(m.dports),
        "sources": [str(n) for n in m.sources], "destinations": [str(n) for n in m.destinations],
    }


def match_from_dict(d: dict[str, Any]) -> Match:
    def ranges(key: str) -> tuple[PortRange, ...]:
        return tuple(PortRange(int(lo), int(hi)) for lo, hi in d.get(key, ()))

    def nets(key: str) -> tuple[Any, ...]:
        return tuple(ipaddress.ip_network(n) for n in d.get(key, ()))

    return Match(
        family=d.get("family", "any"), protocols=tuple(int(p) for p in d.get("protocols", ())),
        ports=ranges("ports"), sports=ranges("sports"), dports=ranges("dports"),
        sources=nets("sources"), destinations=nets("destinations"),
    )



# -- counters ---------------------------------------------------------------

@dataclass(frozen=True)
class TzspCounters:
    captured: int = 0     # frames taken from the ring
    sent: int = 0         # datagrams handed to the kernel
    bytes: int = 0        # UDP payload bytes sent (TZSP header + frame)
    ring_drops: int = 0   # frames the kernel dropped because the ring was full
    send_errors: int = 0  # datagrams not sent (unreachable collector, no route...)
    truncated: int = 0    # frames cut to the snap length

    def __add__(self, other: TzspCounters) -> TzspCounters:
        return TzspCounters(*(getattr(self, f.name) + getattr(other, f.name)
                              for f in fields(self)))




class SharedCounters(Slot):
    """A tap's slot, read as TzspCounters."""

    def read(self) -> TzspCounters:
        return TzspCounters(*self.values())


def tap_line(job: TzspJob, slot: int) -> TapLine:
    """The job as the capture process takes it: filters compiled for both link types."""
    from .bpf import compile_filter, pack

    never = job.never_captured()
    programs = {link: pack(compile_filter(job.match, never, directions=job.directions, link=link,
                                          snaplen=job.snaplen))
                for link in ("ethernet", "raw")}
    return TapLine(slot, job.ifindex, tuple(job.directions), str(job.collector), job.port,
                   str(job.source) if job.source else None, job.ring_bytes, job.interface,
                   job.mirror, programs)


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

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

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
                self._send_set()
        except BaseException:
            self.taps.pop(index, None)
            handle._orphan("could not start")
            raise

    def remove(self, handle: TapHandle, timeout: float = STOP_TIMEOUT) -> None:
        """Take `handle` out of the set and wait until the process closed it (its
        counters are final then); the last one stops the process."""
        if self.taps.get(handle.slot_index) is not handle:
            return
        del self.taps[handle.slot_index]
        if not self.running():
            return
        # An empty set too: the process stays (stop() ends it), so that a tap
        # replaced by another does not cost a new interpreter.
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
        self._orphan_all()

    def _orphan_all(self) -> None:
        p = self._proc
        rc = p.poll() if p is not None else None
        reason = _describe_exit(rc) if rc is not None else "capture process gone"
        for h in list(self.taps.values()):
            h._orphan(reason)
            self.orphans.append(h)
        self.taps.clear()

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
    """One tap in the shared capture process: what the daemon's supervision
    holds per tap. Counters add up across restarts of the same handle."""

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
        self._base = TzspCounters()
        self._dead: Optional[str] = None
        self._stopped = False
        self.starts = 0

    # called by CaptureProcess
    def _attach(self, index: int, slot: SharedCounters) -> None:
        self.slot_index, self._slot = index, slot
        self.line = tap_line(self.job, index).encode()
        self._dead = None
        self._stopped = False
        self.starts += 1

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
        if self._slot is not None and self.poll() is None:
            return
        self._release()
        self.process.add(self)

    def running(self) -> bool:
        return self._slot is not None and self.poll() is None

    def state(self) -> str:
        """"not started", "starting" (socket not open yet), "running" or "exited"."""
        if self._slot is None:
            return "exited" if self.starts else "not started"
        if self.poll() is not None:
            return "exited"
        return "running" if self.slot_state() == STATE_RUNNING else "starting"

    def poll(self) -> Optional[str]:
        """None while the tap runs; else why it ended."""
        if self._slot is None:
            return self._dead or ("not started" if not self.starts else "stopped")
        state = self._slot.meta()[1]
        if state == STATE_EXITED:
            reason = self._slot.reason() or "ended"
        elif self._dead is not None:
            reason = self._dead
        elif self.process.taps.get(self.slot_index) is not self:
            reason = "stopped"
        elif not self.process.running():
            rc = self.process._proc.poll() if self.process._proc is not None else None
            reason = _describe_exit(rc) if rc is not None else "capture process gone"
        else:
            return None
        return reason

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Out of the set, and wait until the process closed it (or is gone): the
        counters are final after this. Idempotent."""
        if self._slot is None:
            return
        self._stopped = True
        self.process.remove(self, timeout)
        self._dead = self.poll() or "stopped"
        self._release()

    def _release(self) -> None:
        """Fold the slot's counters into the base and give the slot back."""
        if self._slot is not None:
            self._base = self._base + self._slot.read()
            self._slot = None
            self.process.release(self.slot_index)

    def counters(self) -> TzspCounters:
        if self._slot is None:
            return self._base
        return self._base + self._slot.read()

    def close(self) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TapHandle({self.job.mirror!r} on {self.job.interface}, slot {self.slot_index})"


class TzspWorker(TapHandle):
    """One job in a capture process of its own (tests, tools): `sentinel` turns
    readable on the process's events; poll() then says whether the tap ended."""

    def __init__(self, job: TzspJob) -> None:
        super().__init__(CaptureProcess(), job)

    def poll(self) -> Optional[str]:
        if self.process.events >= 0:
            self.process.read_events()
        return super().poll()

    def close(self) -> None:
        self.stop()
        self.process.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        super().stop(timeout)
        self.process.stop(timeout)


def counters_dict(c: TzspCounters) -> dict[str, int]:
    return asdict(c)


# -- standalone: python -m mirrord.tzsp.supervisor --interface IF ... --collector ADDR ---------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mirrord.tzsp.supervisor",
                                description="mirrord TZSP capture, by hand: every --interface "
                                            "a tap, all in this one process")
    p.add_argument("--interface", action="append", required=True,
                   help="interface to mirror (repeat for more taps)")
    p.add_argument("--direction", choices=("in", "out", "both"), default="both")
    p.add_argument("--collector", required=True, help="collector address")
    p.add_argument("--port", type=int, default=tzsp.PORT)
    p.add_argument("--snaplen", type=int, default=65535)
    p.add_argument("--match", default="{}", help="match as JSON (see match_to_dict)")
    p.add_argument("--ring-mib", type=int, default=0, help="ring size per tap (default 512 KiB)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--stats", action="store_true", help="print the final counters as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s %(message)s")
    from .capture import serve

    directions = ("in", "out") if args.direction == "both" else (args.direction,)
    try:
        jobs = [TzspJob(mirror=name, interface=name, ifindex=socket.if_nametoindex(name),
                        directions=directions, match=match_from_dict(json.loads(args.match)),
                        collector=ipaddress.ip_address(args.collector), port=args.port,
                        snaplen=args.snaplen, ring_bytes=args.ring_mib << 20)
                for name in args.interface]
    except (ValueError, OSError) as e:
        print(f"tzsp_worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    fd, buf = new_block()
    os.close(fd)
    rc = serve(buf, -1, -1, logging.getLogger("mirrord").getEffectiveLevel(),
               [tap_line(j, i) for i, j in enumerate(jobs)], log_to=log.log)
    if args.stats:
        for i, j in enumerate(jobs):
            s = SharedCounters(buf, i)
            print(json.dumps({"interface": j.interface, "reason": s.reason(),
                              "code": s.meta()[2], **asdict(s.read())}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
