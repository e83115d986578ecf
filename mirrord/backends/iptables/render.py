"""iptables text for mirrord's chains, both ways (pure: no command runs here).

Out: the iptables-restore input for a plan's rules of one IP version.
Back: what of an iptables-save listing is mirrord's (its chains, jumps and
counts) and the fingerprint that verification compares.

Layout: MIRRORD_PRE / MIRRORD_POST first RETURN the traffic of every
collector address (what mirrord sends and what collectors answer is never
copied: no feedback loop; one `-s` per rule is all iptables allows, so the
exclusion cannot ride on each rule), then jump to one chain per collector.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable, Optional

from ...match import PROTOCOL_NAMES, FamilyMatch, PortRange
from ...plan import CloneRule
from ..base import Counts, comment, parse_comment

PRE, POST = "MIRRORD_PRE", "MIRRORD_POST"
HOOKS = {"in": ("PREROUTING", PRE, "-i"), "out": ("POSTROUTING", POST, "-o")}
MULTIPORT_MAX = 15  # the kernel's xt_multiport limit; a range takes two slots

# (gateway, device or None) -> the target's arguments: the dialect.
Target = Callable[[str, Optional[str]], list[str]]


def tee_target(gateway: str, device: Optional[str]) -> list[str]:
    args = ["-j", "TEE", "--gateway", gateway]
    if device:
        args += ["--oif", device]
    return args


def route_target(gateway: str, device: Optional[str]) -> list[str]:
    """The patch-o-matic ROUTE target of old DD-WRT/OpenWrt kernels."""
    args = ["-j", "ROUTE"]
    if device:
        args += ["--oif", device]
    return [*args, "--gw", gateway, "--tee"]


def _ports(ranges: tuple[PortRange, ...]) -> str:
    return ",".join(str(r.low) if r.low == r.high else f"{r.low}:{r.high}" for r in ranges)


def _chunks(ranges: tuple[PortRange, ...]) -> list[tuple[PortRange, ...]]:
    out: list[list[PortRange]] = [[]]
    used = 0
    for r in ranges:
        cost = 1 if r.low == r.high else 2
        if used + cost > MULTIPORT_MAX:
            out.append([])
            used = 0
        out[-1].append(r)
        used += cost
    return [tuple(c) for c in out]


def match_args(fm: FamilyMatch) -> list[list[str]]:
    """The match as alternatives of iptables arguments (one rule each).

    Lists expand to one rule per element; the elements are disjoint (merged
    prefixes, merged port ranges, one protocol per packet), so no packet
    matches two of them and none is copied twice.
    """
    protos: list[list[str]] = [[]]
    if fm.protocols:
        protos = [["-p", PROTOCOL_NAMES.get(p, str(p))] for p in fm.protocols]
    srcs: list[list[str]] = [["-s", str(n)] for n in fm.sources] or [[]]
    dsts: list[list[str]] = [["-d", str(n)] for n in fm.destinations] or [[]]
    ports: list[list[str]] = []
    for clause in fm.port_clauses:
        variants: list[list[str]] = [[]]
        for field, ranges, negated in clause.tests:
            flag = "--sports" if field == "sport" else "--dports"
            if negated:
                # AND of negations: several multiport matches in one rule.
                neg = [a for c in _chunks(ranges) for a in ("-m", "multiport", "!", flag, _ports(c))]
                variants = [v + neg for v in variants]
            else:
                variants = [[*v, "-m", "multiport", flag, _ports(c)] for v in variants
                            for c in _chunks(ranges)]
        ports.extend(variants)
    return [p + s + d + pt for p in protos for s in srcs for d in dsts for pt in ports]


def render_family(rules: list[CloneRule], egress: frozenset[str], target: Target,
                  generation: str = "A") -> str:
    """The restore input for one family.

    The per-collector chains carry a generation letter (A or B): a
    replacement loads the other generation and repoints the top chains
    in one commit, so the old chains stop counting at that instant and
    their final counts can be banked before they are deleted.
    """
    collectors = list(dict.fromkeys((str(r.gateway), r.device) for r in rules))
    # Every rule carries the same exclusions (one tuple, shared by the
    # plan): walk each distinct tuple once, not once per rule.
    lists = {id(r.exclude): (r.version, r.exclude) for r in rules}.values()
    excluded = sorted({r.gateway for r in rules}
                      | {a for v, ex in lists for a in ex if a.version == v}, key=int)
    grouped = _by_collector(rules)
    lines = ["*mangle", f":{PRE} - [0:0]", f":{POST} - [0:0]"]
    body: list[str] = []
    for direction, (_, top, _flag) in HOOKS.items():
        if any(r.direction == direction for r in rules):
            for addr in excluded:
                body.append(f"-A {top} -s {addr} -j RETURN")
                body.append(f"-A {top} -d {addr} -j RETURN")
        for i, (gw, dev) in enumerate(collectors, 1):
            mine = grouped.get((direction, gw, dev), [])
            if not mine:
                continue
            chain = f"{top}_{generation}{i}"
            lines.append(f":{chain} - [0:0]")
            body.append(f"-A {top} -j {chain}")
            if direction == "out":
                for ifname in sorted({i for r in mine for i in r.interfaces} & egress):
                    # Clones leave here and pass POSTROUTING (untracked):
                    # their copy is suppressed by the kernel, but they
                    # must not be counted either.
                    body.append(f"-A {chain} -o {ifname} -m conntrack --ctstate UNTRACKED "
                                "-j RETURN")
            for r in mine:
                body += _rule_lines(chain, r, target)
    lines += body
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"

def _rule_lines(chain: str, r: CloneRule, target: Target) -> list[str]:
    flag = HOOKS[r.direction][2]
    note = ["-m", "comment", "--comment", f'"{comment(r.mirror, r.direction)}"']
    copy = target(str(r.gateway), r.device)
    out = []
    for ifname in r.interfaces:
        for alt in match_args(r.match):
            out.append(" ".join([f"-A {chain}", flag, ifname, *alt, *note, *copy]))
    return out

# -- the kernel --------------------------------------------------------------


def jumps_present(lines: list[str]) -> set[str]:
    return {c for c in (PRE, POST) for ln in lines if ln.endswith(f"-j {c}") and
            re.match(r"^(\[\d+:\d+\] )?-A (PREROUTING|POSTROUTING) -j MIRRORD_", ln)}


def our_chains(lines: list[str]) -> list[str]:
    return [ln[1:].split()[0] for ln in lines if ln.startswith(":MIRRORD_")]


_COUNTED_RULE = re.compile(
    r'^\[(\d+):(\d+)\] -A (MIRRORD_\S+) .*--comment (?:"([^"]+)"|(\S+))')


def chain_counts(lines: list[str], chains: set[str]) -> Counts:
    """Per mirror and direction, the counts of the rules in `chains` (from `-save -c` lines)."""
    out: Counts = {}
    for ln in lines:
        m = _COUNTED_RULE.match(ln)
        if m and m.group(3) in chains:
            key = parse_comment(m.group(4) or m.group(5))
            if key:
                add(out, {key: (int(m.group(1)), int(m.group(2)))})
    return out


def add(total: Counts, more: Counts) -> None:
    for key, (p, b) in more.items():
        tp, tb = total.get(key, (0, 0))
        total[key] = (tp + p, tb + b)


_GENERATION = re.compile(r"^(MIRRORD_(?:PRE|POST))_[AB](\d+)$")
_LINE = re.compile(r"^-[AI] (\S+) (?:\d+ )?(.*)$")
_COMMENT = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_TARGET = re.compile(r"(?:^| )-j (\S+)")
_GATEWAY = re.compile(r" --(?:gateway|gw) (\S+)")


def _generic(chain: str) -> str:
    """A chain's name without its generation letter: A and B hold the same rules."""
    return _GENERATION.sub(r"\1_\2", chain)


def fingerprint(version: int, text: str) -> Counter[tuple[str, ...]]:
    """What of mirrord's lines iptables-save lists as they were restored, as a multiset.

    Matches come back rewritten (`-s A` as `-s A/32`, extra `-m` modules),
    so a rule is known by its chain, target, gateway and comment; jumps from
    the built-in chains count by presence, as apply() adds a missing one
    and leaves anyone else's alone.
    """
    out: Counter[tuple[str, ...]] = Counter()
    v = str(version)
    for ln in text.splitlines():
        if ln.startswith(":MIRRORD_"):
            out["chain", v, _generic(ln[1:].split()[0])] += 1
            continue
        m = _LINE.match(ln)
        if m is None:
            continue
        chain, rest = m.group(1), m.group(2)
        target = _TARGET.search(rest)
        if not chain.startswith("MIRRORD_"):
            if rest in (f"-j {PRE}", f"-j {POST}"):
                out["jump", v, chain, rest[3:]] = 1
            continue
        note = _COMMENT.search(rest)
        gw = _GATEWAY.search(rest)
        gateway = ""
        if gw is not None:
            try:
                gateway = str(ipaddress.ip_address(gw.group(1)))
            except ValueError:
                gateway = gw.group(1)
        out["rule", v, _generic(chain), _generic(target.group(1)) if target else "",
            gateway, (note.group(1) or note.group(2) or "") if note else ""] += 1
    return out


def _by_collector(rules: list[CloneRule]) -> dict[tuple[str, str, Optional[str]], list[CloneRule]]:
    """(direction, gateway, device) -> its rules in order: one pass, not one per collector."""
    out: dict[tuple[str, str, Optional[str]], list[CloneRule]] = {}
    for r in rules:
        out.setdefault((r.direction, str(r.gateway), r.device), []).append(r)
    return out
