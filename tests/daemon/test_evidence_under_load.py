"""``pipeline.evidence_under_load``: when it is behind the daemon classifies new samples without
symmetry evidence instead of falling behind (issue 12: the evidence costs about as much CPU per
frame as the rest of the daemon). The decision is per sample, made at its first frame; a shed
sample's messages carry no evidence, say why in the fusion's warnings, and are counted
``evidence_shed``; no frame is lost. ``"keep"`` never sheds."""

from __future__ import annotations

import pytest

from xtalsym.daemon.overload import SHED_REASON, EvidencePlan, Waiting

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("zmq")

from xtalsym.daemon.client import format_prediction  # noqa: E402
from xtalsym.daemon.sim import DetectorSim  # noqa: E402
from xtalsym.testing import InProcessDaemon, shipped_structures, small_detector  # noqa: E402


def test_the_plan_decides_once_per_sample_and_forgets_at_its_end():
    plan = EvidencePlan(policy="shed", max_frames=4, max_lag=0.5, max_samples=3)
    a, b = (1, "a"), (1, "b")
    assert plan.wants_evidence(a, frames_waiting=4, combine_lag=0.5) == (True, False)
    # its later frames keep the sample's decision, however far behind the daemon is then
    assert plan.wants_evidence(a, frames_waiting=60, combine_lag=50.0) == (True, False)
    assert plan.wants_evidence(b, frames_waiting=5, combine_lag=0.0) == (False, True)  # the frame queue filling
    assert plan.wants_evidence(b, frames_waiting=0, combine_lag=0.0) == (False, False)  # shed once, counted once
    assert plan.wants_evidence((1, "c"), frames_waiting=0, combine_lag=0.51) == (False, True)  # combines behind
    plan.forget(b)  # b's final request was made: a new sample of that key decides afresh
    assert plan.wants_evidence(b, frames_waiting=0, combine_lag=0.0) == (True, False)
    plan.wants_evidence((1, "d"), frames_waiting=0, combine_lag=0.0)
    assert len(plan) == 3  # bounded: the oldest decisions (a, c) went first
    assert plan.wants_evidence(a, frames_waiting=9, combine_lag=0.0) == (False, True)
    keep = EvidencePlan(policy="keep", max_frames=0, max_lag=0.0, max_samples=10)
    assert keep.wants_evidence(a, frames_waiting=10**6, combine_lag=1e6) == (True, False)


def test_waiting_is_the_age_of_the_oldest_item():
    waiting = Waiting()
    assert waiting.oldest_age(100.0) == 0.0
    waiting.add("f1", 90.0)
    waiting.add("f2", 95.0)
    assert waiting.oldest_age(100.0) == 10.0
    waiting.discard("f1")
    assert waiting.oldest_age(100.0) == 5.0
    waiting.discard("f2")
    waiting.discard("f2")  # twice: no error
    assert waiting.oldest_age(100.0) == 0.0


def burst() -> list:
    """8 samples (NaCl, Si, 4 times) sent at once: the workers are behind from the second sample."""
    sources = [shipped_structures() / "NaCl.cif", shipped_structures() / "Si.cif"]
    return list(DetectorSim(sources, geometry=small_detector(), repeat=4).messages())


def run_burst(components, **pipeline) -> tuple[list[dict], dict]:
    messages = burst()
    with InProcessDaemon(components=components, pipeline=pipeline) as run:
        run.send_messages(messages)
        run.settle(len(messages), finals=8)
        snapshot = run.pipeline.metrics.snapshot()
        assert len(run.pipeline.evidence_plan) == 0  # every sample ended: no decision is held
    return run.summary.messages, snapshot


def test_a_backlog_sheds_whole_samples_and_says_so(fused_components):
    messages, snapshot = run_burst(fused_components, evidence_under_load="shed", queue_size=2)
    assert snapshot["bad_frames"] == {}, snapshot["bad_frames"]  # nothing lost
    finals = [m for m in messages if m["final"]]
    assert len(finals) == 8 and all(m["status"] == "complete" for m in finals)
    shed = [m for m in finals if m["evidence"] is None]
    kept = [m for m in finals if m["evidence"] is not None]
    # the first sample finds nothing waiting; with queue_size 2 (shed beyond 1 waiting) a later one finds more
    assert kept and shed, [m["sample_id"] for m in shed]
    assert snapshot["counts"]["evidence_shed"] == len(shed)
    for m in shed:
        assert m["fusion"]["evidence_used"] is False and SHED_REASON in m["fusion"]["warnings"], m["fusion"]
        assert "no evidence (shed under load)" in format_prediction(m)  # what xtalsym listen prints
        # every message of a shed sample: no zone was measured, its partials say why too
        for partial in (p for p in messages if p["sample_id"] == m["sample_id"] and not p["final"]):
            assert partial["evidence"] is None and SHED_REASON in partial["fusion"]["warnings"]
    for m in kept:
        assert "shed under load" not in format_prediction(m)
        assert m["fusion"]["evidence_used"] is True and SHED_REASON not in m["fusion"]["warnings"]
        assert set(m["evidence"]["zones"]) == {"x", "y", "z"}


def test_keep_measures_every_sample_whatever_the_backlog(fused_components):
    messages, snapshot = run_burst(fused_components, evidence_under_load="keep", queue_size=2)
    finals = [m for m in messages if m["final"]]
    assert len(finals) == 8 and snapshot["counts"].get("evidence_shed", 0) == 0
    assert all(m["evidence"] is not None and m["fusion"]["evidence_used"] for m in finals)
