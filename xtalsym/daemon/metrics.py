"""The daemon's Prometheus metrics, in a registry of their own (docs/DAEMON.md, "Metrics").

One :class:`PrometheusMetrics` per pipeline: its own ``CollectorRegistry`` (never the
global one, so several pipelines in one process, as in the tests, do not collide), with
the process and platform collectors registered in it. The pipeline's ``Metrics`` (JSON
snapshot on ZeroMQ) feeds every event here too; the HTTP side is ``httpd.py``.

Names follow the Prometheus conventions: prefix ``xtalsym_``, base units in the name,
counters end in ``_total`` (prometheus-client appends it). Label values are bounded: frame
rejection reasons and event names are code constants, space groups the model's classes
(<= 230), crystal systems 7, stages and queues fixed lists.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

import xtalsym

log = logging.getLogger(__name__)

# Targets: p99 <= 250 ms on CPU, <= 50 ms on GPU; both are bucket bounds, so the share of
# predictions within target is exact (le="0.05", le="0.25").
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("decode", "calibrate_shape", "evidence", "combine", "infer", "match", "fuse", "publish")
QUEUES = ("workers", "results", "open_samples", "combine", "batch", "publish")

# Metrics.count() keys with a metric of their own; any other key goes to xtalsym_events_total{event}.
_COUNTED = {
    "messages": "frames_received",
    "decoded": "frames_decoded",
    "images": "images_accepted",
    "views": "views_shaped",
    "timed_out_samples": "samples_timed_out",
    "frames_missing": "frames_missing",
    "duplicate_axes": "duplicate_axes",
}
SERIES_EVENTS = ("start", "end", "restart")  # Metrics.count("series_<event>") -> xtalsym_series_total{event}


class PrometheusMetrics:
    """Every exported metric; methods are thread-safe (prometheus-client locks)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        self.frames_received = Counter("xtalsym_frames_received", "Messages received on the frame socket "
                                       "(start, image, end or undecodable)", registry=r)
        self.frames_decoded = Counter("xtalsym_frames_decoded", "Messages that decoded to a valid detector event",
                                      registry=r)
        self.frames_rejected = Counter("xtalsym_frames_rejected", "Frames (or samples) rejected, by reason",
                                       ["reason"], registry=r)
        self.images_accepted = Counter("xtalsym_images_accepted", "Images accepted by the series state machine "
                                       "and sent to the shaping workers", registry=r)
        self.views_shaped = Counter("xtalsym_views_shaped", "Views calibrated and shaped by the workers",
                                    registry=r)
        self.events = Counter("xtalsym_events", "Other pipeline events (stale_end, coalesced_messages, "
                              "start_rejected, start_part_ignored, ...)", ["event"], registry=r)
        self.series = Counter("xtalsym_series", "Series events: start (a decoded start message), end (the end of "
                              "the open series), restart (a start while a series was open; also counted in start)",
                              ["event"], registry=r)
        self.frames_missing = Counter("xtalsym_frames_missing", "Image ids a series skipped (and its shortfall "
                                      "against the start's number_of_images at its end): frames that never "
                                      "reached the daemon, e.g. taken by a second PULL client", registry=r)
        self.duplicate_axes = Counter("xtalsym_duplicate_axes", "Views whose sample already had that axis (the "
                                      "newer replaced the older)", registry=r)
        self.predictions = Counter("xtalsym_predictions_published", "Predictions published, by status "
                                   "(partial: fewer than 3 axes; complete)", ["status"], registry=r)
        self.samples_completed = Counter("xtalsym_samples_completed", "Samples closed with all three axes",
                                         registry=r)
        self.samples_partial = Counter("xtalsym_samples_partial", "Samples closed with fewer than three axes, "
                                       "by what closed them", ["closed_by"], registry=r)
        self.samples_timed_out = Counter("xtalsym_samples_timed_out", "Samples closed by the assembly timeout",
                                         registry=r)
        self.open_set_results = Counter("xtalsym_open_set_results", "Final predictions with an open-set result",
                                        registry=r)
        self.open_set_unknown = Counter("xtalsym_open_set_unknown", "Final predictions the open-set match "
                                        "called unknown", registry=r)
        self.space_groups = Counter("xtalsym_predicted_space_group", "Final predictions by top-1 space group",
                                    ["space_group"], registry=r)
        self.crystal_systems = Counter("xtalsym_predicted_crystal_system", "Final predictions by the top-1 "
                                       "space group's crystal system", ["crystal_system"], registry=r)
        self.stage_latency = Histogram("xtalsym_stage_latency_seconds", "Seconds per stage: decode (per message), "
                                       "calibrate_shape (per frame, in a worker), infer and match (per batch)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_cpu = Counter("xtalsym_stage_cpu_seconds", "CPU seconds spent per stage by the thread that ran "
                                 "it (decode: ingest thread, calibrate_shape: the workers, infer and match: the "
                                 "inference thread)", ["stage"], registry=r)
        self.end_to_end = Histogram("xtalsym_end_to_end_latency_seconds", "Seconds from the triggering frame off "
                                    "the socket to its prediction published", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("xtalsym_batch_size", "Requests per inference micro-batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("xtalsym_queue_depth", "Items waiting: workers (frames being shaped), results "
                                 "(shaped, waiting for the inference thread), open_samples, batch (requests in "
                                 "the pending micro-batch)", ["queue"], registry=r)
        self.queue_capacity = Gauge("xtalsym_queue_capacity", "Configured bound of a queue (workers: queue_size, "
                                    "batch: max_batch)", ["queue"], registry=r)
        self.build = Info("xtalsym_build", "xtalsym version and Python", registry=r)
        self.build.info({"version": xtalsym.__version__, "python": platform.python_version()})
        started = time.time()
        self.start_time = Gauge("xtalsym_start_time_seconds", "Unix time the pipeline started", registry=r)
        self.start_time.set(started)
        self.uptime = Gauge("xtalsym_uptime_seconds", "Seconds since the pipeline started", registry=r)
        self.uptime.set_function(lambda: time.time() - started)
        for stage in STAGES:  # every stage series exists from the start (rate() has a zero to start from)
            self.stage_latency.labels(stage=stage)
            self.stage_cpu.labels(stage=stage)
        for status in ("partial", "complete"):
            self.predictions.labels(status=status)
        for closed_by in ("end", "restart", "timeout", "shutdown", "overflow"):
            self.samples_partial.labels(closed_by=closed_by)
        for event in ("stale_end", "coalesced_messages", "start_rejected", "start_part_ignored", "evidence_shed"):
            self.events.labels(event=event)
        for event in SERIES_EVENTS:
            self.series.labels(event=event)

    def count(self, key: str, n: int = 1) -> None:
        name = _COUNTED.get(key)
        if key.startswith("series_") and key[7:] in SERIES_EVENTS:
            self.series.labels(event=key[7:]).inc(n)
        elif name is None:
            self.events.labels(event=key).inc(n)
        else:
            getattr(self, name).inc(n)

    def rejected(self, reason: str) -> None:
        self.frames_rejected.labels(reason=reason).inc()

    def stage(self, stage: str, seconds: float, cpu_seconds: float | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        self.stage_latency.labels(stage=stage).observe(seconds)
        if cpu_seconds is not None:
            self.stage_cpu.labels(stage=stage).inc(max(0.0, cpu_seconds))

    def published(self, *, status: str, final: bool, closed_by: str | None, latency: float,
                  space_group: int | None, crystal_system: str | None, open_set: dict | None) -> None:
        """One prediction sent; the sample-level counters only for the final one of a sample."""
        self.predictions.labels(status=status).inc()
        self.end_to_end.observe(latency)
        if not final:
            return
        if status == "complete":
            self.samples_completed.inc()
        else:
            self.samples_partial.labels(closed_by=closed_by or "unknown").inc()
        if space_group is not None:
            self.space_groups.labels(space_group=str(space_group)).inc()
        if crystal_system:
            self.crystal_systems.labels(crystal_system=crystal_system).inc()
        if open_set is not None:
            self.open_set_results.inc()
            if open_set.get("unknown"):
                self.open_set_unknown.inc()

    def track_queues(self, depths: dict[str, Callable[[], float]],
                     capacities: dict[str, Callable[[], float]]) -> None:
        """Queue depths and bounds read at scrape time from the pipeline (nothing on the hot path)."""
        for name in (*depths, *capacities):
            if name not in QUEUES:
                raise ValueError(f"unknown queue {name!r} (known: {', '.join(QUEUES)})")
        for name, fn in depths.items():
            self.queue_depth.labels(queue=name).set_function(fn)
        for name, fn in capacities.items():
            self.queue_capacity.labels(queue=name).set_function(fn)

    def track_model(self, model: Callable[[], dict]) -> None:
        """Export ``model()`` (the pipeline's ``model`` dict) at every scrape, so a reload shows at once."""
        self.registry.register(_ModelCollector(model))

    def track_threads(self) -> None:
        """Export this process's CPU seconds by thread role (read from /proc at scrape time)."""
        self.registry.register(_ThreadCpuCollector())


class _ModelCollector:
    """xtalsym_model_info{model_id, name, backend, device, precision} 1 and the index size."""

    LABELS = ("model_id", "name", "backend", "device", "precision")

    def __init__(self, model: Callable[[], dict]) -> None:
        self.model = model

    def describe(self):  # fixed names: the registry checks them for clashes without calling collect()
        return [InfoMetricFamily("xtalsym_model", "Model and inference backend in use"),
                GaugeMetricFamily("xtalsym_reference_index_entries", "Entries of the reference index in use "
                                  "(0 = no open-set match)")]

    def collect(self):
        model = self.model()
        info, entries = self.describe()
        info.add_metric([], {k: "" if model.get(k) is None else str(model[k]) for k in self.LABELS})
        entries.add_metric([], (model.get("index") or {}).get("entries", 0))
        return [info, entries]


# Thread roles of the serve process (xtalsym_thread_cpu_seconds{thread}): a bounded label set.
THREAD_ROLES = ("ingest", "inference", "combine", "publish", "worker_pool", "http", "log", "main", "other", "zeromq", "native",
                "exited")


def thread_role(thread: threading.Thread) -> str:
    """The role of a Python thread: the daemon names its own; of the standard library's, the
    process pool's manager thread (by class) and its call queue's feeder, the HTTP server's
    request threads and the workers' log listener (by name)."""
    name = thread.name
    if type(thread).__name__ == "_ExecutorManagerThread":  # concurrent.futures.process: pickles, results
        return "worker_pool"
    for prefix, role in (("xtalsym-ingest", "ingest"), ("xtalsym-inference", "inference"),
                         ("xtalsym-combine", "combine"), ("xtalsym-publish", "publish"),
                         ("xtalsym-metrics-http", "http"), ("MainThread", "main"),
                         ("QueueFeederThread", "worker_pool")):
        if name.startswith(prefix):
            return role
    if "process_request_thread" in name:
        return "http"
    if "_monitor" in name:  # logging.handlers.QueueListener: the workers' log records
        return "log"
    return "other"


def thread_cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) of this process by thread role, from /proc/self/task (Linux;
    empty elsewhere). Python threads by name (:func:`thread_role`; concurrent.futures'
    ``_ExecutorManagerThread`` is a ``Thread-N``), the others by their OS name: ZeroMQ's I/O
    threads, and ``native`` for the rest (ONNX Runtime's intra-op pool, OpenMP/BLAS): a second
    ORT thread's share of inference shows there, not in the ``infer`` stage, which times the
    calling thread. ``exited``: threads gone since (e.g. one per HTTP scrape), so the roles
    sum to the process's CPU time."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    threads = {t.native_id: t for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(THREAD_ROLES, 0.0)
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile: counted in "exited"
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ... utime = 14th
        seconds = (int(fields[11]) + int(fields[12])) / tick
        thread = threads.get(int(tid))
        if thread is not None:
            role = thread_role(thread)
        else:
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            role = "zeromq" if comm.startswith("ZMQbg") else "native"
        out[role] += seconds
    total = sum(os.times()[:2])
    out["exited"] = max(0.0, total - sum(out.values()))
    return {role: round(seconds, 3) for role, seconds in out.items()}


class _ThreadCpuCollector:
    """xtalsym_thread_cpu_seconds{thread}: CPU seconds of this process by thread role (a gauge:
    a role loses the seconds of its threads that exit, which then count in ``exited``)."""

    def describe(self):
        return [GaugeMetricFamily("xtalsym_thread_cpu_seconds", "CPU seconds of the serve process by thread "
                                  "role (ingest, inference, combine, publish, worker_pool: the process pool's manager and "
                                  "feeder threads, http, log, main, other, zeromq, native: ONNX Runtime's intra-op "
                                  "threads, exited: threads gone since)", labels=["thread"])]

    def collect(self):
        (family,) = self.describe()
        for role, seconds in thread_cpu_by_role().items():
            family.add_metric([role], seconds)
        return [family]


class Metrics:
    """Thread-safe counters and latency samples (the JSON metrics message); every event also
    feeds the Prometheus metrics in ``self.prom`` (xtalsym/daemon/metrics.py)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Tally = Tally()
        self.bad: Tally = Tally()
        self.latencies: deque = deque(maxlen=10000)
        self.batch_sizes: deque = deque(maxlen=1000)
        self.cpu: Tally = Tally()  # CPU seconds per stage (thread time of the thread that ran it)
        self.started = time.time()
        self.prom = PrometheusMetrics()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n
        self.prom.count(key, n)

    def stage(self, stage: str, seconds: float, cpu_seconds: float | None = None) -> None:
        if cpu_seconds is not None:
            with self.lock:
                self.cpu[stage] += cpu_seconds
        self.prom.stage(stage, seconds, cpu_seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes.append(size)
        self.prom.batch_size.observe(size)

    def published(self, request, message: dict) -> None:
        """A prediction sent: latency, counts by status; top-1 and open set of final ones."""
        ts = message["timestamps"]
        latency = ts["published"] - ts["received"]
        with self.lock:
            self.latencies.append(latency)
            self.counts["predictions"] += 1
            self.counts[f"predictions_{request.status}"] += 1
            if request.final:
                self.counts["predictions_final"] += 1
        top = message["top"][0] if message["top"] else {}
        self.prom.published(status=request.status, final=request.final, closed_by=request.closed_by,
                            latency=latency, space_group=top.get("space_group"),
                            crystal_system=top.get("crystal_system"), open_set=message.get("open_set"))

    def bad_frame(self, reason: str, message: str, *, quiet: bool = False) -> None:
        """Count a bad frame; ``quiet``: the caller logs it at WARNING itself (a rejected start)."""
        with self.lock:
            self.bad[reason] += 1
            total = self.bad[reason]
        self.prom.rejected(reason)
        # the first few of each reason at WARNING, then every 100th (a storm must not flood the log)
        level = logging.WARNING if (total <= 5 or total % 100 == 0) and not quiet else logging.DEBUG
        log.log(level, "bad frame (%s, #%d): %s", reason, total, message)

    def snapshot(self) -> dict:
        with self.lock:
            lat = np.array(self.latencies) if self.latencies else None
            out = {
                "uptime_seconds": round(time.time() - self.started, 3),
                "counts": dict(self.counts),
                "bad_frames": dict(self.bad),
                "latency_seconds": None if lat is None else {
                    "p50": round(float(np.percentile(lat, 50)), 6),
                    "p99": round(float(np.percentile(lat, 99)), 6),
                    "max": round(float(lat.max()), 6), "n": int(lat.size)},
                "mean_batch": round(float(np.mean(self.batch_sizes)), 3) if self.batch_sizes else None,
                "cpu_seconds": {k: round(v, 6) for k, v in self.cpu.items()},
            }
        return out
