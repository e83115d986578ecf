"""`mirrord trace` run in a lab's router namespace, as the e2e tests start it."""

from __future__ import annotations

import os
import subprocess
import sys

from .lab import ROOT, Lab
from .wait import wait_until

TRACE_TABLE = ("inet", "mirrord_trace")


def has_table(lab: Lab, family: str, name: str) -> bool:
    return lab.rtr.run("nft", "list", "table", family, name, check=False).returncode == 0


def start_trace(lab: Lab, *args: str, wait: bool = True,
                ssh: str = "") -> subprocess.Popen[str]:
    """`mirrord trace ARGS` in the router; with `wait`, returns once its table exists."""
    env = dict(os.environ)
    env.pop("SSH_CONNECTION", None)
    if ssh:
        env["SSH_CONNECTION"] = ssh
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = lab.rtr.popen(sys.executable, "-m", "mirrord", "trace", *args, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    if wait:
        try:
            wait_until(lambda: has_table(lab, *TRACE_TABLE) or p.poll() is not None,
                       15, what="the trace table")
        except BaseException:
            p.kill()
            p.communicate()
            raise
        if p.poll() is not None:
            out, err = p.communicate()
            raise AssertionError(f"trace exited early with {p.returncode}:\n{out}{err}")
    return p


def finish(p: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    """The trace's exit status and output, once it ended (within `timeout`)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"trace did not end in {timeout}s:\n{out}{err}") from None
    return p.returncode, out, err
