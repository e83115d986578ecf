"""Names and counter expressions every nftables table of mirrord shares (pure).

Apart from render.py so that the modules render uses (groups) can use them
too without an import cycle.
"""

from __future__ import annotations

import re
from typing import Any

from ..base import CounterKey

Expr = dict[str, Any]


def chain_name(direction: str, ifname: str, taken: set[str]) -> str:
    base = f"{direction}_{re.sub(r'[^A-Za-z0-9_.-]', '_', ifname)}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def counter_name(key: CounterKey) -> str:
    return f"{key[0]}.{key[1]}"


def counting(key: CounterKey) -> tuple[Expr, Expr]:
    """A named counter and an anonymous one next to it.

    The kernel's notification of a deleted named counter carries no values,
    but that of a deleted rule carries its anonymous counters' last values
    and the named counter's name: with both in every rule, the ledger knows
    what a table deleted by someone else had counted (see reconcile/ledger).
    The anonymous counter starts at 0, or at the named counter's seed in the
    first rule of a batch that creates the named counter (`seed_rules`).
    """
    return {"counter": counter_name(key)}, {"counter": None}
