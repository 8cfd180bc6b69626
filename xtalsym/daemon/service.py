"""The main job: configuration -> bundle, backend, index -> pipeline; signals and systemd.

SIGTERM/SIGINT: stop intake, finish and publish what is in flight, exit 0. SIGHUP:
re-read the configuration, re-load and verify the bundle, swap them in between two
batches (xtalsym.daemon.reload); a bad one is refused and the running one stays. Under
systemd (Type=notify): READY=1, STATUS=, RELOADING=1/READY=1, STOPPING=1 and watchdog
pings while both processing loops are alive (xtalsym.daemon.notify).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import signal
import threading
import time
from collections.abc import Callable

from xtalsym.daemon import reload
from xtalsym.daemon.config import DaemonConfig
from xtalsym.daemon.notify import Notifier, Watchdog
from xtalsym.daemon.pipeline import Pipeline, uses_per_view, warm_backend

log = logging.getLogger(__name__)


def inference_cpu_threads(config: DaemonConfig) -> int:
    """CPU threads for a backend on the CPU: ``pipeline.inference_threads``, or (0) every
    core this process may run on. The backends never busy-wait (``allow_spinning`` off), so
    a thread costs CPU only while a batch runs and the OS shares the cores with the shaping
    workers: on 2 cores with 2 workers, 2 ONNX Runtime threads instead of the cores the workers
    leave (1) gave 25.4 vs 17.8 frames/s with the evidence off and 6.4 vs 5.0 with it on, at
    the same CPU per frame (benchmarks/daemon.py --variants, docs/RESULTS.md issue 12). (With
    spinning threads, as ORT's default, oversubscribing cost ~40 % more CPU per frame.)"""
    import os

    if config.pipeline.inference_threads:
        return config.pipeline.inference_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def limit_native_threads(n: int) -> None:
    """Cap this process's BLAS and OpenMP pools (numpy, FAISS) at ``n`` threads."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)


def load_components(config: DaemonConfig):
    """(bundle, backend, index or None) per ``[bundle]`` and ``[index]``."""
    from xtalsym.bundle import BundleError, load_bundle
    from xtalsym.inference import select_backend

    bundle = load_bundle(config.bundle.path or None)
    if bundle.representation != "shaped":
        # The workers shape every frame; a spot-DP model would classify the wrong picture.
        raise BundleError(f"bundle {bundle.path}: its model ({bundle.model_spec.get('name')}) classifies "
                          f"{bundle.representation} diffraction patterns, but the daemon feeds shaped ones: "
                          "serve a bundle of a shaped-DP model such as msdn")
    threads = inference_cpu_threads(config)
    # The main process's own numpy/FAISS work (index queries) is small: one BLAS/OpenMP
    # thread, so those pools do not spin against the backend and the shaping workers.
    limit_native_threads(1)
    backend = select_backend(bundle, config.bundle.backend, device=config.bundle.device, cpu_threads=threads,
                             precision=config.bundle.precision)
    index = None
    if config.index.enabled and bundle.index_dir is not None:
        from xtalsym.index.store import ReferenceIndex

        index = ReferenceIndex.load(bundle.index_dir, expected_model_id=bundle.model_id)
        log.info("reference index: %d entries", len(index))
    elif config.index.enabled:
        log.info("the bundle has no reference index: predictions carry no open-set result")
    return bundle, backend, index


class Service:
    """Runs one :class:`Pipeline` until :meth:`shutdown` (or SIGTERM/SIGINT in :meth:`run`).

    ``reload_config`` returns the configuration a reload applies (the CLI re-reads the
    file with its overrides); without it a reload keeps the configuration and re-loads
    the bundle. ``notifier`` defaults to ``Notifier.from_env()``.
    """

    STATUS_INTERVAL = 5.0  # seconds between STATUS= updates
    SWAP_TIMEOUT = 30.0  # seconds the inference loop has to take a reloaded bundle

    def __init__(self, config: DaemonConfig, *, components=None, context=None,
                 reload_config: Callable[[], DaemonConfig] | None = None, notifier: Notifier | None = None,
                 load: Callable | None = None) -> None:
        self.config = config
        self._load = load or load_components
        bundle, backend, index = components or self._load(config)
        self.backend = backend
        self.pipeline = Pipeline(config, bundle=bundle, backend=backend, index=index, context=context)
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        self._reload_config = reload_config or (lambda: self.config)
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._reloader: threading.Thread | None = None
        self.reloads = {"done": 0, "refused": 0}

    def start(self) -> Service:
        self.pipeline.start()
        log.info("xtalsym daemon: frames %s %s (%s, %s), predictions PUB %s %s, model %s, backend %s %s",
                 self.config.ingest.socket.upper(), self.config.ingest.mode, self.pipeline.ingest_endpoint
                 if self.config.ingest.mode == "bind" else self.config.ingest.address, self.config.ingest.protocol,
                 self.config.publish.mode, self.pipeline.publish_endpoint, self.pipeline.bundle.model_id[:12],
                 self.pipeline.model_info["backend"], self.pipeline.model_info["precision"])
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """What SIGHUP does: reload soon, in a thread (a reload during a reload runs after it)."""
        self._reload_requested.set()
        self._wake.set()

    def run(self, *, install_signals: bool = True) -> int:
        """Start, serve until a signal or :meth:`shutdown`, then drain and stop. Returns 0."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self._on_signal(signum))
            signal.signal(signal.SIGHUP, lambda signum, frame: self.request_reload())
        self.start()
        self.notifier.ready(self._status("serving"))
        watchdog = None
        if self.notifier.watchdog_interval:
            interval = self.notifier.watchdog_interval
            # a loop silent for longer than a ping interval is stuck: both idle loops beat every 0.1 s
            watchdog = Watchdog(self.notifier, lambda: dict(self.pipeline.heartbeats),
                                interval=interval, stale_after=interval)
            log.info("systemd watchdog: pinging every %.1f s while the ingest and inference loops run", interval)
        frames = self._frames()
        next_status = time.monotonic() + self.STATUS_INTERVAL
        while not self._stop.is_set():
            wait = 0.5 if watchdog is None else min(0.5, watchdog.timeout())
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set() or self.pipeline.finished.is_set():
                break
            if watchdog is not None:
                watchdog.tick()
            if self._reload_requested.is_set() and not (self._reloader and self._reloader.is_alive()):
                self._reload_requested.clear()
                self._reloader = threading.Thread(target=self.reload, name="xtalsym-reload", daemon=True)
                self._reloader.start()
            now = time.monotonic()
            if now >= next_status:
                count = self._frames()
                rate = (count - frames) / (now - next_status + self.STATUS_INTERVAL)
                frames, next_status = count, now + self.STATUS_INTERVAL
                self.notifier.status(self._status(f"serving, {rate:.1f} frames/s"))
        self.notifier.stopping()
        self.notifier.status("stopping: intake closed, finishing frames in flight")
        log.info("stopping: intake closed, finishing frames in flight")
        self.pipeline.stop()
        close = getattr(self.pipeline.backend, "close", None)
        if close:
            close()
        log.info("stopped: %s", self.pipeline.metrics_message())
        self.notifier.close()
        return 0

    def reload(self) -> bool:
        """Re-read the configuration, load and verify the bundle, swap them in; True if applied.

        Sends RELOADING=1 first and READY=1 at the end whether or not the reload was applied
        (systemd waits for it). A refused reload leaves everything running as it was.
        """
        self.notifier.reloading()
        started = time.monotonic()
        running = self.pipeline.bundle
        log.info("reload: re-reading the configuration and the bundle (running model %s)", running.model_id[:12])
        try:
            new_config = self._reload_config()
            config, kept = reload.merge(self.config, new_config)
            for line in kept:
                log.warning("reload: %s", line)
            bundle, backend, index = self._load(config)  # load_bundle verifies every checksum
            try:
                reload.check_same_input(running, bundle)
                warm_backend(backend, bundle.image_size, config.pipeline.max_batch,  # it runs, at full size
                             per_view=uses_per_view(backend, config.pipeline.view_inference))
                future = self.pipeline.swap(config=config, bundle=bundle, backend=backend, index=index)
                try:
                    _, old_backend, _ = future.result(timeout=self.SWAP_TIMEOUT)
                except cf.TimeoutError:
                    if future.cancel():
                        raise reload.ReloadError(f"the inference loop did not take the new bundle within "
                                                 f"{self.SWAP_TIMEOUT:g} s") from None
                    _, old_backend, _ = future.result()
            except BaseException:
                _close(backend)
                raise
        except Exception as exc:  # noqa: BLE001 - a bad reload must never stop the service
            self.reloads["refused"] += 1
            log.error("reload refused, still serving model %s with the previous configuration: %s: %s",
                      running.model_id[:12], type(exc).__name__, exc)
            log.debug("reload failure", exc_info=True)
            self.notifier.ready(self._status(f"reload refused ({type(exc).__name__}: {exc}); serving"))
            return False
        _close(old_backend)
        self.config, self.backend = config, backend
        self.reloads["done"] += 1
        log.info("reload: done in %.1f s, model %s, backend %s", time.monotonic() - started,
                 bundle.model_id[:12], self.pipeline.model_info["backend"])
        self.notifier.ready(self._status("reloaded; serving"))
        return True

    def _frames(self) -> int:
        return self.pipeline.metrics.snapshot()["counts"].get("images", 0)

    def _status(self, state: str) -> str:
        model = self.pipeline.model_info
        return (f"{state}; model {model['model_id'][:12]}, backend {model['backend']} {model['device']}, "
                f"{self._frames()} frames")

    def _on_signal(self, signum: int) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        self.shutdown()


def _close(backend) -> None:
    close = getattr(backend, "close", None)
    if close:
        close()
