"""Logging set-up for the `xtalsym` command: timestamps on a terminal, none in the journal.

Under systemd, stderr is a journal stream (``$JOURNAL_STREAM`` = "device:inode" of that
stream, systemd.exec(5)). The journal stamps every line itself, so we drop our
timestamp and prefix each line with its syslog priority (``<3>`` ... ``<7>``,
sd-daemon(3)), which journald turns into the entry's PRIORITY (journalctl -p works).
"""

from __future__ import annotations

import logging
import os
import sys

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
# syslog priorities: err, warning, info, debug (critical -> crit)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def journal_stream(stream=None, environ=None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream named by $JOURNAL_STREAM."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    stream = sys.stderr if stream is None else stream
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class JournalFormatter(logging.Formatter):
    """``<priority>`` + the record without a timestamp; continuation lines keep the priority."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
        prefix = f"<{_PRIORITY[level]}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def configure(level: int, *, stream=None, environ=None, record_filter: logging.Filter | None = None) -> bool:
    """Set up the root logger at ``level``; returns True when logging for the journal."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if record_filter is not None:
        handler.addFilter(record_filter)
    journal = journal_stream(stream, environ)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    return journal


class _OwnOrWarning(logging.Filter):
    """Passes xtalsym's records, and other libraries' at WARNING and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "xtalsym" or record.name.startswith("xtalsym.")


def configure_cli(verbosity: int, *, stream=None, environ=None) -> bool:
    """The command line's levels: 0 = xtalsym's INFO (progress, what a command did) and
    every library's warnings; 1 (``-v``) = xtalsym's DEBUG; 2 (``-vv``) = DEBUG of every
    library too (FAISS's AVX512 loader, ONNX Runtime, ...)."""
    return configure(logging.INFO if verbosity <= 0 else logging.DEBUG, stream=stream, environ=environ,
                     record_filter=_OwnOrWarning() if verbosity < 2 else None)
