"""Ingest: the ZeroMQ frame socket and the series state machine.

* :func:`open_frame_socket`: PULL (the DECTRIS way: the detector binds PUSH, clients
  connect PULL; several PULL clients share frames round-robin) or SUB (subscribed to
  everything), bound or connected, per ``[ingest]``.
* :class:`SeriesTracker`: start / image / end bookkeeping over decoded events.
  - ``start``: opens a series (geometry from the stream, overridden key by key by
    ``[geometry]``). A start while a series is open is a detector restart: the old series
    is closed (counted ``restart``) and the new one opened.
  - ``image`` of the open series: accepted. An image whose series id (or unique id)
    differs from the open series is dropped (``wrong_series``). An image with no series
    open is dropped (``no_start``) unless ``frames_before_start = "config"`` and the
    config's ``[geometry]`` is complete, in which case it is classified with that geometry.
  - ``end`` of the open series closes it; an end of any other series (a stale end from
    an earlier series, or one with no series open) is ignored (``stale_end``).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from xtalsym.daemon.protocols import GEOMETRY_KEYS, Image, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)


def open_frame_socket(context: zmq.Context, *, socket: str = "pull", mode: str = "connect",
                      address: str, receive_hwm: int = 1000) -> zmq.Socket:
    """The socket frames arrive on; returns it bound or connected (see ``LAST_ENDPOINT``)."""
    sock = context.socket(zmq.PULL if socket == "pull" else zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, receive_hwm)
    sock.setsockopt(zmq.LINGER, 0)
    if socket == "sub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if mode == "bind":
        sock.bind(address)
    else:
        sock.connect(address)
    log.info("ingest: %s %s %s", socket.upper(), mode, endpoint(sock) if mode == "bind" else address)
    return sock


def endpoint(sock: zmq.Socket) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


_tokens = itertools.count(1)


@dataclass
class Series:
    """One open series: what calibration and assembly need from its start message."""

    series_id: int | None
    series_unique_id: str | None
    stream_geometry: dict
    pixel_mask: Any = None  # ndarray or {channel: ndarray}
    channels: list[str] = field(default_factory=list)
    user_data: Any = None
    from_config: bool = False  # no start message: geometry from [geometry]
    token: int = field(default_factory=lambda: next(_tokens))
    images: int = 0
    flatfield: Any = None  # same layout as pixel_mask
    flatfield_applied: bool | None = None  # the detector's own word; None = it did not say

    def mask_for(self, channel: str) -> np.ndarray | None:
        return _for_channel(self.pixel_mask, channel)

    def flatfield_for(self, channel: str) -> np.ndarray | None:
        return _for_channel(self.flatfield, channel)


def _for_channel(maps: Any, channel: str) -> np.ndarray | None:
    """A start message's per-pixel map for ``channel`` (V2: a map per channel; V1: one array)."""
    if maps is None:
        return None
    if isinstance(maps, dict):
        array = maps.get(channel)
        if array is None and len(maps) == 1:
            array = next(iter(maps.values()))
        return array
    return maps


def flatfield_applied(start: SeriesStart) -> bool | None:
    """Whether the detector says it already applied its flatfield: stream V2 ``flatfield_enabled``,
    stream V1 config ``flatfield_correction_applied``; None when the stream does not say."""
    raw = start.raw or {}
    config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    for value in (raw.get("flatfield_enabled"), config.get("flatfield_correction_applied")):
        if isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class Accepted:
    series: Series
    image: Image


@dataclass(frozen=True)
class Dropped:
    reason: str
    message: str


class SeriesTracker:
    """Series state machine; one owner thread. ``handle`` returns Accepted, Dropped or None."""

    def __init__(self, *, geometry_override: dict | None = None, frames_before_start: str = "drop") -> None:
        self.override = dict(geometry_override or {})
        self.frames_before_start = frames_before_start
        self.current: Series | None = None
        self.events: dict[str, int] = {"start": 0, "end": 0, "restart": 0}

    def _config_complete(self) -> bool:
        return all(self.override.get(k) is not None for k in GEOMETRY_KEYS if not k.startswith("image_size"))

    def handle(self, event) -> Accepted | Dropped | None:
        if isinstance(event, SeriesStart):
            return self._start(event)
        if isinstance(event, SeriesEnd):
            return self._end(event)
        if isinstance(event, Image):
            return self._image(event)
        return Dropped("unknown_event", f"unexpected event {type(event).__name__}")

    def _start(self, start: SeriesStart) -> None:
        self.events["start"] += 1
        if self.current is not None and not self.current.from_config:
            self.events["restart"] += 1
            log.warning("series %s (%s) restarted by a new start (series %s, %s) before its end: "
                        "the detector was re-armed", self.current.series_id, self.current.series_unique_id,
                        start.series_id, start.series_unique_id)
        self.current = Series(start.series_id, start.series_unique_id, dict(start.geometry),
                              start.pixel_mask, list(start.channels or []), start.user_data,
                              flatfield=start.flatfield, flatfield_applied=flatfield_applied(start))
        log.info("series %s (%s) started: %s", start.series_id, start.series_unique_id,
                 {k: v for k, v in start.geometry.items() if v is not None})
        return None

    def _end(self, end: SeriesEnd) -> Dropped | None:
        cur = self.current
        if cur is None or cur.from_config or not self._same(cur, end.series_id, end.series_unique_id):
            log.info("stale end of series %s (%s) ignored (open: %s)", end.series_id, end.series_unique_id,
                     None if cur is None else cur.series_id)
            return Dropped("stale_end", f"end of series {end.series_id} while "
                           f"{'no series' if cur is None else f'series {cur.series_id}'} is open")
        self.events["end"] += 1
        log.info("series %s ended after %d images", cur.series_id, cur.images)
        self.current = None
        return None

    @staticmethod
    def _same(cur: Series, series_id: int, unique_id: str | None) -> bool:
        if cur.series_id != series_id:
            return False
        return not (cur.series_unique_id and unique_id and cur.series_unique_id != unique_id)

    def _image(self, image: Image) -> Accepted | Dropped:
        cur = self.current
        if cur is None:
            if self.frames_before_start == "config" and self._config_complete():
                self.current = cur = Series(None, None, {}, from_config=True)
                log.info("images without a start message: using the [geometry] of the config")
            else:
                return Dropped("no_start", f"image {image.image_id} of series {image.series_id} arrived with no "
                               "series open (no start message seen, and no complete [geometry] in the config "
                               "with frames_before_start = \"config\")")
        elif not cur.from_config and not self._same(cur, image.series_id, image.series_unique_id):
            return Dropped("wrong_series", f"image {image.image_id} of series {image.series_id} "
                           f"({image.series_unique_id}) while series {cur.series_id} ({cur.series_unique_id}) is open")
        cur.images += 1
        return Accepted(cur, image)
