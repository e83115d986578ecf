"""The ctypes fallback for libnftables behaves like the Python bindings where mirrord uses them."""

from __future__ import annotations

import re
from pathlib import Path

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
