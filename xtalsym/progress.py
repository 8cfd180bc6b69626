"""Progress of long loops: a tqdm bar on a terminal, a log line every so often elsewhere.

tqdm redraws its bar with carriage returns; in a piped log or the journal every redraw
becomes text, thousands of lines of it. When stderr is not a terminal the same calls
log one INFO line every ``every_s`` seconds instead (and one at the end).
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

DEFAULT_EVERY_S = 30.0


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """The part of tqdm's interface the project uses, reported as log lines."""

    def __init__(
        self,
        *,
        total: int | None,
        desc: str,
        unit: str,
        initial: int = 0,
        every_s: float = DEFAULT_EVERY_S,
        logger: logging.Logger | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self._initial = initial
        self.every_s = float(every_s)
        self.postfix = ""
        self._log = logger or log
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._report(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _report(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._initial) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.n < self.total:
            left = f", about {_duration((self.total - self.n) / rate)} left"
        extra = f"; {self.postfix}" if self.postfix else ""
        self._log.info("%s: %s %s%s, %.1f %s/s%s%s", self.desc, done, self.unit, share, rate, self.unit, left, extra)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._initial:
                self._report(time.monotonic())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress(
    *,
    total: int | None,
    desc: str,
    unit: str = "item",
    enabled: bool = True,
    initial: int = 0,
    every_s: float = DEFAULT_EVERY_S,
    logger: logging.Logger | None = None,
    **tqdm_options,
):
    """A progress reporter with ``update(n)``, ``set_postfix(**kw)`` and ``close()``:
    tqdm when ``enabled`` and stderr is a terminal, periodic log lines when ``enabled``
    and it is not, silence (a disabled tqdm) otherwise."""
    if enabled and not is_terminal():
        return LogProgress(total=total, desc=desc, unit=unit, initial=initial, every_s=every_s, logger=logger)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, **tqdm_options)
