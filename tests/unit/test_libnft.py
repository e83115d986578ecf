"""The ctypes fallback for libnftables behaves like the Python bindings where mirrord uses them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mirrord.libnft import _CtypesNftables
from tests.lab import have_root_netns


def test_fallback_parses_and_reports_errors_without_the_kernel() -> None:
    nft = _CtypesNftables()
    nft.set_dry_run(True)
    rc, _, err = nft.json_cmd({"nftables": [{"add": {"table": {"family": "ip", "name": "x"}}},
                                            {"bogus": {}}]})
    assert rc != 0 and err.strip()


@pytest.mark.integration
@pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns()))
def test_fallback_applies_and_lists_in_a_namespace() -> None:
    ns = "mrdlibnft"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = (
            "from mirrord.libnft import _CtypesNftables\n"
            "n = _CtypesNftables(); n.set_handle_output(False)\n"
            "t = {'family': 'ip', 'table': 't'}\n"
            "rc, out, err = n.json_cmd({'nftables': [{'add': {'table': {'family': 'ip', 'name': 't'}}},"
            " {'add': {'counter': {**t, 'name': 'c', 'packets': 7, 'bytes': 9}}}]})\n"
            "assert rc == 0, err\n"
            "rc, out, err = n.json_cmd({'nftables': [{'list': {'table': {'family': 'ip', 'name': 't'}}}]})\n"
            "c = [o['counter'] for o in out['nftables'] if 'counter' in o][0]\n"
            "print(c['packets'], c['bytes'])\n"
        )
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["7", "9"]
    finally:
        subprocess.run(["ip", "netns", "del", ns])
