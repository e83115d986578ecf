"""TZSP capture without the daemon: one tap in a process of its own, or by hand.

- `TzspWorker`: a TapHandle with a CaptureProcess of its own (the tests'
  worker in a namespace, tests/tzsp_helpers.py run-worker).
- `python -m mirrord.tzsp.worker --interface IF ... --collector ADDR`: every
  --interface a tap, all served in this very process (bench/bench_tzsp.py).

The daemon uses neither: its taps share one CaptureProcess (supervisor.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from dataclasses import asdict
from typing import Optional

from . import codec as tzsp
from .job import SharedCounters, TzspJob, match_from_dict, tap_line
from .protocol import EXIT_CONFIG, new_block
from .supervisor import STOP_TIMEOUT, CaptureProcess, TapHandle

log = logging.getLogger("mirrord.tzsp.worker")

__all__ = ["TzspWorker", "main"]


class TzspWorker(TapHandle):
    """One job in a capture process of its own: `sentinel` turns readable on
    the process's events; poll() then says whether the tap ended."""

    def __init__(self, job: TzspJob) -> None:
        super().__init__(CaptureProcess(), job)

    def poll(self) -> Optional[str]:
        if self.process.events >= 0:
            self.process.read_events()
        return super().poll()

    def close(self) -> None:
        self.stop()
        self.process.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        super().stop(timeout)
        self.process.stop(timeout)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mirrord.tzsp.worker",
                                description="mirrord TZSP capture, by hand: every --interface "
                                            "a tap, all in this one process")
    p.add_argument("--interface", action="append", required=True,
                   help="interface to mirror (repeat for more taps)")
    p.add_argument("--direction", choices=("in", "out", "both"), default="both")
    p.add_argument("--collector", required=True, help="collector address")
    p.add_argument("--port", type=int, default=tzsp.PORT)
    p.add_argument("--snaplen", type=int, default=65535)
    p.add_argument("--match", default="{}", help="match as JSON (see match_to_dict)")
    p.add_argument("--ring-mib", type=int, default=0, help="ring size per tap (default 512 KiB)")
    p.add_argument("--buckets", default=None, type=bucket_list,
                   help="only the flows of these buckets (0-63), e.g. 0-15,40: a collector "
                        "group member's share (default: every flow)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--stats", action="store_true", help="print the final counters as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s %(message)s")
    from .capture import serve

    directions = ("in", "out") if args.direction == "both" else (args.direction,)
    try:
        jobs = [TzspJob(mirror=name, interface=name, ifindex=socket.if_nametoindex(name),
                        directions=directions, match=match_from_dict(json.loads(args.match)),
                        collector=ipaddress.ip_address(args.collector), port=args.port,
                        snaplen=args.snaplen, ring_bytes=args.ring_mib << 20,
                        buckets=args.buckets)
                for name in args.interface]
    except (ValueError, OSError) as e:
        print(f"mirrord.tzsp.worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    fd, buf = new_block()
    os.close(fd)
    rc = serve(buf, -1, -1, logging.getLogger("mirrord").getEffectiveLevel(),
               [tap_line(j, i) for i, j in enumerate(jobs)], log_to=log.log)
    if args.stats:
        for i, j in enumerate(jobs):
            s = SharedCounters(buf, i)
            print(json.dumps({"interface": j.interface, "reason": s.reason(),
                              "code": s.meta()[2], **asdict(s.read())}), flush=True)
    return rc


def bucket_list(text: str) -> tuple[int, ...]:
    """"0-15,40" -> (0, ..., 15, 40); argparse reports a ValueError as a usage error."""
    from .bpf import BUCKETS

    out: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if not 0 <= first <= last < BUCKETS:
            raise ValueError(f"bucket range {part} is not within 0-{BUCKETS - 1}")
        out.update(range(first, last + 1))
    return tuple(sorted(out))


if __name__ == "__main__":
    sys.exit(main())
