"""Spec validation: every error class, with its exact FILE:LINE:COL position.

Each case is a broken spec in golden/errors/<case>.yaml and the exact lines
`mirrord check` must print for it in golden/errors/<case>.txt. The files are
loaded with the golden directory as the working directory, so FILE is the
bare file name, as when a user runs `mirrord check -c case.yaml`.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from mirrord import cli, plan, spec
from mirrord.match import Match, PortRange
from mirrord.netlink.topology import ARPHRD_ETHER, Link, Reach, Topology
from tests.unit.spec_helpers import FULL

ROOT = Path(__file__).resolve().parents[2]
ERRORS = Path(__file__).parent / "golden" / "errors"
EXAMPLE = ROOT / "etc" / "mirrord.yaml"

# Cases whose golden .txt holds the correct output the code does not give yet.
# Their golden files are never rewritten by --update-golden.
# Cases whose golden .txt holds the correct output the code does not give yet
# (none now). Their golden files are never rewritten by --update-golden.
LEAD_BUGS: dict[str, str] = {}

CASES = sorted(p.stem for p in ERRORS.glob("*.yaml"))


def _param(case: str) -> object:
    if case in LEAD_BUGS:
        return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=LEAD_BUGS[case]))
    return case


def _expected(case: str) -> list[str]:
    return (ERRORS / f"{case}.txt").read_text(encoding="utf-8").splitlines()


def test_every_case_has_expected_output() -> None:
    assert len(CASES) >= 30
    for case in CASES:
        assert (ERRORS / f"{case}.txt").is_file(), f"golden/errors/{case}.txt is missing"
        assert _expected(case), f"golden/errors/{case}.txt is empty"
        for line in _expected(case):
            assert line.startswith(f"{case}.yaml:"), line


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_error_golden(case: str, monkeypatch: pytest.MonkeyPatch, golden: Any) -> None:
    monkeypatch.chdir(ERRORS)
    with pytest.raises(spec.SpecError) as info:
        spec.load(f"{case}.yaml")
    if case in LEAD_BUGS:
        assert info.value.problems == _expected(case)  # never rewritten from the code
    else:
        golden.check(f"errors/{case}.txt", "".join(f"{p}\n" for p in info.value.problems))


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_check_prints_problems_and_exits_1(
    case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ERRORS)
    rc = cli.main(["check", "-c", f"{case}.yaml"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert err.splitlines() == _expected(case)


def test_several_errors_are_all_reported() -> None:
    lines = _expected("several_errors")
    # One problem per broken thing in the file, from every section.
    assert len(lines) == 8
    text = (ERRORS / "several_errors.yaml").read_text(encoding="utf-8")
    with pytest.raises(spec.SpecError) as info:
        spec.parse(text, "several_errors.yaml")
    assert info.value.problems == lines
    assert str(info.value) == "\n".join(lines)


def _run_check(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mirrord", "check", *args],
        capture_output=True, text=True, timeout=60, cwd=ERRORS, env=full_env,
    )


def test_check_command_errors_exit_1() -> None:
    p = _run_check("-c", "several_errors.yaml")
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.splitlines() == _expected("several_errors")


def test_check_command_example_ok() -> None:
    p = _run_check("-c", str(EXAMPLE))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    lines = p.stdout.splitlines()
    assert lines[-1] == "OK"
    assert lines[0].startswith("lan: br-lan in+out, all traffic -> ids 192.0.2.50")


def test_check_command_reads_mirrord_config() -> None:
    p = _run_check(env={"MIRRORD_CONFIG": str(ERRORS / "missing_collector.yaml")})
    assert p.returncode == 1
    # The path is printed as given in the environment.
    assert p.stderr.splitlines() == [
        line.replace("missing_collector.yaml", str(ERRORS / "missing_collector.yaml"), 1)
        for line in _expected("missing_collector")
    ]


def test_check_command_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    p = _run_check("-c", str(missing))
    assert p.returncode == 1
    assert p.stderr.startswith(f"{missing}: cannot read: ")


def test_example_spec_parses() -> None:
    s = spec.load(str(EXAMPLE))
    assert s.backend == "auto"
    assert s.poll_interval == 2.0
    assert list(s.collectors) == ["ids"]
    ids = s.collectors["ids"]
    assert ids.address == ipaddress.ip_address("192.0.2.50")
    assert (ids.interface, ids.transport, ids.port) == (None, "auto", 37008)
    assert len(s.mirrors) == 1
    m = s.mirrors[0]
    assert (m.name, m.interfaces, m.direction, m.collector) == ("lan", ("br-lan",), "both", "ids")
    assert m.match == Match()
    assert m.directions == ("in", "out")


def test_full_spec_values() -> None:
    s = spec.parse(FULL, "full.yaml")
    assert s.path == "full.yaml"
    assert s.backend == "iptables-legacy"
    assert s.poll_interval == 0.5
    ids, far = s.collectors["ids"], s.collectors["far"]
    assert (ids.interface, ids.transport, ids.port, ids.snaplen) == ("br-lan", "clone", 37008, 65535)
    assert far.address == ipaddress.ip_address("2001:db8::9")
    assert (far.transport, far.port, far.snaplen) == ("tzsp", 4000, 1518)
    dns, everything, v6 = s.mirrors
    assert dns.interfaces == ("br-lan",)  # a scalar is a one-item list
    assert dns.directions == ("in",)
    assert dns.match.family == "ipv4"
    assert dns.match.protocols == (17, 6)  # names are case-insensitive; numbers allowed
    # Overlapping and adjacent ranges merge; strings, "a-b" and "a:b" are ports too.
    assert dns.match.ports == (PortRange(53, 53), PortRange(80, 80), PortRange(1000, 2501),
                               PortRange(5353, 5353))
    assert dns.match.sources == tuple(
        ipaddress.ip_network(n) for n in ("192.0.2.0/25", "192.0.2.128/25", "198.51.100.7/32")
    )
    assert dns.match.destinations == (ipaddress.ip_network("203.0.113.0/24"),)
    assert everything.match == Match()  # `match:` with no value = everything
    assert everything.interfaces == ("wan", "wg0.100")
    assert everything.directions == ("out",)
    assert v6.direction == "both"
    assert v6.match.protocols == (58,)


@pytest.mark.parametrize("name", ["eth0", "br-lan", "wg0.100", "a" * 15, "ä" * 7 + "a", "lan_2@x"])
def test_valid_interface_names(name: str) -> None:
    assert spec.valid_ifname(name) is None


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a" * 16, "ä" * 8, "a/b", "a b", "a\tb", "a\nb", "a'b", 'a"b', "a:b"]
)
def test_invalid_interface_names(name: str) -> None:
    assert spec.valid_ifname(name) is not None


def test_interface_names_are_kept_verbatim() -> None:
    # Names are data handed to the kernel; odd but legal characters survive.
    text = ("collectors: {ids: {address: 192.0.2.50}}\n"
            "mirrors: [{name: a, interfaces: ['lan$x', 'x;y', 'p-1.2'], collector: ids}]\n")
    assert spec.parse(text).mirrors[0].interfaces == ("lan$x", "x;y", "p-1.2")


def test_unquoted_colon_range_is_a_range() -> None:
    text = ("collectors: {ids: {address: 192.0.2.50}}\n"
            "mirrors:\n  - name: ftp\n    interfaces: [wan]\n    collector: ids\n"
            "    match:\n      port: 20:21\n")
    assert spec.parse(text).mirrors[0].match.ports == (PortRange(20, 21),)


def test_yaml_error_names_where_the_construct_began() -> None:
    text = ("collectors:\n  ids:\n    address: 192.0.2.50\nmirrors:\n"
            "  - name: 'lan\n    interfaces: [br-lan]\n    collector: ids\n")
    with pytest.raises(spec.SpecError) as info:
        spec.parse(text, "q.yaml")
    (problem,) = info.value.problems
    # The quote opens on line 5, column 11.
    assert "q.yaml:5:11" in problem or "line 5, column 11" in problem


def test_link_local_ipv6_collector_needs_an_interface() -> None:
    text = ("collectors: {ids: {address: 'fe80::5'}}\n"
            "mirrors: [{name: a, interfaces: [br-lan], collector: ids}]\n")
    with pytest.raises(spec.SpecError) as info:
        spec.parse(text, "ll.yaml")
    assert info.value.problems[0].startswith("ll.yaml:1:29: collector 'ids': link-local address "
                                             "fe80::5 needs 'interface'")
    ok = text.replace("'fe80::5'}", "'fe80::5', interface: br-lan}")
    assert str(spec.parse(ok).collectors["ids"].address) == "fe80::5"


# -- collectors that are not one host ------------------------------------------
# The spec reader rejects what is never a host (golden/errors/collector_not_a_host);
# whether an address is its link's broadcast or network address depends on the
# router's prefix there, which the plan checks.

def _one_collector(address: str, transport: str) -> spec.Spec:
    return spec.parse(f"collectors: {{ids: {{address: '{address}', transport: {transport}}}}}\n"
                      "mirrors: [{name: m, interfaces: [lan], collector: ids}]\n", "h.yaml")


def _plan_with_prefix(address: str, prefix: str, transport: str = "auto") -> plan.MirrorPlan:
    s = _one_collector(address, transport)
    c = s.collectors["ids"]
    links = {n: Link(n, i, True, None, ARPHRD_ETHER, 1500) for i, n in ((2, "lan"), (3, "eth2"))}
    reach = Reach(c.address, oif="eth2", neighbour="REACHABLE",
                  prefixes=(ipaddress.ip_network(prefix),))
    p = plan.build(s, Topology(links, {(c.address, c.interface): reach}), "nftables")
    (mp,) = p.mirrors
    if mp.state == "error":
        assert (p.clones, p.tzsp) == ((), ())
    return mp


@pytest.mark.parametrize("transport", ["auto", "clone", "tzsp"])
def test_plan_directed_broadcast_collector_is_an_error(transport: str) -> None:
    mp = _plan_with_prefix("192.0.2.255", "192.0.2.0/24", transport)
    assert (mp.state, mp.transport) == ("error", None)
    assert mp.reason == ("collector 192.0.2.255 is the broadcast address of 192.0.2.0/24 on eth2: "
                         "copies would go to every host there; a collector must be one host")


def test_plan_network_address_collector_is_an_error() -> None:
    mp = _plan_with_prefix("198.51.100.64", "198.51.100.64/26")
    assert (mp.state, mp.reason) == (
        "error", "collector 198.51.100.64 is the network address of 198.51.100.64/26 on eth2, "
        "not a host")
    mp = _plan_with_prefix("2001:db8:1::", "2001:db8:1::/64", "tzsp")
    assert (mp.state, mp.reason) == (
        "error", "collector 2001:db8:1:: is the subnet-router anycast address of "
        "2001:db8:1::/64 on eth2, not a host")


@pytest.mark.parametrize("address,prefix", [
    ("192.0.2.255", "192.0.2.0/23"),   # a host in a /23
    ("192.0.2.0", "192.0.2.0/31"),     # both ends of a /31 are hosts (RFC 3021)
    ("192.0.2.1", "192.0.2.0/31"),
    ("192.0.2.9", "192.0.2.9/32"),
    ("2001:db8:1::", "2001:db8:1::/127"),
    ("192.0.2.7", "192.0.2.0/24"),
])
def test_plan_host_collector_in_its_prefix_is_active(address: str, prefix: str) -> None:
    mp = _plan_with_prefix(address, prefix)
    assert (mp.state, mp.transport) == ("active", "clone")


@pytest.mark.parametrize("address", ["255.255.255.255", "0.0.0.0", "::", "127.0.0.2", "::1",
                                     "239.1.1.1", "ff02::1", "240.0.0.1", "::ffff:192.0.2.50",
                                     "192.0.2.255/24", "192.0.2.0/24", "192.0.2.50/24",
                                     "fe80::1%eth0"])
def test_spec_collector_address_that_is_not_a_host(address: str) -> None:
    with pytest.raises(spec.SpecError) as info:
        _one_collector(address, "tzsp")
    (problem,) = info.value.problems
    assert problem.startswith(f"h.yaml:1:29: collector 'ids': address {address} "), problem


@pytest.mark.parametrize("address", ["192.0.2.255", "192.0.2.0", "203.0.113.1", "2001:db8::",
                                     "169.254.1.1"])
def test_spec_collector_address_that_may_be_a_host(address: str) -> None:
    # Without the prefix of its link, these are hosts as far as the spec can tell.
    assert str(_one_collector(address, "tzsp").collectors["ids"].address) == address
