"""Kernel clone backends, the choice between them, and what the rest of
mirrord may know about them: only this package names a backend."""

from __future__ import annotations

from typing import Optional

from .base import ApplyError, Backend, BackendError, Capabilities, Counts, Rendered
from .iptables import IptablesBackend, IptablesLegacyBackend, RouteTeeBackend
from .nftables import NftablesBackend

__all__ = [
    "AUTO_ORDER",
    "FACTORIES",
    "PREFERRED",
    "WATCHABLE_TABLES",
    "ApplyError",
    "Backend",
    "BackendError",
    "Capabilities",
    "Counts",
    "Rendered",
    "create",
    "flush_candidates",
    "select",
]

FACTORIES: dict[str, type[Backend]] = {
    "nftables": NftablesBackend,
    "iptables": IptablesBackend,
    "iptables-legacy": IptablesLegacyBackend,
    "route-tee": RouteTeeBackend,
}
# route-tee is never guessed: it exists only on patched old kernels, and a
# user on one says so.
AUTO_ORDER = ("nftables", "iptables")
# What `auto` is taken for when nothing may be probed (`mirrord render --offline`).
PREFERRED = AUTO_ORDER[0]
# Where `mirrord flush` looks for rules a mirrord left behind. route-tee is
# not there: its chains are iptables' (same names, same tables, same command),
# so the iptables backend removes them.
FLUSH_ORDER = ("nftables", "iptables", "iptables-legacy")
# Every table whose nftables events may concern some backend: the daemon
# watches them all during a reload, while the new spec may switch backend.
WATCHABLE_TABLES: frozenset[tuple[str, str]] = frozenset(
    table
    for factory in FACTORIES.values()
    for caps in factory.possible_capabilities()
    for table in caps.watch_tables
)


def create(name: str) -> Backend:
    return FACTORIES[name]()


def flush_candidates() -> list[Backend]:
    """One backend of each kind whose rules a mirrord may have left behind."""
    return [create(name) for name in FLUSH_ORDER]


def select(wanted: str) -> tuple[Optional[Backend], str]:
    """The backend to use, or None and why every candidate was refused."""
    names = AUTO_ORDER if wanted == "auto" else (wanted,)
    refusals = []
    for name in names:
        backend = create(name)
        why = backend.unsupported()
        if why is None:
            return backend, ""
        refusals.append(f"{name}: {why}")
    if wanted == "auto":
        return None, "no kernel clone backend is usable (tried " + "; ".join(refusals) + ")"
    return None, f"backend {refusals[0]}"
