"""The daemon's spec reader: spec.load in a forked child, so that the daemon
never imports PyYAML (service/spec_reader.py).

Every spec under golden/ is read both ways: the same Spec, or the same
problems. A child that dies or answers nothing is an error, never a Spec.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mirrord import spec
from mirrord.service.spec_reader import ReaderError, load_apart

GOLDEN = Path(__file__).parent / "golden"
SPECS = sorted(GOLDEN.glob("*/*.yaml"))
ROOT = Path(__file__).resolve().parents[2]


def test_every_golden_spec_reads_the_same_in_the_child() -> None:
    assert len(SPECS) > 50
    valid = invalid = 0
    for path in SPECS:
        try:
            here: spec.Spec | list[str] = spec.load(str(path))
        except spec.SpecError as e:
            here = e.problems
        try:
            apart: spec.Spec | list[str] = load_apart(str(path))
        except spec.SpecError as e:
            apart = e.problems
        assert apart == here, path
        if isinstance(here, spec.Spec):
            valid += 1
        else:
            invalid += 1
    assert valid >= 10 and invalid >= 40


def test_an_unreadable_path_is_the_same_spec_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing.yaml")
    with pytest.raises(spec.SpecError) as here:
        spec.load(missing)
    with pytest.raises(spec.SpecError) as apart:
        load_apart(missing)
    assert apart.value.problems == here.value.problems
    assert missing in apart.value.problems[0]


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add(int(entry))
    return out


def test_a_killed_reader_is_an_error_not_a_spec(tmp_path: Path) -> None:
    # A FIFO nobody writes: the child blocks in open() until it is killed.
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    before = _children()
    result: list[object] = []

    def read() -> None:
        try:
            result.append(load_apart(str(fifo)))
        except Exception as e:
            result.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    new: set[int] = set()
    while not new and time.monotonic() < deadline:
        time.sleep(0.01)
        new = _children() - before
    assert len(new) == 1, new
    pid = new.pop()
    os.kill(pid, signal.SIGKILL)
    reader.join(10)
    assert not reader.is_alive()
    assert len(result) == 1 and isinstance(result[0], ReaderError), result
    assert f"pid {pid}" in str(result[0]) and "signal 9" in str(result[0])


def test_the_daemon_imports_no_yaml() -> None:
    # A fresh interpreter: what `mirrord run` imports before and while it runs.
    code = ("import sys, mirrord.cli, mirrord.service.daemon, mirrord.observe.health; "
            "print(sorted(m for m in sys.modules if m == 'yaml' or m.startswith('yaml.') "
            "or m.startswith('mirrord.spec.') and m not in "
            "('mirrord.spec.model', 'mirrord.spec.fields')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_a_reader_that_never_answers_is_killed_at_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrord.service.spec_reader as reader

    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(reader, "READ_TIMEOUT", 0.5)
    before = _children()
    started = time.monotonic()
    with pytest.raises(ReaderError, match=r"no answer within 0.5 s and was killed"):
        load_apart(str(fifo))
    assert 0.5 <= time.monotonic() - started < 5
    assert _children() == before  # killed and reaped: no zombie left
