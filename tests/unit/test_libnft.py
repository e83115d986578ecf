"""The ctypes fallback for libnftables behaves like the Python bindings where mirrord uses them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mirrord.backends.libnft import _CtypesNftables, json_unsupported


def test_fallback_parses_and_reports_errors_without_the_kernel() -> None:
    nft = _CtypesNftables()
    nft.set_dry_run(True)
    rc, _, err = nft.json_cmd({"nftables": [{"add": {"table": {"family": "ip", "name": "x"}}},
                                            {"bogus": {}}]})
    assert rc != 0 and err.strip()


def test_fallback_has_every_method_mirrord_calls() -> None:
    """mirrord on OpenWrt runs on the ctypes twin: a call the bindings have and it lacks crashes there."""
    root = Path(__file__).resolve().parents[2] / "mirrord"
    called: set[str] = set()
    for path in root.rglob("*.py"):
        called |= set(re.findall(r"(?:\bnft|_lib\(\))\.((?:set|get)_\w+|cmd|json_cmd)\(", path.read_text()))
    assert {"json_cmd", "set_json_output"} <= called  # the pattern still finds the calls
    missing = sorted(m for m in called if not hasattr(_CtypesNftables, m))
    assert not missing, f"mirrord calls these on an nftables context; the ctypes twin lacks them: {missing}"


def test_json_probe_accepts_this_library() -> None:
    assert json_unsupported(_CtypesNftables()) is None


class _AsIfBuiltWithoutJson(_CtypesNftables):
    """The real library with JSON mode held off: its nft-syntax parser then gets the
    JSON, exactly as in a library built without JSON (OpenWrt's nftables-nojson)."""

    def set_json_output(self, on: bool) -> None:
        super().set_json_output(False)


def test_json_less_library_is_named_as_such_not_as_a_kernel_problem() -> None:
    why = json_unsupported(_AsIfBuiltWithoutJson())
    assert why is not None
    assert "without JSON support" in why and "nftables-json" in why and "nftables-nojson" in why
    assert "kmod" not in why and "kernel" not in why


class _Interrupting:
    """A libnftables context whose first `fails` commands are interrupted."""

    def __init__(self, fails: int) -> None:
        self.fails, self.calls = fails, 0

    def set_json_output(self, on: bool) -> None: ...

    def set_handle_output(self, on: bool) -> None: ...

    def set_stateless_output(self, on: bool) -> None: ...

    def cmd(self, text: str) -> tuple[int, str, str]:
        self.calls += 1
        if self.calls <= self.fails:
            return 1, "", "netlink: Error: Could not process rule: Interrupted system call\n"
        return 0, "", ""

    def json_cmd(self, root: dict[str, object]) -> tuple[int, object, str]:
        rc, _, err = self.cmd("")
        return rc, None, err


@pytest.mark.parametrize("call", ["json", "text"])
def test_an_interrupted_command_is_asked_again(call: str) -> None:
    """A dump interrupted by a concurrent change committed nothing: ask again (this
    failed `mirrord run`'s removal of its tables at SIGTERM once in a full CI run)."""
    from mirrord.backends.libnft import INTERRUPTED_RETRIES, NftSession

    nft = _Interrupting(fails=INTERRUPTED_RETRIES - 1)
    session = NftSession(nft)
    rc = session.json([])[0] if call == "json" else session.text("list ruleset")[0]
    assert rc == 0 and nft.calls == INTERRUPTED_RETRIES
    nft = _Interrupting(fails=INTERRUPTED_RETRIES)  # bounded: the error stands
    session = NftSession(nft)
    rc = session.json([])[0] if call == "json" else session.text("list ruleset")[0]
    assert rc == 1 and nft.calls == INTERRUPTED_RETRIES
