"""The test matrix itself (scripts/run-tests): a leg never passes by testing something else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("leg", ["venv", "debian", "openwrt"])
def test_leg_check_refuses_an_interpreter_that_is_not_the_legs(leg: str) -> None:
    here = os.environ.get("MIRRORD_TEST_LEG")
    if here is None:
        pytest.skip("not run by scripts/run-tests (MIRRORD_TEST_LEG unset)")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "leg_check.py"), leg],
                       capture_output=True, text=True, timeout=60)
    if leg == here:
        assert p.returncode == 0, p.stderr
    else:
        assert p.returncode == 1 and f"leg {leg}: " in p.stderr, (p.stdout, p.stderr)


@pytest.mark.parametrize("declared", [True, False])
def test_a_missing_module_skips_only_where_the_leg_declares_it(tmp_path: Path,
                                                               declared: bool) -> None:
    (tmp_path / "test_x.py").write_text("def test_x():\n    import mrd_absent_module\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MIRRORD_TEST_ABSENT", None)
    if declared:
        env["MIRRORD_TEST_ABSENT"] = "scapy,mrd_absent_module"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p",
                        "no:cacheprovider", "-q", "-rs", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_x.py")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    if declared:
        assert p.returncode == 0 and "1 skipped" in p.stdout, p.stdout
        assert "needs mrd_absent_module" in p.stdout, p.stdout
    else:
        assert p.returncode == 1 and "1 failed" in p.stdout, p.stdout
