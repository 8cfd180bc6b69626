"""The pipeline: socket -> decode -> series -> (workers: calibrate + shape) -> assemble ->
micro-batched inference -> open-set match -> publish.

Threads and processes (docs/DAEMON.md, "Inside the daemon"):

* **ingest thread** (owns the frame socket): receive, decode (pure decoders), series
  state machine, sample/axis identification, then submits the frame to the worker pool.
  It never calibrates or shapes. At most ``queue_size`` frames are in the workers at once
  (a semaphore): when they are all busy the ingest thread waits, ZeroMQ buffers up to
  ``receive_hwm`` messages and the detector's PUSH then blocks: back-pressure, no loss.
* **worker processes** (``workers``, spawned): calibrate to the training grid and shape
  (:mod:`xtalsym.daemon.workers`). The sampling map is built once per series geometry in each
  worker (cached); the series' pixel mask travels once, through a file.
* **inference thread** (owns the PUB socket): assembles views into samples, micro-batches
  requests (flush at ``max_batch`` requests or when the oldest waited
  ``latency_budget_seconds``, whichever first), runs the backend, queries the reference
  index, publishes, closes timed-out samples and sends metrics.

Bad frames (BadMessage, CalibrationError, ShapingError, AssemblyError, series drops) are
counted by reason (``Metrics.bad``), logged, and skipped: the daemon never dies on a frame.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import logging
import multiprocessing
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from xtalsym import shaping
from xtalsym.daemon import calibrate as cal
from xtalsym.daemon.assemble import AXES, Assembler, AssemblyError, Request, View, identify
from xtalsym.daemon.ingest import Accepted, Dropped, SeriesTracker, open_frame_socket
from xtalsym.daemon.metrics import Metrics
from xtalsym.daemon.protocols import BadMessage, decode
from xtalsym.daemon.publish import Publisher, open_set_result, prediction_message
from xtalsym.daemon.workers import FrameJob, init_worker, shape_timed, warm
from xtalsym.inference.base import InferenceResult, combine_views, supports_views

log = logging.getLogger(__name__)

_STOP = object()


# --------------------------------------------------------------------------- pipeline


def warm_backend(backend, size: int, max_batch: int, *, per_view: bool = False) -> None:
    """Run one full micro-batch of blank views before serving. The backend's memory then holds
    its largest batch from the start: ONNX Runtime's CPU arena grows with the batch size and
    never shrinks (measured: +82 MiB from batch 1 to 16 with the shipped model), which a soak
    otherwise shows as RSS growth at the first backlog, and the first large batch does not pay
    for the allocation. It also proves the backend runs before the daemon says it is ready.
    ``per_view``: the per-view graph is what will serve, warm it (a batch of max_batch
    requests holds at most 3 × max_batch new views, usually max_batch)."""
    t0 = time.perf_counter()
    if per_view:
        backend.run_views(np.zeros((max_batch, 3, size, size), np.uint8), np.arange(max_batch) % 3)
    else:
        backend.run(np.zeros((max_batch, 3, 3, size, size), np.uint8), np.ones((max_batch, 3), bool))
    log.info("backend warmed with a batch of %d%s in %.2f s", max_batch, " views" if per_view else "",
             time.perf_counter() - t0)


def uses_per_view(backend, mode: str) -> bool:
    """Whether the inference thread runs each view once (``pipeline.view_inference``):
    "auto" when the backend has a per-view graph, "off" never."""
    return mode == "auto" and supports_views(backend)


@dataclass
class _Done:
    view_meta: dict
    future: cf.Future


class Pipeline:
    """Runs the daemon's threads; :meth:`start`, then :meth:`stop` (drains) or :meth:`wait`."""

    def __init__(self, config, *, bundle, backend, index=None, context: zmq.Context | None = None) -> None:
        self.config = config
        self.bundle = bundle
        self.backend = backend
        self.index = index
        self.context = context or zmq.Context.instance()
        self.training = cal.TrainingGeometry.from_bundle(bundle)
        self.size = int(bundle.image_size)
        self.metrics = Metrics()
        self.tracker = SeriesTracker(geometry_override=config.geometry_override,
                                     frames_before_start=config.ingest.frames_before_start)
        self.assembler = Assembler(timeout_seconds=config.assembly.timeout_seconds,
                                   publish_partial=config.assembly.publish_partial,
                                   max_open=config.assembly.max_open_samples)
        self._stop_intake = threading.Event()
        self._results: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(config.pipeline.queue_size)
        # futures in the workers, oldest first (a dict keeps insertion order: drop_oldest cancels from the front)
        self._inflight: dict[cf.Future, None] = {}
        self._inflight_lock = threading.Lock()
        self._overload_cancelled: set[cf.Future] = set()  # their slots went to newer frames
        self._cancel_lock = threading.Lock()  # a future is in that set only while surely cancelled
        self._tmp = tempfile.TemporaryDirectory(prefix="xtalsym-daemon-")
        self._mask_files: dict[tuple[int, str], str | None] = {}
        self._geometry: dict[tuple[int, tuple], cal.FrameGeometry] = {}
        self.model = {
            "model_id": bundle.model_id,
            "name": (bundle.card or {}).get("name"),
            "backend": getattr(backend, "name", "?"),
            "device": getattr(backend, "device", "?"),
            "precision": getattr(backend, "precision", "?"),
            "classes": len(bundle.classes),
            "index": None if index is None else {"entries": len(index), "model_id": index.model_id},
        }
        self.frame_socket: zmq.Socket | None = None
        self.publisher: Publisher | None = None
        self.pool: cf.ProcessPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        self.finished = threading.Event()
        # time.monotonic() of each loop's latest iteration (the systemd watchdog reads them)
        self.heartbeats: dict[str, float] = {"ingest": time.monotonic(), "inference": time.monotonic()}
        self._swaps: queue.Queue = queue.Queue()
        self.monitor = None  # the HTTP server of /metrics, /healthz, /readyz (httpd.MonitorServer)
        self._started = threading.Event()
        self._pending_batch = 0
        self._backend_generation = 0  # which backend computed a View.inferred
        self.metrics.prom.track_model(lambda: self.model)  # read at scrape time: follows swap()
        self.metrics.prom.track_queues(
            {"workers": lambda: len(self._inflight), "results": self._results.qsize,
             "open_samples": lambda: len(self.assembler.open), "batch": lambda: self._pending_batch},
            {"workers": lambda: config.pipeline.queue_size, "batch": lambda: self.config.pipeline.max_batch})

    # ---- life cycle

    def start(self) -> None:
        """Open sockets (so the endpoints are known), start workers and threads."""
        c = self.config
        if c.metrics.enabled:  # first: a port in use fails before workers are spawned; /readyz says 503 till then
            from xtalsym.daemon.httpd import MonitorServer

            self.monitor = MonitorServer(self, address=c.metrics.address, port=c.metrics.port,
                                         heartbeat_timeout=c.metrics.heartbeat_timeout_seconds)
            log.info("metrics and health on %s (/metrics, /healthz, /readyz)", self.monitor.url)
        self.publisher = Publisher(self.context, address=c.publish.address, mode=c.publish.mode,
                                   topic=c.publish.topic, send_hwm=c.publish.send_hwm,
                                   curve_secret_key_file=c.publish.curve_secret_key_file,
                                   curve_public_keys_dir=c.publish.curve_public_keys_dir)
        self.frame_socket = open_frame_socket(self.context, socket=c.ingest.socket, mode=c.ingest.mode,
                                              address=c.ingest.address, receive_hwm=c.ingest.receive_hwm)
        self.pool = self._make_pool()
        list(self.pool.map(warm, range(c.pipeline.workers)))  # spawn now, not on the first frame
        log.info("%d shaping workers ready", c.pipeline.workers)
        warm_backend(self.backend, self.size, c.pipeline.max_batch,
                     per_view=uses_per_view(self.backend, c.pipeline.view_inference))
        log.info("inference: %s", "each view once (per-view graph; predictions from the sums of its rows)"
                 if uses_per_view(self.backend, c.pipeline.view_inference)
                 else "the whole graph over the present views of every request")
        self._threads = [
            threading.Thread(target=self._ingest_loop, name="xtalsym-ingest", daemon=True),
            threading.Thread(target=self._inference_loop, name="xtalsym-inference", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._started.set()

    # ---- health (for /healthz, /readyz and the systemd watchdog)

    def heartbeat(self) -> dict[str, float]:
        """Seconds since each processing loop (``heartbeats``) last went round."""
        now = time.monotonic()
        return {loop: now - t for loop, t in self.heartbeats.items()}

    @property
    def state(self) -> str:
        """``starting``, ``running``, ``stopping`` (intake closed, draining) or ``stopped``."""
        if self.finished.is_set():
            return "stopped"
        if self._stop_intake.is_set():
            return "stopping"
        return "running" if self._started.is_set() else "starting"

    @property
    def ready(self) -> bool:
        """Bundle loaded, sockets open, workers spawned, loops started, not shutting down."""
        return self.state == "running"

    def _make_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.config.pipeline.workers, initializer=init_worker,
                                      mp_context=multiprocessing.get_context("spawn"))

    @property
    def ingest_endpoint(self) -> str:
        from xtalsym.daemon.ingest import endpoint

        return endpoint(self.frame_socket)

    @property
    def publish_endpoint(self) -> str:
        return self.publisher.endpoint

    def stop(self, timeout: float = 30.0) -> None:
        """Stop intake, finish every frame in flight, publish open samples, close everything."""
        self._stop_intake.set()
        self.finished.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.monitor is not None:
            self.monitor.close()
        self._tmp.cleanup()

    def wait(self) -> None:
        self.finished.wait()

    def swap(self, *, config, bundle, backend, index) -> cf.Future:
        """Replace config, bundle, backend and index between two batches of the inference thread.

        The caller has verified them and checked that the bundle takes the same shaped input
        (image size, training geometry). Views already shaped and open samples carry over.
        The future resolves to the old (bundle, backend, index) once the swap is applied.
        """
        future: cf.Future = cf.Future()
        self._swaps.put((future, config, bundle, backend, index))
        return future

    def _apply_swaps(self) -> None:
        while True:
            try:
                future, config, bundle, backend, index = self._swaps.get_nowait()
            except queue.Empty:
                return
            old = (self.bundle, self.backend, self.index)
            self.bundle, self.backend, self.index = bundle, backend, index
            self._backend_generation += 1  # per-view results of the old model are not reused
            self.model = {**self.model, "model_id": bundle.model_id, "name": (bundle.card or {}).get("name"),
                          "backend": getattr(backend, "name", "?"), "device": getattr(backend, "device", "?"),
                          "precision": getattr(backend, "precision", "?"), "classes": len(bundle.classes),
                          "index": None if index is None else {"entries": len(index), "model_id": index.model_id}}
            self.config = config
            future.set_result(old)

    # ---- ingest thread

    def _ingest_loop(self) -> None:
        sock = self.frame_socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop_intake.is_set():
                self.heartbeats["ingest"] = time.monotonic()
                if not poller.poll(100):
                    continue
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue
                received = time.time()
                try:
                    self._handle(frames, received)
                except Exception as exc:  # noqa: BLE001 - the loop must survive any frame
                    self.metrics.bad_frame("internal_error", f"{type(exc).__name__}: {exc}")
                    log.exception("unexpected error on a frame")
            self._drain_socket(sock)
        finally:
            sock.close(linger=0)
            self._drain_workers()
            self._results.put(_STOP)

    def _drain_socket(self, sock: zmq.Socket) -> None:
        """At stop: finish the messages the socket has already received (at most receive_hwm),
        so that stopping intake loses nothing the detector has already handed over."""
        for _ in range(self.config.ingest.receive_hwm):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(frames, time.time())
            except Exception as exc:  # noqa: BLE001
                self.metrics.bad_frame("internal_error", f"{type(exc).__name__}: {exc}")

    def _handle(self, frames: list, received: float) -> None:
        m = self.metrics
        m.count("messages")
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            event = decode(self.config.ingest.protocol, frames, max_pixels=self.config.ingest.max_pixels)
        except BadMessage as exc:
            m.bad_frame(exc.reason, str(exc))
            return
        finally:
            m.stage("decode", time.perf_counter() - t0, time.thread_time() - c0)
        m.count("decoded")
        outcome = self.tracker.handle(event)
        if outcome is None:
            return
        if isinstance(outcome, Dropped):
            if outcome.reason == "stale_end":
                m.count("stale_end")
                log.info("%s", outcome.message)
            else:
                m.bad_frame(outcome.reason, outcome.message)
            return
        self._submit(outcome, received)

    def _submit(self, accepted: Accepted, received: float) -> None:
        c, m = self.config, self.metrics
        series, image = accepted.series, accepted.image
        m.count("images")
        channel = c.ingest.channel or next(
            (ch for ch in series.channels if ch in image.data), next(iter(image.data), None))
        frame = image.data.get(channel) if channel else None
        if frame is None:
            m.bad_frame("no_channel", f"image {image.image_id} has no channel {channel!r} "
                        f"(channels: {', '.join(image.data) or 'none'})")
            return
        try:
            sample_key, axis = identify(
                series_id=image.series_id, series_unique_id=image.series_unique_id, image_id=image.image_id,
                user_data=image.user_data, axis_from=c.assembly.axis_from, axis_key=c.assembly.axis_key,
                axis_order=tuple(c.assembly.axis_order), sample_key=c.assembly.sample_key)
            geometry = self._frame_geometry(series, frame.shape)
        except (AssemblyError, cal.CalibrationError) as exc:
            m.bad_frame(exc.reason, str(exc))
            return
        mask_path = self._mask_file(series, channel, frame.shape) if c.calibration.use_stream_mask else None
        job = FrameJob(frame=frame, frame_geometry=geometry, training=self.training, method=c.calibration.method,
                       mask_path=mask_path, saturation_value=c.calibration.saturation_value or None, axis=axis,
                       shaping_method=c.pipeline.shaping_method, size=self.size,
                       flatfield_path=self._flatfield_file(series, channel, frame.shape))
        meta = {"sample_key": sample_key, "axis": axis, "series_id": image.series_id, "image_id": image.image_id,
                "series_unique_id": image.series_unique_id, "user_data": image.user_data, "received": received}
        if not self._take_slot():
            m.bad_frame("overload", f"image {image.image_id} of series {image.series_id} dropped: {c.pipeline.queue_size} "
                        f"frames already waiting for the workers (overload = {c.pipeline.overload!r})")
            return
        try:
            future = self.pool.submit(shape_timed, job)
        except cf.BrokenExecutor:  # a worker died (its frames are counted worker_crashed in _add_view)
            self._replace_pool()
            future = self.pool.submit(shape_timed, job)
        with self._inflight_lock:
            self._inflight[future] = None
        future.add_done_callback(lambda f, meta=meta: self._done(meta, f))

    def _take_slot(self) -> bool:
        """A place in the workers for one frame, per ``pipeline.overload``; False = drop the new frame."""
        policy = self.config.pipeline.overload
        if policy == "block":  # back-pressure: ZeroMQ buffers receive_hwm messages, then the sender blocks
            self._slots.acquire()
            return True
        if self._slots.acquire(blocking=False):
            return True
        if policy == "drop_oldest":
            with self._inflight_lock:
                oldest_first = list(self._inflight)
            for future in oldest_first:
                with self._cancel_lock:
                    self._overload_cancelled.add(future)  # before cancel(): its callback may run at once
                    if future.cancel():  # still queued, not in a worker yet: its slot passes to the new frame
                        return True
                    self._overload_cancelled.discard(future)
        return False

    def _replace_pool(self) -> None:
        log.error("a shaping worker died; replacing the worker pool")
        self.metrics.count("pool_restarts")
        broken, self.pool = self.pool, self._make_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def _done(self, meta: dict, future: cf.Future) -> None:
        # queued before it leaves _inflight: _drain_workers then knows every result is queued
        self._results.put(_Done(meta, future))
        with self._inflight_lock:
            self._inflight.pop(future, None)
        # the slot is released when the inference thread takes the result (_add_view): frames in
        # the workers plus results not yet assembled stay within queue_size, even when inference lags

    def _drain_workers(self) -> None:
        # cf.wait returns before done-callbacks run, so wait for _inflight to empty instead
        while True:
            with self._inflight_lock:
                pending = list(self._inflight)
            if not pending:
                return
            cf.wait(pending, timeout=0.1)
            time.sleep(0.001)

    def _frame_geometry(self, series, frame_shape) -> cal.FrameGeometry:
        key = (series.token, tuple(frame_shape))
        g = self._geometry.get(key)
        if g is None:
            g = cal.resolve_geometry(series.stream_geometry, self.config.geometry_override, frame_shape=frame_shape)
            self._geometry[key] = g
            log.info("series %s calibration geometry: %s", series.series_id, g)
        return g

    def _mask_file(self, series, channel: str, shape) -> str | None:
        key = (series.token, channel)
        if key not in self._mask_files:
            mask = series.mask_for(channel)
            path = None
            if mask is not None:
                mask = np.asarray(mask)
                if mask.shape != tuple(shape):
                    log.warning("series %s: pixel mask %s does not match the frames %s; mask ignored",
                                series.series_id, mask.shape, tuple(shape))
                else:
                    path = str(Path(self._tmp.name) / f"mask-{series.token}-{len(self._mask_files)}.npy")
                    np.save(path, (mask != 0).astype(np.uint8), allow_pickle=False)
            self._mask_files[key] = path
        return self._mask_files[key]

    def _flatfield_file(self, series, channel: str, shape) -> str | None:
        """The series' flatfield for ``channel`` as a file for the workers, when ``calibration.flatfield``
        says to apply it (auto: only if the detector says it did not); None otherwise."""
        key = (series.token, channel, "flatfield")
        if key not in self._mask_files:
            mode, flatfield, path = self.config.calibration.flatfield, series.flatfield_for(channel), None
            wanted = mode == "apply" or (mode == "auto" and series.flatfield_applied is False)
            if flatfield is not None and wanted:
                flatfield = np.asarray(flatfield, dtype=np.float32)
                if flatfield.shape != tuple(shape):
                    log.warning("series %s: flatfield %s does not match the frames %s; not applied",
                                series.series_id, flatfield.shape, tuple(shape))
                else:
                    path = str(Path(self._tmp.name) / f"flatfield-{series.token}-{len(self._mask_files)}.npy")
                    np.save(path, flatfield, allow_pickle=False)
                    log.info("series %s: applying the stream's flatfield to channel %s (calibration.flatfield = %r)",
                             series.series_id, channel, mode)
            self._mask_files[key] = path
        return self._mask_files[key]

    # ---- inference thread

    def _inference_loop(self) -> None:
        c = self.config.pipeline
        pending: list[Request] = []
        oldest = 0.0
        next_metrics = time.monotonic() + (self.config.publish.metrics_interval_seconds or float("inf"))
        stopping = False
        try:
            while True:
                now = self.heartbeats["inference"] = time.monotonic()
                self._apply_swaps()  # between batches, in this thread: a batch never mixes two models
                c = self.config.pipeline
                timeout = 0.1
                if pending:
                    timeout = max(0.0, oldest + c.latency_budget_seconds - now)
                deadline = self.assembler.next_deadline()
                if deadline is not None:
                    timeout = min(timeout, max(0.0, deadline - time.time()))
                item = None
                if not stopping:
                    try:
                        item = self._results.get(timeout=timeout)
                    except queue.Empty:
                        pass
                if item is _STOP:
                    stopping = True
                elif item is not None:
                    for request in self._add_view(item):
                        if not pending:
                            oldest = time.monotonic()
                        pending.append(request)
                for request in self.assembler.expire(time.time()):
                    self.metrics.count("timed_out_samples")
                    if not pending:
                        oldest = time.monotonic()
                    pending.append(request)
                if stopping:
                    pending.extend(self.assembler.close_all("shutdown"))
                now = time.monotonic()
                if pending and (len(pending) >= c.max_batch or now - oldest >= c.latency_budget_seconds or stopping):
                    while pending:
                        batch, pending = pending[: c.max_batch], pending[c.max_batch:]
                        self._classify(batch)
                        if not stopping:
                            break
                    oldest = time.monotonic()
                self._pending_batch = len(pending)
                if now >= next_metrics:
                    self.publisher.send_metrics(self.metrics_message())
                    next_metrics = now + self.config.publish.metrics_interval_seconds
                if stopping and not pending:
                    break
        except Exception:  # pragma: no cover - a bug; log it, never hang the service
            log.exception("inference loop failed")
        finally:
            try:
                self.publisher.send_metrics(self.metrics_message())
                self.publisher.close()
            finally:
                self.finished.set()

    def _add_view(self, done: _Done) -> list[Request]:
        meta = done.view_meta
        with self._cancel_lock:
            overloaded = done.future in self._overload_cancelled
            self._overload_cancelled.discard(done.future)
        if overloaded:  # drop_oldest cancelled it; a newer frame has its slot
            self.metrics.bad_frame("overload", f"image {meta['image_id']} of series {meta['series_id']} dropped "
                                   "for a newer frame (overload = 'drop_oldest')")
            return []
        self._slots.release()
        try:
            shaped, seconds, cpu_seconds = done.future.result()
        except (cal.CalibrationError, shaping.ShapingError) as exc:
            reason = getattr(exc, "reason", "shaping_error")
            self.metrics.bad_frame(reason, f"image {meta['image_id']} of series {meta['series_id']}: {exc}")
            return []
        except cf.CancelledError:
            self.metrics.bad_frame("cancelled", f"image {meta['image_id']}: cancelled at shutdown")
            return []
        except BrokenProcessPool as exc:  # a worker process died (killed, out of memory): its frames are lost
            self.metrics.bad_frame("worker_crashed", f"image {meta['image_id']}: {exc}")
            return []
        except Exception as exc:  # noqa: BLE001 - a bug in a worker: count, go on
            self.metrics.bad_frame("worker_error", f"image {meta['image_id']}: {type(exc).__name__}: {exc}")
            return []
        self.metrics.stage("calibrate_shape", seconds, cpu_seconds)
        self.metrics.count("views")
        view = View(shaped=shaped, **meta)
        requests = self.assembler.add(view, time.time())
        overflowed = sum(r.closed_by == "overflow" for r in requests)
        if overflowed:  # max_open_samples reached: the oldest open samples were closed as partial
            self.metrics.count("overflowed_samples", overflowed)
        return requests

    def _infer_whole(self, batch: list[Request]) -> InferenceResult:
        """The previous path: the whole graph over each request's present views (a view is
        recomputed in every request of its sample)."""
        size = self.size
        x = np.zeros((len(batch), 3, 3, size, size), np.uint8)
        present = np.zeros((len(batch), 3), bool)
        for i, request in enumerate(batch):
            x[i], present[i] = request.tensors(size)
        self.metrics.count("views_inferred", int(present.sum()))
        return self.backend.run(x, present)

    def _infer_by_views(self, batch: list[Request]) -> InferenceResult:
        """Each view through the per-view graph once: views this backend has not run yet go in
        one batch, their rows are kept on the View, and every request's logits are the sum of
        its views' rows (as the whole graph sums them), its embeddings their rows."""
        generation = self._backend_generation
        todo: dict[int, View] = {}
        for request in batch:
            for view in request.views.values():
                if view.inferred is None or view.inferred[0] != generation:
                    todo[id(view)] = view
        if todo:
            views = list(todo.values())
            out = self.backend.run_views(np.stack([v.shaped.transpose(2, 0, 1) for v in views]),
                                         np.array([AXES.index(v.axis) for v in views], np.int64))
            for k, view in enumerate(views):
                view.inferred = (generation, out.logits[k], out.embeddings[k])
            self.metrics.count("views_inferred", len(views))
        terms = [[r.views[a].inferred[1] if a in r.views else None for a in AXES] for r in batch]
        features = [[r.views[a].inferred[2] if a in r.views else None for a in AXES] for r in batch]
        return combine_views(terms, features, len(self.backend.classes))

    def _classify(self, batch: list[Request]) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if uses_per_view(self.backend, self.config.pipeline.view_inference):
                result = self._infer_by_views(batch)
            else:
                result = self._infer_whole(batch)
        except Exception as exc:  # noqa: BLE001 - keep serving; every request of the batch is counted
            log.exception("inference failed on a batch of %d", len(batch))
            for request in batch:
                self.metrics.bad_frame("inference_error", f"sample {request.sample_key}: {exc}")
            return
        self.metrics.stage("infer", time.perf_counter() - t0, time.thread_time() - c0)
        open_sets: list[Any] = [None] * len(batch)
        if self.index is not None and self.config.index.enabled:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                from xtalsym.index.scoring import normalise_views

                queries = self.index.query(normalise_views(result.embeddings), probabilities=result.probabilities,
                                           classes=self.backend.classes, k=self.config.index.neighbours)
                open_sets = [open_set_result(q) for q in queries]
                self.metrics.stage("match", time.perf_counter() - t0, time.thread_time() - c0)
            except Exception as exc:  # noqa: BLE001
                self.metrics.bad_frame("index_error", f"{type(exc).__name__}: {exc}")
        self.metrics.batch(len(batch))
        for request, probs, open_set in zip(batch, result.probabilities, open_sets):
            message = prediction_message(request, probabilities=probs, classes=self.backend.classes,
                                         model=self.model, open_set=open_set)
            if self.publisher.send(message):
                self.metrics.published(request, message)
            else:  # the publisher never blocks: a message ZeroMQ refuses is counted, not waited for
                self.metrics.count("publish_dropped")

    def metrics_message(self) -> dict:
        snap = self.metrics.snapshot()
        snap["series"] = dict(self.tracker.events)
        snap["open_samples"] = len(self.assembler.open)
        snap["duplicate_axes"] = self.assembler.duplicates
        snap["model_id"] = self.bundle.model_id
        return snap
