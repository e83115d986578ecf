"""`mirrord check` rejects a spec whose copies would be input to a mirror, where the spec shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrord import cli, spec
from mirrord.spec.loops import static_problems

CLONE_AND_TZSP = """\
collectors:
  ids:
    address: 192.0.2.50
    interface: eth2
    transport: clone
  far:
    address: 203.0.113.130
    transport: {far_transport}
mirrors:
  - name: lan
    interfaces: [br-lan]
    collector: ids
  - name: t
    interfaces:
      - wan
      - eth2
    direction: {direction}
    collector: far
"""


def text(direction: str = "both", far_transport: str = "tzsp") -> str:
    return CLONE_AND_TZSP.format(direction=direction, far_transport=far_transport)


@pytest.mark.parametrize("direction", ["out", "both"])
def test_tzsp_capture_where_clones_leave_is_rejected_with_its_position(direction: str) -> None:
    t = text(direction)
    (problem,) = static_problems(spec.parse(t, "m.yaml"), t)
    # Line 16, column 9: the '- eth2' item of mirror t's interfaces.
    assert problem.startswith("m.yaml:16:9: mirror 't': TZSP capture of ")
    assert "eth2 would copy mirrord's own kernel clones to collector 'ids'" in problem
    assert "direction: in" in problem


@pytest.mark.parametrize("direction, far_transport", [
    ("in", "tzsp"),     # clones are only ever outgoing
    ("both", "clone"),  # the kernel never clones a clone (per-CPU flag)
    ("both", "auto"),   # depends on routes: the plan decides, status shows it
])
def test_no_problem_when_clones_cannot_be_captured_or_it_is_not_known(
        direction: str, far_transport: str) -> None:
    t = text(direction, far_transport)
    if far_transport == "clone":
        t = t.replace("address: 203.0.113.130", "address: 192.0.2.60")
    assert static_problems(spec.parse(t, "m.yaml"), t) == []


def test_an_unused_clone_collector_sends_no_clones() -> None:
    t = text().replace("    collector: ids\n", "    collector: far\n")
    assert static_problems(spec.parse(t, "m.yaml"), t) == []


def test_check_command_exits_1_naming_the_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text(text("out"), encoding="utf-8")
    assert cli.main(["check", "-c", "m.yaml"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("m.yaml:16:9: mirror 't': ")
    (tmp_path / "ok.yaml").write_text(text("in"), encoding="utf-8")
    assert cli.main(["check", "-c", "ok.yaml"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[-1] == "OK"
