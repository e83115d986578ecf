"""Reading the spec in a short-lived child process, so the daemon never holds the
YAML parser.

PyYAML and the validator cost an idle daemon about 1 MiB of a router's memory
(bench/bench_memory.py) for work it does at start and on SIGHUP only. A
forked child reads the file with the same code as `mirrord check`
(spec.load) and hands back the Spec, or its problems, pickled through a pipe;
the parser's memory leaves with the child. The child is this process's own
fork, so what it pickles is as trusted as the daemon.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import time

from .. import spec

log = logging.getLogger("mirrord")

# A path that never answers (a FIFO, a stalled mount) must not stop the daemon
# for good: the child is killed and the read fails. Far above what reading the
# largest spec takes on a slow router.
READ_TIMEOUT = 120.0

# The signals the daemon catches: the child must die of them, not set the
# daemon's flags in its copy of the daemon or write to its wakeup fd.
_CAUGHT = ("SIGHUP", "SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")


class ReaderError(Exception):
    """The child gave no answer: it was killed, or failed outside spec.load."""


def load_apart(path: str) -> spec.Spec:
    """spec.load(path), run in a child: the Spec, or SpecError with its problems.

    ReaderError when the child gave no answer; where no child can be started
    (fork refused: no memory, a process limit) the spec is read here instead,
    at the cost of the parser's memory, rather than refusing the reload.
    """
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        log.warning("cannot start a process to read the spec (%s); reading it in the daemon",
                    e.strerror or e)
        return spec.load(path)
    if pid == 0:
        os.close(r)
        _child(path, w)
    os.close(w)
    data: bytes | None = None
    try:
        data = _answer(r)
    finally:
        os.close(r)
        if data is None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if data is None:
        raise ReaderError(f"the process reading the spec (pid {pid}) gave no answer within "
                          f"{READ_TIMEOUT:g} s and was killed (does the path name a pipe, or "
                          "a file on a stalled mount?)")
    return _result(data, status, pid)


def _answer(fd: int) -> bytes | None:
    """Everything the child wrote until it closed the pipe; None past READ_TIMEOUT."""
    deadline = time.monotonic() + READ_TIMEOUT
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if not poller.poll(left * 1000):
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _child(path: str, fd: int) -> None:
    """Never returns: writes the answer to `fd` and exits without running the
    daemon's exit handlers or flushing its buffers."""
    code = 70  # EX_SOFTWARE: something failed outside spec.load
    try:
        signal.set_wakeup_fd(-1)
        for name in _CAUGHT:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        answer: tuple[str, object]
        try:
            answer = ("spec", spec.load(path))
        except spec.SpecError as e:
            # The problems, not the exception: SpecError(*args) would not
            # rebuild it.
            answer = ("problems", e.problems)
        except Exception as e:  # MemoryError, RecursionError included
            answer = ("error", f"{type(e).__name__}: {e}")
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        code = 0
    finally:
        os._exit(code)


def _result(data: bytes, status: int, pid: int) -> spec.Spec:
    if os.WIFSIGNALED(status):
        raise ReaderError(f"the process reading the spec (pid {pid}) was killed by signal "
                          f"{os.WTERMSIG(status)}")
    try:
        kind, value = pickle.loads(data)
    except Exception:
        raise ReaderError(f"the process reading the spec (pid {pid}) exited with status "
                          f"{os.waitstatus_to_exitcode(status)} and no answer") from None
    if kind == "spec" and isinstance(value, spec.Spec):
        return value
    if kind == "problems" and isinstance(value, list):
        raise spec.SpecError([str(p) for p in value])
    raise ReaderError(str(value))
