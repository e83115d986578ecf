"""The userspace transport: TZSP copies to any routed host.

codec (the wire format), bpf (the in-kernel filter), ring (AF_PACKET ring and
batched sends), protocol (what daemon and capture process say), capture (the
capture process), supervisor (the daemon's side), receive (the collector's side).

Kept empty: the capture process imports this package with `python -I -S`.
"""
