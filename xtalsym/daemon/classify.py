"""``xtalsym classify``: recorded frames -> the daemon's predictions, as JSON lines and CSV.

Scientists classify what they recorded after the beamtime. Frames come from
:mod:`xtalsym.daemon.recorded` (EIGER/NeXus HDF5, TIFF, CBF, PNG, .npy) and go through the
daemon's own code, not a copy of it:

* geometry: the file's, overridden key by key by the TOML's ``[geometry]``
  (:func:`calibrate.resolve_geometry`, as for a stream's start message);
* per frame: :func:`xtalsym.daemon.workers.process_frame` (decompress, calibrate, shape),
  in ``pipeline.workers`` processes like the daemon's when more than one;
* axis and sample: :func:`xtalsym.daemon.assemble.identify` with the ``[assembly]``
  settings; recorded frames carry no user_data, so the axis is ``axis_order[image_id % 3]``
  (what the daemon does without user_data), the sample ``"<file name>#<n>:<image_id // 3>"``
  (n = the series' number in this run, as the daemon numbers the series it opens);
* sampling method: ``calibration.method``, ``auto`` resolved per series as the daemon does;
* samples: :class:`~xtalsym.daemon.assemble.Assembler`; a series' open samples are closed at
  its end (``closed_by = "end"``);
* inference, open-set match and the message: :func:`xtalsym.daemon.infer.classify_batch`
  in micro-batches of ``pipeline.max_batch``.

Each final prediction (every prediction with ``--partial``) is one JSON line of schema
``xtalsym.prediction/2`` (docs/DAEMON.md) with ``user_data = {"source": "<file>[:dataset[i]]"}``
of its triggering frame, and one CSV row (:data:`CSV_COLUMNS`). Bad frames are counted by
reason, logged, and skipped, as in the daemon; the summary lists them.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import logging
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtalsym import shaping
from xtalsym.daemon import calibrate as cal
from xtalsym.daemon.assemble import Assembler, AssemblyError, Request, View, identify
from xtalsym.daemon.infer import classify_batch, load_fusion, model_info
from xtalsym.daemon.protocols import BadMessage
from xtalsym.daemon.publish import encode
from xtalsym.daemon.recorded import RecordedError, RecordedSeries, open_recorded
from xtalsym.daemon.workers import flatfield_wanted, frame_job, init_worker, process_frame

log = logging.getLogger(__name__)

CSV_COLUMNS = ("sample_id", "status", "closed_by", "axes", "image_ids", "sources",
               "space_group", "symbol", "crystal_system", "probability",
               "space_group_2", "probability_2", "space_group_3", "probability_3",
               "open_set_space_group", "open_set_unknown", "open_set_by", "top_similarity", "model_id")


@dataclass
class ClassifySummary:
    series: int = 0
    frames: int = 0
    views: int = 0
    written: int = 0  # predictions written
    samples: int = 0  # final predictions
    complete: int = 0
    bad_frames: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0

    def line(self) -> str:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(self.bad_frames.items())) or "none"
        return (f"classified {self.frames} frames of {self.series} series in {self.seconds:.1f} s: "
                f"{self.samples} samples ({self.complete} complete), {self.written} predictions written; "
                f"bad frames: {bad}")


def csv_row(message: dict) -> dict:
    top = message["top"] + [{}] * 3
    open_set = message.get("open_set") or {}
    sources = [v.get("source", "") for v in message.get("_sources", [])]
    return {
        "sample_id": message["sample_id"], "status": message["status"], "closed_by": message["closed_by"],
        "axes": "".join(message["axes"]), "image_ids": " ".join(str(f["image_id"]) for f in message["frames"]),
        "sources": " ".join(sources),
        "space_group": top[0].get("space_group"), "symbol": top[0].get("symbol"),
        "crystal_system": top[0].get("crystal_system"), "probability": top[0].get("probability"),
        "space_group_2": top[1].get("space_group"), "probability_2": top[1].get("probability"),
        "space_group_3": top[2].get("space_group"), "probability_3": top[2].get("probability"),
        "open_set_space_group": open_set.get("space_group"), "open_set_unknown": open_set.get("unknown"),
        "open_set_by": open_set.get("by"), "top_similarity": open_set.get("top_similarity"),
        "model_id": message["model"]["model_id"],
    }


class _Writer:
    """JSON lines (+ CSV) of the predictions; ``seq`` and ``published`` set like the publisher's."""

    def __init__(self, jsonl: Path, csv_path: Path | None, *, partial: bool) -> None:
        self.partial = partial
        self.seq = 0
        self._jsonl = jsonl.open("w", encoding="utf-8")
        self._csv_file = csv_path.open("w", newline="", encoding="utf-8") if csv_path else None
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS) if self._csv_file else None
        if self._csv:
            self._csv.writeheader()

    def write(self, request: Request, message: dict) -> bool:
        if not (message["final"] or self.partial):
            return False
        message["timestamps"]["published"] = time.time()
        message["seq"] = self.seq
        self.seq += 1
        self._jsonl.write(encode(message).decode() + "\n")
        if self._csv:
            sources = [request.views[a].user_data or {} for a in request.axes]
            self._csv.writerow(csv_row({**message, "_sources": sources}))
        return True

    def close(self) -> None:
        self._jsonl.close()
        if self._csv_file:
            self._csv_file.close()


def _series_geometry(series: RecordedSeries, config) -> cal.FrameGeometry:
    override = config.geometry_override
    try:
        geometry = cal.resolve_geometry(series.geometry, override, frame_shape=series.frame_shape)
    except cal.CalibrationError as exc:
        if exc.reason == "missing_geometry":
            raise RecordedError(f"{series.name}: {exc.message}: set them in the [geometry] section of the "
                                "configuration (--config FILE)") from None
        raise RecordedError(f"{series.name}: {exc}") from None
    for key in sorted(series.geometry_from):
        if key not in override:
            log.info("%s: %s from %s", series.name, key, series.geometry_from[key])
    for key in sorted(override):
        log.info("%s: %s = %r from the configuration's [geometry]", series.name, key, override[key])
    return geometry


def _save(directory: Path, name: str, array: np.ndarray) -> str:
    path = directory / name
    np.save(path, array, allow_pickle=False)
    return str(path)


class _Shaper:
    """process_frame in this process (workers <= 1) or in a pool of spawned workers, in order,
    with at most 2 x workers frames in flight."""

    def __init__(self, workers: int) -> None:
        self.pool = None
        self.window = 1
        if workers > 1:
            self.pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=init_worker,
                                               mp_context=multiprocessing.get_context("spawn"))
            self.window = 2 * workers

    def map(self, items: Iterable[tuple[object, object]]) -> Iterator[tuple[object, np.ndarray | None, Exception | None]]:
        """(meta, job or None) -> (meta, shaped or None, error or None), in order."""
        if self.pool is None:
            for meta, job in items:
                if job is None:
                    yield meta, None, None
                    continue
                try:
                    yield meta, process_frame(job), None
                except (cal.CalibrationError, shaping.ShapingError, BadMessage) as exc:
                    yield meta, None, exc
            return
        pending: collections.deque = collections.deque()
        for meta, job in items:
            pending.append((meta, None if job is None else self.pool.submit(process_frame, job)))
            while len(pending) >= self.window:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    @staticmethod
    def _result(meta, future):
        if future is None:
            return meta, None, None
        try:
            return meta, future.result(), None
        except (cal.CalibrationError, shaping.ShapingError, BadMessage) as exc:
            return meta, None, exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def classify_recorded(paths: Sequence[str | Path], *, config, components, jsonl_path: str | Path,
                      csv_path: str | Path | None = None, partial: bool = False,
                      progress: bool | None = None) -> ClassifySummary:
    """Classify every frame of ``paths``; ``components`` = (bundle, backend, index) as
    :func:`xtalsym.daemon.service.load_components` returns. ``progress`` None: a bar when
    stderr is a terminal."""
    from tqdm import tqdm

    bundle, backend, index = components
    if bundle.representation != "shaped":
        raise RecordedError(f"bundle {bundle.path}: its model classifies {bundle.representation} diffraction "
                            "patterns; classify feeds shaped ones (use a shaped-DP model such as msdn)")
    t_start = time.perf_counter()
    all_series = open_recorded(paths)  # every file checked before anything is classified
    training = cal.TrainingGeometry.from_bundle(bundle)
    size = int(bundle.image_size)
    fusion = load_fusion(bundle)
    model = model_info(bundle, backend, index, fusion)
    geometries = [_series_geometry(s, config) for s in all_series]
    summary = ClassifySummary(series=len(all_series))
    c = config
    writer = _Writer(Path(jsonl_path), Path(csv_path) if csv_path else None, partial=partial)
    shaper = _Shaper(int(c.pipeline.workers))
    bar = tqdm(total=sum(s.n_frames for s in all_series), unit="frame", desc="classify", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    warned: set[str] = set()

    def bad(reason: str, message: str) -> None:
        summary.bad_frames[reason] += 1
        n = summary.bad_frames[reason]
        log.log(logging.WARNING if n <= 5 or n % 100 == 0 else logging.DEBUG, "bad frame (%s, #%d): %s",
                reason, n, message)

    def run(batch: list[Request]) -> None:
        for lo in range(0, len(batch), c.pipeline.max_batch):
            chunk = batch[lo:lo + c.pipeline.max_batch]
            result = classify_batch(chunk, backend=backend, size=size, model=model, index=index, fusion=fusion,
                                    index_enabled=c.index.enabled, neighbours=c.index.neighbours,
                                    index_query=c.index.query)
            if result.inference_error is not None:
                for request in chunk:
                    bad("inference_error", f"sample {request.sample_key}: {result.inference_error}")
                continue
            if result.index_error is not None:
                bad("index_error", f"{type(result.index_error).__name__}: {result.index_error}")
            if result.fusion_error is not None:
                bad("fusion_error", f"{type(result.fusion_error).__name__}: {result.fusion_error}")
            for request, message in result.messages:
                summary.written += writer.write(request, message)
                if request.final:
                    summary.samples += 1
                    summary.complete += request.status == "complete"

    try:
        with tempfile.TemporaryDirectory(prefix="xtalsym-classify-") as tmp:
            for series, geometry in zip(all_series, geometries):
                log.info("%s: %d frames %dx%d, geometry %s", series.name, series.n_frames, series.frame_shape[1],
                         series.frame_shape[0], geometry)
                mask_path = flatfield_path = None
                if series.pixel_mask is not None and c.calibration.use_stream_mask:
                    mask_path = _save(Path(tmp), f"mask-{series.series_id}.npy",
                                      (np.asarray(series.pixel_mask) != 0).astype(np.uint8))
                if series.flatfield is not None and flatfield_wanted(c.calibration.flatfield, series.flatfield_applied):
                    flatfield_path = _save(Path(tmp), f"flatfield-{series.series_id}.npy",
                                           np.asarray(series.flatfield, np.float32))
                    log.info("%s: applying the file's flatfield (calibration.flatfield = %r)", series.name,
                             c.calibration.flatfield)
                unique = Path(series.name).name
                method = c.calibration.method
                if method == "auto":  # as the daemon: from how many detector pixels one grid pixel spans
                    method = cal.auto_method(geometry, training)
                    log.info("%s: calibration method %s (one training-grid pixel spans %.2f detector pixels)",
                             series.name, method, cal.footprint_px(geometry, training))
                assembler = Assembler(timeout_seconds=float("inf"), publish_partial=partial,
                                      max_open=c.assembly.max_open_samples)

                def jobs(series=series, geometry=geometry, mask_path=mask_path, flatfield_path=flatfield_path,
                         unique=unique, method=method):
                    for frame in series.frames():
                        summary.frames += 1
                        meta = {"frame": frame, "received": time.time()}
                        if frame.error is not None:
                            bad(frame.error.split(":", 1)[0], f"{frame.where}: {frame.error}")
                            yield meta, None
                            continue
                        axis_from = c.assembly.axis_from
                        if axis_from in ("user_data", "auto"):  # recorded frames have none: image-id order
                            axis_from = "image_id"
                            if series.name not in warned:
                                warned.add(series.name)
                                log.info("%s: no user_data in recorded frames: axes in image-id order %s",
                                         series.name, "".join(c.assembly.axis_order))
                        try:
                            meta["key"], meta["axis"] = identify(
                                series_id=series.series_id, series_unique_id=unique, image_id=frame.image_id,
                                user_data=None, axis_from=axis_from, axis_key=c.assembly.axis_key,
                                axis_order=tuple(c.assembly.axis_order), sample_key=c.assembly.sample_key,
                                series_number=series.series_id)
                        except AssemblyError as exc:
                            bad(exc.reason, f"{frame.where}: {exc}")
                            yield meta, None
                            continue
                        yield meta, frame_job(c, frame=frame.data, geometry=geometry, training=training,
                                              axis=meta["axis"], size=size, mask_path=mask_path,
                                              flatfield_path=flatfield_path, method=method)

                pending: list[Request] = []
                for meta, shaped, error in shaper.map(jobs()):
                    bar.update(1)
                    frame = meta["frame"]
                    if error is not None:
                        bad(getattr(error, "reason", "shaping_error"), f"{frame.where}: {error}")
                    if shaped is None:
                        continue
                    summary.views += 1
                    view = View(sample_key=meta["key"], axis=meta["axis"], series_id=series.series_id,
                                image_id=frame.image_id, shaped=shaped, received=meta["received"],
                                user_data={"source": frame.where}, series_unique_id=unique)
                    pending.extend(assembler.add(view, time.time()))
                    if len(pending) >= c.pipeline.max_batch:
                        run(pending)
                        pending = []
                pending.extend(assembler.close_all("end"))
                run(pending)
    finally:
        bar.close()
        shaper.close()
        writer.close()
    summary.seconds = time.perf_counter() - t_start
    return summary
