"""The whole path over real sockets on 127.0.0.1: detector-sim -> serve -> listener."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
zmq = pytest.importorskip("zmq")

from xtalsym.daemon.client import listen
from xtalsym.daemon.config import load_config
from xtalsym.daemon.service import Service
from xtalsym.daemon.sim import DetectorGeometry, DetectorSim
from xtalsym.offline import structures
from xtalsym.testing import (
    REPO_ROOT,
    TINY_CLASSES,
    InProcessDaemon,
    detector_socket,
    shared_path,
    shipped_structures,
    small_detector,
)

CLASSES = TINY_CLASSES
SHIPPED = shipped_structures()
GEOMETRY = small_detector()


def test_end_to_end(components):
    sim = DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, gap_rows=(200, 204), bad_every=2)
    run = InProcessDaemon(components=components)
    summary = run.run_sim(sim, finals=2)
    msgs = summary.messages
    finals = [m for m in msgs if m["final"]]
    assert sorted(m["user_data"]["formula"] for m in finals) == ["NaCl", "Si"]
    assert all(m["status"] == "complete" and m["axes"] == ["x", "y", "z"] for m in finals)
    partial = [m for m in msgs if m["status"] == "partial"]
    assert len(partial) == 4  # one after each of the first two views of each sample
    m = finals[0]
    assert m["schema"] == "xtalsym.prediction/2" and len(m["top"]) == 5
    assert {t["space_group"] for t in m["top"]} <= set(CLASSES)
    assert all(0 <= t["probability"] <= 1 for t in m["top"])
    assert m["open_set"] is not None and len(m["open_set"]["neighbours"]) == 4
    assert m["model"]["model_id"] == components[0].model_id
    assert m["user_data"]["space_group"] in (225, 227)
    assert m["timestamps"]["published"] >= m["timestamps"]["received"]
    # the symmetry evidence measured by the workers on the calibrated frames, combined per sample
    for final in finals:
        e = final["evidence"]
        assert e["schema"] == "xtalsym.evidence/1" and len(e["group_loglik"]) == 230
        assert set(e["zones"]) == {"x", "y", "z"} and all(z["decided"] for z in e["zones"].values())
        assert e["crystal_system"] in (None, "cubic") and e["cell"]["a"] == pytest.approx(e["cell"]["b"], rel=0.01)
        sg = final["user_data"]["space_group"]
        assert e["group_loglik"][sg - 1] >= max(e["group_loglik"]) - 5  # the true group is in the top set
    assert all(p["evidence"]["partial"] and p["evidence"]["zones"] for p in partial)
    metrics = run.service.pipeline.metrics.snapshot()
    # 6 images, a bad message after every second one: 3 bad, all counted, every good frame classified
    assert sum(metrics["bad_frames"].values()) == 3, metrics["bad_frames"]
    assert metrics["counts"]["views"] == 6


def test_partial_timeout_and_stale_end(components):
    """A sample missing an axis is published as a final partial after the timeout; a stale
    end of an earlier series is ignored; an image before any start is counted and dropped."""
    sim = DetectorSim(
        [SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"],
        geometry=GEOMETRY,
        protocol="native",
        axis_order="zxy",
        skip_axes={"NaCl": "y"},
        series_id=7,
    )
    from xtalsym.daemon import protocols as proto

    with InProcessDaemon(
        components=components, ingest={"protocol": "native"}, assembly={"timeout_seconds": 1.0}
    ) as run:
        image_id, array, ud = next(sim.images())
        run.send_messages(
            [
                proto.encode_native_image(series_id=6, image_id=0, array=array, user_data=ud),
                proto.encode_native_end(series_id=6),
            ]
        )  # stale: no series open
        messages = list(sim.messages())
        run.send_messages(messages[:-1])
        run.send_messages([proto.encode_native_end(series_id=5)])  # stale: another series
        run.wait_final(2, timeout=30)  # the series' own end comes later: NaCl is closed by the timeout
        run.send_messages(messages[-1:])
        run.wait_until(lambda: run.service.pipeline.tracker.events["end"] == 1, "the series' end", 30)
    summary = run.summary
    finals = {m["user_data"]["formula"]: m for m in summary.messages if m["final"]}
    assert finals["Si"]["status"] == "complete" and finals["Si"]["closed_by"] == "complete"
    nacl = finals["NaCl"]
    assert nacl["status"] == "partial" and nacl["closed_by"] == "timeout" and nacl["axes"] == ["x", "z"]
    metrics = run.service.pipeline.metrics.snapshot()
    assert metrics["bad_frames"] == {"no_start": 1}
    assert metrics["counts"]["stale_end"] == 2
    assert run.service.pipeline.tracker.events == {"start": 1, "end": 1, "restart": 0}


@pytest.mark.parametrize("protocol", ["stream_v1"])
def test_image_id_axes_and_restart(components, protocol):
    """Axes from image_id order; a detector restart (new start mid-series) is survived."""
    first = DetectorSim([SHIPPED / "NaCl.cif"], geometry=GEOMETRY, protocol=protocol, series_id=1)
    second = DetectorSim([SHIPPED / "Si.cif"], geometry=GEOMETRY, protocol=protocol, series_id=2)
    with InProcessDaemon(
        components=components, ingest={"protocol": protocol}, assembly={"axis_from": "image_id"}
    ) as run:
        run.send_messages(list(first.messages())[:2])  # start + one image, then the detector is re-armed
        run.send_messages(second.messages())
        run.wait_final(1)
    summary = run.summary
    assert run.service.pipeline.tracker.events["restart"] == 1
    finals = [m for m in summary.messages if m["final"]]
    by = {m["user_data"]["formula"]: m for m in finals}
    assert by["Si"]["status"] == "complete" and by["Si"]["axes"] == ["x", "y", "z"]
    # the interrupted series' single view is closed when the restart closes its series, never dropped
    assert by["NaCl"]["closed_by"] == "restart" and by["NaCl"]["axes"] == ["x"]


def test_other_geometry_classifies_the_same(components):
    """NaCl rendered at the detector geometry and calibrated back gives the model the same answer
    as the training-grid render."""
    from xtalsym import shaping
    from xtalsym.daemon import calibrate as cal
    from xtalsym.daemon.sim import render, to_counts
    from xtalsym.offline import simulate as sim

    bundle, backend, _ = components
    s = structures.load_structure(SHIPPED / "NaCl.cif").structure
    det = DetectorGeometry(
        pixels_x=380,
        pixels_y=340,
        pixel_size_m=55e-6,
        distance_m=0.5,
        wavelength_m=2.5e-12,
        beam_center_x_px=190.5,
        beam_center_y_px=160.5,
    )
    sampling = cal.build_map(cal.FrameGeometry(**det.stream_geometry()), cal.TrainingGeometry.from_bundle(bundle))
    frames = render(s, det)
    ref = sim.simulate_axes(s, **sim.DATASET_OPTIONS)
    size = bundle.image_size
    x = np.zeros((2, 3, 3, size, size), np.uint8)
    for i, axis in enumerate("xyz"):
        x[0, i] = shaping.shape(sim.to_raw_uint8(ref[axis]), axis, size=size).transpose(2, 0, 1)
        x[1, i] = shaping.shape(cal.calibrate(to_counts(frames[axis], None), sampling), axis, size=size).transpose(
            2, 0, 1
        )
    result = backend.run(x)
    p = result.probabilities
    assert p[0].argmax() == p[1].argmax()
    assert np.abs(p[0] - p[1]).max() < 0.02


def test_sub_bind_ingest_and_pub_connect(components):
    """The other socket layouts: the daemon binds SUB for frames (a PUB source connects to it)
    and connects its PUB to a subscriber that binds (e.g. a collector behind a firewall)."""
    ctx = zmq.Context.instance()
    collector = ctx.socket(zmq.SUB)
    collector.setsockopt(zmq.SUBSCRIBE, b"xtalsym.prediction")
    collector.bind("tcp://127.0.0.1:*")
    collector_endpoint = collector.getsockopt(zmq.LAST_ENDPOINT).decode()
    config = load_config(
        overrides={
            "ingest": {"socket": "sub", "mode": "bind", "address": "tcp://127.0.0.1:*"},
            "publish": {"mode": "connect", "address": collector_endpoint, "metrics_interval_seconds": 0},
            "pipeline": {"workers": 1, "latency_budget_seconds": 0.01},
            "metrics": {"port": 0},
        }
    )
    service = Service(config, components=components).start()
    source = ctx.socket(zmq.PUB)
    try:
        source.connect(service.pipeline.ingest_endpoint)
        time.sleep(0.5)  # PUB/SUB join: a PUB drops what it sends before the subscription arrives
        DetectorSim([SHIPPED / "NaCl.cif"], geometry=GEOMETRY).send(source)
        finals, deadline = [], time.monotonic() + 60
        while not finals and time.monotonic() < deadline:
            if collector.poll(200):
                topic, body = collector.recv_multipart()
                message = json.loads(body)
                if message["final"]:
                    finals.append(message)
    finally:
        source.close(linger=0)
        service.pipeline.stop()
        collector.close(linger=0)
    assert len(finals) == 1 and finals[0]["status"] == "complete", service.pipeline.metrics.snapshot()
    assert finals[0]["user_data"]["formula"] == "NaCl"


FIXTURES = shared_path("fixtures", "dectris_stream2")


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"DECTRIS captures not found at {FIXTURES}")
def test_shipped_config_serves_real_dectris_captures():
    """The real EIGER2 500K messages (no start message is public) replayed over a socket into
    the daemon run from the shipped example config and the shipped bundle: with the
    geometry from the config, every image is calibrated, shaped, classified and published."""
    sock, endpoint = detector_socket()
    config = load_config(
        REPO_ROOT / "systemd" / "xtalsym.example.toml",
        overrides={
            "ingest": {"address": endpoint, "frames_before_start": "config"},
            # EIGER2 500K: 1030 x 514 pixels of 75 um; beam centre, wavelength and distance as a user would set them
            "geometry": {
                "beam_center_x_px": 515.0,
                "beam_center_y_px": 257.0,
                "pixel_size_x_m": 75e-6,
                "pixel_size_y_m": 75e-6,
                "wavelength_m": 1.0e-10,
                "detector_distance_m": 0.1,
            },
            "assembly": {"axis_from": "image_id", "timeout_seconds": 1.0},
            "publish": {"address": "tcp://127.0.0.1:*"},
            "metrics": {"port": 0},
        },
    )
    service = Service(config).start()
    stop, ready = threading.Event(), threading.Event()
    result = {}
    listener = threading.Thread(
        target=lambda: result.update(s=listen(service.pipeline.publish_endpoint, stop=stop, ready=ready)), daemon=True
    )
    listener.start()
    ready.wait(5)
    time.sleep(0.3)
    images = sorted(FIXTURES.glob("*_image.cbor"))
    try:
        for path in [*images, FIXTURES / "end.cbor"]:
            sock.send(path.read_bytes())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and service.pipeline.metrics.snapshot()["counts"].get(
            "timed_out_samples", 0
        ) < len(images):
            time.sleep(0.2)
    finally:
        sock.close(linger=0)
        service.pipeline.stop()
        time.sleep(0.3)
        stop.set()
        listener.join(5)
    snap = service.pipeline.metrics.snapshot()
    assert snap["bad_frames"] == {}, snap
    assert snap["counts"]["messages"] == len(images) + 1 and snap["counts"]["views"] == len(images), snap
    finals = [m for m in result["s"].messages if m["final"]]
    assert len(finals) == len(images)  # one sample per capture (each its own series), closed by the timeout
    assert {m["frames"][0]["series_unique_id"] for m in finals} == {
        ev.series_unique_id for ev in (decode_v2(p) for p in images)
    }
    for m in finals:
        assert m["status"] == "partial" and m["closed_by"] == "timeout" and m["axes"] == ["x"]
        assert m["model"]["model_id"] == service.pipeline.bundle.model_id and len(m["top"]) == 5
        assert abs(sum(t["probability"] for t in m["top"])) <= 1.0 + 1e-6


def decode_v2(path):
    from xtalsym.daemon.protocols import decode

    return decode("stream_v2", [path.read_bytes()])


@pytest.mark.parametrize("protocol", ["stream_v2", "stream_v1"])
def test_stream_flatfield_applied_when_the_detector_did_not(components, protocol):
    """Frames from a detector whose left half counts a quarter as much, with the flatfield that
    corrects it in the start message: classified like the clean frames when the start says the
    detector did not apply it (auto); left alone when it says it did."""
    from xtalsym.daemon import protocols as proto

    def series(sid, frames, flatfield=None, applied=None):
        sim = DetectorSim([SHIPPED / "NaCl.cif"], geometry=GEOMETRY, series_id=sid, protocol=protocol)
        geo = GEOMETRY.stream_geometry()
        if protocol == "stream_v2":
            extra = {} if applied is None else {"flatfield_enabled": applied}
            start = proto.encode_stream_v2_start(
                series_id=sid,
                series_unique_id=sim.series_unique_id,
                geometry=geo,
                channels=["threshold_1"],
                image_dtype="uint16",
                number_of_images=3,
                extra=extra,
                flatfield=None if flatfield is None else {"threshold_1": flatfield},
            )
        else:
            config = {
                "beam_center_x": geo["beam_center_x_px"],
                "beam_center_y": geo["beam_center_y_px"],
                "x_pixel_size": geo["pixel_size_x_m"],
                "y_pixel_size": geo["pixel_size_y_m"],
                "wavelength": geo["wavelength_m"] * 1e10,
                "detector_distance": geo["detector_distance_m"],
                "x_pixels_in_detector": geo["image_size_x_px"],
                "y_pixels_in_detector": geo["image_size_y_px"],
                "nimages": 3,
                "ntrigger": 1,
                "bit_depth_image": 16,
                **({} if applied is None else {"flatfield_correction_applied": applied}),
            }
            start = proto.encode_stream_v1_header(
                series_id=sid,
                config=config,
                flatfield=flatfield,
                header_detail="all" if flatfield is not None else "basic",
            )
        images = [sim.image_message(i, frames(a), {**ud, "sample_id": f"s{sid}"}) for i, a, ud in sim.images()]
        return [start, *images, sim.end_message()]

    def weak(array):
        out = array.copy()
        out[:, :150] = out[:, :150] // 4
        return out

    flatfield = np.ones((GEOMETRY.pixels_y, GEOMETRY.pixels_x), np.float32)
    flatfield[:, :150] = 4.0
    with InProcessDaemon(components=components, ingest={"protocol": protocol}) as run:
        for messages in (
            series(1, lambda a: a),
            series(2, weak, flatfield, applied=False),
            series(3, weak, flatfield, applied=True),
        ):
            run.send_messages(messages)
        run.wait_final(3)
    summary = run.summary
    finals = {
        m["sample_id"]: {t["space_group"]: t["probability"] for t in m["top"]} for m in summary.messages if m["final"]
    }
    clean, corrected, uncorrected = finals["s1"], finals["s2"], finals["s3"]
    # (the tiny untrained model's probabilities are flat, so compare the two differences)
    off_corrected = max(abs(clean[g] - corrected.get(g, 0)) for g in clean)
    off_uncorrected = max(abs(clean[g] - uncorrected.get(g, 0)) for g in clean)
    assert off_corrected < 1e-3 and off_uncorrected > 10 * off_corrected, (off_corrected, off_uncorrected)


def test_backend_warmed_with_a_full_batch_before_serving(components):
    """The first batch the backend sees is a full micro-batch of blank views (its memory holds
    the largest batch from the start), before any frame."""
    bundle, backend, index = components

    class Recording:
        def __init__(self, inner):
            self.inner, self.sizes = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, x, present=None):
            self.sizes.append(len(x))
            return self.inner.run(x, present)

        def run_views(self, views, axes):  # the daemon's default path: each view once
            self.sizes.append(len(views))
            return self.inner.run_views(views, axes)

    recording = Recording(backend)
    run = InProcessDaemon(components=(bundle, recording, index), pipeline={"max_batch": 7})
    assert recording.sizes == [7]  # before any frame
    run.run_sim(DetectorSim([SHIPPED / "NaCl.cif"], geometry=GEOMETRY), finals=1)
    # whole graph: at most max_batch requests; per-view: at most 3 x max_batch new views
    assert len(recording.sizes) > 1 and all(1 <= n <= 21 for n in recording.sizes)
