"""What the daemon and the TZSP capture process say to each other.

- The set of taps, over the process's stdin (a pipe the daemon keeps open):
  one `T` line per tap (tap_line), then `E`; every set replaces the last, and
  taps whose slot is in both keep running untouched. EOF: stop.
- Events, over a pipe the process writes: `X slot` (the tap ended; its state,
  code and reason are in its slot), `L level text` (a log line for the
  daemon's log). EOF: the process is gone.
- Counters, in a shared memory block: one slot per tap, written by the
  process, read by the daemon without a round trip.

Standard library only, and little of it: the capture process imports this.

Slot layout (SLOT_SIZE bytes, native byte order):
  0   seq (u64; odd while a write is in progress), then the counters (u64 each;
      room for 11)
  96  pid (u64), state (u64), exit code (i64)
  120 reason length (u16), reason text (UTF-8, up to 134 bytes)
The daemon and the capture process it starts are always the same version, so
the layout may change between versions.
"""

from __future__ import annotations

import mmap
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

COUNTER_NAMES = ("captured", "sent", "bytes", "ring_drops", "send_errors", "truncated",
                 "oversize")
SLOT_SIZE = 256
MAX_TAPS = 256
SHM_SIZE = SLOT_SIZE * MAX_TAPS  # only the slots in use are ever touched (resident)
_WORDS = struct.Struct("=Q" + "Q" * len(COUNTER_NAMES))
_SEQ = struct.Struct("=Q")
_META = struct.Struct("=QQq")
_META_OFF = 96
_REASON_OFF = 120
_REASON_LEN = struct.Struct("=H")
_REASON_MAX = SLOT_SIZE - _REASON_OFF - _REASON_LEN.size
assert _WORDS.size <= _META_OFF and _META_OFF + _META.size <= _REASON_OFF
STATE_STARTING, STATE_RUNNING, STATE_EXITED = 0, 1, 2

EXIT_STOPPED = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERFACE = 3


class TapLine:
    """One tap of a set: what the capture process needs, nothing to compile."""

    __slots__ = (
        "collector",
        "directions",
        "ifindex",
        "interface",
        "mirror",
        "port",
        "programs",
        "ring_bytes",
        "slot",
        "source",
    )

    def __init__(self, slot: int, ifindex: int, directions: tuple[str, ...], collector: str,
                 port: int, source: Optional[str], ring_bytes: int, interface: str, mirror: str,
                 programs: dict[str, bytes]) -> None:
        self.slot, self.ifindex, self.directions = slot, ifindex, directions
        self.collector, self.port, self.source = collector, port, source
        self.ring_bytes, self.interface, self.mirror = ring_bytes, interface, mirror
        self.programs = programs  # link type ("ethernet", "raw") -> packed sock_filter[]

    def same_tap(self, other: TapLine) -> bool:
        """The same socket and destination: the two may differ in their filters
        only (a group member's share, swapped in place)."""
        return all(getattr(self, k) == getattr(other, k)
                   for k in self.__slots__ if k != "programs")

    def encode(self) -> str:
        # Names as hex: a line never breaks, whatever a name holds.
        return " ".join((
            "T", str(self.slot), str(self.ifindex), "+".join(self.directions), self.collector,
            str(self.port), self.source or "-", str(self.ring_bytes),
            self.interface.encode().hex(), self.mirror.encode().hex(),
            self.programs.get("ethernet", b"").hex() or "-",
            self.programs.get("raw", b"").hex() or "-")) + "\n"

    @classmethod
    def decode(cls, line: str) -> TapLine:
        """ValueError on anything malformed."""
        f = line.split()
        if len(f) != 12 or f[0] != "T":
            raise ValueError(f"bad tap line: {line[:80]!r}")
        programs = {link: bytes.fromhex(h) for link, h in (("ethernet", f[10]), ("raw", f[11]))
                    if h != "-"}
        if any(len(p) % 8 or not p for p in programs.values()):
            raise ValueError("bad filter program")
        directions = tuple(f[3].split("+"))
        if not directions or not set(directions) <= {"in", "out"}:
            raise ValueError(f"bad directions {f[3]!r}")
        return cls(int(f[1]), int(f[2]), directions, f[4], int(f[5]),
                   None if f[6] == "-" else f[6], int(f[7]), bytes.fromhex(f[8]).decode(),
                   bytes.fromhex(f[9]).decode(), programs)


class Slot:
    """One tap's block: a seqlock-protected set of counters, a state and a reason."""

    def __init__(self, buf: mmap.mmap, index: int = 0) -> None:
        if not 0 <= index < len(buf) // SLOT_SIZE:
            raise ValueError(f"slot {index} out of range")
        self.buf = buf
        self.index = index
        self.off = index * SLOT_SIZE
        self.seq = _SEQ.unpack_from(buf, self.off)[0] & ~1

    def reset(self) -> None:
        """Zero the slot (the daemon, before handing it to a new tap)."""
        self.buf[self.off:self.off + SLOT_SIZE] = bytes(SLOT_SIZE)
        self.seq = 0

    def write(self, values: tuple[int, ...]) -> None:
        self.seq += 1  # odd: a write is in progress
        _SEQ.pack_into(self.buf, self.off, self.seq)
        _WORDS.pack_into(self.buf, self.off, self.seq, *values)
        self.seq += 1
        _SEQ.pack_into(self.buf, self.off, self.seq)

    def values(self) -> tuple[int, ...]:
        values: tuple[int, ...] = (0,) * (len(COUNTER_NAMES) + 1)
        for _ in range(1000):
            values = _WORDS.unpack_from(self.buf, self.off)
            if values[0] & 1:
                continue
            if _SEQ.unpack_from(self.buf, self.off)[0] == values[0]:
                break
        return tuple(values[1:])

    def set_meta(self, pid: int, state: int, code: int = 0) -> None:
        _META.pack_into(self.buf, self.off + _META_OFF, pid, state, code)

    def meta(self) -> tuple[int, int, int]:
        pid, state, code = _META.unpack_from(self.buf, self.off + _META_OFF)
        return int(pid), int(state), int(code)

    def set_reason(self, reason: str) -> None:
        raw = reason.encode("utf-8", "replace")[:_REASON_MAX]
        at = self.off + _REASON_OFF + _REASON_LEN.size
        self.buf[at:at + len(raw)] = raw
        _REASON_LEN.pack_into(self.buf, self.off + _REASON_OFF, len(raw))

    def reason(self) -> str:
        (n,) = _REASON_LEN.unpack_from(self.buf, self.off + _REASON_OFF)
        at = self.off + _REASON_OFF + _REASON_LEN.size
        return bytes(self.buf[at:at + n]).decode("utf-8", "replace")


def new_block(size: int = SHM_SIZE) -> tuple[int, mmap.mmap]:
    """A shared memory file and its mapping (the fd goes to the capture process)."""
    try:
        fd = os.memfd_create("mirrord-tzsp", 0)
    except (AttributeError, OSError):
        import tempfile

        d = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryFile(dir=d) as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def map_block(fd: int, size: Optional[int] = None) -> mmap.mmap:
    """The capture process's mapping of the block the daemon passed as `fd`."""
    if size is None:
        size = os.fstat(fd).st_size
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
