"""Totals through a deletion of mirrord's tables by another process.

The notifications are the kernel's own bytes (tests/unit/data/nft_counter_events.txt,
captured on Linux 6.18 by data/capture_nft_counter_events.py): a table shaped like
mirrord's (a named counter seeded 5/500, two rules each with `counter name "m.out"
counter`, the first anonymous counter seeded like the named one), its rules flushed
and one made again (what mirrord's own replacement does), then the table deleted.
The capture's first line holds the named counter read right before the deletion:
the ledger must arrive at exactly that from the notifications alone.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Optional

from mirrord.backends.base import CounterKey, Counts, Rendered
from mirrord.backends.nftables.render import batch, family_seeds
from mirrord.netlink.rtnl import attr, messages
from mirrord.netlink.watch import CounterEvent, NftChanges, _rule_counts_walk, rule_counts
from mirrord.reconcile.ledger import CounterLedger
from tests.unit.test_reconciler import CLONE, FakeKernel, reconciler

DATA = Path(__file__).parent / "data" / "nft_counter_events.txt"
OWN = frozenset({("ip", "mirrord"), ("ip6", "mirrord"), ("netdev", "mirrord")})
KEY = ("m", "out")


def capture() -> tuple[tuple[int, int], list[bytes]]:
    lines = DATA.read_text().splitlines()
    m = re.search(r"packets (\d+) bytes (\d+)", lines[0])
    assert m
    return (int(m.group(1)), int(m.group(2))), [bytes.fromhex(x) for x in lines[1:] if x]


def events(datagrams: list[bytes], tables: frozenset[tuple[str, str]] = OWN) -> list[CounterEvent]:
    p = NftChanges(tables)
    for d in datagrams:
        p.changes(d)
    return p.take_counter_events()


def replay(ledger: CounterLedger, evs: list[CounterEvent]) -> None:
    """What Reconciler.counter_events does, with the nftables naming."""
    for e in evs:
        named = (e.family, e.name)
        mirror, _, direction = e.name.rpartition(".")
        if e.kind == "created":
            ledger.counter_created(named)
        elif e.kind == "rule":
            ledger.rule_deleted(named, e.packets, e.nbytes, e.values)
        elif e.kind == "deleted":
            ledger.counter_deleted(named, (mirror, direction), 0.0)
        elif e.kind == "lost":
            ledger.events_lost()


def test_the_kernels_delete_notifications_parse_to_the_anonymous_counts() -> None:
    _, datagrams = capture()
    assert events(datagrams) == [
        CounterEvent("created", "ip", "m.out"),
        # Our own flush: both rules, each with its anonymous counter's last values.
        CounterEvent("rule", "ip", "m.out", 25, 2180),
        CounterEvent("rule", "ip", "m.out", 20, 1680),
        # Another process deletes the table: the rule, then the named counter (no values).
        CounterEvent("rule", "ip", "m.out", 10, 840),
        CounterEvent("deleted", "ip", "m.out"),
    ]


def test_the_fast_path_reads_what_the_walk_through_every_expression_reads() -> None:
    _, datagrams = capture()
    rules = [m for d in datagrams for m in messages(d) if m.type == (10 << 8) | 8]
    assert len(rules) == 3
    for m in rules:
        exprs = attr(m.buf, m.start + 4, m.end, 4)
        assert exprs is not None
        assert rule_counts("ip", m.buf, m.start, m.end) == _rule_counts_walk("ip", exprs)


def test_other_tables_are_not_ours() -> None:
    _, datagrams = capture()
    assert events(datagrams, frozenset({("ip", "fw4")})) == []


def test_the_ledger_arrives_at_the_deleted_counters_last_value() -> None:
    named, datagrams = capture()
    ledger = CounterLedger()
    ledger.fold_clones({KEY: (5, 500)})  # the last reading: right after the table was made
    replay(ledger, events(datagrams))
    ledger.fold_clones({})  # the table is gone: nothing to read
    assert ledger.carry() == {KEY: named}
    assert ledger.notes() == ()


def test_our_own_replacement_counts_nothing_twice() -> None:
    """Rules deleted while the named counter lives on move the base, not the total."""
    named, datagrams = capture()
    own = [e for e in events(datagrams) if e.kind != "deleted"]
    ledger = CounterLedger()
    replay(ledger, own)
    ledger.fold_clones({KEY: named})  # what the surviving counter reads
    assert ledger.carry() == {KEY: named}


def test_a_final_value_counts_until_the_counter_is_made_again() -> None:
    named, datagrams = capture()
    ledger = CounterLedger()
    replay(ledger, events(datagrams))
    ledger.fold_clones({})
    carry = ledger.seeding()  # the heal seeds the new counter with it ...
    assert carry == {KEY: named}
    replay(ledger, [CounterEvent("created", "ip", "m.out")])
    ledger.fold_clones({KEY: (named[0] + 3, named[1] + 300)})  # ... which goes on from there
    assert ledger.carry() == {KEY: (named[0] + 3, named[1] + 300)}
    assert ledger.notes() == ()


def test_a_counter_made_again_before_its_deletion_was_read_says_so() -> None:
    _, datagrams = capture()
    ledger = CounterLedger()
    replay(ledger, events(datagrams))
    replay(ledger, [CounterEvent("created", "ip", "m.out")])  # no seeding() in between
    assert len(ledger.notes()) == 1 and "55 copies of mirror m (out)" in ledger.notes()[0]


def test_a_counter_made_again_with_nothing_counted_since_the_carry_notes_nothing() -> None:
    named, datagrams = capture()
    ledger = CounterLedger()
    ledger.fold_clones({KEY: named})  # read right before the (own) delete-and-create
    ledger.seeding()
    replay(ledger, [*events(datagrams), CounterEvent("created", "ip", "m.out")])
    assert ledger.notes() == ()


def test_a_deletion_of_an_adopted_counter_says_what_was_not_counted() -> None:
    """A counter made by an earlier run: its base is unknown, so is its last value."""
    _, datagrams = capture()
    later = events(datagrams)[1:]  # no "created": the counter was there at start
    ledger = CounterLedger()
    ledger.fold_clones({KEY: (5, 500)})
    replay(ledger, later)
    ledger.fold_clones({})
    assert ledger.carry() == {KEY: (5, 500)}
    (note,) = ledger.notes()
    assert "mirror m (out)" in note and "were not counted" in note


def test_lost_notifications_make_every_base_unknown() -> None:
    _, datagrams = capture()
    evs = events(datagrams)
    ledger = CounterLedger()
    replay(ledger, [*evs[:2], CounterEvent("lost"), *evs[2:]])
    assert len(ledger.notes()) == 1


def test_a_reference_without_its_anonymous_counter_drops_the_base() -> None:
    ledger = CounterLedger()
    replay(ledger, [CounterEvent("created", "ip", "m.out"),
                    CounterEvent("rule", "ip", "m.out", values=False),
                    CounterEvent("deleted", "ip", "m.out")])
    assert len(ledger.notes()) == 1


def test_truncated_and_garbled_notifications_raise_nothing() -> None:
    _, datagrams = capture()
    rng = random.Random(14)
    for d in datagrams:
        for cut in range(len(d)):
            events([d[:cut]])
        for _ in range(300):
            b = bytearray(d)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            for e in events([bytes(b)]):
                assert e.kind in ("rule", "created", "deleted")
    for _ in range(500):
        junk = rng.randbytes(rng.randint(0, 400))
        events([junk])
        _rule_counts_walk("ip", junk)
        rule_counts("ip", junk, 0, len(junk))


# -- seeds: a mirror's total is the sum over its families' counters -------------------------
def _table(fam: str, *names: str) -> list[dict[str, object]]:
    t = {"family": fam, "table": "mirrord"}
    objs: list[dict[str, object]] = [{"table": {"family": fam, "name": "mirrord"}}]
    objs += [{"counter": {**t, "name": n}} for n in names]
    objs += [{"chain": {**t, "name": "c"}}]
    objs += [{"rule": {**t, "chain": "c", "expr": [{"counter": n}, {"counter": None}]}}
             for n in names for _ in range(2)]
    return objs


def test_a_dual_stack_mirrors_carry_is_seeded_once() -> None:
    tables = {"ip": _table("ip", "m.in"), "ip6": _table("ip6", "m.in")}
    assert family_seeds(tables, {("m", "in"): (100, 9000)}, {}) == {
        ("ip", "m.in"): (100, 9000), ("ip6", "m.in"): (0, 0)}


def test_a_family_made_again_starts_from_the_carry_less_what_the_others_hold() -> None:
    tables = {"ip": _table("ip", "m.in"), "ip6": _table("ip6", "m.in")}
    kept6 = [{"counter": {"family": "ip6", "table": "mirrord", "name": "m.in",
                          "packets": 30, "bytes": 3000}}]
    cmds = batch(tables, {("m", "in"): (100, 9000)}, {"ip6": kept6})
    added = [c["add"] for c in cmds if "add" in c]
    counters = [a["counter"] for a in added if "counter" in a]
    assert [(c["family"], c["packets"], c["bytes"]) for c in counters] == [("ip", 70, 6000)]
    rules = [a["rule"]["expr"][1]["counter"] for a in added
             if "rule" in a and a["rule"]["family"] == "ip"]
    # The first rule's anonymous counter starts like the named one, the others at 0.
    assert rules == [{"packets": 70, "bytes": 6000}, None]
    rules6 = [a["rule"]["expr"][1]["counter"] for a in added
              if "rule" in a and a["rule"]["family"] == "ip6"]
    assert rules6 == [None, None]  # refilled: the kept counter's base moves instead


# -- the reconciler: the deletion is folded in before the heal seeds from the carry ---------
class CountingKernel(FakeKernel):
    """A FakeKernel whose deletions notify what its rules had counted, like nftables'."""

    capabilities = dataclasses.replace(FakeKernel.capabilities, counted_deletes=True)

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[CounterEvent] = []  # notifications not read yet
        self.since_apply: Counts = {}  # what the rules' anonymous counters hold

    def named_counter(self, name: str) -> Optional[CounterKey]:
        mirror, _, direction = name.rpartition(".")
        return (mirror, direction)

    def apply(self, rendered: Rendered, carry: Counts) -> None:
        super().apply(rendered, carry)
        self.queue += [CounterEvent("created", "ip", f"{m}.{d}") for m, d in self.counts]
        self.since_apply = dict(self.counts)  # each first rule seeded like its counter

    def count(self, key: tuple[str, str], packets: int) -> None:
        super().count(key, packets)
        p, b = self.since_apply.get(key, (0, 0))
        self.since_apply[key] = (p + packets, b + 100 * packets)

    def delete_everything(self) -> None:
        self.queue += [CounterEvent("rule", "ip", f"{m}.{d}", p, b)
                       for (m, d), (p, b) in self.since_apply.items()]
        self.queue += [CounterEvent("deleted", "ip", f"{m}.{d}") for m, d in self.counts]
        super().delete_everything()


def test_the_heal_starts_from_what_the_deleted_rules_had_counted() -> None:
    k = CountingKernel()
    r, _ = reconciler(CLONE, k)

    def drain() -> None:
        events, k.queue = k.queue, []
        r.counter_events(events)

    r.drain = drain
    r.reconcile(["start"], refresh_topology=True, force=True)
    k.count(("lan", "in"), 5)
    assert r.read().clones[("lan", "in")] == (5, 500)
    k.count(("lan", "in"), 7)  # counted, never read ...
    k.delete_everything()  # ... and the table is gone
    r.reconcile(["table deleted"], refresh_topology=False)
    assert k.counts[("lan", "in")] == (12, 1200)  # the new rules start from the exact total
    k.count(("lan", "in"), 1)
    reading = r.read()
    assert reading.clones[("lan", "in")] == (13, 1300)
    assert reading.notes == ()


def test_without_counted_deletes_a_heal_says_what_may_be_missing() -> None:
    r, k = reconciler(CLONE)
    r.reconcile(["start"], refresh_topology=True, force=True)
    k.count(("lan", "in"), 7)
    k.delete_everything()
    r.reconcile(["table deleted"], refresh_topology=False)
    (note,) = r.read().notes
    assert "copies of lan between" in note and "backend fake" in note
