"""Work per reconcile grows linearly with mirrors and interfaces (issue 9, item 8).

Each test compares the CPU time of one step over 8n items with that of 8
steps over n items each (the collector off so that only the steps' own work
counts): the same work on a working set of the same size, so about 1x if the
step is linear and 8x if it is quadratic; the bound of 3x sits between them
(see `growth` for why a step at n is not the reference). The sizes keep a
quadratic step quick to fail. Also: libyaml and pure PyYAML give the
validator the same node tree.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from mirrord import plan, spec
from mirrord.backends.iptables import IptablesBackend
from mirrord.backends.nftables import render_tables, to_text
from mirrord.commands import offline_topology
from mirrord.netlink import topology
from mirrord.netlink.watch import Change
from mirrord.observe.health import plan_findings
from mirrord.service.daemon import Pending
from mirrord.spec import yaml_tree

GOLDEN = Path(__file__).parent / "golden"
LINEAR_BOUND = 3.0
PENDING_BOUND = 5.0  # see test_pending_events_are_linear
FACTOR = 8


def spec_text(mirrors: int, interfaces: int = 1, collectors: int = 1) -> str:
    lines = ["backend: nftables", "collectors:"]
    for c in range(collectors):
        lines += [f"  c{c}:", f"    address: 192.0.2.{c % 250 + 1}", "    transport: clone"]
    lines.append("mirrors:")
    for m in range(mirrors):
        lines += [f"  - name: m{m}", "    interfaces:"]
        lines += [f"      - d{m}x{i}" for i in range(interfaces)]
        lines += ["    direction: both", f"    collector: c{m % collectors}"]
    return "\n".join(lines) + "\n"


def cpu(f: Callable[[], object], at_least: float = 0.05) -> float:
    """CPU seconds per call of f, repeated for at least `at_least` s."""
    calls, t = 0, time.process_time()
    while True:
        f()
        calls += 1
        spent = time.process_time() - t
        if spent >= at_least:
            return spent / calls


def growth(make: Callable[[int], Callable[[], object]], n: int, rounds: int = 7) -> float:
    """CPU time of one step over FACTOR*n items over that of FACTOR steps over
    n items each, every step on its own objects: about 1 if the step is
    linear, FACTOR if it is quadratic.

    Both sides do the same work on a working set of the same size, so the
    memory cost that grows with the working set (caches and TLB shared with
    the other processes on the machine: a bare loop touching each object of
    a plan grows 25-33x, not 8x, for 8x the mirrors under load) is paid on
    both sides and cancels, where comparing one step at n with one at
    FACTOR*n would count it as growth. The sides alternate within each round
    so that a change of load hits both; the median round is kept.
    """
    large = make(FACTOR * n)
    steps = [make(n) for _ in range(FACTOR)]

    def small() -> object:
        # Every result stays alive until the end, as the large step's does.
        return [f() for f in steps]

    ratios: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            if r % 2:
                few = cpu(small)
                one = cpu(large)
            else:
                one = cpu(large)
                few = cpu(small)
            ratios.append(one / few)
    finally:
        gc.enable()
    return statistics.median(ratios)


def built(mirrors: int, interfaces: int = 1, collectors: int = 1) -> plan.Plan:
    s = spec.parse(spec_text(mirrors, interfaces, collectors))
    return plan.build(s, offline_topology(s), "nftables")


@pytest.mark.parametrize("shape", ["mirrors", "interfaces"])
def test_spec_parse_is_linear(shape: str) -> None:
    def make(n: int) -> Callable[[], object]:
        text = spec_text(n) if shape == "mirrors" else spec_text(1, interfaces=n)
        return lambda: spec.parse(text)

    assert growth(make, 200 if shape == "mirrors" else 500) < LINEAR_BOUND


@pytest.mark.parametrize("shape", ["mirrors", "interfaces"])
def test_plan_render_and_text_are_linear(shape: str) -> None:
    def plan_of(n: int) -> plan.Plan:
        return built(n) if shape == "mirrors" else built(1, interfaces=n)

    def make_plan(n: int) -> Callable[[], object]:
        s = spec.parse(spec_text(n) if shape == "mirrors" else spec_text(1, interfaces=n))
        topo = offline_topology(s)
        return lambda: plan.build(s, topo, "nftables")

    def make_render(n: int) -> Callable[[], object]:
        p = plan_of(n)
        return lambda: render_tables(p)

    def make_text(n: int) -> Callable[[], object]:
        tables = render_tables(plan_of(n))
        return lambda: to_text(tables)

    def make_iptables(n: int) -> Callable[[], object]:
        p = plan_of(n)
        return lambda: IptablesBackend().render(p)

    n = 250
    assert growth(make_plan, n) < LINEAR_BOUND
    assert growth(make_render, n) < LINEAR_BOUND
    assert growth(make_text, n) < LINEAR_BOUND
    assert growth(make_iptables, n) < LINEAR_BOUND


def test_iptables_render_is_linear_in_collectors() -> None:
    def make(n: int) -> Callable[[], object]:
        p = built(n, collectors=min(n, 200))
        return lambda: IptablesBackend().render(p)

    assert growth(make, 25) < LINEAR_BOUND


def test_pending_events_are_linear() -> None:
    def make(n: int) -> Callable[[], object]:
        changes = [Change(f"link added/changed: d{i}") for i in range(n)]

        def add_all() -> None:
            p = Pending()
            for c in changes:
                p.add(c, topology_changed=True)

        return add_all

    # One set of 16,000 reasons costs more per entry than eight of 2,000:
    # its table is large enough to come fresh from the kernel at each step
    # (page faults the small tables never pay) and misses the caches more:
    # 1.1-2.1x usually, 3.18x once in a full CI run on a quiet machine
    # (Debian's Python). The old list search gives 8.3-9.8x (quadratic).
    assert growth(make, 2000) < PENDING_BOUND


def test_plan_lookup_and_findings_are_linear() -> None:
    def make_lookup(n: int) -> Callable[[], object]:
        p = built(n)
        names = [f"m{i}" for i in range(n)]
        return lambda: [p.mirror(name) for name in names]

    def make_findings(n: int) -> Callable[[], object]:
        s = spec.parse(spec_text(n))
        topo = offline_topology(s)
        p = plan.build(s, topo, "nftables")
        return lambda: plan_findings(p, "", topo)

    assert growth(make_lookup, 250) < LINEAR_BOUND
    assert growth(make_findings, 250) < LINEAR_BOUND


def test_topology_index_lookup_is_linear() -> None:
    def make(n: int) -> Callable[[], object]:
        links = {f"d{i}": topology.Link(f"d{i}", i, True, None, 1, 1500) for i in range(n)}
        topo = topology.Topology(links=links)
        return lambda: [topo.by_index(i) for i in range(n)]

    assert growth(make, 500) < LINEAR_BOUND


def _tree(node: yaml.Node | None) -> object:
    """Everything of a node the validator may read."""
    if node is None:
        return None
    where = (node.start_mark.line, node.start_mark.column)
    if isinstance(node, yaml.ScalarNode):
        return ("scalar", node.tag, node.value, node.style, where)
    if isinstance(node, yaml.SequenceNode):
        return ("seq", node.tag, where, [_tree(n) for n in node.value])
    assert isinstance(node, yaml.MappingNode)
    return ("map", node.tag, where, [(_tree(k), _tree(v)) for k, v in node.value])


YAML_FILES = sorted(GOLDEN.rglob("*.yaml")) + sorted(
    (Path(__file__).resolve().parents[2] / "etc").glob("*.yaml"))


@pytest.mark.skipif(getattr(yaml, "CSafeLoader", None) is None, reason="no libyaml")
def _pure(text: str) -> yaml.Node | None:
    """The tree of mirrord's own bounded pure-Python loader."""
    loader = yaml_tree._Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_libyaml_gives_the_same_tree_as_pure_pyyaml(path: Path) -> None:
    text = path.read_text()
    try:
        pure = _pure(text)
    except yaml.YAMLError:
        pytest.skip("not YAML: the pure parser reports it either way")
    assert _tree(yaml_tree._compose(text)[0]) == _tree(pure)


def test_libyaml_tree_of_a_large_spec_matches() -> None:
    text = spec_text(50, interfaces=3) + "# ports as plain text\n"
    text = text.replace("    direction: both", "    direction: both\n    match:\n"
                        "      port: [53, 20:21, \"1000-2000\"]\n      protocol: udp")
    assert _tree(yaml_tree._compose(text)[0]) == _tree(_pure(text))
