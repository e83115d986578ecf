"""Asking the kernel to resolve a dead group member's neighbour again.

A group member whose neighbour went FAILED holds no buckets, so no copy is
sent to it and the kernel never re-probes it: it would stay dead for ever
after it came back. One empty UDP datagram to its discard port (9) makes
the kernel resolve it again (ARP/ND); an answer is a neighbour event the
daemon acts on, and the member gets its buckets back. Standard library only.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from ..match import Address

DISCARD_PORT = 9


def probe(addresses: Iterable[Address]) -> None:
    """One datagram to each address; errors (the previous probe's ICMP or
    EHOSTUNREACH) are the expected answer of a dead host and ignored."""
    for a in addresses:
        family = socket.AF_INET6 if a.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(b"", (str(a), DISCARD_PORT))
        except OSError:
            pass
