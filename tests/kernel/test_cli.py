"""The commands run without CAP_NET_ADMIN, in a namespace of their own: one clear line."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness.lab import have_root_netns
from tests.unit.test_cli import mirrord


@pytest.mark.integration
@pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns()))
@pytest.mark.parametrize("command", [("run", "-c", "/nonexistent.yaml"), ("flush",),
                                     ("flush", "--dry-run"), ("trace", "--protocol", "icmp")])
def test_without_root_one_clear_line(command: tuple[str, ...]) -> None:
    """Root without CAP_NET_ADMIN (what a non-root user lacks; root keeps reading the
    interpreter wherever it lives), in a namespace of its own."""
    ns = f"mrdcli{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        pre = ("ip", "netns", "exec", ns, "setpriv", "--bounding-set=-net_admin",
               "--inh-caps=-net_admin")
        p = mirrord(*command, pre=pre)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"mirrord {command[0]}: needs root (CAP_NET_ADMIN)"), p.stderr
