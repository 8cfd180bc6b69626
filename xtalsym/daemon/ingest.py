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
  - the daemon numbers every series it opens (1, 2, ...: ``Series.number``); samples are
    keyed by it, because detectors reuse ids. A closed series is reported in
    :attr:`SeriesTracker.closed` (number, ``"end"`` or ``"restart"``) so that its open
    samples can be closed.
  - image ids that skip (``frames_missing``; at the end also the shortfall against the
    start's ``number_of_images``) are counted, with one WARNING per series naming the usual
    cause: a second PULL client on the same detector takes every other frame.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
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
    number: int = 0  # the daemon's own number for this series (1, 2, ... per tracker)
    number_of_images: int | None = None  # as the start announced
    geometry_fields: dict = field(default_factory=dict)  # geometry key -> stream field it came from
    raw: dict = field(default_factory=dict)  # the start message (for messages that name its fields)
    next_image_id: int = 0  # one past the highest image id seen
    frames_missing: int = 0
    warned: set = field(default_factory=set)  # one-per-series warnings already given

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
    """Series state machine; one owner thread. ``handle`` returns Accepted, Dropped or None.

    ``count(key, n)`` (the pipeline's metrics) receives ``series_start``, ``series_end``,
    ``series_restart``, ``frames_missing`` and ``start_part_ignored``."""

    def __init__(self, *, geometry_override: dict | None = None, frames_before_start: str = "drop",
                 count: Callable[[str, int], None] | None = None) -> None:
        self.override = dict(geometry_override or {})
        self.frames_before_start = frames_before_start
        self.current: Series | None = None
        self.events: dict[str, int] = {"start": 0, "end": 0, "restart": 0}
        self.frames_missing = 0
        self.numbered = 0
        self.closed: list[tuple[int, str]] = []  # (series number, "end" | "restart"), taken by the pipeline
        self._count = count or (lambda key, n=1: None)

    def _config_complete(self) -> bool:
        return all(self.override.get(k) is not None for k in GEOMETRY_KEYS if not k.startswith("image_size"))

    def _number(self) -> int:
        self.numbered += 1
        return self.numbered

    def handle(self, event) -> Accepted | Dropped | None:
        if isinstance(event, SeriesStart):
            return self._start(event)
        if isinstance(event, SeriesEnd):
            return self._end(event)
        if isinstance(event, Image):
            return self._image(event)
        return Dropped("unknown_event", f"unexpected event {type(event).__name__}")

    def take_closed(self) -> list[tuple[int, str]]:
        closed, self.closed = self.closed, []
        return closed

    def rejected_start(self, exc) -> None:
        """A start message that did not decode (BadMessage with ``message_type == "start"``): say
        what happens to the images that follow, at WARNING (they would otherwise be a silent run
        of ``no_start`` or ``wrong_series``)."""
        series = "?" if exc.series_id is None else exc.series_id
        if self.frames_before_start == "config" and self._config_complete():
            fate = "its images will be classified with the [geometry] of the config (frames_before_start = \"config\")"
        elif self.frames_before_start == "config":
            missing = [k for k in GEOMETRY_KEYS if not k.startswith("image_size") and self.override.get(k) is None]
            fate = ("its images will be dropped (no_start) until [geometry] is complete for frames_before_start = "
                    f"\"config\" (missing: {', '.join(missing)})")
        else:
            fate = ("its images will be dropped (no_start) unless frames_before_start = \"config\" with a complete "
                    "[geometry]")
        log.warning("start of series %s rejected: %s; %s", series, exc, fate)

    def _start(self, start: SeriesStart) -> None:
        self.events["start"] += 1
        self._count("series_start", 1)
        if self.current is not None:
            if not self.current.from_config:
                self.events["restart"] += 1
                self._count("series_restart", 1)
                log.warning("series %s (%s) restarted by a new start (series %s, %s) before its end: "
                            "the detector was re-armed", self.current.series_id, self.current.series_unique_id,
                            start.series_id, start.series_unique_id)
            self.closed.append((self.current.number, "restart"))
        self.current = Series(start.series_id, start.series_unique_id, dict(start.geometry),
                              start.pixel_mask, list(start.channels or []), start.user_data,
                              flatfield=start.flatfield, flatfield_applied=flatfield_applied(start),
                              number=self._number(), number_of_images=start.number_of_images,
                              geometry_fields=dict(start.geometry_fields), raw=dict(start.raw or {}))
        for warning in start.warnings:
            self._count("start_part_ignored", 1)
            log.warning("series %s (%s): %s; the series is kept", start.series_id, start.series_unique_id, warning)
        log.info("series %s (%s) started (the daemon's series #%d): %s", start.series_id, start.series_unique_id,
                 self.current.number, {k: v for k, v in start.geometry.items() if v is not None})
        return None

    def _end(self, end: SeriesEnd) -> Dropped | None:
        cur = self.current
        if cur is None or cur.from_config or not self._same(cur, end.series_id, end.series_unique_id):
            log.info("stale end of series %s (%s) ignored (open: %s)", end.series_id, end.series_unique_id,
                     None if cur is None else cur.series_id)
            return Dropped("stale_end", f"end of series {end.series_id} while "
                           f"{'no series' if cur is None else f'series {cur.series_id}'} is open")
        self.events["end"] += 1
        self._count("series_end", 1)
        announced = cur.number_of_images
        if announced is not None and cur.next_image_id < announced:  # the last frames never came
            self._missing(cur, announced - cur.next_image_id,
                          f"the series ended at image {cur.next_image_id - 1} of the {announced} its start announced")
        log.info("series %s ended after %d images%s", cur.series_id, cur.images,
                 "" if announced is None else f" ({announced} announced, {cur.frames_missing} missing)")
        self.closed.append((cur.number, "end"))
        self.current = None
        return None

    def _missing(self, cur: Series, n: int, what: str) -> None:
        cur.frames_missing += n
        self.frames_missing += n
        self._count("frames_missing", n)
        if "gap" not in cur.warned:
            cur.warned.add("gap")
            log.warning("series %s: %s: %d frame(s) never reached this daemon. The usual cause is a second client "
                        "PULLing from the same detector: ZeroMQ hands each frame to one PULL client in turn "
                        "(round-robin), so each gets every other frame. Run one client per detector stream (or "
                        "SUB to a stream that is published). Further gaps of this series are counted "
                        "(frames_missing) without a warning", cur.series_id, what, n)

    @staticmethod
    def _same(cur: Series, series_id: int, unique_id: str | None) -> bool:
        if cur.series_id != series_id:
            return False
        return not (cur.series_unique_id and unique_id and cur.series_unique_id != unique_id)

    def _image(self, image: Image) -> Accepted | Dropped:
        cur = self.current
        if cur is None:
            if self.frames_before_start == "config" and self._config_complete():
                self.current = cur = Series(None, None, {}, from_config=True, number=self._number())
                log.info("images without a start message: using the [geometry] of the config")
            else:
                return Dropped("no_start", f"image {image.image_id} of series {image.series_id} arrived with no "
                               "series open (no start message seen, and no complete [geometry] in the config "
                               "with frames_before_start = \"config\")")
        elif not cur.from_config and not self._same(cur, image.series_id, image.series_unique_id):
            return Dropped("wrong_series", f"image {image.image_id} of series {image.series_id} "
                           f"({image.series_unique_id}) while series {cur.series_id} ({cur.series_unique_id}) is open")
        if not cur.from_config:  # images of several detector series share a config series: no id order
            if image.image_id > cur.next_image_id:
                self._missing(cur, image.image_id - cur.next_image_id,
                              f"image ids jump from {cur.next_image_id - 1} to {image.image_id}" if cur.next_image_id
                              else f"its first image is image {image.image_id}, not 0")
            cur.next_image_id = max(cur.next_image_id, image.image_id + 1)
        cur.images += 1
        return Accepted(cur, image)


def geometry_hint(series: Series, override: dict, exc) -> str:
    """What to set when a series' geometry is refused (CalibrationError missing/bad_geometry):
    the stream field each offending value came from and the ``[geometry]`` key that fixes it."""
    hints = []
    for key in GEOMETRY_KEYS:
        if key not in exc.message:
            continue
        if override.get(key) is not None:
            hints.append(f"{key} comes from [geometry]: correct it there")
            continue
        source = series.geometry_fields.get(key)
        note = f"the stream's {source} gave it" if source else "the start message does not give it"
        if key == "detector_distance_m" and not source and series.raw.get("detector_translation") is not None:
            note = (f"the start has no detector_distance, and its detector_translation "
                    f"{series.raw['detector_translation']!r} has no z > 0 to take")
        hints.append(f"{note}: set [geometry] {key}")
    return "; ".join(hints)
