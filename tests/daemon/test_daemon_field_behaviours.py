"""What real (EIGER-compatible) streams were seen to do (issue 11), each reproduced by
detector-sim on request and driven over real sockets on 127.0.0.1 into the real daemon:
no user_data, a negative detector_translation / no distance, an odd-encoded mask and
flatfield, the start and image 0 in one message, a reused series_unique_id, a duplicate
end, and a second PULL client taking frames round-robin. Every test checks the accounting
identity of docs/DAEMON.md; one checks it from a real /metrics scrape alone."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
zmq = pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")

from test_metrics import get, samples, total, value  # noqa: E402

from xtalsym.daemon import protocols as proto  # noqa: E402
from xtalsym.daemon.sim import DetectorGeometry, DetectorSim  # noqa: E402
from xtalsym.testing import InProcessDaemon, shipped_structures, small_detector  # noqa: E402

GEOMETRY = small_detector()
STRUCTURES = [shipped_structures() / "NaCl.cif", shipped_structures() / "Si.cif"]


def final_predictions(summary) -> list[dict]:
    return [m for m in summary.messages if m["final"]]


def warnings_of(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.fixture
def warn_log(caplog):
    caplog.set_level(logging.INFO, logger="xtalsym")
    return caplog


# ------------------------------------------------------------------ defaults that work


@pytest.mark.parametrize("protocol", ["stream_v2", "stream_v1"])
def test_no_user_data_axes_from_image_id_order(components, warn_log, protocol):
    """No user_data at all: with the shipped defaults (axis_from = "auto") the axes come from
    the image-id order, warned once per series, and both samples are classified complete."""
    sims = [
        DetectorSim(STRUCTURES, geometry=GEOMETRY, protocol=protocol, series_id=sid, user_data=False) for sid in (1, 2)
    ]
    with InProcessDaemon(components=components, ingest={"protocol": protocol}) as run:
        n = sum(run.send_messages(list(sim.messages())) for sim in sims)
        run.settle(n, finals=4)
    summary = run.summary
    finals = final_predictions(summary)
    assert len(finals) == 4 and all(m["status"] == "complete" and m["closed_by"] == "complete" for m in finals)
    assert all(m["user_data"] is None for m in finals)
    # keyed by the daemon's series number: series 1 is the daemon's #1, series 2 its #2
    ids = sorted(m["sample_id"] for m in finals)
    series = ["1", "2"] if protocol == "stream_v1" else [sim.series_unique_id for sim in sims]  # V1: no unique id
    assert ids == sorted(f"{s}#{k}:{i}" for k, s in enumerate(series, 1) for i in (0, 1)), ids
    assert len(warnings_of(warn_log, "axes come from the image-id order")) == 2  # once per series
    assert run.service.pipeline.metrics.snapshot()["bad_frames"] == {}


def test_distance_from_the_stream_or_a_message_naming_the_fix(components, warn_log):
    """A V2 start whose only distance is a detector_translation with z < 0: never taken; each
    image is a bad frame whose message names detector_translation and [geometry]
    detector_distance_m. A positive translation z is taken; a V1 start without
    detector_distance names the key too, and so does a V2 start with no distance field at all. With [geometry] detector_distance_m given, the
    negative-translation series classifies."""
    negative = DetectorSim(STRUCTURES[:1], geometry=GEOMETRY, series_id=1, distance_field="negative_translation")
    positive = DetectorSim(STRUCTURES[:1], geometry=GEOMETRY, series_id=2, distance_field="translation")
    with InProcessDaemon(components=components) as run:
        n = run.send_messages(list(negative.messages())) + run.send_messages(list(positive.messages()))
        run.settle(n, finals=1)
    summary = run.summary
    snap = run.service.pipeline.metrics.snapshot()
    assert snap["bad_frames"] == {"missing_geometry": 3}, snap
    refused = [r.getMessage() for r in warn_log.records if "missing_geometry" in r.getMessage()]
    assert refused and all(
        "detector_translation" in m and "set [geometry] detector_distance_m" in m for m in refused
    ), refused
    assert warnings_of(warn_log, "is not used as the detector distance")  # at the start, before any image
    finals = final_predictions(summary)
    assert [(m["series_id"], m["status"]) for m in finals] == [(2, "complete")]

    for protocol in ("stream_v1", "stream_v2"):  # no distance field at all, in either protocol
        warn_log.clear()
        bare = DetectorSim(STRUCTURES[:1], geometry=GEOMETRY, series_id=3, protocol=protocol, distance_field="none")
        with InProcessDaemon(components=components, ingest={"protocol": protocol}) as run:
            run.settle(run.send_messages(list(bare.messages())))
        assert run.service.pipeline.metrics.snapshot()["bad_frames"] == {"missing_geometry": 3}, protocol
        assert any(
            "the start message does not give it: set [geometry] detector_distance_m" in r.getMessage()
            for r in warn_log.records
        ), protocol

    with InProcessDaemon(components=components, geometry={"detector_distance_m": GEOMETRY.distance_m}) as run:
        negative.series_id = 4
        run.settle(run.send_messages(list(negative.messages())), finals=1)
    summary = run.summary
    assert [m["status"] for m in final_predictions(summary)] == ["complete"]
    assert run.service.pipeline.metrics.snapshot()["bad_frames"] == {}


def test_worker_warnings_reach_the_daemons_log(components, warn_log):
    """A detector that covers little of the training grid: the shaping worker's warning arrives
    as a log record of the daemon process (level, logger, timestamp), not a bare stderr line."""
    small = DetectorGeometry(pixels_x=100, pixels_y=100, pixel_size_m=55e-6, distance_m=0.33, wavelength_m=3.5e-12)
    sim = DetectorSim(STRUCTURES[:1], geometry=small, series_id=1)
    with InProcessDaemon(components=components) as run:
        run.settle(run.send_messages(list(sim.messages())))
    relayed = [
        r
        for r in warn_log.records
        if r.name == "xtalsym.daemon.calibrate" and "of the training grid falls on the frame" in r.getMessage()
    ]
    assert relayed and relayed[0].levelno == logging.WARNING and relayed[0].created > 0
    assert relayed[0].process != __import__("os").getpid()  # it was logged in a worker process


# ------------------------------------------------------------------ one odd message must not lose a series


@pytest.mark.parametrize("protocol", ["stream_v2", "stream_v1"])
def test_odd_mask_encoding_keeps_the_series(components, warn_log, protocol):
    """The start's pixel mask and flatfield in an unexpected encoding (V2 raw bytes, V1
    pixelmask-1.0 / flatfield-1.0): the series is kept, each part warned about and ignored."""
    sim = DetectorSim(STRUCTURES, geometry=GEOMETRY, protocol=protocol, odd_mask_encoding=True)
    with InProcessDaemon(components=components, ingest={"protocol": protocol}) as run:
        run.settle(run.send_messages(list(sim.messages())), finals=2)
    summary = run.summary
    assert [m["status"] for m in final_predictions(summary)] == ["complete", "complete"]
    snap = run.service.pipeline.metrics.snapshot()
    assert snap["bad_frames"] == {} and snap["counts"]["start_part_ignored"] == 2, snap
    kept = warnings_of(warn_log, "the series is kept")
    assert len(kept) == 2 and any("flatfield" in r.getMessage() for r in kept), [r.getMessage() for r in kept]


@pytest.mark.parametrize("protocol", ["stream_v2", "stream_v1"])
def test_start_and_first_image_in_one_message(components, protocol):
    """The start and image 0 sent as one ZeroMQ message: both handled; the message counts as
    two detector messages (coalesced_messages = 1), so the accounting still closes."""
    sim = DetectorSim(STRUCTURES, geometry=GEOMETRY, protocol=protocol, start_with_first_image=True)
    messages = list(sim.messages())
    assert len(messages) == 7  # (start + image 0), 5 images, end
    with InProcessDaemon(components=components, ingest={"protocol": protocol}) as run:
        run.send_messages(messages)
        run.settle(8, finals=2)
    summary = run.summary
    assert [m["status"] for m in final_predictions(summary)] == ["complete", "complete"]
    snap = run.service.pipeline.metrics.snapshot()
    assert snap["counts"]["coalesced_messages"] == 1 and snap["counts"]["views"] == 6 and snap["bad_frames"] == {}


def test_rejected_start_is_a_warning_naming_frames_before_start(components, warn_log):
    """A start that does not decode: WARNING "start of series N rejected: ...; its images will
    be dropped ... frames_before_start"; its images are then counted no_start."""
    sim = DetectorSim(STRUCTURES[:1], geometry=GEOMETRY, series_id=9)
    start, *rest = list(sim.messages())
    bad_start = proto.encode_stream_v2_start(
        series_id=9,
        geometry=GEOMETRY.stream_geometry(),
        channels=["threshold_1"],
        image_dtype="uint16",
        number_of_images=3,
        extra={"incident_wavelength": -1.0},
    )
    with InProcessDaemon(components=components) as run:
        run.settle(run.send_messages([bad_start, *rest]))
    assert run.service.pipeline.metrics.snapshot()["bad_frames"] == {"bad_field": 1, "no_start": 3}
    said = warnings_of(warn_log, "start of series 9 rejected")
    assert len(said) == 1 and "incident_wavelength" in said[0].getMessage()
    assert 'frames_before_start = "config"' in said[0].getMessage()


# ------------------------------------------------------------------ sample assembly


def test_reused_unique_id_never_joins_two_series_and_end_closes_samples(components):
    """A detector that reuses its series_unique_id, no user_data: image 0 of one series and
    images 1-2 of the next once made one "complete" sample. Now each series is its own
    sample, closed (final partial) by its series' end, not by the timeout; every end sent
    twice is a stale end the second time."""
    first = DetectorSim(
        STRUCTURES[:1],
        geometry=GEOMETRY,
        series_id=1,
        user_data=False,
        unique_id="reused",
        skip_axes={"NaCl": "yz"},
        duplicate_end=True,
    )
    second = DetectorSim(
        STRUCTURES[:1],
        geometry=GEOMETRY,
        series_id=1,
        user_data=False,
        unique_id="reused",
        skip_axes={"NaCl": "x"},
        duplicate_end=True,
    )
    with InProcessDaemon(components=components, assembly={"timeout_seconds": 600.0}) as run:
        n = run.send_messages(list(first.messages())) + run.send_messages(list(second.messages()))
        assert n == 2 * 4 + 1  # start, 1 image, end, end; start, 2 images, end, end
        run.settle(n, finals=2)
    summary = run.summary
    finals = final_predictions(summary)
    assert [(m["sample_id"], m["axes"], m["closed_by"]) for m in finals] == [
        ("reused#1:0", ["x"], "end"),
        ("reused#2:0", ["y", "z"], "end"),
    ]
    snap = run.service.pipeline.metrics.snapshot()
    assert snap["counts"]["stale_end"] == 2 and run.service.pipeline.tracker.events["end"] == 2
    # the second series' start announced 2 images of ids 1 and 2: image id 0 is missing there
    assert snap["counts"]["frames_missing"] == 1


def test_late_view_joins_its_sample_instead_of_an_orphan(components):
    """Views finish late when the workers lag behind the timeout: NaCl's x is shaped, then the
    worker stalls (SIGSTOP) with y and z inside it for five timeouts. The sample is not timed
    out while its views are still in the workers, so they complete it instead of becoming an
    orphan partial of their own; the series' end closes nothing early either."""
    sim = DetectorSim(STRUCTURES[:1], geometry=GEOMETRY, series_id=1)
    start, x, y, z, end = list(sim.messages())
    with InProcessDaemon(components=components, assembly={"timeout_seconds": 0.3}) as run:
        pipeline = run.service.pipeline
        workers = list(pipeline.pool._processes)
        run.send_messages([start, x])
        run.wait_until(lambda: pipeline.metrics.snapshot()["counts"].get("views", 0) == 1, "the first view", 90)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            run.send_messages([y, z, end])
            run.wait_until(lambda: pipeline.tracker.events["end"] == 1, "the end", 90)
            time.sleep(1.5)  # five timeouts with y and z stuck in the worker
            assert len(pipeline.assembler.open) == 1, "timed out while its views were in the workers"
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        run.settle(5)
    summary = run.summary
    finals = final_predictions(summary)
    assert [(m["status"], m["axes"]) for m in finals] == [("complete", ["x", "y", "z"])]  # one, no orphan


# ------------------------------------------------------------------ fan-out


def test_second_pull_client_gaps_counted_and_warned(components, warn_log):
    """A second PULL client on the same detector takes every other frame (ZeroMQ round-robin):
    the image-id gaps are counted (frames_missing) and one WARNING names the likely cause."""
    sim = DetectorSim(STRUCTURES, geometry=GEOMETRY, series_id=1, repeat=2)  # 12 images
    start, *images, end = list(sim.messages())
    with InProcessDaemon(components=components, assembly={"timeout_seconds": 600.0}) as run:
        pipeline = run.service.pipeline
        other = zmq.Context.instance().socket(zmq.PULL)
        taken: list[int] = []
        try:
            run.send_messages([start])  # the daemon alone: it gets the start
            run.settle(1)
            other.connect(run.endpoint)
            time.sleep(0.5)  # the second peer is attached: from now on PUSH alternates
            run.send_messages([*images, end])
            deadline = time.monotonic() + 30
            got = pipeline.metrics.snapshot()["counts"].get("messages", 0) - 1
            while len(taken) + got < len(images) + 1 and time.monotonic() < deadline:
                if other.poll(100):
                    ev = proto.decode("stream_v2", other.recv_multipart())
                    taken.append(ev.image_id if isinstance(ev, proto.Image) else -1)
                got = pipeline.metrics.snapshot()["counts"].get("messages", 0) - 1
            assert len(taken) + got == len(images) + 1
            run.settle(1 + got)
        finally:
            other.close(linger=0)
    assert 0 < len(taken) < len(images) + 1  # both clients got frames
    snap = pipeline.metrics_message()
    ended = pipeline.tracker.events["end"] == 1  # whether the end came to the daemon
    seen = {i for i in range(len(images)) if i not in taken}
    expected = (len(images) if ended else max(seen) + 1) - len(seen)  # ids up to the last (or all, at the end)
    assert snap["frames_missing"] == expected > 0, (taken, snap)
    fanout = warnings_of(warn_log, "round-robin")
    assert len(fanout) == 1 and "second client" in fanout[0].getMessage()


# ------------------------------------------------------------------ /metrics alone


def test_accounting_identity_from_a_metrics_scrape(components):
    """Starts (one rejected), a restart, images, a stale end, a duplicate end, a duplicate axis,
    an undecodable message, a start + image sent as one message, a gap: the identity
    frames_received = series{start} + series{end} + events{stale_end} + views_shaped +
    Σ frames_rejected holds from one scrape of /metrics, and the new counters agree with the
    daemon's own state."""
    a = DetectorSim(STRUCTURES, geometry=GEOMETRY, series_id=1, start_with_first_image=True, duplicate_end=True)
    b = DetectorSim(STRUCTURES, geometry=GEOMETRY, series_id=2)
    c = DetectorSim(STRUCTURES[:1], geometry=GEOMETRY, series_id=3)
    a_msgs, b_msgs, c_msgs = list(a.messages()), list(b.messages()), list(c.messages())
    _, array, ud = next(c.images())
    duplicate = c.image_message(0, array, ud)  # axis x of NaCl again
    bad_start = proto.encode_stream_v2_start(
        series_id=8,
        geometry={},
        channels=["threshold_1"],
        image_dtype="uint16",
        number_of_images=1,
        extra={"incident_wavelength": 0.0},
    )
    # b is cut after 2 images by c's start (a restart); c: image 0 twice, image 1 never sent (a gap)
    stream = [
        *a_msgs,
        *b_msgs[:3],
        *c_msgs[:2],
        duplicate,
        *c_msgs[3:],
        [b"\xd9\xd9\xf7not cbor"],
        bad_start,
        proto.encode_stream_v2_end(series_id=77),
    ]
    with InProcessDaemon(components=components, assembly={"timeout_seconds": 600.0}) as run:
        pipeline = run.service.pipeline
        sent = run.send_messages(stream)
        run.settle(sent + 1, finals=4)  # + the image inside a's first message; a's 2, b's and c's NaCl
        url = pipeline.monitor.url
        code, text = get(url + "/metrics")
        assert code == 200
    p = samples(text)
    received = value(p, "xtalsym_frames_received_total")
    accounted = (
        value(p, "xtalsym_series_total", event="start")
        + value(p, "xtalsym_series_total", event="end")
        + value(p, "xtalsym_events_total", event="stale_end")
        + value(p, "xtalsym_views_shaped_total")
        + total(p, "xtalsym_frames_rejected_total")
    )
    assert received == accounted == sent + 1, (received, accounted, sent)
    assert value(p, "xtalsym_events_total", event="coalesced_messages") == 1
    assert (
        value(p, "xtalsym_series_total", event="start") == 3 and value(p, "xtalsym_series_total", event="restart") == 1
    )
    assert value(p, "xtalsym_series_total", event="end") == 2  # a and c (b was restarted)
    assert value(p, "xtalsym_events_total", event="stale_end") == 2  # a's second end, series 77
    assert value(p, "xtalsym_events_total", event="start_rejected") == 1
    assert value(p, "xtalsym_duplicate_axes_total") == 1 == pipeline.assembler.duplicates
    # b was cut by the restart (no shortfall counted for it); c skipped image 1
    assert value(p, "xtalsym_frames_missing_total") == pipeline.tracker.frames_missing == 1
    snap = pipeline.metrics_message()
    assert snap["series"] == {"start": 3, "end": 2, "restart": 1} and snap["frames_missing"] == 1
    assert value(p, "xtalsym_samples_partial_total", closed_by="restart") == 1  # b's NaCl (x, y)
    assert value(p, "xtalsym_samples_partial_total", closed_by="end") == 1  # c's NaCl (x, z)
