"""`mirrord trace`: follow matching packets through nftables, like the seeds' iptables TRACE.

Matching packets get `meta nftrace set 1` from a temporary table
`inet mirrord_trace` (prerouting and output, raw priority, so everything later
sees the mark). The kernel then reports every rule, return and policy the
packet meets on NFNLGRP_NFTRACE; events are grouped per packet and printed as
one header line followed by the table/chain/rule/verdict path, with mirrord's
own copy rules marked.

The command's parts, in the order a run uses them:

- selection: the options (or a spec's mirror) -> what to trace; match options
  are read by the spec's own rules
- table: the temporary table (marking rules, SSH exclusion, stale-owner
  recovery, removal on every way out)
- rulebook: the rules events name, with their text and the mirror they copy for
- headers: packet headers from the events (no scapy), and the keys that group them
- events: NFT_MSG_TRACE events grouped per packet (parsed in mirrord.netlink.nftrace)
- render: the human and JSON output
- loop: the run itself, signals, timeouts, exit status

This package is the subcommand's module: it provides `add_arguments` and `run`.
"""

from __future__ import annotations

from .loop import EXIT_ERROR, EXIT_NOT_REACHED, EXIT_OK, run, trace
from .selection import Selection, TraceError, add_arguments, selection_from_args
from .table import TRACE_FAMILY, TRACE_TABLE, owner_alive, stale_owner

__all__ = [
    "EXIT_ERROR",
    "EXIT_NOT_REACHED",
    "EXIT_OK",
    "TRACE_FAMILY",
    "TRACE_TABLE",
    "Selection",
    "TraceError",
    "add_arguments",
    "owner_alive",
    "run",
    "selection_from_args",
    "stale_owner",
    "trace",
]
