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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..backends.base import Counts

Pair = tuple[int, int]  # (packets, bytes)


class CounterLedger:
    def __init__(self) -> None:
        self._clones: Counts = {}
        self._tzsp_banked: dict[str, Pair] = {}

    # -- kernel clones -------------------------------------------------------
    def fold_clones(self, current: Counts) -> None:
        """Fold a reading of the backend's counters in: a total never goes down."""
        for key, (p, b) in current.items():
            lp, lb = self._clones.get(key, (0, 0))
            self._clones[key] = (max(p, lp), max(b, lb))

    def carry(self) -> Counts:
        """The totals new rules start from."""
        return dict(self._clones)

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
