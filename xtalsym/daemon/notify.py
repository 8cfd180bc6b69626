"""systemd's notify protocol (sd_notify(3)): READY=1, STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1.

Our own few lines rather than a library: the protocol is one datagram of ``KEY=VALUE``
lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract socket
written with a leading ``@``). python-systemd needs libsystemd headers to build and
``sdnotify`` has not been released since 2017. Without ``$NOTIFY_SOCKET`` (not under
systemd, or not Type=notify) every call is a no-op.

:class:`Watchdog` sends WATCHDOG=1 only while every processing loop has heartbeated
recently, so a stuck pipeline stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()  # abstract namespace
    return name


class Notifier:
    """Sends notify messages to ``socket_path`` (None = disabled, every call a no-op)."""

    def __init__(self, socket_path: str | None, *, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path or None
        self.watchdog_usec = watchdog_usec if self.socket_path else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (sd_watchdog_enabled(3))."""
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or None
        usec = None
        raw = env.get("WATCHDOG_USEC")
        if raw:
            pid = env.get("WATCHDOG_PID")
            try:
                value = int(raw)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not an integer: watchdog pings disabled", raw)
            else:
                if value <= 0:
                    log.warning("WATCHDOG_USEC=%r is not positive: watchdog pings disabled", raw)
                elif pid and pid != str(os.getpid()):
                    log.info("WATCHDOG_PID=%s is not this process (%d): watchdog pings disabled", pid, os.getpid())
                else:
                    usec = value
        return cls(path, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, **fields: str | int) -> bool:
        """One datagram of ``KEY=value`` lines; True if sent. Never raises: a lost
        notification must not take the service down (it is logged once)."""
        if not self.enabled:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), _address(self.socket_path))
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %s failed (%s); systemd may not see this service's state",
                            self.socket_path, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        # systemd >= 253 needs MONOTONIC_USEC (CLOCK_MONOTONIC) to tell this reload from an earlier one
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Pings WATCHDOG=1 every ``interval`` s while every loop's heartbeat is newer than ``stale_after`` s.

    ``heartbeats()`` returns {loop name: time.monotonic() of its last iteration}. Call
    :meth:`tick` often (at least every ``interval``); it pings when one is due.
    """

    def __init__(self, notifier: Notifier, heartbeats: Callable[[], dict[str, float]], *,
                 interval: float, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or stale_after <= 0:
            raise ValueError(f"watchdog interval {interval!r} and stale_after {stale_after!r} must be > 0")
        self.notifier = notifier
        self.heartbeats = heartbeats
        self.interval = interval
        self.stale_after = stale_after
        self.clock = clock
        self._next = clock()
        self._withheld: tuple[str, ...] = ()

    def stale(self) -> dict[str, float]:
        """{loop: seconds since its heartbeat} for every loop older than ``stale_after``."""
        now = self.clock()
        ages = {name: now - beat for name, beat in self.heartbeats().items()}
        return {name: age for name, age in ages.items() if age > self.stale_after}

    def tick(self) -> bool:
        """Ping if due and healthy; True when a ping was sent."""
        now = self.clock()
        if now < self._next:
            return False
        self._next = now + self.interval
        stale = self.stale()
        if stale:
            names = tuple(sorted(stale))
            if names != self._withheld:
                log.error("watchdog: %s made no progress for %s; withholding WATCHDOG=1 so systemd restarts "
                          "the service if it stays stuck", ", ".join(names),
                          ", ".join(f"{stale[n]:.1f} s" for n in names))
                self._withheld = names
            return False
        if self._withheld:
            log.warning("watchdog: %s running again; pings resumed", ", ".join(self._withheld))
            self._withheld = ()
        return self.notifier.watchdog()

    def timeout(self) -> float:
        """Seconds until the next ping is due (for the caller's wait)."""
        return max(0.0, self._next - self.clock())
