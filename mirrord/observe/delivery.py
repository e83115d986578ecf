"""Whether kernel copies leave the router: copied versus delivered, per point.

Each delivery point (plan.delivery) has a counter after every firewall chain,
next to the counters of the rules that feed it. The comparison is made over
the copies since the previous status query that saw any (the daemon takes no
samples of its own): a firewall that stopped dropping is seen at the next
query, and a query with no new copies keeps the last verdict. The first
query compares everything since the counters began, so one query after the
first copies already tells. A window never spans one of mirrord's own
applies: what a heal lost is the heal's (status's last_heal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:
    from ..backends.base import Counts
    from ..plan.model import DeliveryPoint

Verdict = Literal["leaving", "dropped", "idle"]
# Copies counted by the rule but not yet by the point when the counters were
# read (the clone crosses the output hook right after): a few at most.
IN_FLIGHT = 2
# After an apply that replaced running rules, the first copies may still be
# lost to the apply itself (a tunnel device made again comes up, neighbours
# resolve): they are the heal's, and no verdict is given for this long.
SETTLE = 1.0


@dataclass(frozen=True)
class Delivery:
    point: DeliveryPoint
    copied: int  # packets the feeding rules counted (all directions, all mirrors)
    left: int  # packets counted at the point
    left_bytes: int  # as they left: with the tunnel's encapsulation
    verdict: Verdict
    lost: int  # in the window the verdict is about
    window_copied: int
    since: float  # wall clock: the start of that window


class DeliveryMeter:
    def __init__(self) -> None:
        # point name -> (copied, left, wall clock) at the start of the window
        self._base: dict[str, tuple[int, int, float]] = {}
        self._last: dict[str, Delivery] = {}
        self._epoch = 0
        self._settled = 0.0  # no verdict before this (the `mono` clock)

    def assess(self, points: tuple[DeliveryPoint, ...], counts: Counts, now: float,
               started: float, epoch: int = 0,
               mono: Optional[float] = None) -> dict[str, Delivery]:
        """`now`, `started`: wall clock, for the windows' `since`; `mono`: a
        monotonic clock for the settling after an apply, which a step of the
        wall clock must not stretch or cut (default: `now`).
        `epoch`: changes whenever mirrord applied its rules (start, reload,
        heal). Copies lost while the rules were missing or bound to a device
        that was gone are the heal's story (status shows it as last_heal),
        not a firewall's: a window never spans an apply, nor the SETTLE
        seconds after one."""
        out: dict[str, Delivery] = {}
        clock = now if mono is None else mono
        if epoch != self._epoch:
            if self._epoch:  # not the first apply this meter sees
                self._settled = clock + SETTLE
            self._epoch = epoch
        rebase = clock < self._settled
        for p in points:
            copied = sum(counts.get(feed, (0, 0))[0] for feed in p.feeds)
            left, left_bytes = counts.get(p.key, (0, 0))
            if rebase:
                self._base[p.name] = (copied, left, now)
                self._last.pop(p.name, None)  # no verdict on the new rules yet
            base = self._base.get(p.name, (0, 0, started))
            if copied < base[0] or left < base[1]:
                base = (0, 0, started)  # counters started again (a renewed table)
            d_copied, d_left = copied - base[0], left - base[1]
            last = self._last.get(p.name)
            if d_copied <= 0:
                verdict: Verdict = last.verdict if last is not None else "idle"
                lost = last.lost if last is not None else 0
                wc = last.window_copied if last is not None else 0
                since = last.since if last is not None else base[2]
            else:
                lost = max(0, d_copied - d_left)
                verdict = "dropped" if lost > IN_FLIGHT + d_copied // 100 else "leaving"
                wc, since = d_copied, base[2]
                self._base[p.name] = (copied, left, now)
            d = Delivery(p, copied, left, left_bytes, verdict, lost, wc, since)
            self._last[p.name] = d
            out[p.name] = d
        for gone in set(self._base) - {p.name for p in points}:
            del self._base[gone]
            self._last.pop(gone, None)
        return out


def why_dropped(d: Delivery, collector: str, device: Optional[str]) -> str:
    via = f" through {device}" if device else ""
    return (f"{d.lost} of {d.window_copied} copies to {collector} did not leave{via} "
            f"({d.point.describe()}): something after the copy dropped them")
