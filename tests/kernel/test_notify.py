"""Journal fields through systemd-python, into a journald socket in a private /run (needs root)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.test_notify import HAVE_SYSTEMD_PYTHON, ROOT

JOURNAL_PROBE = textwrap.dedent("""
    import logging, os, socket, sys
    os.makedirs("/run/systemd/journal", exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("/run/systemd/journal/socket")
    s.settimeout(5)
    from mirrord.service import logsetup
    target = logsetup.setup_logging(0, env={"INVOCATION_ID": "0123"}, stream=open(os.devnull, "w"))
    logging.getLogger("mirrord").info("applied rules", extra={"MIRROR": "lan", "ACTION": "apply"})
    data = s.recv(65536)
    sys.stdout.write(target + "\\n" + data.decode())
""")


@pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a private mount namespace)")
def test_journal_fields(tmp_path: Path) -> None:
    """JournalHandler -> a journald socket the test owns, in a private /run."""
    script = tmp_path / "probe.py"
    script.write_text(JOURNAL_PROBE)
    p = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /run && exec "$0" "$1"', sys.executable, str(script)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if p.returncode != 0 and "unshare" in p.stderr:
        pytest.skip(f"no mount namespace: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    target, _, payload = p.stdout.partition("\n")
    assert target == "journal"
    fields = dict(line.split("=", 1) for line in payload.splitlines() if "=" in line)
    assert fields["MESSAGE"] == "applied rules"
    assert fields["MIRROR"] == "lan"
    assert fields["ACTION"] == "apply"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "mirrord"
    assert fields["LOGGER"] == "mirrord"
    # Only valid journal field names go out (no msg=, args=, ...).
    assert all(k == k.upper() for k in fields), sorted(fields)
