"""Packaging pieces that need root to try out: systemd-tmpfiles creates root-owned files."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_packaging import TMPFILES, one, unit


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="needs systemd-tmpfiles")
def test_tmpfiles_creates_the_xtables_lock(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    p = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lock = tmp_path / "run/xtables.lock"
    assert lock.is_file() and stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert "-/run/xtables.lock" in one(unit()["Service"], "ReadWritePaths")
