"""iptables backends: mangle-table TEE (nft or legacy), and the legacy ROUTE --tee dialect.

mirrord owns chains named MIRRORD_* in the mangle table, jumped to from the
first position of PREROUTING and POSTROUTING. Everything is applied with one
`iptables-restore -w --noflush` per address family: declaring a chain flushes
it, so the input is the complete desired state of mirrord's chains, and the
table is committed at once (legacy: one table replace; nft: one transaction).

Layout: MIRRORD_PRE / MIRRORD_POST first RETURN the traffic of every
collector address (what mirrord sends and what collectors answer is never
copied: no feedback loop; one `-s` per rule is all iptables allows, so the
exclusion cannot ride on each rule), then jump to one chain per collector.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

from ..match import PROTOCOL_NAMES, FamilyMatch, PortRange
from ..plan import CloneRule, Plan
from .base import ApplyError, Backend, Counts, Rendered, comment, parse_comment

log = logging.getLogger("mirrord")

PRE, POST = "MIRRORD_PRE", "MIRRORD_POST"
HOOKS = {"in": ("PREROUTING", PRE, "-i"), "out": ("POSTROUTING", POST, "-o")}
MULTIPORT_MAX = 15  # the kernel's xt_multiport limit; a range takes two slots

Dialect = Literal["tee", "route"]


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


class IptablesBackend(Backend):
    name = "iptables"
    dialect: Dialect = "tee"
    # The `iptables` command may be either variant; probe decides.
    binary_suffix = ""

    def __init__(self) -> None:
        self._event_driven: Optional[bool] = None
        # Per IP version: final counts of rule generations replaced (see apply).
        self.banked: dict[int, Counts] = {}

    # -- commands ----------------------------------------------------------
    def _bin(self, version: int, tool: str) -> str:
        base = "iptables" if version == 4 else "ip6tables"
        return f"{base}{self.binary_suffix}{tool}"

    def _run(self, argv: list[str], stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
        """A command's result; a missing binary or a hung one is a failed result, not an exception."""
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]}: no answer within 30 s "
                                                              "(xtables lock held?)")
        except OSError as e:
            return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {e}")

    def _restore_argv(self, version: int) -> list[str]:
        # -w: take the xtables lock, so a firewall reload (fw3,
        # netfilter-persistent) and we never interleave our commits.
        return [self._bin(version, "-restore"), "-w", "--noflush"]

    def _restore(self, version: int, text: str) -> subprocess.CompletedProcess[str]:
        return self._run(self._restore_argv(version), text)

    def versions_wanted(self, plan: Plan) -> set[int]:
        return {r.version for r in plan.clones}

    @property
    def kernel_owner(self) -> str:
        return "iptables-nft" if self.uses_nft else "iptables-legacy"

    @property
    def event_driven(self) -> bool:
        return self.uses_nft

    @property
    def uses_nft(self) -> bool:
        if self._event_driven is None:
            p = self._run([self._bin(4, ""), "--version"]) if shutil.which(self._bin(4, "")) else None
            self._event_driven = bool(p and "nf_tables" in p.stdout)
        return self._event_driven

    # -- probing -------------------------------------------------------------
    def unsupported(self) -> Optional[str]:
        for tool in ("-restore", "-save"):
            if shutil.which(self._bin(4, tool)) is None:
                return f"{self._bin(4, tool)} is not installed (install iptables)"
        p = self._run([self._bin(4, "-save")])
        if p.returncode != 0:
            return f"cannot read the iptables tables: {p.stderr.strip()}"
        return self._probe_target()

    def _target_args(self, gateway: str, device: Optional[str]) -> list[str]:
        args = ["-j", "TEE", "--gateway", gateway]
        if device:
            args += ["--oif", device]
        return args

    def _probe_target(self) -> Optional[str]:
        chain = "MIRRORD_PROBE"
        rule = " ".join(self._target_args("192.0.2.1", None))
        add = f"*mangle\n:{chain} - [0:0]\n-A {chain} {rule}\nCOMMIT\n"
        had_table = bool(self._save(4))
        p = self._restore(4, add)
        self._restore(4, f"*mangle\n-F {chain}\n-X {chain}\nCOMMIT\n")
        if not had_table:
            self._drop_empty_table(4)
        if p.returncode != 0:
            return self._missing_target(p.stderr.strip().splitlines()[0] if p.stderr else "")
        return None

    def _missing_target(self, err: str) -> str:
        return (f"the kernel or iptables lacks the TEE target ({err}); install "
                "kmod-ipt-tee and iptables-mod-tee (OpenWrt) or enable CONFIG_NETFILTER_XT_TARGET_TEE")

    # -- rendering -------------------------------------------------------------
    def render(self, plan: Plan) -> Rendered:
        texts = self.render_restore(plan)
        # As applied on a router where mirrord's jumps are not there yet
        # (apply() adds each jump only when it is missing).
        jumps = "".join(f"-I {hook} 1 -j {top}\n" for hook, top, _ in HOOKS.values())
        restore = " ".join(self._restore_argv(4)[1:])
        text = "".join(f"# {self._bin(v, '-restore')} {restore}\n" +
                       t.replace("COMMIT\n", jumps + "COMMIT\n") for v, t in texts.items())
        payload = {v: ([r for r in plan.clones if r.version == v], plan.clone_egress)
                   for v in texts}
        return Rendered(text=text, payload=payload)

    def render_restore(self, plan: Plan, generation: str = "A") -> dict[int, str]:
        out: dict[int, str] = {}
        for version in sorted(self.versions_wanted(plan)):
            rules = [r for r in plan.clones if r.version == version]
            out[version] = self._render_family(rules, plan.clone_egress, generation)
        return out

    def _render_family(self, rules: list[CloneRule], egress: frozenset[str],
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
                    body += self._rule_lines(chain, r)
        lines += body
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def _rule_lines(self, chain: str, r: CloneRule) -> list[str]:
        flag = HOOKS[r.direction][2]
        note = ["-m", "comment", "--comment", f'"{comment(r.mirror, r.direction)}"']
        target = self._target_args(str(r.gateway), r.device)
        out = []
        for ifname in r.interfaces:
            for alt in match_args(r.match):
                out.append(" ".join([f"-A {chain}", flag, ifname, *alt, *note, *target]))
        return out

    # -- the kernel --------------------------------------------------------------
    def _save(self, version: int, counters: bool = False) -> list[str]:
        """The mangle table's lines, or [] when there is no mangle table.

        Never `-save -t mangle`: for iptables-legacy that makes the kernel
        create the table, which then filters every packet and cannot be
        removed again.
        """
        argv = [self._bin(version, "-save")]
        if counters:
            argv.append("-c")
        p = self._run(argv)
        if p.returncode != 0:
            return []
        out: list[str] = []
        inside = False
        for ln in p.stdout.splitlines():
            if ln == "*mangle":
                inside = True
            elif inside and ln == "COMMIT":
                break
            if inside:
                out.append(ln)
        return out

    def _jumps_present(self, lines: list[str]) -> set[str]:
        return {c for c in (PRE, POST) for ln in lines if ln.endswith(f"-j {c}") and
                re.match(r"^(\[\d+:\d+\] )?-A (PREROUTING|POSTROUTING) -j MIRRORD_", ln)}

    def apply(self, rendered: Rendered, carry: Counts) -> None:
        """Switch every family to a new generation, then retire the old ones.

        Phase 1 commits, per family, the new generation and the top chains
        pointing at it; if a family is refused, the families already switched
        are pointed back at their old chains, so a refusal changes nothing.
        Phase 2 banks the retired chains' final counts and deletes them.
        """
        wanted: dict[int, tuple[list[CloneRule], frozenset[str]]] = rendered.payload
        for version in wanted:
            if shutil.which(self._bin(version, "-restore")) is None:
                raise ApplyError(f"{self._bin(version, '-restore')} is not installed")
        switched: list[_Switch] = []
        for version in (4, 6):
            if shutil.which(self._bin(version, "-restore")) is None:
                continue
            current = self._save(version)
            ours = _our_chains(current)
            if version not in wanted:
                if ours:
                    switched.append(_Switch(version, current, ours, set(), remove=True))
                continue
            generation = "B" if any(c.startswith((f"{PRE}_A", f"{POST}_A")) for c in ours) else "A"
            text = self._render_family(*wanted[version], generation)
            missing = [f"-I {hook} 1 -j {top}" for hook, top, _ in HOOKS.values()
                       if top not in self._jumps_present(current)]
            # --noflush keeps PREROUTING's other rules, so our jump is added
            # only when missing, in the same commit as the chains it targets.
            text = text.replace("COMMIT\n", "".join(f"{e}\n" for e in missing) + "COMMIT\n")
            p = self._restore(version, text)
            if p.returncode != 0:
                self._roll_back(switched)
                raise ApplyError(
                    f"{self._bin(version, '-restore')} refused the rules: {p.stderr.strip()}\n"
                    f"input:\n{text}"
                )
            declared = {ln[1:].split()[0] for ln in text.splitlines() if ln.startswith(":")}
            switched.append(_Switch(version, current, ours, declared))
        for sw in switched:
            retired = [c for c in sw.before if c not in sw.declared]
            final = self._chain_counts(sw.version, set(retired)) if retired else {}
            if sw.remove:
                self._remove(sw.version, sw.current)
            elif retired:
                # Unreferenced since phase 1: their counts are final.
                drop = [f"-F {c}" for c in retired] + [f"-X {c}" for c in retired]
                self._restore(sw.version, "*mangle\n" + "\n".join(drop) + "\nCOMMIT\n")
            bank = self.banked.setdefault(sw.version, {})
            if sw.before:
                _add(bank, final)
            else:
                # Nothing of ours was there (first start, or a flush removed
                # it): go on from the totals the daemon last saw.
                keys = {(r.mirror, r.direction) for r in wanted.get(sw.version, ([], None))[0]}
                self.banked[sw.version] = {k: v for k, v in carry.items() if k in keys}

    def _roll_back(self, switched: list[_Switch]) -> None:
        """Point already switched families back at their previous chains."""
        for sw in switched:
            if sw.remove:
                continue
            lines = ["*mangle"]
            fresh = [c for c in sw.declared if c not in sw.before]
            if PRE in sw.before:
                lines += [f":{PRE} - [0:0]", f":{POST} - [0:0]"]
                lines += [ln for ln in sw.current if ln.startswith((f"-A {PRE} ", f"-A {POST} "))]
            else:
                lines += [f"-D {hook} -j {top}" for hook, top, _ in HOOKS.values()]
            lines += [f"-F {c}" for c in fresh] + [f"-X {c}" for c in fresh]
            lines.append("COMMIT")
            p = self._restore(sw.version, "\n".join(lines) + "\n")
            if p.returncode != 0:
                log.error("could not roll back IPv%d after a refused apply: %s", sw.version,
                          p.stderr.strip())

    def _chain_counts(self, version: int, chains: set[str]) -> Counts:
        out: Counts = {}
        for ln in self._save(version, counters=True):
            m = _COUNTED_RULE.match(ln)
            if m and m.group(3) in chains:
                key = parse_comment(m.group(4) or m.group(5))
                if key:
                    _add(out, {key: (int(m.group(1)), int(m.group(2)))})
        return out

    def _remove(self, version: int, current: list[str]) -> None:
        lines = ["*mangle"]
        for hook, top, _ in HOOKS.values():
            if top in self._jumps_present(current):
                lines.append(f"-D {hook} -j {top}")
        chains = _our_chains(current)
        lines += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]
        lines.append("COMMIT")
        p = self._restore(version, "\n".join(lines) + "\n")
        if p.returncode != 0:
            raise ApplyError(f"{self._bin(version, '-restore')} could not remove mirrord's chains: "
                             f"{p.stderr.strip()}")
        self._drop_empty_table(version)

    def _drop_empty_table(self, version: int) -> None:
        """iptables-nft creates `table ip mangle` for our jumps; leave no empty one behind.

        Only when nothing but empty built-in chains remains (no rule, no user
        chain of anyone's). Legacy tables cannot be removed from userspace.
        """
        if not self.uses_nft or shutil.which("nft") is None:
            return
        lines = self._save(version)
        if not lines or any(ln.startswith("-A ") for ln in lines):
            return
        builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
        chains = [ln[1:].split() for ln in lines if ln.startswith(":")]
        if all(c[0] in builtin and c[1] == "ACCEPT" for c in chains):
            self._run(["nft", "delete", "table", "ip" if version == 4 else "ip6", "mangle"])

    def snapshot(self) -> str:
        parts = []
        for version in (4, 6):
            if shutil.which(self._bin(version, "-save")) is None:
                continue
            mine = [ln for ln in self._save(version) if "MIRRORD_" in ln]
            if mine:
                parts.append(f"v{version}\n" + "\n".join(mine))
        return "\n".join(parts)

    def verify(self, rendered: Rendered, snapshot: str) -> Optional[str]:
        wanted: dict[int, tuple[list[CloneRule], frozenset[str]]] = rendered.payload
        want: Counter[tuple[str, ...]] = Counter()
        for version, (rules, egress) in wanted.items():
            jumps = "".join(f"-A {hook} -j {top}\n" for hook, top, _ in HOOKS.values())
            want.update(_fingerprint(version, self._render_family(rules, egress) + jumps))
        blocks: dict[int, list[str]] = {}
        lines: list[str] = []
        for ln in snapshot.splitlines():
            if ln in ("v4", "v6"):
                lines = blocks.setdefault(int(ln[1]), [])
            else:
                lines.append(ln)
        have: Counter[tuple[str, ...]] = Counter()
        for version, block in blocks.items():
            have.update(_fingerprint(version, "\n".join(block)))
        if want == have:
            return None
        missing, extra = want - have, have - want
        first = next(iter(missing), None) or next(iter(extra))
        return (f"{sum(missing.values())} line(s) missing, {sum(extra.values())} unexpected "
                f"(e.g. {' '.join(first)})")

    def counters(self) -> Counts:
        """Totals: the live rules' counts plus those of retired generations."""
        out: Counts = {}
        for bank in self.banked.values():
            _add(out, bank)
        for version in (4, 6):
            if shutil.which(self._bin(version, "-save")) is None:
                continue
            current = self._save(version)
            _add(out, self._chain_counts(version, set(_our_chains(current))))
        return out

    def flush(self) -> None:
        for version in (4, 6):
            if shutil.which(self._bin(version, "-save")) is None:
                continue
            current = self._save(version)
            if any("MIRRORD_" in ln for ln in current):
                self._remove(version, current)


@dataclass
class _Switch:
    """One family's step in apply(): what was there, what the new input declared."""

    version: int
    current: list[str]
    before: list[str]
    declared: set[str]
    remove: bool = False


_COUNTED_RULE = re.compile(
    r'^\[(\d+):(\d+)\] -A (MIRRORD_\S+) .*--comment (?:"([^"]+)"|(\S+))')


_GENERATION = re.compile(r"^(MIRRORD_(?:PRE|POST))_[AB](\d+)$")
_LINE = re.compile(r"^-[AI] (\S+) (?:\d+ )?(.*)$")
_COMMENT = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_TARGET = re.compile(r"(?:^| )-j (\S+)")
_GATEWAY = re.compile(r" --(?:gateway|gw) (\S+)")


def _generic(chain: str) -> str:
    """A chain's name without its generation letter: A and B hold the same rules."""
    return _GENERATION.sub(r"\1_\2", chain)


def _fingerprint(version: int, text: str) -> Counter[tuple[str, ...]]:
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


def _our_chains(lines: list[str]) -> list[str]:
    return [ln[1:].split()[0] for ln in lines if ln.startswith(":MIRRORD_")]


def _add(total: Counts, more: Counts) -> None:
    for key, (p, b) in more.items():
        tp, tb = total.get(key, (0, 0))
        total[key] = (tp + p, tb + b)


class IptablesLegacyBackend(IptablesBackend):
    name = "iptables-legacy"
    binary_suffix = "-legacy"

    @property
    def uses_nft(self) -> bool:
        return False


class RouteTeeBackend(IptablesBackend):
    """The patch-o-matic ROUTE target of old DD-WRT/OpenWrt kernels: IPv4 only."""

    name = "route-tee"
    dialect = "route"
    versions = frozenset({4})

    def versions_wanted(self, plan: Plan) -> set[int]:
        return {4} if any(r.version == 4 for r in plan.clones) else set()

    def _target_args(self, gateway: str, device: Optional[str]) -> list[str]:
        args = ["-j", "ROUTE"]
        if device:
            args += ["--oif", device]
        return [*args, "--gw", gateway, "--tee"]

    def _missing_target(self, err: str) -> str:
        return (f"this kernel has no ROUTE target ({err}); ROUTE --tee exists only on old "
                "patch-o-matic kernels (DD-WRT): use backend iptables (TEE) or nftables")

    def _restore_argv(self, version: int) -> list[str]:
        # The iptables of the old images that have ROUTE predates
        # `iptables-restore -w` (1.6.2).
        return [self._bin(version, "-restore"), "--noflush"]
