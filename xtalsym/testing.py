"""Helpers shared by the tests and the benchmarks: where ``../shared`` is, tiny bundles,
and one in-process daemon with a listener on its predictions.

Heavy packages (torch, ZeroMQ, the daemon) are imported only by the helpers that need
them, so a test module can import this one before it skips for a missing extra.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHARED_ENV = "XTALSYM_SHARED"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Space groups of the tiny bundles: a few of every common kind (triclinic to cubic).
TINY_CLASSES = [2, 14, 62, 194, 225, 227]
# A small, off-centre detector that still covers the training grid (q/px 0.0048 vs 0.0054).
SMALL_DETECTOR = {
    "pixels_x": 300,
    "pixels_y": 290,
    "pixel_size_m": 55e-6,
    "distance_m": 0.33,
    "wavelength_m": 3.5e-12,
    "beam_center_x_px": 150.5,
    "beam_center_y_px": 140.5,
}


def shared_dir() -> Path:
    """The project's shared data folder: ``$XTALSYM_SHARED``, else ``shared/`` beside the
    checkout (CI clones the repository with ``../shared`` next to it)."""
    env = os.environ.get(SHARED_ENV)
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path inside :func:`shared_dir` (it may not exist: tests skip on that)."""
    return shared_dir().joinpath(*parts)


def shipped_structures() -> Path:
    """The CIF files that ship with the package (xtalsym/data/structures)."""
    from xtalsym.offline import structures

    return structures.shipped_structures_dir()


def small_detector():
    """The :class:`~xtalsym.daemon.sim.DetectorGeometry` of :data:`SMALL_DETECTOR`."""
    from xtalsym.daemon.sim import DetectorGeometry

    return DetectorGeometry(**SMALL_DETECTOR)


# --------------------------------------------------------------------------- tiny bundles


def tiny_bundle(
    tmp: str | os.PathLike,
    *,
    index: bool = True,
    seed: int = 0,
    model_name: str = "msdn",
    image_size: int = 64,
    classes: Sequence[int] = TINY_CLASSES,
) -> Path:
    """A bundle in ``tmp/bundle`` of a freshly initialised model (input 32, ONNX graph
    ``image_size``; ONNX only for the multistream msdn), with a reference index of four
    random references when ``index``. Another ``seed`` gives other weights (another model_id)."""
    import numpy as np
    import torch

    from xtalsym import bundle as bundles
    from xtalsym import model as models
    from xtalsym.offline import dataset as ds

    tmp = Path(tmp)
    name = "tiny" if seed == 0 else f"tiny-{seed}"
    classes = [int(c) for c in classes]
    torch.manual_seed(seed)
    release = tmp / "release"
    release.mkdir(parents=True)
    model = models.build_model(model_name, len(classes), input_size=32)
    models.save_checkpoint(
        release / "model.pt",
        model,
        extra={
            "classes": classes,
            "dataset_config": ds.BuildConfig().to_json(),
            "config": {},
            "metrics": [],
            "release": name,
        },
    )
    (release / "card.json").write_text(json.dumps({"name": name, "classes": classes}))
    (release / "MODEL_CARD.md").write_text("# tiny\n")
    out = bundles.build_bundle(release, tmp / "bundle", image_size=image_size, onnx=model_name == "msdn")
    if index:
        from xtalsym.index.scoring import normalise_views
        from xtalsym.index.store import ReferenceIndex

        b = bundles.load_bundle(out)
        rng = np.random.default_rng(0)
        vecs = normalise_views(rng.normal(size=(4, 3, 960)).astype(np.float32))
        entries = [
            {"material_id": f"mp-{i}", "formula": f"X{i}", "space_group": sg}
            for i, sg in enumerate([225, 225, 62, 194])
        ]
        ReferenceIndex.build(vecs, entries, model_id=b.model_id, gpu="off").save(tmp / "index")
        bundles.add_index(out, tmp / "index")
    return out


def shipped_or_tiny_bundle(tmp: str | os.PathLike) -> tuple[str, bool]:
    """(path, tiny): the shipped bundle when it verifies, else a tiny untrained one built in
    ``tmp`` (for benchmarks that measure the daemon, not the model)."""
    from xtalsym.bundle import BundleError, default_bundle_path, load_bundle

    try:
        path = str(default_bundle_path())
        load_bundle(path)
        return path, False
    except (BundleError, FileNotFoundError):
        return str(tiny_bundle(tmp)), True


# --------------------------------------------------------------------------- the daemon in-process


def detector_socket(context=None) -> tuple[Any, str]:
    """A bound PUSH socket on a free loopback port, as a detector's, and its endpoint."""
    import zmq

    from xtalsym.daemon.sim import push_socket

    sock = push_socket(context or zmq.Context.instance(), "tcp://127.0.0.1:*")
    return sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def daemon_overrides(frame_endpoint: str, *, bundle: str | os.PathLike | None = None, **sections: dict) -> dict:
    """Configuration overrides for a test daemon: lossless (``overload = "block"``, tests
    count every frame), evidence for every sample (``evidence_under_load = "keep"``: tests send
    bursts, and compare every sample's evidence), one worker, publish and metrics on free ports
    (never a real daemon's), the bundle on ONNX Runtime on the CPU; ``sections`` are merged on top."""
    overrides: dict = {
        "ingest": {"address": frame_endpoint},
        "publish": {"address": "tcp://127.0.0.1:*", "metrics_interval_seconds": 0.5},
        "pipeline": {"workers": 1, "latency_budget_seconds": 0.01, "overload": "block", "evidence_under_load": "keep"},
        "metrics": {"port": 0},
    }
    if bundle is not None:
        overrides["bundle"] = {"path": str(bundle), "backend": "onnxruntime", "device": "cpu"}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return overrides


class InProcessDaemon:
    """A :class:`~xtalsym.daemon.service.Service` in this process, a listener thread on its
    predictions (``live``: readable while it runs) and, unless ``frame_endpoint`` is given,
    a detector PUSH socket of its own (``push``, ``endpoint``). A context manager: leaving
    ``with`` stops it, and ``summary`` is then what the listener saw.

    ``components``: (bundle, backend, index) already loaded (fast), else ``bundle`` is
    loaded; ``next_config`` is what a SIGHUP reload reads.
    """

    def __init__(
        self,
        *,
        components=None,
        bundle: str | os.PathLike | None = None,
        frame_endpoint: str | None = None,
        **sections: dict,
    ) -> None:
        import zmq

        from xtalsym.daemon.client import ListenSummary, listen
        from xtalsym.daemon.config import load_config
        from xtalsym.daemon.service import Service

        self.push = None
        if frame_endpoint is None:
            self.push, frame_endpoint = detector_socket(zmq.Context.instance())
        self.endpoint = frame_endpoint
        self.config = load_config(overrides=daemon_overrides(frame_endpoint, bundle=bundle, **sections))
        self.next_config = self.config
        self.service = Service(self.config, components=components, reload_config=lambda: self.next_config).start()
        self.live = ListenSummary()
        self.summary: ListenSummary | None = None
        self.stop = threading.Event()
        ready = threading.Event()

        def run() -> None:
            self.summary = listen(
                self.service.pipeline.publish_endpoint, stop=self.stop, ready=ready, summary=self.live, receive_hwm=0
            )

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        time.sleep(0.3)  # PUB/SUB join

    @property
    def pipeline(self):
        return self.service.pipeline

    def __enter__(self) -> InProcessDaemon:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, sources, *, series_id: int = 1, geometry=None) -> int:
        """Stream the structures as one series on this daemon's own detector socket."""
        from xtalsym.daemon.sim import DetectorSim

        return DetectorSim(sources, geometry=geometry or small_detector(), series_id=series_id).send(self.push)

    def send_messages(self, messages) -> int:
        """Send ZeroMQ multipart messages (e.g. ``DetectorSim.messages()``) on the own detector socket."""
        n = 0
        for n, message in enumerate(messages, 1):
            self.push.send_multipart(message)
        return n

    def run_sim(self, sim, *, finals: int, timeout: float = 60.0):
        """Stream a :class:`~xtalsym.daemon.sim.DetectorSim` on the own detector socket, wait for
        ``finals`` final predictions, stop the daemon; returns what the listener saw."""
        with self:
            sim.send(self.push)
            self.wait_final(finals, timeout)
        return self.summary

    def summary_messages(self) -> list[dict]:
        return list(self.live.messages)

    def predictions(self) -> int:
        return self.pipeline.metrics.snapshot()["counts"].get("predictions", 0)

    def finals(self) -> int:
        """Final predictions published (complete, or closed by end, restart, timeout, ...)."""
        return self.pipeline.metrics.snapshot()["counts"].get("predictions_final", 0)

    def accounting(self) -> tuple[int, int]:
        """(messages received, messages accounted for) from the daemon's own counters: every
        message is a start, an end, a stale end, a shaped view or a rejected frame."""
        snap = self.pipeline.metrics.snapshot()
        c, bad, ev = snap["counts"], snap["bad_frames"], self.pipeline.tracker.events
        accounted = ev["start"] + ev["end"] + c.get("stale_end", 0) + c.get("views", 0) + sum(bad.values())
        return c.get("messages", 0), accounted

    def wait_predictions(self, n: int, timeout: float = 60.0) -> None:
        self.wait_until(lambda: self.predictions() >= n, f"{n} predictions", timeout)

    def wait_final(self, n: int, timeout: float = 60.0) -> None:
        self.wait_until(lambda: self.finals() >= n, f"{n} final predictions", timeout)

    def settle(self, n_messages: int, *, finals: int | None = None, timeout: float = 90.0) -> None:
        """Wait until ``n_messages`` are received and accounted for (and ``finals`` final predictions are out)."""
        self.wait_until(
            lambda: self.accounting() == (n_messages, n_messages), f"{n_messages} messages accounted", timeout
        )
        if finals is not None:
            self.wait_final(finals, timeout)

    def wait_until(self, done, what: str, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if done():
                return
            time.sleep(0.05)
        raise AssertionError(f"not {what} after {timeout} s: {self.pipeline.metrics.snapshot()}")

    def close(self):
        """Stop the daemon, then the listener; returns what the listener saw."""
        self.service.pipeline.stop()
        time.sleep(0.3)
        self.stop.set()
        self.thread.join(5)
        if self.push is not None:
            self.push.close(linger=0)
        if self.summary is None:  # the listener did not stop in time: what it saw so far
            self.summary = self.live
        return self.summary


# --------------------------------------------------------------------------- systemd


class SystemdSide:
    """The receiving end of $NOTIFY_SOCKET: one datagram = one dict of KEY=VALUE lines."""

    def __init__(self, address) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, *, after: float = 0.0, timeout: float = 60.0) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for t, fields in list(self.messages):
                if t >= after and key in fields and (value is None or fields[key] == value):
                    return fields
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} from the daemon in {timeout} s; got {self.messages}")

    def pings(self, start: float, end: float) -> int:
        return sum(1 for t, f in list(self.messages) if start <= t < end and f.get("WATCHDOG") == "1")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
