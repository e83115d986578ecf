"""Where mirrord's log goes: the journal, syslog or stderr.

- Under systemd (stderr is the journal stream, or the service manager started
  us): the journal, with MIRROR= and ACTION= from `extra=` as fields, so
  `journalctl -u mirrord MIRROR=lan-ids` filters one mirror. Without
  systemd-python, stderr with `<N>` priority prefixes, which journald parses.
- On OpenWrt (no systemd, /dev/log present, stderr not a terminal), or when
  MIRRORD_SYSLOG=1: syslog with ident "mirrord", so `logread -e mirrord` works.
- Otherwise (a terminal, a test harness writing to a file): stderr.

MIRRORD_SYSLOG=0 forces stderr/journal even on OpenWrt.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping, Optional, TextIO

# Structured fields the daemon attaches with logger.info(msg, extra={...}).
FIELDS = ("MIRROR", "ACTION")
SYSLOG_IDENT = "mirrord"
SYSLOG_SOCKET = "/dev/log"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
OPENWRT_RELEASE = "/etc/openwrt_release"

log = logging.getLogger(__name__)


def level_for(verbosity: int, daemon: bool = True) -> int:
    """0 = INFO for the daemon (WARNING for one-shot commands), 1 = INFO, 2+ = DEBUG."""
    if verbosity >= 2:
        return logging.DEBUG
    if verbosity == 1 or daemon:
        return logging.INFO
    return logging.WARNING


def _fields_suffix(record: logging.LogRecord) -> str:
    parts = [f"{k.lower()}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None)]
    return f" [{' '.join(parts)}]" if parts else ""


class FieldsFormatter(logging.Formatter):
    """Plain-text formatter that keeps the structured fields visible."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record) + _fields_suffix(record)


class PrefixFormatter(FieldsFormatter):
    """sd-daemon(3) `<N>` prefixes: journald reads the priority from stderr lines."""

    PRIORITY = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
        logging.INFO: 6, logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        pri = self.PRIORITY.get(record.levelno, 6 if record.levelno > logging.DEBUG else 7)
        # One journal entry per line: prefix continuation lines (tracebacks) too.
        return "\n".join(f"<{pri}>{line}" for line in super().format(record).split("\n"))


def _journal_handler() -> Optional[logging.Handler]:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None

    class FieldsJournalHandler(JournalHandler):  # type: ignore[misc]
        """JournalHandler that forwards only valid journal field names from `extra`.

        systemd-python 235 forwards every LogRecord attribute (msg=, args=,
        ...), which journald drops as invalid names, and 234 forwards none of
        them: pass exactly the upper-case ones, which covers MIRROR= and ACTION=.
        """

        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields: dict[str, Any] = dict(getattr(self, "_extra", {}))
                for key, value in record.__dict__.items():
                    if key.isupper() and not key.startswith("_") and value is not None:
                        fields[key] = str(value)
                if record.exc_info:
                    fields["EXCEPTION_INFO"] = str(record.exc_info[1])
                self.send(
                    self.format(record),
                    PRIORITY=format(self.map_priority(record.levelno)),
                    LOGGER=record.name,
                    THREAD_NAME=record.threadName,
                    CODE_FILE=record.pathname,
                    CODE_LINE=record.lineno,
                    CODE_FUNC=record.funcName,
                    **fields,
                )
            except Exception:
                self.handleError(record)

    handler: logging.Handler = FieldsJournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENT)
    return handler


def _stderr_is_journal(env: Mapping[str, str], stream: TextIO) -> bool:
    # JOURNAL_STREAM is inherited by everything a service starts (a terminal
    # opened from a desktop session too): it counts only if it is our stderr.
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):
        return False


def choose_target(env: Optional[Mapping[str, str]] = None, stream: Optional[TextIO] = None,
                  syslog_socket: str = SYSLOG_SOCKET) -> str:
    """'journal', 'syslog' or 'stderr' for this process."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    forced = env.get("MIRRORD_SYSLOG")
    if forced == "1":
        return "syslog"
    if _stderr_is_journal(env, stream):
        return "journal"
    # INVOCATION_ID is set for every process systemd spawns as a unit; with a
    # terminal on stderr someone is watching, so it stays on stderr.
    if env.get("INVOCATION_ID") and not _isatty(stream):
        return "journal"
    if forced == "0":
        return "stderr"
    # Only on OpenWrt: elsewhere a redirected stderr is a file someone chose.
    if os.path.exists(OPENWRT_RELEASE) and os.path.exists(syslog_socket) and not _isatty(stream):
        return "syslog"
    return "stderr"


def _syslog_handler(address: str) -> logging.Handler:
    # Imported here: logging.handlers brings pickle and queue (about 0.5 MiB
    # resident) that only the syslog target needs.
    import logging.handlers

    handler = logging.handlers.SysLogHandler(
        address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
    )
    handler.ident = f"{SYSLOG_IDENT}[{os.getpid()}]: "
    # syslog(3) sends no trailing NUL; logd would store it as part of the text.
    handler.append_nul = False
    handler.setFormatter(FieldsFormatter("%(message)s"))
    return handler


def setup_logging(verbosity: int, daemon: bool = True, *, env: Optional[Mapping[str, str]] = None,
                  stream: Optional[TextIO] = None, syslog_socket: str = SYSLOG_SOCKET,
                  journal_socket: str = JOURNAL_SOCKET) -> str:
    """Send the root logger to the right place; returns the target chosen.

    Replaces handlers installed earlier (cli.py's basicConfig), so it can be
    called again once the daemon knows its verbosity.
    """
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    target = choose_target(env, stream, syslog_socket)
    handler: Optional[logging.Handler] = None
    if target == "journal":
        # Without journald's socket (a container without journald) every
        # record would fail to send: then stderr, which is the journal itself
        # when JOURNAL_STREAM matches.
        if os.path.exists(journal_socket):
            handler = _journal_handler()
        if handler is None and _stderr_is_journal(env, stream):
            handler = logging.StreamHandler(stream)
            handler.setFormatter(PrefixFormatter("%(name)s: %(message)s"))
    elif target == "syslog":
        try:
            handler = _syslog_handler(syslog_socket)
        except OSError:
            target = "stderr"
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(FieldsFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level_for(verbosity, daemon))
    log.debug("logging to %s", target)
    return target
