"""Statistics of the benchmarks: disruption trials against a sequenced stream's copies.

The stream and its capture are the test harness's (tests/harness/stream.py):
each copy carries the kernel's receive time on CLOCK_REALTIME, the clock the
router namespace stamps its disruptions with.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness.stream import Copies  # noqa: E402 - after the path set-up above


@dataclass
class Trial:
    start: float  # the disruptive command began (CLOCK_REALTIME)
    done: float  # ... and returned: the kernel state is disrupted from here
    rules_back: Optional[float] = None  # the router saw mirrord's rules back
    extra: dict[str, Any] = field(default_factory=dict)
    # filled by analyse()
    heal: Optional[float] = None  # first copy after the loss, minus `done`
    outage: Optional[float] = None  # first copy after the loss, minus the last copy before it
    uncopied: int = 0
    window: int = 0


def analyse(data: Copies, trials: list[Trial], end: Optional[float] = None) -> None:
    """Attribute each lost copy to the disruption it followed; time the first copy after."""
    copied = data.copied()
    order = sorted(data.sent_at.items(), key=lambda kv: kv[1])
    for i, tr in enumerate(trials):
        hi = trials[i + 1].start if i + 1 < len(trials) else (end or float("inf"))
        # Packets sent from shortly before the command (it may act before it
        # returns) up to the next disruption belong to this trial.
        window = [seq for seq, ts in order if tr.start - 0.002 <= ts < hi]
        tr.window = len(window)
        lost = [seq for seq in window if seq not in copied]
        tr.uncopied = len(lost)
        if not window:
            continue
        if not lost:
            tr.heal = 0.0
            tr.outage = 0.0
            continue
        # The first run of lost sequence numbers is the disruption's; a
        # later stray loss (if any) is counted but does not stretch the heal.
        end_run = 0
        while end_run + 1 < len(lost) and lost[end_run + 1] == lost[end_run] + 1:
            end_run += 1
        tr.extra["runs"] = 1 + sum(1 for a, b in zip(lost, lost[1:]) if b != a + 1)
        after = [seq for seq in window if seq > lost[end_run] and seq in copied]
        if not after:
            continue  # never healed within the window
        first_back = min(copied[seq] for seq in after)
        tr.heal = first_back - tr.done
        before = [t for seq, t in copied.items() if lost[0] - 50 <= seq < lost[0]]
        tr.outage = first_back - max(before) if before else None


def ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def summarize(values: list[float]) -> dict[str, float]:
    vs = sorted(values)
    if not vs:
        return {}
    p90 = vs[min(len(vs) - 1, round(0.9 * (len(vs) - 1)))]
    return {"n": len(vs), "min": vs[0], "median": statistics.median(vs), "p90": p90,
            "worst": vs[-1]}
