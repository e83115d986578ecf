"""The counter ledger: totals that survive every replacement of what counts them.

Kernel clone rules are replaced on every change, healed after a firewall
reload, deleted with their table; TZSP taps are restarted with their capture
process. What a user sees must never go down, so one ledger carries the
totals across all of it:

- clone totals, per (mirror, direction): every reading of the backend's
  counters is folded in with max(); `carry()` is what new rules are seeded
  with, so a table deleted behind mirrord's back resumes from the last total
  seen rather than from zero;
- TZSP totals, per mirror: a stopped tap's final counters are banked; live
  taps' counters are added on every reading.

A named counter deleted by someone else (`nft delete table`, `nft flush
ruleset`) takes what it counted since the last reading with it: its delete
notification carries no values. Each rule also holds an anonymous counter
next to its named counter reference, and a deleted rule's notification does
carry those. So, per (family, counter name), the ledger keeps a *base*: the
named counter equals its base plus the anonymous counters of its live rules.
The first rule of the batch that creates a named counter is seeded like it
(base 0); every deleted rule adds its anonymous counts to the base (our own
replacements too: the named counter lives on, only the base moves); when the
named counter is deleted, its base is exactly what it had counted. That
final value is *pending* until the counter is made again (seeded from a carry
that included it). A base is unknown for a counter adopted at start (made by
an earlier run) and after notifications were lost: a deletion then says so
in `notes` instead of counting silently wrong.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..backends.base import CounterKey, Counts

Pair = tuple[int, int]  # (packets, bytes)
Named = tuple[str, str]  # (family, counter name)
MAX_NOTES = 20


@dataclass
class _Final:
    key: CounterKey
    counts: Pair
    in_carry: bool = False  # a carry handed to the backend included it


class CounterLedger:
    def __init__(self) -> None:
        self._clones: Counts = {}
        self._tzsp_banked: dict[str, Pair] = {}
        self._bases: dict[Named, Pair] = {}
        self._finals: dict[Named, _Final] = {}
        self._read_at = 0.0  # wall time of the last reading of the backend's counters
        self._seeded_at = 0.0
        self._seeded_with: Counts = {}  # the last carry handed to an apply
        self._notes: list[str] = []

    # -- kernel clones -------------------------------------------------------
    def fold_clones(self, current: Counts) -> None:
        """Fold a reading of the backend's counters in: a total never goes down.
        Deleted counters' final values count until they are made again."""
        now = dict(current)
        for f in self._finals.values():
            p, b = now.get(f.key, (0, 0))
            now[f.key] = (p + f.counts[0], b + f.counts[1])
        for key, (p, b) in now.items():
            lp, lb = self._clones.get(key, (0, 0))
            self._clones[key] = (max(p, lp), max(b, lb))
        self._read_at = time.time()

    def carry(self) -> Counts:
        """The totals new rules start from."""
        return dict(self._clones)

    def seeding(self) -> Counts:
        """carry() for an apply: the final values folded in so far are in it."""
        for f in self._finals.values():
            f.in_carry = True
        self._seeded_with, self._seeded_at = self.carry(), self._read_at
        return self.carry()

    # -- what notifications say about named counters ----------------------------
    def counter_created(self, named: Named) -> None:
        """Made anew: its first rule's anonymous counter starts where it does."""
        self._bases[named] = (0, 0)
        f = self._finals.pop(named, None)
        if f is not None and not f.in_carry:
            # Deleted and made again before the deletion was read (in one
            # transaction: ours, when a device was made again, or another
            # process's): the new counter started from the last carry, not
            # from the deleted one's final value.
            missing = f.counts[0] - self._seeded_with.get(f.key, (0, 0))[0]
            if missing > 0:
                since = _iso(self._seeded_at) if self._seeded_at else "the start"
                self.note(f"{missing} copies of {_who(f.key)} counted between {since} and "
                          f"{_iso(time.time())} are missing from the totals: its counter was "
                          "deleted and made again before mirrord could read it")

    def rule_deleted(self, named: Named, packets: int, nbytes: int, values: bool) -> None:
        base = self._bases.get(named)
        if base is None:
            return
        if not values:
            # Not a rule of ours (no anonymous counter beside the reference):
            # what it counted is unknown from here on.
            del self._bases[named]
            return
        self._bases[named] = (base[0] + packets, base[1] + nbytes)

    def counter_deleted(self, named: Named, key: CounterKey, when: float) -> None:
        base = self._bases.pop(named, None)
        if base is None:
            since = _iso(self._read_at) if self._read_at else "the start"
            self.note(f"copies of {_who(key)} between {since} and {_iso(when)} were not "
                      "counted: another process deleted its counter, and what it had "
                      "counted since the last reading is unknown (its rules were made "
                      "before this start, or nftables notifications were lost)")
            return
        self._finals[named] = _Final(key, base)

    def events_lost(self) -> None:
        """Notifications were dropped: no base can be trusted any more."""
        self._bases.clear()

    def note(self, text: str) -> None:
        self._notes = [*self._notes, text][-MAX_NOTES:]

    def unread_since(self) -> float:
        """When the backend's counters were last read (0: never)."""
        return self._read_at

    def notes(self) -> tuple[str, ...]:
        """Where the totals could not be kept exact, oldest first."""
        return tuple(self._notes)

    # -- TZSP ---------------------------------------------------------------
    def bank_tap(self, mirror: str, packets: int, nbytes: int) -> None:
        """A stopped tap's final counters (taken after it stopped: nothing in flight)."""
        p, b = self._tzsp_banked.get(mirror, (0, 0))
        self._tzsp_banked[mirror] = (p + packets, b + nbytes)

    def tzsp_totals(self, live: Iterable[tuple[str, int, int]]) -> dict[str, Pair]:
        """mirror -> totals: every stopped tap's plus the running ones' (`live`)."""
        out = dict(self._tzsp_banked)
        for mirror, packets, nbytes in live:
            p, b = out.get(mirror, (0, 0))
            out[mirror] = (p + packets, b + nbytes)
        return out

    def clone_totals(self) -> Mapping[tuple[str, str], Pair]:
        return dict(self._clones)


def _who(key: CounterKey) -> str:
    if key[1] == "delivered":  # plan.model.DELIVERED: a delivery point's counter
        return f"copies delivered at {key[0]}"
    return f"mirror {key[0]} ({key[1]})"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
