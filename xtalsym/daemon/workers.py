"""The per-frame path: one frame in, its shaped DP out (decompress + calibrate + shape), and
its symmetry evidence (:func:`xtalsym.evidence.analyse_frame` on the calibrated float frame).

:func:`process_frame` is what the daemon's worker processes run on every frame
(:mod:`xtalsym.daemon.pipeline` owns the pool) and what ``xtalsym classify`` runs on every
recorded frame (:mod:`xtalsym.daemon.classify`): one implementation for both. A job is a
picklable :class:`FrameJob` built by the daemon itself; its frame may still be compressed
(:class:`~xtalsym.daemon.protocols.CompressedFrame`: decompressing in the workers keeps the
ingest thread and the pipe to the workers free of 36 MB arrays; a bslz4 frame under an area map
is not even decompressed densely: :meth:`CompressedFrame.nonzero` decodes it straight to its
non-zero usable pixels, which the binning needs, :meth:`calibrate.PreparedMap.apply_nonzero`). Each worker builds the
sampling map once per series geometry (:func:`calibrate.build_map` is cached), reads the
series' pixel mask and flatfield once, from files (:func:`_load_mask`), and folds them into
the map once (:func:`_prepared`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from xtalsym import shaping
from xtalsym.daemon import calibrate as cal
from xtalsym.daemon import result_slots
from xtalsym.daemon.protocols import CompressedFrame, materialise


@dataclass(frozen=True)
class FrameJob:
    """Everything a worker needs for one frame (picklable, no sockets)."""

    frame: np.ndarray | CompressedFrame
    frame_geometry: cal.FrameGeometry
    training: cal.TrainingGeometry
    method: str
    mask_path: str | None
    saturation_value: float | None
    axis: str
    shaping_method: str
    size: int
    flatfield_path: str | None = None
    evidence: bool = True  # also measure the symmetry evidence on the calibrated float frame
    # (shared-memory block, slot, bytes) for the shaped DP (xtalsym.daemon.result_slots), or None: returned
    result_slot: tuple[str, int, int] | None = None


def frame_job(config, *, frame, geometry: cal.FrameGeometry, training: cal.TrainingGeometry, axis: str,
              size: int, mask_path: str | None, flatfield_path: str | None, method: str,
              evidence: bool | None = None) -> FrameJob:
    """The job of one frame under the daemon configuration ``config`` (saturation and shaping settings);
    ``method`` is the series' resolved sampling method (``calibration.method``, "auto" resolved);
    ``evidence``: measure the frame's symmetry evidence (None: ``pipeline.evidence``)."""
    return FrameJob(frame=frame, frame_geometry=geometry, training=training, method=method,
                    mask_path=mask_path, saturation_value=config.calibration.saturation_value or None, axis=axis,
                    shaping_method=config.pipeline.shaping_method, size=size, flatfield_path=flatfield_path,
                    evidence=config.pipeline.evidence if evidence is None else evidence)


def flatfield_wanted(mode: str, applied: bool | None) -> bool:
    """``calibration.flatfield``: apply the series' flatfield? (auto: only if the detector says it did not)."""
    return mode == "apply" or (mode == "auto" and applied is False)


_mask_cache: dict[str, np.ndarray] = {}


def _load_mask(path: str) -> np.ndarray:
    """A per-series map (pixel mask or flatfield) the daemon saved; cached, it is the same for every frame."""
    mask = _mask_cache.get(path)
    if mask is None:
        if len(_mask_cache) >= 4:
            _mask_cache.pop(next(iter(_mask_cache)))
        mask = _mask_cache[path] = np.load(path, allow_pickle=False)
    return mask


_prepared_cache: dict[tuple, cal.PreparedMap] = {}


def _prepared(job: FrameJob) -> cal.PreparedMap:
    """The series' sampling map with its mask and flatfield folded in; cached, it is the same for every frame."""
    key = (job.frame_geometry, job.training, job.method, job.mask_path, job.flatfield_path)
    prepared = _prepared_cache.get(key)
    if prepared is None:
        if len(_prepared_cache) >= 4:
            _prepared_cache.pop(next(iter(_prepared_cache)))
        sampling = cal.build_map(job.frame_geometry, job.training, job.method)
        mask = _load_mask(job.mask_path) if job.mask_path else None
        flatfield = _load_mask(job.flatfield_path) if job.flatfield_path else None
        prepared = _prepared_cache[key] = cal.prepare(sampling, pixel_mask=mask, flatfield=flatfield)
    return prepared


def _intensity(job: FrameJob, prepared: cal.PreparedMap) -> tuple[np.dtype, np.ndarray]:
    """(the frame's element type, its calibrated float intensity). A bslz4 frame under an area map
    is decoded straight to its non-zero usable pixels and binned from those (no dense frame: a 16M
    frame's decompression and a scan of its 18 M pixels for the non-zero ones become one pass in
    cache); any other frame is decompressed and calibrated densely."""
    frame = job.frame
    if isinstance(frame, CompressedFrame) and prepared.takes_nonzero:
        sparse = frame.nonzero(prepared.usable)
        if sparse is not None:
            indices, values = sparse
            return values.dtype, prepared.apply_nonzero(indices, values, saturation_value=job.saturation_value)
    frame = materialise(frame)
    return frame.dtype, prepared.apply(frame, saturation_value=job.saturation_value)


def _calibrate(job: FrameJob) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(the frame's element type, calibrated float intensity, 8-bit raw DP) of one job."""
    prepared = _prepared(job)
    dtype, intensity = _intensity(job, prepared)
    try:
        raw = cal.to_uint8(intensity)
    except cal.CalibrationError as exc:
        if exc.reason != "empty_frame":
            raise
        mask = _load_mask(job.mask_path) if job.mask_path else None
        why = cal.explain_empty(materialise(job.frame), prepared.sampling, pixel_mask=mask,
                                saturation_value=job.saturation_value, method=job.method)
        raise cal.CalibrationError("empty_frame", f"nothing on the training grid: {why}") from None
    return dtype, intensity, raw


def process_frame(job: FrameJob) -> np.ndarray:
    """Decompress, calibrate and shape one frame: uint8 (size, size, 3).

    Raises BadMessage (a corrupt compressed frame), CalibrationError or ShapingError."""
    _, _, raw = _calibrate(job)
    return shaping.shape(raw, job.axis, method=job.shaping_method, size=job.size)


def frame_evidence(intensity: np.ndarray, job: FrameJob, *, counts: bool):
    """Symmetry evidence of the calibrated float frame (counts on the training grid; never raises
    on bad data: an undecidable frame says why)."""
    from xtalsym.evidence import analyse_frame

    t = job.training
    q_per_pixel = t.pixel_size_m / (t.distance_m * t.wavelength_m) * 1e-10
    return analyse_frame(intensity, axis=job.axis, q_per_pixel=q_per_pixel, counts=counts)


def shape_timed(job: FrameJob) -> tuple[np.ndarray | None, float, float, object, float, float]:
    """Calibrate, shape and (``job.evidence``) measure the evidence of one frame in a worker:
    (shaped, calibrate+shape seconds, its CPU seconds in the worker's thread (the stage's cost on
    a shared machine), FrameEvidence or None, evidence seconds, evidence CPU seconds). With a
    ``job.result_slot`` the shaped DP is written there and ``shaped`` is None."""
    t0, c0 = time.perf_counter(), time.thread_time()
    dtype, intensity, raw = _calibrate(job)
    shaped = shaping.shape(raw, job.axis, method=job.shaping_method, size=job.size)
    if job.result_slot is not None and result_slots.write(job.result_slot, shaped):
        shaped = None
    t1, c1 = time.perf_counter(), time.thread_time()
    if not job.evidence:
        return shaped, t1 - t0, c1 - c0, None, 0.0, 0.0
    found = frame_evidence(intensity, job, counts=bool(np.issubdtype(dtype, np.integer)))
    return shaped, t1 - t0, c1 - c0, found, time.perf_counter() - t1, time.thread_time() - c1


def init_worker(log_queue=None, level: int = logging.INFO) -> None:
    """One thread per shaping worker: the pool is the parallelism; OpenCV's and BLAS's own
    per-core thread pools inside every worker would oversubscribe the cores.

    ``log_queue``: the daemon's queue for this process's log records, so that a worker's
    warning (e.g. a geometry that covers little of the training grid) reaches the daemon's
    handlers with level and timestamp instead of a bare line on stderr."""
    import cv2
    from threadpoolctl import threadpool_limits

    if log_queue is not None:
        import logging.handlers

        root = logging.getLogger()
        root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
        root.setLevel(level)
        logging.captureWarnings(True)  # Python warnings (numpy, OpenCV bindings) too, as "py.warnings" records

    cv2.setNumThreads(1)
    threadpool_limits(1)


def warm(_: int) -> int:
    return os.getpid()


