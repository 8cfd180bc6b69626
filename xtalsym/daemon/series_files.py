"""What a series carries beside its frames, prepared once per series for the workers: the
calibration geometry, and the pixel mask and flatfield written to files (a frame job then
names a path instead of shipping the arrays with every frame)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from xtalsym.daemon import calibrate as cal
from xtalsym.daemon.ingest import geometry_hint
from xtalsym.daemon.workers import flatfield_wanted

log = logging.getLogger(__name__)


class SeriesSideFiles:
    """Per-series geometry, mask and flatfield files in one temporary folder."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="xtalsym-daemon-")
        self._files: dict[tuple, str | None] = {}
        self._geometry: dict[tuple[int, tuple], tuple[cal.FrameGeometry, str]] = {}

    def frame_geometry(self, series, frame_shape, *, override, training, method: str) -> tuple[cal.FrameGeometry, str]:
        """The series' calibration geometry and sampling method (``auto``: from how many detector
        pixels one training-grid pixel spans, decided once per series geometry); a refused
        geometry names the stream field and the fix."""
        key = (series.token, tuple(frame_shape))
        cached = self._geometry.get(key)
        if cached is None:
            try:
                g = cal.resolve_geometry(series.stream_geometry, override, frame_shape=frame_shape)
            except cal.CalibrationError as exc:
                hint = geometry_hint(series, override, exc)
                raise cal.CalibrationError(exc.reason, f"{exc.message} ({hint})" if hint else exc.message) from None
            auto = cal.auto_method(g, training)
            cached = self._geometry[key] = (g, auto)
            log.info(
                'series %s calibration geometry: %s; calibration.method "auto" means %s for it (one '
                "training-grid pixel spans %.2f detector pixels)",
                series.series_id,
                g,
                auto,
                cal.footprint_px(g, training),
            )
        return cached[0], cached[1] if method == "auto" else method

    def mask_file(self, series, channel: str, shape) -> str | None:
        key = (series.token, channel)
        if key not in self._files:
            mask = series.mask_for(channel)
            path = None
            if mask is not None:
                mask = np.asarray(mask)
                if mask.shape != tuple(shape):
                    log.warning(
                        "series %s: pixel mask %s does not match the frames %s; mask ignored",
                        series.series_id,
                        mask.shape,
                        tuple(shape),
                    )
                else:
                    path = str(Path(self._tmp.name) / f"mask-{series.token}-{len(self._files)}.npy")
                    np.save(path, (mask != 0).astype(np.uint8), allow_pickle=False)
            self._files[key] = path
        return self._files[key]

    def flatfield_file(self, series, channel: str, shape, mode: str) -> str | None:
        """The series' flatfield for ``channel`` as a file for the workers, when ``calibration.flatfield``
        (``mode``) asks for it to be applied; else None."""
        key = (series.token, channel, "flatfield")
        if key not in self._files:
            flatfield, path = series.flatfield_for(channel), None
            wanted = flatfield_wanted(mode, series.flatfield_applied)
            if flatfield is not None and wanted:
                flatfield = np.asarray(flatfield, dtype=np.float32)
                if flatfield.shape != tuple(shape):
                    log.warning(
                        "series %s: flatfield %s does not match the frames %s; not applied",
                        series.series_id,
                        flatfield.shape,
                        tuple(shape),
                    )
                else:
                    path = str(Path(self._tmp.name) / f"flatfield-{series.token}-{len(self._files)}.npy")
                    np.save(path, flatfield, allow_pickle=False)
                    log.info(
                        "series %s: applying the stream's flatfield to channel %s (calibration.flatfield = %r)",
                        series.series_id,
                        channel,
                        mode,
                    )
            self._files[key] = path
        return self._files[key]

    def cleanup(self) -> None:
        self._tmp.cleanup()
