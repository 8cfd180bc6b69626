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
* **inference thread** (owns the PUB socket unless the publish thread does): assembles views
  into samples, micro-batches requests (flush at ``max_batch`` requests or when the oldest
  waited ``latency_budget_seconds``, whichever first), runs the backend, closes timed-out
  samples; queries the reference index, publishes and sends metrics itself only with
  ``pipeline.publish_thread = false``.
* **combine thread**: combines the zones' symmetry evidence of each final sample, and of each
  partial one whose evidence the fusion weighs (milliseconds per request), before its request
  joins a batch, so that it runs beside the network (ONNX Runtime releases the GIL) instead of
  in front of every request of the batch.
* **publish thread** (``pipeline.publish_thread``; owns the PUB socket then): a batch's
  open-set match, fusion, messages and sends, while the inference thread runs the next
  batch's network; at most ``_PUBLISH_BACKLOG`` batches wait for it, in order.

Bad frames (BadMessage, CalibrationError, ShapingError, AssemblyError, series drops) are
counted by reason (``Metrics.bad``), logged, and skipped: the daemon never dies on a frame.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import logging
import logging.handlers
import multiprocessing
import queue
import threading
import time
from collections import Counter as Tally
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import zmq

from xtalsym import shaping
from xtalsym.daemon import calibrate as cal
from xtalsym.daemon.assemble import Assembler, AssemblyError, Request, View, axis_in_user_data, identify
from xtalsym.daemon.infer import (
    combine_timed,
    evidence_frames,
    finish_batch,
    infer_batch,
    load_fusion,
    model_info,
    uses_per_view,
    wants_combined,
)
from xtalsym.daemon.ingest import Accepted, Dropped, SeriesTracker, open_frame_socket
from xtalsym.daemon.metrics import Metrics
from xtalsym.daemon.overload import SHED_REASON, EvidencePlan, Waiting, WorkerSlots
from xtalsym.daemon.protocols import BadMessage, decode_parts
from xtalsym.daemon.publish import Publisher, evidence_partial
from xtalsym.daemon.result_slots import ResultSlots
from xtalsym.daemon.series_files import SeriesSideFiles
from xtalsym.daemon.workers import frame_job, init_worker, shape_timed, warm

log = logging.getLogger(__name__)

_STOP = object()
# batches inferred and waiting for the publish thread, at most: the inference thread then waits
# (the publish thread is the faster of the two; this only bounds a stall's memory and latency)
_PUBLISH_BACKLOG = 2


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


def one_native_thread() -> None:
    """One OpenMP thread for the calling thread's FAISS work (index queries: small). OpenMP's thread
    count is a per-thread setting: the limit the service sets on its main thread (BLAS, which is
    process-wide, and OpenMP) does not reach the inference thread, whose FAISS queries then ran on
    a second OpenMP thread that spun after every query (libgomp's wait policy), ~0.5 CPU-ms per
    frame at 512² (perf, docs/RESULTS.md issue 12). Only OpenMP: a process that embeds the
    pipeline (the tests) keeps its own BLAS settings."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="openmp")


@dataclass
class _Done:
    view_meta: dict
    future: cf.Future
    slot: int | None = None  # the ResultSlots slot its shaped DP was written to (released when taken)


@dataclass
class _Combined:
    """A request whose evidence the combine thread has finished (``future``)."""

    request: Request
    future: cf.Future
    ticket: int = -1  # its number among the combine thread's requests (Pipeline._newest_combine)


@dataclass(frozen=True)
class _SeriesClosed:
    """Queued by the ingest thread when a series ends (or a restart closes it): the inference
    thread closes the series' open samples once its frames still in the workers are back."""

    number: int
    reason: str  # "end" | "restart"


class _Relay(logging.Handler):
    """Hands a worker process's log record to the logger of the same name in this process, so
    worker warnings get this process's handlers (level, timestamp, journal priority)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


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
                                     frames_before_start=config.ingest.frames_before_start, count=self.metrics.count)
        self.assembler = Assembler(timeout_seconds=config.assembly.timeout_seconds,
                                   publish_partial=config.assembly.publish_partial,
                                   max_open=config.assembly.max_open_samples)
        self._stop_intake = threading.Event()
        self._results: queue.Queue = queue.Queue()
        self.slots = WorkerSlots(config.pipeline.queue_size)  # pipeline.overload decides when they are full
        self.evidence_plan = EvidencePlan(policy=config.pipeline.evidence_under_load,
                                          max_frames=config.pipeline.queue_size // 2,
                                          max_lag=config.pipeline.evidence_max_lag_seconds,
                                          max_samples=config.assembly.max_open_samples + config.pipeline.queue_size)
        # the requests waiting for the combine thread, since when (EvidencePlan; the frames waiting
        # are the _pending counts)
        self._combines_waiting = Waiting()
        self._shed_warned = -float("inf")  # time.monotonic() of the last "samples go without evidence" warning
        self.side_files = SeriesSideFiles()  # per-series geometry, mask and flatfield files for the workers
        # frames handed to the workers whose result the inference thread has not taken yet, per
        # sample key and per series number (ingest increments, inference decrements)
        self._pending_lock = threading.Lock()
        self._pending_samples: Tally = Tally()
        self._pending_series: Tally = Tally()
        self._closing: dict[int, str] = {}  # series number -> reason, waiting for its frames (inference thread)
        # worker processes log through this queue into this process's handlers
        self._log_queue = multiprocessing.get_context("spawn").Queue()
        self._log_listener = logging.handlers.QueueListener(self._log_queue, _Relay())
        self.fusion = load_fusion(bundle)
        self.model_info = model_info(bundle, backend, index, self.fusion)
        self.frame_socket: zmq.Socket | None = None
        self.publisher: Publisher | None = None
        self.pool: cf.ProcessPoolExecutor | None = None
        self.result_slots: ResultSlots | None = None  # shaped DPs back from the workers (shared memory)
        self.combiner: cf.ThreadPoolExecutor | None = None  # the combine thread (pipeline.evidence)
        self.poster: cf.ThreadPoolExecutor | None = None  # the publish thread (pipeline.publish_thread)
        self._publish_slots = threading.Semaphore(_PUBLISH_BACKLOG)
        self._publishing = 0  # requests inferred, not yet published (the publish thread's queue)
        self._publishing_lock = threading.Lock()  # two threads change it
        self._combining = 0  # requests on the combine thread (inference thread's count)
        # per sample, the ticket of its newest request handed to the combine thread: a partial one
        # superseded there by a newer one of its sample is not combined (_combine_unless_superseded)
        self._newest_combine: dict[tuple[int, str], int] = {}
        self._tickets = itertools.count()
        self._threads: list[threading.Thread] = []
        self.finished = threading.Event()
        # time.monotonic() of each loop's latest iteration (the systemd watchdog reads them)
        self.heartbeats: dict[str, float] = {"ingest": time.monotonic(), "inference": time.monotonic()}
        self._swaps: queue.Queue = queue.Queue()
        self.monitor = None  # the HTTP server of /metrics, /healthz, /readyz (httpd.MonitorServer)
        self._started = threading.Event()
        self._pending_batch = 0
        self._backend_generation = 0  # which backend computed a View.inferred
        self.metrics.prom.track_model(lambda: self.model_info)  # read at scrape time: follows swap()
        self.metrics.prom.track_threads()  # CPU by thread role: what the stages do not time
        self.metrics.prom.track_queues(
            {"workers": lambda: len(self.slots), "results": self._results.qsize,
             "open_samples": lambda: len(self.assembler.open), "combine": lambda: self._combining,
             "batch": lambda: self._pending_batch, "publish": lambda: self._publishing},
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
        self._log_listener.start()
        self._log_listening = True
        self.pool = self._make_pool()
        # more slots than frames the workers may hold: only drop_oldest's cancelled frames, held
        # until the inference thread takes them, can exhaust them (then a DP comes by pipe)
        self.result_slots = ResultSlots(2 * c.pipeline.queue_size, (self.size, self.size, 3))
        list(self.pool.map(warm, range(c.pipeline.workers)))  # spawn now, not on the first frame
        log.info("%d shaping workers ready", c.pipeline.workers)
        warm_backend(self.backend, self.size, c.pipeline.max_batch,
                     per_view=uses_per_view(self.backend, c.pipeline.view_inference))
        log.info("inference: %s", "each view once (per-view graph; predictions from the sums of its rows)"
                 if uses_per_view(self.backend, c.pipeline.view_inference)
                 else "the whole graph over the present views of every request")
        if c.pipeline.evidence:  # the 230 groups' zone tables, once, before the first sample needs them
            from xtalsym.evidence import sample as evidence_sample

            t0 = time.perf_counter()
            evidence_sample.group_table()
            log.info("symmetry-evidence tables ready in %.1f s", time.perf_counter() - t0)
            self.combiner = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xtalsym-combine",
                                                  initializer=one_native_thread)
        if c.pipeline.publish_thread:  # one thread: messages leave in the order of their batches
            self.poster = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xtalsym-publish",
                                                initializer=one_native_thread)
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
                                      initargs=(self._log_queue, logging.getLogger("xtalsym").getEffectiveLevel()),
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
        if self.combiner is not None:
            self.combiner.shutdown(wait=True, cancel_futures=True)
        if self.poster is not None:  # normally already shut by the inference loop, after its last batch
            self.poster.shutdown(wait=True)
        if self.result_slots is not None:
            self.result_slots.close()
        if self.monitor is not None:
            self.monitor.close()
        if getattr(self, "_log_listening", False):
            self._log_listener.stop()
            self._log_listening = False
        self.side_files.cleanup()

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
            self.fusion = load_fusion(bundle)
            self.model_info = {**self.model_info, **model_info(bundle, backend, index, self.fusion)}
            self.config = config
            self.evidence_plan.policy = config.pipeline.evidence_under_load
            self.evidence_plan.max_lag = config.pipeline.evidence_max_lag_seconds
            self.evidence_plan.max_frames = config.pipeline.queue_size // 2
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
            # image payloads stay compressed: the workers decompress them (workers.process_frame)
            events = decode_parts(self.config.ingest.protocol, frames, max_pixels=self.config.ingest.max_pixels,
                                  defer_decompression=True)
        except BadMessage as exc:
            self._bad_message(exc)
            return
        finally:
            m.stage("decode", time.perf_counter() - t0, time.thread_time() - c0)
        if len(events) > 1:  # a start and the image(s) after it in one ZeroMQ message: each is a message
            m.count("messages", len(events) - 1)
            m.count("coalesced_messages", len(events) - 1)
            log.log(logging.WARNING if m.counts["coalesced_messages"] == len(events) - 1 else logging.DEBUG,
                    "one ZeroMQ message carried %d detector messages (%s): each handled in order (counted "
                    "coalesced_messages)", len(events), ", ".join(type(e).__name__ for e in events))
        for event in events:
            if isinstance(event, BadMessage):
                self._bad_message(event)
                continue
            m.count("decoded")
            outcome = self.tracker.handle(event)
            for number, reason in self.tracker.take_closed():
                self._results.put(_SeriesClosed(number, reason))
            if outcome is None:
                continue
            if isinstance(outcome, Dropped):
                if outcome.reason == "stale_end":
                    m.count("stale_end")
                    log.info("%s", outcome.message)
                else:
                    m.bad_frame(outcome.reason, outcome.message)
                continue
            self._submit(outcome, received)

    def _bad_message(self, exc: BadMessage) -> None:
        if exc.message_type == "start":  # its own WARNING: the series' images will follow
            self.metrics.count("start_rejected")
            self.metrics.bad_frame(exc.reason, str(exc), quiet=True)
            self.tracker.rejected_start(exc)
        else:
            self.metrics.bad_frame(exc.reason, str(exc))

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
                axis_order=tuple(c.assembly.axis_order), sample_key=c.assembly.sample_key,
                series_number=series.number)
            geometry, method = self.side_files.frame_geometry(series, frame.shape, override=c.geometry_override,
                                                              training=self.training, method=c.calibration.method)
        except (AssemblyError, cal.CalibrationError) as exc:
            m.bad_frame(exc.reason, str(exc))
            return
        if (c.assembly.axis_from == "auto" and "axis" not in series.warned
                and not axis_in_user_data(image.user_data, c.assembly.axis_key)):
            series.warned.add("axis")
            log.warning("series %s: image %d has no user_data[%r]: this series' axes come from the image-id order "
                        "(axis_order[image_id %% 3] = %s; assembly.axis_from = \"auto\": set it to \"image_id\" to "
                        "say so, or to \"user_data\" to require user_data)", image.series_id, image.image_id,
                        c.assembly.axis_key, "".join(c.assembly.axis_order))
        mask_path = self.side_files.mask_file(series, channel, frame.shape) if c.calibration.use_stream_mask else None
        evidence = c.pipeline.evidence and self._sample_gets_evidence((series.number, sample_key))
        job = frame_job(c, frame=frame, geometry=geometry, training=self.training, axis=axis, size=self.size,
                        mask_path=mask_path, method=method, evidence=evidence,
                        flatfield_path=self.side_files.flatfield_file(series, channel, frame.shape, c.calibration.flatfield))
        meta = {"sample_key": sample_key, "axis": axis, "series_id": image.series_id, "image_id": image.image_id,
                "series_unique_id": image.series_unique_id, "user_data": image.user_data, "received": received,
                "series_number": series.number,
                "evidence_skipped": SHED_REASON if c.pipeline.evidence and not evidence else None}
        if not self.slots.take(c.pipeline.overload):
            m.bad_frame("overload", f"image {image.image_id} of series {image.series_id} dropped: {c.pipeline.queue_size} "
                        f"frames already waiting for the workers (overload = {c.pipeline.overload!r})")
            return
        slot = self.result_slots.take() if self.result_slots is not None else None
        if slot is not None:
            job = dataclasses.replace(job, result_slot=self.result_slots.job_slot(slot))
        self._pending(meta, +1)  # before the worker can finish it: the inference thread decrements
        try:
            try:
                future = self.pool.submit(shape_timed, job)
            except cf.BrokenExecutor:  # a worker died (its frames are counted worker_crashed in _add_view)
                self._replace_pool()
                future = self.pool.submit(shape_timed, job)
        except BaseException:
            self._pending(meta, -1)
            self.slots.release()
            if slot is not None:
                self.result_slots.release(slot)
            raise
        self.slots.add(future)
        future.add_done_callback(lambda f, meta=meta, slot=slot: self._done(meta, f, slot))

    def _sample_gets_evidence(self, key: tuple[int, str]) -> bool:
        """Whether this frame's sample gets symmetry evidence (:class:`EvidencePlan`): decided at its
        first frame from how far behind the daemon is then (frames not yet assembled, the oldest
        request waiting for the combine thread); a shed sample is counted ``evidence_shed``."""
        with self._pending_lock:  # frames handed to the workers whose result the inference thread has not taken
            frames = sum(self._pending_series.values())
        combines = self._combines_waiting.oldest_age(time.time())
        on, shed = self.evidence_plan.wants_evidence(key, frames_waiting=frames, combine_lag=combines)
        if shed:
            self.metrics.count("evidence_shed")
            if time.monotonic() - self._shed_warned >= 60.0:  # once a minute at most: a fast scan sheds many
                self._shed_warned = time.monotonic()
                log.warning("the daemon is behind (%d frames waiting for the workers or the inference thread, of at "
                            "most %d before new samples go without evidence; the oldest request for the combine thread "
                            "%.2f s old, evidence_max_lag_seconds = %g): new samples go without symmetry evidence "
                            "until it catches up (counted evidence_shed; pipeline.evidence_under_load = \"keep\" "
                            "measures it for every sample)", frames, self.evidence_plan.max_frames, combines,
                            self.evidence_plan.max_lag)
        return on

    def _pending(self, meta: dict, n: int) -> None:
        with self._pending_lock:
            self._pending_samples[(meta["series_number"], meta["sample_key"])] += n
            self._pending_series[meta["series_number"]] += n
            if self._pending_samples[(meta["series_number"], meta["sample_key"])] <= 0:
                del self._pending_samples[(meta["series_number"], meta["sample_key"])]
            if self._pending_series[meta["series_number"]] <= 0:
                del self._pending_series[meta["series_number"]]

    def _busy_samples(self) -> frozenset:
        with self._pending_lock:
            return frozenset(self._pending_samples)

    def _replace_pool(self) -> None:
        log.error("a shaping worker died; replacing the worker pool")
        self.metrics.count("pool_restarts")
        broken, self.pool = self.pool, self._make_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def _done(self, meta: dict, future: cf.Future, slot: int | None = None) -> None:
        # queued before it leaves _inflight: _drain_workers then knows every result is queued
        self._results.put(_Done(meta, future, slot))
        self.slots.left_workers(future)
        # the slot is released when the inference thread takes the result (_add_view): frames in
        # the workers plus results not yet assembled stay within queue_size, even when inference lags

    def _drain_workers(self) -> None:
        # cf.wait returns before done-callbacks run, so wait for _inflight to empty instead
        while True:
            pending = self.slots.pending()
            if not pending:
                return
            cf.wait(pending, timeout=0.1)
            time.sleep(0.001)

    # ---- inference thread

    def _inference_loop(self) -> None:
        one_native_thread()
        c = self.config.pipeline
        pending: list[Request] = []
        oldest = 0.0
        next_metrics = time.monotonic() + (self.config.publish.metrics_interval_seconds or float("inf"))
        stopping = False

        def enqueue(request: Request, *, combined: bool = False) -> None:
            nonlocal oldest
            if request.final and not combined:  # its sample is done: a later one of that key decides afresh
                self.evidence_plan.forget(request.trigger.key)
            if not combined and not stopping and self._combine_aside(request):
                return  # it joins ``pending`` when the combine thread is done with it
            if not pending:
                oldest = time.monotonic()
            pending.append(request)

        try:
            while True:
                now = self.heartbeats["inference"] = time.monotonic()
                self._apply_swaps()  # between batches, in this thread: a batch never mixes two models
                c = self.config.pipeline
                timeout = 0.1
                if pending:
                    timeout = max(0.0, oldest + c.latency_budget_seconds - now)
                busy = self._busy_samples()
                deadline = self.assembler.next_deadline(busy)
                if deadline is not None:
                    timeout = min(timeout, max(0.0, deadline - time.time()))
                item = None
                if not stopping or self._combining:  # after _STOP only combined requests arrive
                    try:
                        item = self._results.get(timeout=timeout)
                    except queue.Empty:
                        pass
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _SeriesClosed):
                    self._closing[item.number] = item.reason
                elif isinstance(item, _Combined):
                    enqueue(self._took_combined(item), combined=True)
                elif item is not None:
                    for request in self._add_view(item):
                        enqueue(request)
                for request in self._close_ended_series():
                    enqueue(request)
                for request in self.assembler.expire(time.time(), self._busy_samples()):
                    self.metrics.count("timed_out_samples")
                    enqueue(request)
                if stopping:
                    for request in self.assembler.close_all("shutdown"):
                        enqueue(request)  # combined in the batch: shutdown waits for nothing else
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
                    self._post(self.publisher.send_metrics, self.metrics_message())
                    next_metrics = now + self.config.publish.metrics_interval_seconds
                if stopping and not pending and not self._combining:
                    break
        except Exception:  # pragma: no cover - a bug; log it, never hang the service
            log.exception("inference loop failed")
        finally:
            try:
                if self.poster is not None:  # its batches first: then the PUB socket is this thread's again
                    self.poster.shutdown(wait=True)
                self.publisher.send_metrics(self.metrics_message())
                self.publisher.close()
            finally:
                self.finished.set()

    def _post(self, fn, *args) -> None:
        """Run ``fn`` where the PUB socket's sends happen: the publish thread (in order), or here."""
        if self.poster is None:
            fn(*args)
        else:
            self.poster.submit(fn, *args)

    def _combine_aside(self, request: Request) -> bool:
        """Hand a request with evidence whose zones are combined (final, or partial where the
        fusion weighs their evidence: :func:`wants_combined`) to the combine thread; False when it
        goes to the batch as it is (nothing to combine, no combine thread, or that thread is shut)."""
        if self.combiner is None or request.combined is not None or not wants_combined(request, self.fusion):
            return False
        frames = evidence_frames(request)
        if not frames:
            return False
        key, ticket = request.trigger.key, next(self._tickets)
        previous = self._newest_combine.get(key)
        self._newest_combine[key] = ticket  # before the job can start
        try:
            if request.final:
                future = self.combiner.submit(combine_timed, frames)
            else:
                future = self.combiner.submit(self._combine_unless_superseded, frames, key, ticket)
        except RuntimeError:  # shut down: the batch combines it
            if previous is None:
                self._newest_combine.pop(key, None)
            else:
                self._newest_combine[key] = previous
            return False
        self._combining += 1
        self._combines_waiting.add(ticket, time.time())
        future.add_done_callback(lambda f, r=request, t=ticket: self._results.put(_Combined(r, f, t)))
        return True

    def _combine_unless_superseded(self, frames: dict, key: tuple[int, str], ticket: int):
        """Combine thread: a partial request's zones, unless a newer request of its sample already
        waits here (the thread is behind: the partial prediction is superseded within moments, so it
        goes out fused without evidence, as before issue 15's partial evidence, and the combine is saved)."""
        if self._newest_combine.get(key, ticket) != ticket:
            return None
        return combine_timed(frames)

    def _took_combined(self, item: _Combined) -> Request:
        """The request of a finished combine, its evidence (or the error) on it."""
        self._combining -= 1
        self._combines_waiting.discard(item.ticket)
        request = item.request
        if self._newest_combine.get(request.trigger.key) == item.ticket:
            del self._newest_combine[request.trigger.key]
        try:
            out = item.future.result()
        except cf.CancelledError:  # shutting down: the batch combines it
            return request
        except Exception as exc:  # noqa: BLE001 - the evidence never costs a prediction
            log.error("evidence of sample %s failed: %s: %s", request.sample_key, type(exc).__name__, exc)
            request.combined = (None, exc)
            return request
        if out is None:  # a superseded partial request: its zones' own evidence, no fused evidence
            self.metrics.count("partial_evidence_superseded")
            request.combined = (evidence_partial(evidence_frames(request)), None)
            return request
        evidence, seconds, cpu_seconds = out
        self.metrics.stage("combine", seconds, cpu_seconds)
        request.combined = (evidence, None)
        return request

    def _close_ended_series(self) -> list[Request]:
        """Close the open samples of the series that ended (or were restarted) once none of their
        frames is left in the workers: a view finishing late still joins its sample."""
        out: list[Request] = []
        for number, reason in list(self._closing.items()):
            with self._pending_lock:
                waiting = self._pending_series.get(number, 0)
            if waiting:
                continue
            del self._closing[number]
            out.extend(self.assembler.close_series(number, reason))
        return out

    def _add_view(self, done: _Done) -> list[Request]:
        try:
            return self._take_view(done)
        finally:  # every outcome (shaped, failed, cancelled, worker lost) frees the frame's DP slot
            if done.slot is not None:
                self.result_slots.release(done.slot)

    def _take_view(self, done: _Done) -> list[Request]:
        meta = done.view_meta
        self._pending(meta, -1)
        overloaded = self.slots.cancelled_for_newer(done.future)
        if overloaded:  # drop_oldest cancelled it; a newer frame has its slot
            self.metrics.bad_frame("overload", f"image {meta['image_id']} of series {meta['series_id']} dropped "
                                   "for a newer frame (overload = 'drop_oldest')")
            return []
        self.slots.release()
        try:
            shaped, seconds, cpu_seconds, found, evidence_seconds, evidence_cpu_seconds = done.future.result()
        except (cal.CalibrationError, shaping.ShapingError, BadMessage) as exc:  # BadMessage: corrupt compressed data
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
        if shaped is None:  # the worker wrote it into the frame's slot
            shaped = self.result_slots.read(done.slot)
        self.metrics.stage("calibrate_shape", seconds, cpu_seconds)
        if found is not None:
            self.metrics.stage("evidence", evidence_seconds, evidence_cpu_seconds)
        self.metrics.count("views")
        view = View(shaped=shaped, evidence=found, **meta)
        duplicates = self.assembler.duplicates
        requests = self.assembler.add(view, time.time())
        if self.assembler.duplicates > duplicates:
            self.metrics.count("duplicate_axes", self.assembler.duplicates - duplicates)
        overflowed = sum(r.closed_by == "overflow" for r in requests)
        if overflowed:  # max_open_samples reached: the oldest open samples were closed as partial
            self.metrics.count("overflowed_samples", overflowed)
        return requests

    def _classify(self, batch: list[Request]) -> None:
        """The batch's network here; its match, fusion and messages on the publish thread (or here)."""
        per_view = uses_per_view(self.backend, self.config.pipeline.view_inference)
        result, out = infer_batch(batch, backend=self.backend, size=self.size, per_view=per_view,
                                  generation=self._backend_generation)
        if result.inference_error is not None:  # keep serving; every request of the batch is counted
            for request in batch:
                self.metrics.bad_frame("inference_error", f"sample {request.sample_key}: {result.inference_error}")
            return
        self.metrics.count("views_inferred", result.views_inferred)
        self.metrics.stage("infer", result.infer_seconds, result.infer_cpu_seconds)
        # what the batch needs from the current model, taken now: a swap may follow before it is published
        finish = dict(classes=self.backend.classes, model=self.model_info, index=self.index, fusion=self.fusion,
                      index_enabled=self.config.index.enabled, neighbours=self.config.index.neighbours,
                      index_query=self.config.index.query)
        if self.poster is None:
            self._publish_batch(batch, out, result, finish)
            return
        self._publish_slots.acquire()  # released when the publish thread is done with it
        self._queued_for_publishing(len(batch))
        try:
            self.poster.submit(self._publish_batch, batch, out, result, finish, True)
        except BaseException:
            self._queued_for_publishing(-len(batch))
            self._publish_slots.release()
            raise

    def _queued_for_publishing(self, n: int) -> None:
        with self._publishing_lock:
            self._publishing += n

    def _publish_batch(self, batch: list[Request], out, result, finish: dict, queued: bool = False) -> None:
        try:
            result = finish_batch(batch, out, result, **finish)
            if result.match_seconds is not None:
                self.metrics.stage("match", result.match_seconds, result.match_cpu_seconds)
            if result.index_error is not None:
                exc = result.index_error
                self.metrics.bad_frame("index_error", f"{type(exc).__name__}: {exc}")
            if result.fuse_seconds is not None:
                self.metrics.stage("fuse", result.fuse_seconds, result.fuse_cpu_seconds)
            if result.fusion_error is not None:
                exc = result.fusion_error
                self.metrics.bad_frame("fusion_error", f"{type(exc).__name__}: {exc}")
            for seconds, cpu_seconds in result.combine_seconds:
                self.metrics.stage("combine", seconds, cpu_seconds)
            for key, exc in result.evidence_errors:
                self.metrics.bad_frame("evidence_error", f"sample {key}: {type(exc).__name__}: {exc}")
            self.metrics.batch(len(batch))
            t0, c0 = time.perf_counter(), time.thread_time()
            for request, message in result.messages:
                if self.publisher.send(message):
                    self.metrics.published(request, message)
                else:  # the publisher never blocks: a message ZeroMQ refuses is counted, not waited for
                    self.metrics.count("publish_dropped")
            self.metrics.stage("publish", result.message_seconds + time.perf_counter() - t0,
                               result.message_cpu_seconds + time.thread_time() - c0)
        except Exception as exc:
            if not queued:
                raise
            log.exception("publishing a batch of %d failed", len(batch))  # a bug: count it, keep the thread
            for request in batch:
                self.metrics.bad_frame("internal_error", f"sample {request.sample_key} not published: "
                                       f"{type(exc).__name__}: {exc}", quiet=True)
        finally:
            if queued:
                self._queued_for_publishing(-len(batch))
                self._publish_slots.release()

    def metrics_message(self) -> dict:
        snap = self.metrics.snapshot()
        snap["series"] = dict(self.tracker.events)
        snap["open_samples"] = len(self.assembler.open)
        snap["duplicate_axes"] = self.assembler.duplicates
        snap["frames_missing"] = self.tracker.frames_missing
        snap["model_id"] = self.bundle.model_id
        return snap
