"""The temporary `inet mirrord_trace` table that marks what a trace follows.

Its rules set `meta nftrace 1` on the selected packets in prerouting and
output at raw priority, so everything later sees the mark, and keep the
user's own SSH session out. It is created in one exclusive transaction and
removed on every way out; one left by a killed run is recognised by the
pid and start time in its rule comments and removed by the next run, unless
that process still runs.

The table is not created inside `ip mirrord`/`ip6 mirrord`: the daemon
replaces those whole on every reconcile.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from typing import Any, Optional

from ...backends.libnft import NftSession
from ...netlink.nftrace import TraceSocket, process_start_time
from .selection import Selection, TraceError

log = logging.getLogger(__package__)  # the command's one logger, whichever module logs

TRACE_FAMILY = "inet"
TRACE_TABLE = "mirrord_trace"  # the daemon never removes it; `mirrord flush` only a dead trace's
PRIO_RAW = -300
# (chain, hook, priority). Marking happens in prerouting (everything that
# arrives) and output (what the router itself sends): every packet's first
# hook. The empty `post` chain, after every NAT and mirror chain, marks
# nothing; its policy event tells where a traced packet finally leaves, which
# no other event may say when no other table has a postrouting chain.
MARK_CHAINS = (("pre", "prerouting"), ("out", "output"))
CHAINS = ((*MARK_CHAINS[0], PRIO_RAW), (*MARK_CHAINS[1], PRIO_RAW), ("post", "postrouting", 1000))
COMMENT_RE = re.compile(r"^mirrord trace pid=(\d+) start=(\d+)$")

Expr = dict[str, Any]


# -- the marking rules -----------------------------------------------------------
def _meta_match(key: str, value: Any) -> Expr:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


NFTRACE_ON: Expr = {"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}


def trace_rules(sel: Selection) -> list[tuple[str, list[Expr]]]:
    """(chain, expressions) of every marking rule; pure."""
    from ...backends.nftables import match_exprs

    rules: list[tuple[str, list[Expr]]] = []
    for version in sel.match.versions():
        fm = sel.match.for_version(version)
        if fm is None:
            continue
        # The lead renders protocols with `meta l4proto`, which in an inet
        # table matches both families: pin the family explicitly.
        family = _meta_match("nfproto", f"ipv{version}")
        for alt in match_exprs(fm):
            if not sel.crossings:
                for chain, _hook in MARK_CHAINS:
                    rules.append((chain, [family, *alt, NFTRACE_ON]))
                continue
            for iface, direction in sel.crossings:
                if direction == "in":
                    rules.append(("pre", [family, _meta_match("iifname", iface), *alt,
                                          NFTRACE_ON]))
                else:
                    # Forwarded packets: prerouting does not know the output
                    # interface yet, so ask the FIB where the packet will go.
                    fib = {"match": {"op": "==", "left": {"fib": {"result": "oifname",
                                                                  "flags": ["daddr"]}},
                                     "right": iface}}
                    rules.append(("pre", [family, fib, *alt, NFTRACE_ON]))
                    rules.append(("out", [family, _meta_match("oifname", iface), *alt,
                                          NFTRACE_ON]))
    return rules


def trace_comment(pid: int, start: int) -> str:
    return f"mirrord trace pid={pid} start={start}"


SshFlow = tuple[str, int, str, int]  # client address, client port, server address, server port


def ssh_flow(environ: dict[str, str]) -> Optional[SshFlow]:
    """The SSH connection this command runs in, from SSH_CONNECTION, if any."""
    parts = environ.get("SSH_CONNECTION", "").split()
    if len(parts) != 4:
        return None
    try:
        client, server = ipaddress.ip_address(parts[0]), ipaddress.ip_address(parts[2])
        cport, sport = int(parts[1]), int(parts[3])
    except ValueError:
        return None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    if isinstance(server, ipaddress.IPv6Address) and server.ipv4_mapped:
        server = server.ipv4_mapped
    if client.version != server.version:
        return None
    return str(client), cport, str(server), sport


def ssh_exclusions(flow: SshFlow) -> list[tuple[str, list[Expr]]]:
    """Rules that keep the user's own SSH session out of the trace.

    Tracing it would print a packet for every packet of the printing itself,
    a loop that floods the terminal as soon as the match is broad.
    """
    client, cport, server, sport = flow
    fam = "ip6" if ":" in client else "ip"

    def one(saddr: str, sp: int, daddr: str, dp: int) -> list[Expr]:
        def m(left: Expr, right: Any) -> Expr:
            return {"match": {"op": "==", "left": left, "right": right}}

        return [
            m({"payload": {"protocol": fam, "field": "saddr"}}, saddr),
            m({"payload": {"protocol": fam, "field": "daddr"}}, daddr),
            m({"meta": {"key": "l4proto"}}, "tcp"),
            m({"payload": {"protocol": "th", "field": "sport"}}, sp),
            m({"payload": {"protocol": "th", "field": "dport"}}, dp),
            {"return": None},
        ]

    return [("pre", one(client, cport, server, sport)), ("out", one(server, sport, client, cport))]


def create_commands(sel: Selection, comment: str,
                    ssh: Optional[SshFlow] = None) -> list[dict[str, Any]]:
    """One transaction creating the whole trace table; `create` fails if it exists."""
    t = {"family": TRACE_FAMILY, "table": TRACE_TABLE}
    cmds: list[dict[str, Any]] = [{"create": {"table": {"family": TRACE_FAMILY,
                                                        "name": TRACE_TABLE}}}]
    for chain, hook, prio in CHAINS:
        cmds.append({"add": {"chain": {**t, "name": chain, "type": "filter", "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
    rules = (ssh_exclusions(ssh) if ssh else []) + trace_rules(sel)
    for chain, exprs in rules:
        cmds.append({"add": {"rule": {**t, "chain": chain, "expr": exprs, "comment": comment}}})
    return cmds


DELETE_COMMANDS: list[dict[str, Any]] = [
    {"delete": {"table": {"family": TRACE_FAMILY, "name": TRACE_TABLE}}}
]


# -- the table in the kernel -------------------------------------------------------
def open_session() -> NftSession:
    try:
        return NftSession.open()
    except (ImportError, OSError) as e:
        raise TraceError(str(e)) from e  # names the library's problem and the package


def stale_owner(objs: list[dict[str, Any]]) -> Optional[tuple[int, int]]:
    """The (pid, start) a trace table's rule comments name, if any."""
    for o in objs:
        m = COMMENT_RE.match(str(o.get("rule", {}).get("comment", "")))
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def owner_alive(owner: tuple[int, int]) -> bool:
    pid, start = owner
    if pid == os.getpid():
        return False
    return process_start_time(pid) == start


class TraceTable:
    def __init__(self, nft: NftSession) -> None:
        self.nft = nft
        self.created = False
        self.seen_created = False  # our NEWTABLE came back on the event socket

    def clear_stale(self) -> None:
        objs = self.nft.list_table(TRACE_FAMILY, TRACE_TABLE)
        if objs is None:
            return
        owner = stale_owner(objs)
        if owner is not None and owner_alive(owner):
            raise TraceError(
                f"another mirrord trace (pid {owner[0]}) is running in this network namespace; "
                "stop it first (both would print each other's packets)")
        rc, _, err = self.nft.json(DELETE_COMMANDS)
        if rc != 0:
            raise TraceError(f"cannot remove the stale table {TRACE_FAMILY} {TRACE_TABLE}: "
                             f"{err.strip()}")
        who = f" (pid {owner[0]}, no longer running)" if owner else ""
        log.warning("removed table %s %s left behind by an earlier trace%s",
                    TRACE_FAMILY, TRACE_TABLE, who)

    def create(self, sel: Selection, comment: str, ssh: Optional[SshFlow] = None) -> None:
        cmds = create_commands(sel, comment, ssh)
        rc, _, err = self.nft.json(cmds)
        if rc != 0:
            raise TraceError(f"nftables refused the trace table: {err.strip()}\n"
                             f"input: {json.dumps({'nftables': cmds})}")
        self.created = True

    def delete(self) -> bool:
        if not self.created:
            return True
        rc, _, err = self.nft.json(DELETE_COMMANDS)
        if rc != 0 and self.nft.list_table(TRACE_FAMILY, TRACE_TABLE) is not None:
            log.error("could not remove table %s %s: %s; remove it with: "
                      "nft delete table %s %s", TRACE_FAMILY, TRACE_TABLE, err.strip(),
                      TRACE_FAMILY, TRACE_TABLE)
            return False
        self.created = False
        return True


def removed_by_others(sock: TraceSocket, table: TraceTable) -> bool:
    """Whether our table was deleted after we created it (a stale one's deletion comes first)."""
    removed = False
    for op, family, name in sock.table_events:
        if (family, name) == (TRACE_FAMILY, TRACE_TABLE):
            if op == "new":
                table.seen_created = True
            elif table.seen_created:
                removed = True
    sock.table_events.clear()
    if removed:
        table.created = False
    return removed
