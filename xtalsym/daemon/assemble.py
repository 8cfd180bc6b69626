"""Assembly: shaped views -> samples of up to three zone axes -> inference requests.

A sample is the frames of its three zone axes (x, y, z). Which axis a frame is, and which
sample it belongs to, comes from the stream (:func:`identify`):

* ``axis_from = "auto"`` (default): ``user_data[axis_key]`` when the frame has it, else
  ``axis_order[image_id % 3]``; ``"user_data"``: only ``user_data[axis_key]`` ("x", "y" or
  "z"); ``"image_id"``: only ``axis_order[image_id % 3]``;
* the sample key is ``user_data[sample_key]`` when present, else
  ``"<series>#<n>:<image_id // 3>"`` (series = series_unique_id, else series_id; n = the
  number the daemon gave the series, so a detector that reuses its ids never joins two
  series in one sample).

Samples never span series: the assembler keys them by (the daemon's series number, sample
key), and :meth:`Assembler.close_series` closes a series' open samples when it ends.

:class:`Assembler` turns each arriving view into a request: ``partial`` while axes are
missing (only when ``publish_partial``), ``complete`` (final) when the third axis
arrives; :meth:`Assembler.expire` closes samples older than the timeout as final
``partial`` requests and :meth:`Assembler.close_all` does the same at shutdown, so no
sample is ever dropped silently. At most ``max_open`` samples are open: a flood of distinct
sample ids closes the oldest open sample as a final ``partial`` (``closed_by = "overflow"``)
instead of growing without bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

AXES = ("x", "y", "z")


class AssemblyError(ValueError):
    """A frame whose axis or sample cannot be determined; ``reason`` is a short key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across processes (two-argument __init__)
        return type(self), (self.reason, self.message)


def axis_in_user_data(user_data: Any, axis_key: str = "axis") -> bool:
    return isinstance(user_data, dict) and user_data.get(axis_key) is not None


def identify(*, series_id: int, series_unique_id: str | None, image_id: int, user_data: Any,
             axis_from: str = "auto", axis_key: str = "axis", axis_order=AXES,
             sample_key: str = "sample_id", series_number: int | None = None) -> tuple[str, str]:
    """(sample key, axis) of one frame per the assembly configuration."""
    ud = user_data if isinstance(user_data, dict) else {}
    if axis_from == "user_data" or (axis_from == "auto" and axis_in_user_data(ud, axis_key)):
        axis = ud.get(axis_key)
        if axis is None:
            raise AssemblyError("no_axis", f"image {image_id} of series {series_id} has no user_data[{axis_key!r}] "
                                f"(assembly.axis_from = \"user_data\"; \"auto\" or \"image_id\" take the axis "
                                "from the image-id order)")
        axis = str(axis).lower()
        if axis not in AXES:
            raise AssemblyError("bad_axis", f"image {image_id}: user_data[{axis_key!r}] = {axis!r}, expected x, y or z")
    else:
        axis = axis_order[image_id % 3]
    key = ud.get(sample_key)
    if key is None or isinstance(key, (dict, list)):
        series = series_unique_id if series_unique_id else str(series_id)
        number = "" if series_number is None else f"#{series_number}"
        key = f"{series}{number}:{image_id // 3}"
    return str(key), axis


@dataclass
class View:
    """One shaped zone-axis view and where it came from."""

    sample_key: str
    axis: str
    series_id: int
    image_id: int
    shaped: np.ndarray  # (S, S, 3) uint8
    received: float  # wall-clock seconds when the frame arrived
    user_data: Any = None
    series_unique_id: str | None = None
    series_number: int = 0  # the daemon's number of the series (samples never span series)
    evidence: Any = None  # xtalsym.evidence.FrameEvidence of the calibrated frame, or None
    evidence_skipped: str | None = None  # why the frame has no evidence by design (overload.SHED_REASON)
    # (backend generation, logits (C,), embedding (960,)) once the view went through a per-view
    # graph: later requests of the same sample reuse it instead of running the view again
    inferred: tuple | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[int, str]:
        return (self.series_number, self.sample_key)


@dataclass
class Request:
    """What to classify and publish: a snapshot of one sample's views."""

    sample_key: str
    views: dict[str, View]
    status: str  # "partial" | "complete"
    final: bool  # no further prediction will be published for this sample
    closed_by: str | None  # None (more may come), "complete", "end", "restart", "timeout", "shutdown", "overflow"
    trigger: View  # the view whose arrival (or the sample's expiry) caused the request
    # a final request's combined evidence made before its batch: (evidence JSON or None, the
    # error that prevented it or None); None: not combined yet (the batch combines it)
    combined: tuple[dict | None, Exception | None] | None = field(default=None, repr=False)

    @property
    def axes(self) -> list[str]:
        return [a for a in AXES if a in self.views]

    @property
    def evidence_skipped(self) -> str | None:
        """Why the sample's views carry no symmetry evidence by design (shed under load), or None."""
        return next((v.evidence_skipped for v in self.views.values() if v.evidence_skipped), None)

    def tensors(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(3, 3, S, S) uint8 input and (3,) bool present mask."""
        x = np.zeros((3, 3, size, size), np.uint8)
        present = np.zeros(3, bool)
        for i, axis in enumerate(AXES):
            view = self.views.get(axis)
            if view is not None:
                x[i] = view.shaped.transpose(2, 0, 1)
                present[i] = True
        return x, present


@dataclass
class _Open:
    views: dict[str, View] = field(default_factory=dict)
    opened: float = 0.0


class Assembler:
    """Collects views per sample, keyed (series number, sample key); not thread-safe (one owner thread).

    ``busy`` (for :meth:`expire` and :meth:`next_deadline`): keys with a view still being
    shaped. Such a sample is not timed out: its late view would otherwise open an orphan
    partial sample of its own (views finish out of order when the workers lag)."""

    def __init__(self, *, timeout_seconds: float = 5.0, publish_partial: bool = True, max_open: int = 1000) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open!r}")
        self.timeout_seconds = float(timeout_seconds)
        self.publish_partial = publish_partial
        self.max_open = int(max_open)
        self.open: dict[tuple[int, str], _Open] = {}  # insertion order = opening order: the first is the oldest
        self.duplicates = 0
        self.overflowed = 0

    def add(self, view: View, now: float) -> list[Request]:
        out: list[Request] = []
        key = view.key
        entry = self.open.get(key)
        if entry is None:
            while len(self.open) >= self.max_open:
                self.overflowed += 1
                out.append(self._close(next(iter(self.open)), "overflow"))
            entry = self.open[key] = _Open(opened=now)
        if view.axis in entry.views:
            self.duplicates += 1
            log.warning("sample %s: axis %s arrived twice (image %d); the newer view replaces the older",
                        view.sample_key, view.axis, view.image_id)
        entry.views[view.axis] = view
        if len(entry.views) == 3:
            del self.open[key]
            return [*out, Request(view.sample_key, dict(entry.views), "complete", True, "complete", view)]
        if self.publish_partial:
            return [*out, Request(view.sample_key, dict(entry.views), "partial", False, None, view)]
        return out

    def expire(self, now: float, busy=frozenset()) -> list[Request]:
        """Final partial requests for samples open longer than the timeout (none of ``busy``)."""
        old = [k for k, e in self.open.items() if now - e.opened >= self.timeout_seconds and k not in busy]
        return [self._close(k, "timeout") for k in old]

    def close_series(self, series_number: int, reason: str = "end") -> list[Request]:
        """Final partial requests for every open sample of one series (its end, or a restart)."""
        return [self._close(k, reason) for k in list(self.open) if k[0] == series_number]

    def close_all(self, reason: str = "shutdown") -> list[Request]:
        return [self._close(k, reason) for k in list(self.open)]

    def _close(self, key: tuple[int, str], reason: str) -> Request:
        entry = self.open.pop(key)
        last = max(entry.views.values(), key=lambda v: v.received)
        log.info("sample %s closed by %s with axes %s", key[1], reason, "".join(a for a in AXES if a in entry.views))
        return Request(key[1], dict(entry.views), "partial", True, reason, last)

    def next_deadline(self, busy=frozenset()) -> float | None:
        opened = [e.opened for k, e in self.open.items() if k not in busy]
        if not opened:
            return None
        return min(opened) + self.timeout_seconds
