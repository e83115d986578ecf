"""iptables backends: mangle-table TEE (nft or legacy), and the legacy ROUTE --tee dialect.

mirrord owns chains named MIRRORD_* in the mangle table, jumped to from the
first position of PREROUTING and POSTROUTING. Everything is applied with one
`iptables-restore -w --noflush` per address family: declaring a chain flushes
it, so the input is the complete desired state of mirrord's chains, and the
table is committed at once (legacy: one table replace; nft: one transaction).
The text itself, both ways, is render's.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

from ...plan import CloneRule, Plan
from ..base import ApplyError, Backend, Capabilities, Counts, Rendered
from .render import (
    HOOKS,
    POST,
    PRE,
    Target,
    add,
    chain_counts,
    fingerprint,
    jumps_present,
    our_chains,
    render_family,
    route_target,
    tee_target,
)

log = logging.getLogger("mirrord")

Dialect = Literal["tee", "route"]
# iptables-nft keeps the mangle chains in these nftables tables.
MANGLE_TABLES = frozenset({("ip", "mangle"), ("ip6", "mangle")})
BOTH = frozenset({4, 6})


def flavour_capabilities(nft: bool, versions: frozenset[int] = BOTH) -> Capabilities:
    owner = "iptables-nft" if nft else "iptables-legacy"
    return Capabilities(
        versions=versions,
        # iptables-legacy changes produce no nftables events: polled.
        watch_tables=MANGLE_TABLES if nft else frozenset(),
        event_driven=nft,
        kernel_owner=owner,
        removes=f"chains MIRRORD_* in the mangle tables of {owner}, and the jumps to them",
    )


class IptablesBackend(Backend):
    name = "iptables"
    dialect: Dialect = "tee"
    # The `iptables` command may be either variant; probe decides.
    binary_suffix = ""

    def __init__(self) -> None:
        self._uses_nft: Optional[bool] = None
        # Per IP version: the `carry` of the apply that found none of our
        # chains, plus the final counts of the rule generations retired since
        # (see apply). counters() goes on from these; that is this backend's
        # whole counter duty, and it keeps no other totals (the daemon does).
        self.banked: dict[int, Counts] = {}

    @property
    def capabilities(self) -> Capabilities:
        """Which flavour the `iptables` command is, is known only by running it."""
        return flavour_capabilities(self.uses_nft)

    @classmethod
    def possible_capabilities(cls) -> tuple[Capabilities, ...]:
        caps: object = cls.capabilities
        if isinstance(caps, Capabilities):  # a subclass that knows its flavour
            return (caps,)
        return (flavour_capabilities(True), flavour_capabilities(False))

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
    def uses_nft(self) -> bool:
        if self._uses_nft is None:
            p = self._run([self._bin(4, ""), "--version"]) if shutil.which(self._bin(4, "")) else None
            self._uses_nft = bool(p and "nf_tables" in p.stdout)
        return self._uses_nft

    # -- probing -------------------------------------------------------------
    def unsupported(self) -> Optional[str]:
        for tool in ("-restore", "-save"):
            if shutil.which(self._bin(4, tool)) is None:
                return f"{self._bin(4, tool)} is not installed (install iptables)"
        p = self._run([self._bin(4, "-save")])
        if p.returncode != 0:
            return f"cannot read the iptables tables: {p.stderr.strip()}"
        return self._probe_target()

    def _target(self) -> Target:
        return tee_target

    def _probe_target(self) -> Optional[str]:
        chain = "MIRRORD_PROBE"
        rule = " ".join(self._target()("192.0.2.1", None))
        had_table = bool(self._save(4))
        p = self._restore(4, f"*mangle\n:{chain} - [0:0]\n-A {chain} {rule}\nCOMMIT\n")
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
            out[version] = render_family(rules, plan.clone_egress, self._target(), generation)
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
            ours = our_chains(current)
            if version not in wanted:
                if ours:
                    switched.append(_Switch(version, current, ours, set(), remove=True))
                continue
            generation = "B" if any(c.startswith((f"{PRE}_A", f"{POST}_A")) for c in ours) else "A"
            text = render_family(*wanted[version], self._target(), generation)
            missing = [f"-I {hook} 1 -j {top}" for hook, top, _ in HOOKS.values()
                       if top not in jumps_present(current)]
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
                add(bank, final)
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
        return chain_counts(self._save(version, counters=True), chains)

    def _remove(self, version: int, current: list[str]) -> None:
        lines = ["*mangle"]
        for hook, top, _ in HOOKS.values():
            if top in jumps_present(current):
                lines.append(f"-D {hook} -j {top}")
        chains = our_chains(current)
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
            want.update(fingerprint(version, render_family(rules, egress, self._target()) + jumps))
        blocks: dict[int, list[str]] = {}
        lines: list[str] = []
        for ln in snapshot.splitlines():
            if ln in ("v4", "v6"):
                lines = blocks.setdefault(int(ln[1]), [])
            else:
                lines.append(ln)
        have: Counter[tuple[str, ...]] = Counter()
        for version, block in blocks.items():
            have.update(fingerprint(version, "\n".join(block)))
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
            add(out, bank)
        for version in (4, 6):
            if shutil.which(self._bin(version, "-save")) is None:
                continue
            current = self._save(version)
            add(out, self._chain_counts(version, set(our_chains(current))))
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


class IptablesLegacyBackend(IptablesBackend):
    name = "iptables-legacy"
    binary_suffix = "-legacy"
    capabilities = flavour_capabilities(nft=False)

    @property
    def uses_nft(self) -> bool:
        return False


class RouteTeeBackend(IptablesBackend):
    """The patch-o-matic ROUTE target of old DD-WRT/OpenWrt kernels: IPv4 only."""

    name = "route-tee"
    dialect = "route"
    # ROUTE exists only on old patch-o-matic kernels, whose iptables is the
    # legacy one (on any other kernel unsupported() refuses this backend).
    capabilities = flavour_capabilities(nft=False, versions=frozenset({4}))

    def versions_wanted(self, plan: Plan) -> set[int]:
        return {4} if any(r.version == 4 for r in plan.clones) else set()

    def _target(self) -> Target:
        return route_target

    def _missing_target(self, err: str) -> str:
        return (f"this kernel has no ROUTE target ({err}); ROUTE --tee exists only on old "
                "patch-o-matic kernels (DD-WRT): use backend iptables (TEE) or nftables")

    def _restore_argv(self, version: int) -> list[str]:
        # The iptables of the old images that have ROUTE predates
        # `iptables-restore -w` (1.6.2).
        return [self._bin(version, "-restore"), "--noflush"]
