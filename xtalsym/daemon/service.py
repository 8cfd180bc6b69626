"""The main job: configuration -> bundle, backend, index -> pipeline; clean shutdown on signals."""

from __future__ import annotations

import logging
import signal
import threading

from xtalsym.daemon.config import DaemonConfig
from xtalsym.daemon.pipeline import Pipeline

log = logging.getLogger(__name__)


def load_components(config: DaemonConfig):
    """(bundle, backend, index or None) per ``[bundle]`` and ``[index]``."""
    from xtalsym.bundle import load_bundle
    from xtalsym.inference import select_backend

    bundle = load_bundle(config.bundle.path or None)
    options = {}
    threads = config.pipeline.inference_threads
    if threads and config.bundle.backend == "onnxruntime":
        options["intra_op_threads"] = threads
    elif threads and config.bundle.backend == "torch":
        options["threads"] = threads
    backend = select_backend(bundle, config.bundle.backend, device=config.bundle.device, **options)
    index = None
    if config.index.enabled and bundle.index_dir is not None:
        from xtalsym.index import ReferenceIndex

        index = ReferenceIndex.load(bundle.index_dir, expected_model_id=bundle.model_id)
        log.info("reference index: %d entries", len(index))
    elif config.index.enabled:
        log.info("the bundle has no reference index: predictions carry no open-set result")
    return bundle, backend, index


class Service:
    """Runs one :class:`Pipeline` until :meth:`shutdown` (or SIGTERM/SIGINT in :meth:`run`)."""

    def __init__(self, config: DaemonConfig, *, components=None, context=None) -> None:
        self.config = config
        bundle, backend, index = components or load_components(config)
        self.backend = backend
        self.pipeline = Pipeline(config, bundle=bundle, backend=backend, index=index, context=context)
        self._stop = threading.Event()

    def start(self) -> Service:
        self.pipeline.start()
        log.info("xtalsym daemon: frames %s %s (%s, %s), predictions PUB %s %s, model %s, backend %s",
                 self.config.ingest.socket.upper(), self.config.ingest.mode, self.pipeline.ingest_endpoint
                 if self.config.ingest.mode == "bind" else self.config.ingest.address, self.config.ingest.protocol,
                 self.config.publish.mode, self.pipeline.publish_endpoint, self.pipeline.bundle.model_id[:12],
                 self.pipeline.model["backend"])
        return self

    def shutdown(self) -> None:
        self._stop.set()

    def run(self, *, install_signals: bool = True) -> int:
        """Start, serve until a signal or :meth:`shutdown`, then drain and stop. Returns 0."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self._on_signal(signum))
        self.start()
        while not self._stop.wait(0.5):
            if self.pipeline.finished.is_set():
                break
        log.info("stopping: intake closed, finishing frames in flight")
        self.pipeline.stop()
        close = getattr(self.backend, "close", None)
        if close:
            close()
        log.info("stopped: %s", self.pipeline.metrics_message())
        return 0

    def _on_signal(self, signum: int) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        self._stop.set()
