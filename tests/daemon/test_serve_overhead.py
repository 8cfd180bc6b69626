"""The serve process's own costs: shaped DPs back from the workers through shared memory
(xtalsym.daemon.result_slots) and its CPU by thread role (xtalsym_thread_cpu_seconds)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import numpy as np

from xtalsym.daemon import calibrate as cal
from xtalsym.daemon import result_slots, workers
from xtalsym.daemon.metrics import THREAD_ROLES, thread_cpu_by_role, thread_role
from xtalsym.daemon.result_slots import ResultSlots
from xtalsym.daemon.sim import DetectorGeometry, render, to_counts
from xtalsym.offline import structures
from xtalsym.testing import shipped_structures


def test_slots_take_read_release_and_run_out():
    slots = ResultSlots(2, (4, 4, 3))
    try:
        a, b = slots.take(), slots.take()
        assert {a, b} == {0, 1} and slots.take() is None and len(slots) == 2  # all taken: the pipe instead
        dp = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
        assert result_slots.write(slots.job_slot(b), dp)
        assert result_slots.write(slots.job_slot(a), 255 - dp)
        got = slots.read(b)
        np.testing.assert_array_equal(got, dp)
        slots.release(b)
        assert len(slots) == 1 and slots.take() == b
        assert result_slots.write(slots.job_slot(b), np.zeros_like(dp))  # a reused slot: the copy read before stays
        np.testing.assert_array_equal(got, dp)
        np.testing.assert_array_equal(slots.read(a), 255 - dp)  # its neighbour untouched
        # not the slot's size or type: nothing written, the caller sends it through the pipe
        assert not result_slots.write(slots.job_slot(a), np.zeros((4, 4, 2), np.uint8))
        assert not result_slots.write(slots.job_slot(a), dp.astype(np.int16))
        np.testing.assert_array_equal(slots.read(a), 255 - dp)
    finally:
        slots.close()


def test_shape_timed_writes_the_same_dp_into_its_slot():
    geometry = DetectorGeometry(pixels_x=256, pixels_y=256)
    structure = structures.load_structure(shipped_structures() / "NaCl.cif").structure
    counts = to_counts(render(structure, geometry, axes=("z",))["z"], None)
    job = workers.FrameJob(
        frame=counts,
        frame_geometry=cal.FrameGeometry(**geometry.stream_geometry()),
        training=cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256),
        method="bilinear",
        mask_path=None,
        saturation_value=None,
        axis="z",
        shaping_method="fast",
        size=224,
        evidence=False,
    )
    want, *_ = workers.shape_timed(job)
    slots = ResultSlots(3, want.shape)
    try:
        slot = slots.take()
        shaped, seconds, cpu, found, *_ = workers.shape_timed(
            dataclasses.replace(job, result_slot=slots.job_slot(slot))
        )
        assert shaped is None and seconds > 0 and found is None
        np.testing.assert_array_equal(slots.read(slot), want)
    finally:
        slots.close()


def test_thread_roles_and_cpu_by_role():
    assert [
        thread_role(threading.Thread(name=n))
        for n in (
            "xtalsym-ingest",
            "xtalsym-inference",
            "xtalsym-combine_0",
            "QueueFeederThread",
            "Thread-7 (process_request_thread)",
            "Thread-1 (_monitor)",
            "xtalsym-reload",
        )
    ] == ["ingest", "inference", "combine", "worker_pool", "http", "log", "other"]

    def spin(seconds: float) -> None:
        t = time.thread_time()
        while time.thread_time() - t < seconds:
            pass

    before = thread_cpu_by_role()
    done = threading.Event()

    def run():  # a named thread that burns 0.3 s of CPU, then waits so that /proc still lists it
        spin(0.3)
        done.set()
        time.sleep(5)

    threading.Thread(target=run, name="xtalsym-combine_9", daemon=True).start()
    done.wait(30)
    after = thread_cpu_by_role()
    assert set(after) == set(THREAD_ROLES)
    assert after["combine"] - before["combine"] >= 0.25  # its CPU under its role (clock ticks: 10 ms)
    assert abs(sum(after.values()) - sum(os.times()[:2])) < 0.1  # the roles add up to the process


def test_encode_gives_what_json_of_jsonable_gives():
    from xtalsym.daemon.publish import encode, jsonable

    odd = type("Odd", (), {"__str__": lambda self: "odd!"})()
    messages = [
        {
            "evidence": {
                "group_loglik": [0.0, float("-inf"), -3.25],
                "rms": float("nan"),
                "zones": {"x": {"ok": True}},
            },
            "top": [{"probability": np.float32(0.25), "space_group": np.int64(225)}],
            "flag": np.bool_(False),
            "embedding": np.zeros((2, 960), np.float32),
            "raw": b"\x00\x01",
            "pair": (1, "a"),
            "other": odd,
            "timestamps": {"received": 1764644400.123456},
        },
        {1: "a non-string key", "big": 2**70},  # what orjson refuses: the general path
    ]
    for message in messages:
        want = json.loads(json.dumps(jsonable(message), allow_nan=False))
        assert json.loads(encode(message)) == want
