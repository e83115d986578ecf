"""Kernel clone backends and the choice between them."""

from __future__ import annotations

from typing import Callable, Optional

from .base import ApplyError, Backend, BackendError, Counts, Rendered
from .iptables import IptablesBackend, IptablesLegacyBackend, RouteTeeBackend
from .nftables import NftablesBackend

__all__ = [
    "AUTO_ORDER",
    "FACTORIES",
    "ApplyError",
    "Backend",
    "BackendError",
    "Counts",
    "Rendered",
    "create",
    "select",
]

FACTORIES: dict[str, Callable[[], Backend]] = {
    "nftables": NftablesBackend,
    "iptables": IptablesBackend,
    "iptables-legacy": IptablesLegacyBackend,
    "route-tee": RouteTeeBackend,
}
# route-tee is never guessed: it exists only on patched old kernels, and a
# user on one says so.
AUTO_ORDER = ("nftables", "iptables")


def create(name: str) -> Backend:
    return FACTORIES[name]()


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
