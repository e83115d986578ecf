"""The userspace transport: TZSP copies to any routed host.

codec (the wire format), bpf (the in-kernel filter), job (a planned tap as
the daemon hands it over, and its counters), protocol (what daemon and capture
process say: tap lines, events, shared-memory slots), supervisor (the daemon's
side: the capture process and its tap handles), capture (the capture process),
forward (its hot loop), ring (AF_PACKET ring), send (batched UDP sends),
worker (one tap without the daemon: tests, bench), receive (the collector's side).

Kept empty: the capture process imports this package with `python -I -S`.
"""
