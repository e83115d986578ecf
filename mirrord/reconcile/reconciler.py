"""The reconciler: the one path from spec to kernel, for start-up, reload, heal
and TZSP tap restarts alike.

    spec + topology -> plan -> render -> compare with the kernel -> apply -> Snapshot

It commits state only after the kernel agreed: a refused apply raises and
leaves the previous snapshot (and the rules that were running) in place. The
rendered rules are the comparison, the kernel's listing right after the
apply (verified to hold them) the reference for drift.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from types import MappingProxyType
from typing import Any, Optional

from .. import backends, plan
from ..backends.base import Backend, Counts, Rendered
from ..match import Address
from ..netlink import links
from ..netlink.links import Tunnel
from ..netlink.topology import Topology
from ..netlink.watch import CounterEvent
from ..plan.groups import groups_of, member_changes
from ..spec import Spec
from .ledger import CounterLedger
from .snapshot import Heal, Reading, Snapshot
from .taps import TapPool

log = logging.getLogger("mirrord")

# Neighbour states that mean the collector answered (or needs no answer).
GOOD_NEIGHBOUR = frozenset({"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"})
RETRY_MAX = 30.0  # seconds: the longest wait before applying again
# Seconds before a fresh look when the kernel could not do what a mirror needs
# (no netdev family or egress hook, a tunnel it refused): a module may be
# installed meanwhile, and no event says so.
LOOK_AGAIN = 30.0
# A group member dead by its neighbour gets no copies, so nothing makes the
# kernel resolve it again: probe it (netlink.probe) and look again this often.
PROBE_DEAD_EVERY = 1.0
_LOOK_AGAIN_FOR = frozenset({plan.Code.FRAMES_UNSUPPORTED, plan.Code.EGRESS_UNSUPPORTED,
                             plan.Code.TUNNEL_FAILED})
VERIFY_BACKOFF = 0.01  # the first wait after a listing that kept failing verification
# What a mirror's plan says for status only; everything else may shape the rules.
_STATE_ONLY = frozenset({"state", "reasons", "taps", "bridge_ports"})

TopologyReader = Callable[[Spec], Topology]
BackendChooser = Callable[[str], tuple[Optional[Backend], str]]
# Make the kernel hold exactly these mirrord tunnel devices; name -> why one failed.
TunnelMaker = Callable[[Sequence[Tunnel]], dict[str, str]]


def summarize(reasons: list[str], keep: int = 2) -> str:
    """One log-friendly line: a flush of a table is five events, not five lines."""
    unique = list(dict.fromkeys(reasons))
    # What tells most comes first: a link or a table coming or going; then
    # the rest, latest first (the table went, after its chains and rules).
    def rank(r: str) -> int:
        return 0 if r.startswith(("link", "table", "worker")) else 1

    shown = sorted(reversed(unique), key=rank)[:keep]
    more = len(unique) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def render_key(p: plan.Plan) -> tuple[Any, ...]:
    """What a backend's rendering of `p` can depend on: the plan without the
    mirrors' states. Generic over the fields, so a field added later counts."""
    names = [f.name for f in dataclasses.fields(plan.MirrorPlan) if f.name not in _STATE_ONLY]
    return (
        tuple(getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "mirrors"),
        tuple(tuple(getattr(mp, n) for n in names) for mp in p.mirrors),
    )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A reconcile's result: the new snapshot, and when to reconcile again
    (`again_in` seconds; None: not needed) because the listing taken after the
    apply did not hold what was applied."""

    snapshot: Snapshot
    again_in: Optional[float] = None
    why_again: str = ""
    # Reconcile with a fresh look at the kernel in this many seconds (None: no need).
    look_again_in: Optional[float] = None


class Reconciler:
    def __init__(self, spec: Spec, read_topology: TopologyReader, choose_backend: BackendChooser,
                 taps: TapPool, ledger: CounterLedger,
                 make_tunnels: TunnelMaker = links.ensure) -> None:
        self._read_topology = read_topology
        self._make_tunnels = make_tunnels
        # None: not asked yet, so the first reconcile removes what a mirrord
        # that died left behind.
        self._tunnels: Optional[tuple[Tunnel, ...]] = None
        # Devices the running rules may still copy into that the spec being
        # applied no longer wants: deleted once its apply is committed, so a
        # reload the kernel refuses leaves the old rules their devices.
        self._tunnels_stale: tuple[Tunnel, ...] = ()
        self._tunnel_errors: dict[str, str] = {}
        self._tunnels_tried = 0.0
        self._choose = choose_backend
        self.taps = taps
        self.ledger = ledger
        self.snapshot = Snapshot(spec=spec, started=time.time())
        self._probed: dict[Address, float] = {}  # group member -> when last probed
        self.backend: Optional[Backend] = None
        self._rendered: Optional[Rendered] = None
        self._render_cache: Optional[tuple[Backend, tuple[Any, ...], Rendered]] = None
        # The kernel's listing right after the last apply, verified to hold
        # what was rendered; None: not verified, so the next reconcile applies.
        self._applied_listing: Optional[str] = ""
        self._verify_failures = 0
        self._repeated_failures = 0  # ... with the very same listing each time
        self._unverified_listing = ""
        self._states: dict[str, str] = {}
        self.failed_neighbours: set[Address] = set()
        # Reads the nftables notifications waiting on the daemon's socket
        # (passing what they say about counters to counter_events): called
        # right before a carry is taken and right after an apply, so that a
        # deletion is folded in before the heal seeds from the carry, and our
        # own apply's notifications before any reading.
        self.drain: Optional[Callable[[], None]] = None
        self._lost_since: Optional[float] = None  # notifications lost; counters read then
        # The backend whose apply's notifications are being read (a switch
        # commits self.backend only after it).
        self._applying: Optional[Backend] = None
        backend, why = choose_backend(spec.backend)
        self.backend = backend
        self.snapshot = dataclasses.replace(self.snapshot, backend=backend.name if backend else None,
                                            backend_error=why)

    # -- the one path ---------------------------------------------------------
    def reconcile(self, reasons: list[str], refresh_topology: bool, force: bool = False,
                  new_spec: Optional[Spec] = None) -> Outcome:
        """Apply what the spec asks for now. Raises BackendError when the kernel
        refused it; the snapshot and the running rules are then unchanged."""
        cur = self.snapshot
        s = new_spec or cur.spec
        backend, backend_error = self.backend, cur.backend_error
        if new_spec is not None:
            backend, backend_error = self._backend_for(new_spec)
        fresh = cur.topology is None or refresh_topology or new_spec is not None
        if fresh:
            self._ensure_tunnels(s, backend)
        topo = self._topology(s) if fresh else cur.topology
        assert topo is not None
        p = self._plan(s, topo, backend, backend_error)
        if new_spec is not None and backend is None and p.clones == () and any(
            m.transport == "clone" for m in p.mirrors
        ) and self.backend is not None and cur.applies:
            # The new spec asks for a backend this kernel cannot use: keep the
            # running one rather than leave mirrors without rules.
            raise backends.ApplyError(backend_error or "no usable backend for the new spec")
        rendered = self._render(backend, p) if backend is not None else None
        listing = backend.snapshot() if backend is not None else ""
        changed_rules = rendered is not None and (
            self._rendered is None or rendered.text != self._rendered.text
            or rendered.binds != self._rendered.binds or backend is not self.backend)
        drift = backend is not None and listing != self._applied_listing
        # The same rules over devices made again (a tunnel, a span port): a heal.
        rebound = (rendered is not None and self._rendered is not None and new_spec is None
                   and rendered.text == self._rendered.text
                   and rendered.binds != self._rendered.binds)
        applied = False
        again: Optional[float] = None
        switching = self.backend is not None and backend is not self.backend and bool(cur.applies)
        if backend is not None and rendered is not None and (force or changed_rules or drift):
            self._drained()
            carry = self._carry()
            if rendered.text or listing:
                backend.apply(rendered, carry)  # raises: nothing below runs
                applied = True
                self._applying = backend
                try:
                    self._drained()
                finally:
                    self._applying = None
            again = self._verify(backend, rendered)
            if applied and drift and cur.applies and not changed_rules:
                self._note_uncounted(backend)
        self._lost_since = None
        if switching and self.backend is not None:
            # Only now that the new backend's rules are in: for a moment
            # both copy (a duplicate), never neither (a gap).
            self._fold_counters()
            old = self.backend.capabilities.kernel_owner
            if backend is None or backend.capabilities.kernel_owner != old:
                self.backend.flush()
        # The kernel agreed (or nothing needed doing): commit.
        why = summarize(reasons)
        applies, reapplies = cur.applies, cur.reapplies
        if applied:
            applies += 1
            reapplies += applies > 1
            what = "rules changed" if changed_rules else "rules were altered outside mirrord"
            log.info("applied %s rules (%s; %s)", backend.name if backend else "", what, why,
                     extra={"ACTION": "apply"})
        self.backend = backend
        if rendered is not None:
            self._rendered = rendered
        self._prune_tunnels()
        heals = self._note_changes(p, why, (drift or rebound) and applied and not force)
        since, moved = member_changes(groups_of(cur.plan.mirrors if cur.plan else ()),
                                      groups_of(p.mirrors), cur.member_since, time.time())
        for line in moved:
            log.warning("%s (%s)", line, why, extra={"ACTION": "member"})
        self.snapshot = dataclasses.replace(
            cur, spec=s, topology=topo, plan=p, backend=backend.name if backend else None,
            backend_error=backend_error, applies=applies, reapplies=reapplies, heals=heals,
            apply_error="", member_since=MappingProxyType(since))
        self.taps.sync(p, time.monotonic())
        waiting_on_kernel = any(r.code in _LOOK_AGAIN_FOR for mp in p.mirrors
                                for r in (*mp.reasons, *(t.cause for t in mp.taps if t.cause)))
        look: Optional[float] = LOOK_AGAIN if waiting_on_kernel else None
        if self._probe_dead_members(p):
            look = min(look or PROBE_DEAD_EVERY, PROBE_DEAD_EVERY)
        return Outcome(self.snapshot, again, "rules changed during the apply" if again else "",
                       look)

    def _probe_dead_members(self, p: plan.Plan) -> bool:
        """Probe the group members dead by a FAILED neighbour, at most once per
        PROBE_DEAD_EVERY each; whether any is dead that way."""
        from ..netlink.probe import probe

        now = time.monotonic()
        dead = [a for mp in p.mirrors if mp.group is not None
                for m, a in zip(mp.group.members, mp.collector.member_addresses())
                if not m.alive and "FAILED" in m.cause]
        due = [a for a in dict.fromkeys(dead)
               if now - self._probed.get(a, -PROBE_DEAD_EVERY) >= PROBE_DEAD_EVERY]
        for a in due:
            self._probed[a] = now
        probe(due)
        return bool(dead)

    def failed(self, error: str) -> Snapshot:
        """Record that the last apply was refused (the running rules stay)."""
        self.snapshot = dataclasses.replace(self.snapshot, apply_error=error)
        return self.snapshot

    def read(self) -> Reading:
        """The counters now: kernel clones and TZSP taps, totals across every replacement."""
        self._fold_counters()
        tzsp, rows = self.taps.reading()
        return Reading(clones=self.ledger.carry(), tzsp=tzsp, taps=rows,
                       notes=self.ledger.notes())

    def counter_events(self, events: Iterable[CounterEvent]) -> None:
        """What nftables notifications said about named counters, in their order."""
        backend = self._applying or self.backend
        for e in events:
            if e.kind == "lost":
                self.ledger.events_lost()
                if self._lost_since is None:
                    self._lost_since = self.ledger.unread_since()
                continue
            key = backend.named_counter(e.name) if backend is not None else None
            if key is None:
                continue
            named = (e.family, e.name)
            if e.kind == "rule":
                self.ledger.rule_deleted(named, e.packets, e.nbytes, e.values)
            elif e.kind == "created":
                self.ledger.counter_created(named)
            elif e.kind == "deleted":
                self.ledger.counter_deleted(named, key, time.time())

    def _drained(self) -> None:
        if self.drain is not None:
            self.drain()

    def _note_uncounted(self, backend: Backend) -> None:
        """A heal of rules someone else changed, where their last counts may be gone."""
        exact = backend.capabilities.counted_deletes
        if exact and self._lost_since is None:
            return
        since = self._lost_since if exact else self.ledger.unread_since()
        mirrors = sorted({m.mirror.name for m in (self.snapshot.plan.mirrors
                                                  if self.snapshot.plan else ())
                          if m.kernel_copies})
        if not mirrors:
            return
        why = ("nftables notifications were lost" if exact else
               f"backend {backend.name} cannot tell what rules deleted by another process "
               "had counted")
        self.ledger.note(
            f"copies of {', '.join(mirrors)} between "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since)) if since else 'the start'}"
            f" and {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} may not have been "
            f"counted: the rules were changed by another process and {why}")

    def stop(self) -> None:
        """Stop every tap, remove every rule, then the tunnel devices the rules
        copied into (the daemon is going away)."""
        self.taps.stop_all()
        if self.backend is not None and self.snapshot.applies:
            self.backend.flush()
        if self._tunnels or self._tunnels_stale:
            self._tunnels_stale = ()
            for name, error in self._make_tunnels(()).items():
                log.warning("could not remove tunnel device %s: %s", name, error)

    def _ensure_tunnels(self, s: Spec, backend: Optional[Backend]) -> None:
        """The tunnel devices `s` copies into, made (or made again) before the
        topology is read: the plan binds the rules to their ifindexes.

        A set that failed is tried again only after LOOK_AGAIN s (or for
        another set): a device that is made and then fails to come up is
        deleted again, and those link events must not start it over for ever.
        """
        wanted = plan.tunnels(s) if backend is not None else ()
        if backend is not None and wanted and backend.frame_support().ingress:
            wanted = ()  # no rule could copy into them
        names = {t.name for t in wanted}
        # Until the apply is committed the running rules are the old ones:
        # their devices stay (a device whose settings changed is replaced).
        stale = tuple(t for t in (*self._tunnels_stale, *(self._tunnels or ()))
                      if t.name not in names)
        stale = tuple({t.name: t for t in stale}.values())
        if not wanted and not stale and self._tunnels == ():
            return
        now = time.monotonic()
        if (wanted == self._tunnels and self._tunnel_errors
                and now - self._tunnels_tried < LOOK_AGAIN):
            return
        make = wanted + stale
        try:
            errors = self._make_tunnels(make)
        except OSError as e:  # rtnetlink itself failed: every tunnel is in doubt
            errors = {t.name: f"cannot make tunnel device {t.name}: {e}" for t in make}
        for name, error in errors.items():
            if name in names and self._tunnel_errors.get(name) != error:
                log.error("tunnel device %s: %s", name, error, extra={"ACTION": "tunnel"})
        errors = {name: e for name, e in errors.items() if name in names}
        self._tunnels, self._tunnel_errors, self._tunnels_tried = wanted, errors, now
        self._tunnels_stale = stale

    def _prune_tunnels(self) -> None:
        """The apply committed: the devices only the old rules used can go."""
        if not self._tunnels_stale:
            return
        self._tunnels_stale = ()
        try:
            errors = self._make_tunnels(self._tunnels or ())
        except OSError as e:
            log.warning("could not remove the tunnel devices no longer used: %s", e)
            return
        for name, error in errors.items():
            if self._tunnel_errors.get(name) != error:
                log.error("tunnel device %s: %s", name, error, extra={"ACTION": "tunnel"})

    # -- the steps ------------------------------------------------------------
    def _backend_for(self, s: Spec) -> tuple[Optional[Backend], str]:
        """The backend for `s`, keeping the running one whenever it still fits.

        nftables -> auto resolving to nftables must keep the same object (its
        state, and above all: no "switch" that removes the old rules, which
        are the new ones). Different backends that own the same kernel
        objects (iptables -> iptables-legacy on a legacy system) are not
        flushed on a switch either: see kernel_owner in reconcile.
        """
        cur = self.backend
        if cur is not None and (s.backend == cur.name or (
                s.backend == "auto" and self.snapshot.spec.backend == "auto")):
            return cur, ""
        chosen, why = self._choose(s.backend)
        if cur is not None and chosen is not None and chosen.name == cur.name:
            return cur, ""
        return chosen, why

    def _topology(self, s: Spec) -> Topology:
        """The kernel's view, with collectors seen FAILED kept failed.

        Under traffic the kernel re-probes a FAILED entry on the next clone,
        so a moment later it reads INCOMPLETE: that is the same dead host,
        not a recovery; only an answer (a good state) clears it.
        """
        topo = self._read_topology(s)
        reach = dict(topo.reach)
        for key, r in topo.reach.items():
            if r.neighbour == "FAILED":
                self.failed_neighbours.add(r.address)
            elif r.neighbour in GOOD_NEIGHBOUR:
                self.failed_neighbours.discard(r.address)
            elif r.address in self.failed_neighbours and r.onlink:
                reach[key] = dataclasses.replace(r, neighbour="FAILED")
        return dataclasses.replace(topo, reach=reach)

    def _plan(self, s: Spec, topo: Topology, backend: Optional[Backend],
              backend_error: str) -> plan.Plan:
        """plan.build, skipped when none of its inputs changed (a reconcile on nft
        events alone): with thousands of mirrors a plan costs a good part of a heal."""
        cur = self.snapshot
        if (cur.plan is not None and s is cur.spec and topo is cur.topology
                and backend is self.backend and backend_error == cur.backend_error):
            return cur.plan
        frames = (backend.frame_support() if backend is not None and any(
            c.copies_frames for c in s.collectors.values()) else plan.FrameSupport())
        return plan.build(s, topo, backend.name if backend else None, backend_error,
                          backend.capabilities.versions if backend else frozenset({4, 6}),
                          frames, dict(self._tunnel_errors),
                          backend.capabilities.delivery_counters if backend else False)

    def _render(self, backend: Backend, p: plan.Plan) -> Rendered:
        """backend.render(p), or the last rendering when it cannot differ.

        Rendering thousands of mirrors costs far more than comparing plans;
        link events change mirrors' states (what status shows), rarely the
        rules. Everything of the plan but those states is compared.
        """
        key = render_key(p)
        cached = self._render_cache
        if cached is not None and cached[0] is backend and cached[1] == key:
            return cached[2]
        rendered = backend.render(p)
        self._render_cache = (backend, key, rendered)
        return rendered

    def _fold_counters(self) -> None:
        """Fold the running backend's totals into the ledger, before anything
        replaces or removes rules: copies counted since the last reading are
        not lost with them."""
        if self.backend is None or not self.snapshot.applies:
            return
        try:
            current = self.backend.counters()
        except backends.BackendError as e:
            log.warning("could not read the counters: %s", e)
            return
        self.ledger.fold_clones(current)

    def _carry(self) -> Counts:
        self._fold_counters()
        return self.ledger.seeding()

    def _verify(self, backend: Backend, rendered: Rendered) -> Optional[float]:
        """Take the post-apply listing as the drift reference only if it is ours;
        otherwise say how soon to reconcile again.

        Someone else's change landing between our commit and this listing
        (a second `nft flush ruleset` a few ms after the first) would
        otherwise become "what mirrord applied", and the rules would stay
        gone while status says active.
        """
        after = backend.snapshot()
        problem = backend.verify(rendered, after)
        if problem is None:
            self._applied_listing = after
            self._verify_failures = self._repeated_failures = 0
            self._unverified_listing = ""
            return None
        self._applied_listing = None
        self._verify_failures += 1
        # Someone else's change shows as a listing with pieces missing, and
        # the answer is to apply again right away, however often it lands in
        # the window. The same non-empty listing failing again and again is
        # more likely this code misreading the kernel: back off, so that it
        # cannot turn into a busy loop of applies.
        repeated = bool(after) and after == self._unverified_listing
        self._unverified_listing = after
        self._repeated_failures = self._repeated_failures + 1 if repeated else 0
        level = logging.WARNING if self._repeated_failures in (4, 9) else logging.INFO
        log.log(level, "rules changed right after the apply (%s); applying again%s", problem,
                f" ({self._verify_failures} times in a row)" if self._verify_failures > 1 else "",
                extra={"ACTION": "apply-unverified"})
        if not self._repeated_failures:
            return 0.0
        return float(min(RETRY_MAX, VERIFY_BACKOFF * 2 ** min(self._repeated_failures, 12)))

    def _note_changes(self, p: plan.Plan, why: str, healed_drift: bool) -> MappingProxyType[str, Heal]:
        now = time.time()
        heals = dict(self.snapshot.heals)
        states: dict[str, str] = {}
        for mp in p.mirrors:
            name = mp.mirror.name
            state = f"{mp.state}:{mp.transport}:{mp.reason}"
            last = self._states.get(name, "")
            if last and last != state:
                heals[name] = Heal(now, why)
                log.info("mirror %s: %s%s (%s)", name, mp.state,
                         f" ({mp.reason})" if mp.reason else "", why,
                         extra={"MIRROR": name, "ACTION": "state"})
            elif healed_drift and mp.kernel_copies:
                heals[name] = Heal(now, f"rules restored after: {why}")
            states[name] = state
        self._states = states
        return MappingProxyType({k: v for k, v in heals.items() if k in states})
