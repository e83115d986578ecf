"""Golden-file support for the unit tests.

A golden file holds the exact expected output of a pure function (a rendered
ruleset, the problems found in a broken spec). A missing or different golden
file fails the test. `--update-golden` (or MIRRORD_UPDATE_GOLDEN=1, for runs
where this conftest is not loaded early enough to add the option) rewrites
them from the current output: read every rewritten file before keeping it,
because a golden file is a claim that its content is correct, not a record of
whatever the code printed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False,
        help="rewrite tests/unit/golden files from the current output (review them!)",
    )


class Golden:
    def __init__(self, update: bool) -> None:
        self.update = update

    def check(self, relpath: str, actual: str) -> None:
        path = GOLDEN / relpath
        if self.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text(encoding="utf-8") != actual:
                path.write_text(actual, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"golden file {path} is missing; create it with --update-golden and review it")
        expected = path.read_text(encoding="utf-8")
        if expected != actual:
            diff = "".join(difflib.unified_diff(
                expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                fromfile=f"golden/{relpath}", tofile="actual",
            ))
            pytest.fail(f"output differs from golden/{relpath}:\n{diff}", pytrace=False)


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    update = bool(request.config.getoption("--update-golden", default=False)) or (
        os.environ.get("MIRRORD_UPDATE_GOLDEN") == "1"
    )
    return Golden(update)
