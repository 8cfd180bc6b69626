"""The running daemon over real sockets on 127.0.0.1 (issue 6): bad input, overload, faults.

Every test checks the accounting: each message the daemon received ended as a series
start, a series end, a stale end, a published view, or a bad frame counted by reason
(overload and worker crashes included). ``XTALSYM_DAEMON_FUZZ=N`` sets the number of bad
messages of the fuzz test (default 600; docs/RESULTS.md reports a 5000 run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
zmq = pytest.importorskip("zmq")
psutil = pytest.importorskip("psutil")

from xtalsym.daemon import protocols as proto
from xtalsym.daemon.sim import DetectorSim, push_socket
from xtalsym.testing import InProcessDaemon, detector_socket, shipped_structures, small_detector

SHIPPED = shipped_structures()
GEOMETRY = small_detector()

N_FUZZ = int(os.environ.get("XTALSYM_DAEMON_FUZZ", "600"))


@pytest.fixture(scope="module")
def sims():
    """Rendered once: NaCl and Si, series 1 and 2 (new series ids and unique ids)."""
    return {
        sid: DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, series_id=sid)
        for sid in (1, 2, 3)
    }


def finals(summary_or_run) -> dict:
    msgs = summary_or_run.messages
    return {m["sample_id"]: m for m in msgs if m["final"]}


def send_all(sock, messages) -> int:
    for m in messages:
        sock.send_multipart(m)
    return len(messages)


# ------------------------------------------------------------------ bad input


def bad_messages(sim: DetectorSim, n: int, seed: int = 0) -> list[list[bytes]]:
    """n hostile stream V2 messages of many kinds; none carries a sample of the good series."""
    rng = random.Random(seed)
    _, array, ud = next(sim.images())
    ud = {**ud, "sample_id": "fuzz"}
    good = proto.encode_stream_v2_image(
        series_id=sim.series_id,
        series_unique_id=sim.series_unique_id,
        image_id=999,
        data={"threshold_1": array},
        user_data=ud,
    )[0]
    h, w = array.shape

    def image(data, **kw):
        return proto.encode_stream_v2_image(
            series_id=sim.series_id,
            series_unique_id=sim.series_unique_id,
            image_id=999,
            data={"threshold_1": data},
            user_data={**ud, **kw},
            compression="lz4",
        )

    nan = np.full((h, w), np.nan, np.float32)
    inf = np.full((h, w), np.inf, np.float32)
    cbor = __import__("cbor2")
    kinds = [
        lambda: [rng.randbytes(rng.randint(0, 300))],
        lambda: [good[: rng.randint(0, len(good) - 1)]],  # truncated
        lambda: [bytes(b ^ (1 << rng.randint(0, 7)) if rng.random() < 0.001 else b for b in good)],  # bit flips
        lambda: [good, good],  # two frames
        lambda: [b""],  # one empty frame (an empty multipart cannot be sent)
        lambda: [b"\xd9\xd9\xf7" + cbor.dumps({"type": "image", "series_id": "one", "image_id": 0, "data": {}})],
        lambda: [
            b"\xd9\xd9\xf7"
            + cbor.dumps(
                {
                    "type": rng.choice(["image", "start", "end", "calibration"]),
                    "series_id": rng.choice([-1, None, 1.5, [1], "1"]),
                }
            )
        ],
        lambda: [
            b"\xd9\xd9\xf7"
            + cbor.dumps(
                {
                    "type": "image",
                    "series_id": 1,
                    "image_id": 0,
                    "data": {
                        "c": cbor.CBORTag(
                            40,
                            [
                                [h, w],
                                cbor.CBORTag(
                                    69, cbor.CBORTag(56500, ["bslz4", 2, rng.randbytes(rng.randint(12, 200))])
                                ),
                            ],
                        )
                    },
                }
            )
        ],  # garbage bslz4
        lambda: [
            b"\xd9\xd9\xf7"
            + cbor.dumps(
                {
                    "type": "image",
                    "series_id": 1,
                    "image_id": 0,
                    "data": {"c": cbor.CBORTag(40, [[2**20, 2**20], cbor.CBORTag(69, b"")])},
                }
            )
        ],  # oversized
        lambda: proto.encode_stream_v2_image(series_id=77, image_id=0, data={"c": array}),  # wrong series
        lambda: proto.encode_stream_v2_end(series_id=55),  # stale end
    ]
    # well-formed messages whose frames calibration refuses (they reach the workers: few of them)
    in_workers = [
        lambda: image(nan),
        lambda: image(inf),
        lambda: image(-inf),
        lambda: image(np.zeros((h, w), np.int8)),
        lambda: image(array[:-3]),  # wrong shape
        lambda: image(np.zeros((h, w), np.uint64)),
    ]
    out = [rng.choice(kinds)() for _ in range(n)]
    for i, make in enumerate(in_workers):
        out.insert((i + 1) * len(out) // (len(in_workers) + 1), make())
    return out


def test_fuzz_running_daemon(components, sims):
    """Thousands of bad messages interleaved with good samples: no crash, every bad one
    counted by reason, every good sample classified; NaN/inf/int8/uint64/wrong-shape frames
    inside well-formed messages are counted by calibration, not fatal."""
    sim = sims[1]
    good = list(sim.messages())  # start, 6 images, end
    bad = bad_messages(sim, N_FUZZ)
    sock, endpoint = detector_socket()
    run = InProcessDaemon(
        components=components, frame_endpoint=endpoint, metrics={"enabled": False}, assembly={"timeout_seconds": 30.0}
    )
    try:
        sent = send_all(sock, good[:1])
        chunks = np.array_split(np.arange(len(bad)), 6)
        for image, idx in zip(good[1:-1], chunks):  # a good image after every chunk of bad ones
            sent += send_all(sock, [bad[i] for i in idx])
            sent += send_all(sock, [image])
        sent += send_all(sock, good[-1:])
        run.settle(sent, timeout=120)
        run.wait_final(2)
    finally:
        sock.close(linger=0)
        summary = run.close()
    snap = run.service.pipeline.metrics.snapshot()
    bad_counts = snap["bad_frames"]
    print(
        f"daemon fuzz: {len(bad)} bad messages in {sent} sent; bad_frames {bad_counts}; "
        f"stale_end {snap['counts'].get('stale_end', 0)}; views {snap['counts']['views']}"
    )
    assert "internal_error" not in bad_counts and "worker_error" not in bad_counts, bad_counts
    got = finals(summary)
    assert {"NaCl", "Si"} <= set(got) and all(got[k]["status"] == "complete" for k in ("NaCl", "Si"))
    # each bad message counted exactly once, by reason (a bit-flipped copy that still decodes
    # is a valid frame of sample "fuzz": a view, not a bad one)
    stale = snap["counts"].get("stale_end", 0)
    fuzz_views = snap["counts"]["views"] - 6
    assert fuzz_views >= 0 and sum(bad_counts.values()) + stale + fuzz_views == len(bad), (bad_counts, stale)
    for reason in (
        "not_cbor",
        "bad_frames",
        "bad_field",
        "bad_compression",
        "too_large",
        "wrong_series",
        "empty_frame",
        "size_mismatch",
    ):
        assert bad_counts.get(reason, 0) > 0, (reason, bad_counts)


# ------------------------------------------------------------------ overload


def rss_total() -> int:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_new", "block"])
def test_overload_bounded_and_recovers(components, sims, policy):
    """A flood far above capacity: memory bounded, drops counted (none with block), every
    message accounted for, and a sample sent after the flood is classified."""
    flood_sim = DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, series_id=5, repeat=40)
    flood = list(flood_sim.messages())  # 240 images (5.3 MB decoded each side of the pool)
    sock, endpoint = detector_socket()
    run = InProcessDaemon(
        components=components,
        frame_endpoint=endpoint,
        metrics={"enabled": False},
        pipeline={"workers": 1, "queue_size": 8, "overload": policy, "latency_budget_seconds": 0.01},
        assembly={"timeout_seconds": 2.0},
    )
    rss0 = rss_total()
    peak = [rss0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_total())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        t0 = time.monotonic()
        sent = send_all(sock, flood)
        offered = len(flood) / (time.monotonic() - t0)
        run.settle(sent, timeout=180)
        snap = run.service.pipeline.metrics.snapshot()
        after = list(sims[2].messages())  # recovery: a new series at a gentle pace
        for m in after:
            sock.send_multipart(m)
            time.sleep(0.05)
        sent += len(after)
        run.settle(sent)
        run.wait_until(
            lambda: (
                {"NaCl", "Si"} <= {m["sample_id"] for m in run.summary_messages() if m["final"] and m["series_id"] == 2}
            ),
            "recovery samples",
            30,
        )
    finally:
        stop.set()
        sock.close(linger=0)
        summary = run.close()
    dropped = snap["bad_frames"].get("overload", 0)
    views = snap["counts"]["views"]
    assert views + dropped == 240, snap  # every flood image: a view or an overload drop
    if policy == "block":
        assert dropped == 0
    else:
        assert dropped > 0, (offered, views)
    assert peak[0] - rss0 < 400 * 2**20, f"RSS grew {(peak[0] - rss0) / 2**20:.0f} MiB"
    recovered = [m for m in summary.messages if m["final"] and m["series_id"] == 2]
    assert sorted(m["sample_id"] for m in recovered) == ["NaCl", "Si"]
    assert all(m["status"] == "complete" for m in recovered)


def test_open_samples_capped(components, sims):
    """A flood of distinct sample ids (one axis each) never keeps more than max_open_samples
    open: the oldest are closed as final partials, counted."""
    sim = sims[3]
    start, *_ = list(sim.messages())
    _, array, ud = next(sim.images())
    sock, endpoint = detector_socket()
    run = InProcessDaemon(
        components=components,
        frame_endpoint=endpoint,
        metrics={"enabled": False},
        assembly={"max_open_samples": 5, "timeout_seconds": 60.0},
    )
    try:
        sock.send_multipart(start)
        for i in range(20):
            sock.send_multipart(
                proto.encode_stream_v2_image(
                    series_id=3,
                    series_unique_id=sim.series_unique_id,
                    image_id=i,
                    data={"threshold_1": array},
                    user_data={**ud, "sample_id": f"s{i}", "axis": "x"},
                )
            )
        run.settle(21)
        run.wait_until(
            lambda: run.service.pipeline.metrics.snapshot()["counts"].get("overflowed_samples") == 15,
            "15 overflowed samples",
            10,
        )
        assert len(run.service.pipeline.assembler.open) == 5
    finally:
        sock.close(linger=0)
        summary = run.close()
    closed = [m for m in summary.messages if m["final"] and m["closed_by"] == "overflow"]
    assert sorted(m["sample_id"] for m in closed) == sorted(f"s{i}" for i in range(15))


# ------------------------------------------------------------------ faults


def test_detector_restart_and_reconnect(components, sims):
    """The detector's socket closes mid-series and is bound again (a detector restart): the
    daemon's PULL reconnects by itself, the interrupted series is closed by the new start."""
    first, second = list(sims[1].messages()), list(sims[2].messages())
    sock, endpoint = detector_socket()
    run = InProcessDaemon(
        components=components, frame_endpoint=endpoint, metrics={"enabled": False}, assembly={"timeout_seconds": 1.0}
    )
    try:
        send_all(sock, first[:3])  # start + 2 images of NaCl, then the detector goes away
        run.settle(3)
        run.wait_until(lambda: any(m["final"] for m in run.summary_messages()), "NaCl timed out", 10)
        sock.close(linger=0)
        time.sleep(0.5)
        sock = push_socket(zmq.Context.instance(), endpoint)  # same port, new socket
        send_all(sock, second)
        run.settle(3 + len(second))
        run.wait_until(
            lambda: sum(m["final"] and m["series_id"] == 2 for m in run.summary_messages()) == 2, "second series", 30
        )
    finally:
        sock.close(linger=0)
        summary = run.close()
    assert run.service.pipeline.tracker.events["restart"] == 1
    assert {m["sample_id"]: m["status"] for m in summary.messages if m["final"] and m["series_id"] == 2} == {
        "NaCl": "complete",
        "Si": "complete",
    }
    nacl1 = [m for m in summary.messages if m["final"] and m["series_id"] == 1]
    assert nacl1 and nacl1[0]["status"] == "partial" and nacl1[0]["closed_by"] == "timeout"


def test_daemon_restart_mid_series(components, sims):
    """A new daemon process-equivalent (fresh pipeline) joins mid-series: the images
    without a start are counted no_start, the next series is classified."""
    first, second = list(sims[1].messages()), list(sims[2].messages())
    sock, endpoint = detector_socket()
    run = InProcessDaemon(components=components, frame_endpoint=endpoint, metrics={"enabled": False})
    try:
        send_all(sock, first[:3])
        run.settle(3)
    finally:
        run.close()
    run = InProcessDaemon(
        components=components, frame_endpoint=endpoint, metrics={"enabled": False}
    )  # the detector's PUSH stays bound, as a detector's does
    try:
        send_all(sock, first[3:])  # 4 images + end of the series the new daemon never saw start
        send_all(sock, second)
        run.settle(len(first) - 3 + len(second))
        run.wait_final(2)
    finally:
        sock.close(linger=0)
        summary = run.close()
    snap = run.service.pipeline.metrics.snapshot()
    assert snap["bad_frames"] == {"no_start": 4} and snap["counts"]["stale_end"] == 1
    assert sorted((m["series_id"], m["sample_id"]) for m in summary.messages if m["final"]) == [(2, "NaCl"), (2, "Si")]


def test_slow_and_vanished_subscribers_never_block(components):
    """A subscriber that never reads and one that disconnects: the pipeline publishes on,
    the fast listener gets every prediction, the slow one sees the gap in ``seq``."""
    sim = DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, series_id=4, repeat=12)
    pad = "p" * 500_000  # echoed in each prediction's user_data: 72 x 500 kB overflow the kernel's buffers
    messages = [
        sim.start_message(),
        *(sim.image_message(i, a, {**ud, "pad": pad}) for i, a, ud in sim.images()),
        sim.end_message(),
    ]  # 72 images -> 72 predictions
    sock, endpoint = detector_socket()
    # send_hwm above max_batch (16): a listener that reads keeps up with a whole batch
    run = InProcessDaemon(
        components=components, frame_endpoint=endpoint, metrics={"enabled": False}, publish={"send_hwm": 24}
    )
    ctx = zmq.Context.instance()
    slow = ctx.socket(zmq.SUB)
    slow.setsockopt(zmq.RCVHWM, 2)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.setsockopt(zmq.SUBSCRIBE, b"xtalsym.prediction")
    slow.connect(run.service.pipeline.publish_endpoint)
    gone = ctx.socket(zmq.SUB)
    gone.setsockopt(zmq.SUBSCRIBE, b"")
    gone.connect(run.service.pipeline.publish_endpoint)
    time.sleep(0.3)
    gone.close(linger=0)
    try:
        send_all(sock, messages)
        run.settle(len(messages))
        run.wait_until(
            lambda: run.service.pipeline.metrics.snapshot()["counts"].get("predictions", 0) == 72, "72 predictions", 60
        )
        time.sleep(0.5)
        seqs = []
        while slow.poll(200):
            seqs.append(json.loads(slow.recv_multipart()[1])["seq"])
        more = DetectorSim([SHIPPED / "NaCl.cif"], geometry=GEOMETRY, series_id=8)
        send_all(sock, list(more.messages()))  # the slow one reads again: the next seq shows the gap
        assert slow.poll(30000)
        next_seq = json.loads(slow.recv_multipart()[1])["seq"]
        run.settle(len(messages) + 5)
    finally:
        slow.close(linger=0)
        sock.close(linger=0)
        summary = run.close()
    assert summary.predictions == 72 + 3 and summary.missed == 0  # the fast listener: everything
    assert run.service.pipeline.metrics.snapshot()["counts"].get("publish_dropped", 0) == 0
    assert 0 < len(seqs) < 72 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # what it had queued
    assert next_seq == 72 and next_seq > seqs[-1] + 1  # it lost the rest, and can tell from seq


def test_worker_killed(components, sims):
    """SIGKILL a shaping worker with frames in flight: the pool is replaced, the frames it
    lost are counted worker_crashed, later frames are classified, nothing unaccounted."""
    flood_sim = DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, series_id=6, repeat=6)
    flood = list(flood_sim.messages())
    sock, endpoint = detector_socket()
    run = InProcessDaemon(
        components=components,
        frame_endpoint=endpoint,
        metrics={"enabled": False},
        pipeline={"workers": 1, "overload": "block"},
        assembly={"timeout_seconds": 1.0},
    )
    try:
        pool = run.service.pipeline.pool
        send_all(sock, flood)
        run.wait_until(
            lambda: run.service.pipeline.metrics.snapshot()["counts"].get("views", 0) >= 2, "first views", 30
        )
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)
        run.settle(len(flood), timeout=120)
        after = list(sims[2].messages())
        send_all(sock, after)
        run.settle(len(flood) + len(after))
        run.wait_until(
            lambda: sum(m["final"] and m["series_id"] == 2 for m in run.summary_messages()) == 2,
            "series after the crash",
            30,
        )
    finally:
        sock.close(linger=0)
        summary = run.close()
    snap = run.service.pipeline.metrics.snapshot()
    assert run.service.pipeline.pool is not pool and snap["counts"]["pool_restarts"] >= 1
    crashed = snap["bad_frames"].get("worker_crashed", 0)
    assert crashed > 0 and snap["counts"]["views"] + crashed == 36 + 6, snap  # both series' images
    assert {m["sample_id"]: m["status"] for m in summary.messages if m["final"] and m["series_id"] == 2} == {
        "NaCl": "complete",
        "Si": "complete",
    }


def test_frame_errors_cross_the_process_boundary():
    """Errors raised in a worker must unpickle in the daemon: one that did not (a two-argument
    __init__) broke the whole pool on the first NaN frame, losing every frame in flight."""
    import pickle

    from xtalsym.daemon.assemble import AssemblyError
    from xtalsym.daemon.calibrate import CalibrationError

    for error in (
        CalibrationError("empty_frame", "all NaN"),
        AssemblyError("no_axis", "x"),
        proto.BadMessage("truncated", "12 bytes"),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and again.reason == error.reason and str(again) == str(error)
