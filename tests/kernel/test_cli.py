"""The commands run without CAP_NET_ADMIN, in a namespace of their own: one clear line."""

from __future__ import annotations

import pytest

from tests.harness.lab import Netns
from tests.unit.test_cli import mirrord


@pytest.mark.integration
@pytest.mark.parametrize("command", [("run", "-c", "/nonexistent.yaml"), ("flush",),
                                     ("flush", "--dry-run"), ("trace", "--protocol", "icmp")])
def test_without_root_one_clear_line(command: tuple[str, ...], netns: Netns) -> None:
    """Root without CAP_NET_ADMIN (what a non-root user lacks; root keeps reading the
    interpreter wherever it lives), in a namespace of its own."""
    pre = ("ip", "netns", "exec", netns.name, "setpriv", "--bounding-set=-net_admin",
           "--inh-caps=-net_admin")
    p = mirrord(*command, pre=pre)
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"mirrord {command[0]}: needs root (CAP_NET_ADMIN)"), p.stderr
