"""The shaping worker processes: one frame in, its shaped DP out (calibrate + shape).

They are spawned processes (:mod:`xtalsym.daemon.pipeline` owns the pool); everything they
receive is a picklable :class:`FrameJob` built by the daemon itself, never network bytes.
Each worker builds the sampling map once per series geometry (:func:`calibrate.build_map`
is cached) and reads the series' pixel mask once, from a file (:func:`_load_mask`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from xtalsym import shaping
from xtalsym.daemon import calibrate as cal


@dataclass(frozen=True)
class FrameJob:
    """Everything a worker needs for one frame (picklable, no sockets)."""

    frame: np.ndarray
    frame_geometry: cal.FrameGeometry
    training: cal.TrainingGeometry
    method: str
    mask_path: str | None
    saturation_value: float | None
    axis: str
    shaping_method: str
    size: int
    flatfield_path: str | None = None


_mask_cache: dict[str, np.ndarray] = {}


def _load_mask(path: str) -> np.ndarray:
    """A per-series map (pixel mask or flatfield) the daemon saved; cached, it is the same for every frame."""
    mask = _mask_cache.get(path)
    if mask is None:
        if len(_mask_cache) >= 4:
            _mask_cache.pop(next(iter(_mask_cache)))
        mask = _mask_cache[path] = np.load(path, allow_pickle=False)
    return mask


def process_frame(job: FrameJob) -> np.ndarray:
    """Calibrate and shape one frame (runs in a worker process): uint8 (size, size, 3)."""
    sampling = cal.build_map(job.frame_geometry, job.training, job.method)
    mask = _load_mask(job.mask_path) if job.mask_path else None
    flatfield = _load_mask(job.flatfield_path) if job.flatfield_path else None
    raw = cal.calibrate(job.frame, sampling, pixel_mask=mask, saturation_value=job.saturation_value,
                        flatfield=flatfield)
    return shaping.shape(raw, job.axis, method=job.shaping_method, size=job.size)


def shape_timed(job: FrameJob) -> tuple[np.ndarray, float, float]:
    """:func:`process_frame`, its duration in the worker (the stage latency, without queueing)
    and the CPU seconds the worker's thread spent on it (the stage's cost on a shared machine)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    shaped = process_frame(job)
    return shaped, time.perf_counter() - t0, time.thread_time() - c0


def init_worker() -> None:
    """One thread per shaping worker: the pool is the parallelism; OpenCV's and BLAS's own
    per-core thread pools inside every worker would oversubscribe the cores."""
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)


def warm(_: int) -> int:
    return os.getpid()


