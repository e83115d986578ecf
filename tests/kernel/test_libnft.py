"""The ctypes fallback for libnftables against the kernel, in a namespace (and without the library)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirrord.backends.libnft import SONAME
from tests.harness.lab import Netns, have_root_netns


@pytest.mark.integration
def test_fallback_applies_and_lists_in_a_namespace(netns: Netns) -> None:
    code = (
        "from mirrord.backends.libnft import _CtypesNftables\n"
        "n = _CtypesNftables(); n.set_handle_output(False)\n"
        "t = {'family': 'ip', 'table': 't'}\n"
        "rc, out, err = n.json_cmd({'nftables': [{'add': {'table': {'family': 'ip', 'name': 't'}}},"
        " {'add': {'counter': {**t, 'name': 'c', 'packets': 7, 'bytes': 9}}}]})\n"
        "assert rc == 0, err\n"
        "rc, out, err = n.json_cmd({'nftables': [{'list': {'table': {'family': 'ip', 'name': 't'}}}]})\n"
        "c = [o['counter'] for o in out['nftables'] if 'counter' in o][0]\n"
        "print(c['packets'], c['bytes'])\n"
    )
    assert netns.python(code).split() == ["7", "9"]


def _libnftables_path() -> str:
    ctypes.CDLL(SONAME)
    with open("/proc/self/maps") as f:
        for line in f:
            if SONAME in line:
                return os.path.realpath(line.split()[-1])
    raise AssertionError(f"{SONAME} loaded but not in /proc/self/maps")


@pytest.mark.integration
@pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns()))
def test_missing_library_is_one_clear_message_without_a_traceback() -> None:
    """libnftables hidden in a private mount namespace (the host's files are untouched)."""
    lib = _libnftables_path()
    code = (
        "from mirrord.backends import create\n"
        "print(create('nftables').unsupported())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         'mount --bind /dev/null "$1"; exec "$2" -c "$3"', "sh", lib, sys.executable, code],
        capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr  # no "Exception ignored in: Nftables.__del__"
    assert f"{SONAME} cannot be loaded" in p.stdout and "nftables-json on OpenWrt" in p.stdout
    assert "python3-nftables (OpenWrt)" not in p.stdout


@pytest.mark.integration
def test_fallback_stateless_output_drops_the_counts(netns: Netns) -> None:
    code = (
        "from mirrord.backends.libnft import _CtypesNftables\n"
        "n = _CtypesNftables()\n"
        "rc, out, err = n.cmd('add table ip t; add counter ip t c { packets 7 bytes 9 }')\n"
        "assert rc == 0, err\n"
        "print(n.cmd('list counter ip t c')[1].count('packets 7'))\n"
        "n.set_stateless_output(True)\n"
        "print(n.cmd('list counter ip t c')[1].count('packets 7'))\n"
    )
    assert netns.python(code).split() == ["1", "0"]
