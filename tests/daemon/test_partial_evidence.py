"""A partial prediction is fused with the combined evidence of the zones it has wherever the
bundle's fusion weighs evidence at that number of views (issue 15): over real sockets
(127.0.0.1) the daemon's 2-view partial prediction equals the offline Fusion.predict with those
two zones' combined evidence, the combine runs on the combine thread, and the batch path
(``xtalsym classify``, shutdown) gives the same answer. A partial request superseded on the
combine thread by a newer one of its sample is not combined."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("zmq")

from xtalsym.daemon import pipeline as pipeline_module
from xtalsym.daemon.infer import classify_batch, evidence_frames
from xtalsym.daemon.sim import DetectorSim
from xtalsym.testing import InProcessDaemon, shipped_structures, small_detector

AXES = ("x", "y", "z")


def offline_prediction(engine, backend, request, size: int) -> dict:
    """Fusion.predict from the request's views (the whole graph) and its zones' combined evidence
    in the message's JSON form."""
    from xtalsym.evidence import combine

    x, present = request.tensors(size)
    summed = backend.run(x[None], present[None]).logits[0]
    view_logits = np.zeros((3, len(summed)))
    view_logits[int(np.flatnonzero(present)[0])] = summed  # the fusion sums the present rows
    loglik = np.asarray(combine(evidence_frames(request)).to_json()["group_loglik"], dtype=np.float64)
    return engine.predict(view_logits, present, loglik, views=request.axes).to_json()


def assert_same_fusion(got: dict, expected: dict, tol: float = 2e-5) -> None:
    assert got["evidence_used"] == expected["evidence_used"] and got["views"] == expected["views"]
    assert [g["space_group"] for g in got["top_groups"]] == [g["space_group"] for g in expected["top_groups"]]
    assert [g["probability"] for g in got["top_groups"]] == pytest.approx(
        [g["probability"] for g in expected["top_groups"]], abs=tol)
    assert got["set"]["label"] == expected["set"]["label"]
    assert got["set"]["probability"] == pytest.approx(expected["set"]["probability"], abs=tol)
    assert got["decided"] == expected["decided"]


def test_partial_predictions_fuse_the_evidence_of_their_zones(fused_components, monkeypatch):
    bundle, backend, _ = fused_components
    requests, combined = [], []
    real_infer, real_combine = pipeline_module.infer_batch, pipeline_module.combine_timed

    def infer_spy(batch, **kwargs):  # the inference thread's network step sees every request
        requests.extend(batch)
        return real_infer(batch, **kwargs)

    def combine_spy(frames):
        combined.append((sorted(frames), threading.current_thread().name))
        return real_combine(frames)

    monkeypatch.setattr(pipeline_module, "infer_batch", infer_spy)
    monkeypatch.setattr(pipeline_module, "combine_timed", combine_spy)
    frames = list(DetectorSim([shipped_structures() / "NaCl.cif"], geometry=small_detector()).messages())
    with InProcessDaemon(components=fused_components) as run:
        run.send_messages(frames[:-2])  # start, x, y: the 2-view partial goes out before z comes
        run.wait_until(lambda: any(m["axes"] == ["x", "y"] for m in run.summary_messages()), "the 2-view partial")
        run.send_messages(frames[-2:])
        run.wait_final(1)
    messages = run.summary.messages
    by_axes = {tuple(m["axes"]): m for m in messages}
    assert set(by_axes) == {("x",), ("x", "y"), AXES}, list(by_axes)

    # the combine thread combined the 2-view partial and the final sample, not the 1-view one
    assert [axes for axes, _ in combined] == [["x", "y"], ["x", "y", "z"]]
    assert all(name.startswith("xtalsym-combine") for _, name in combined), combined

    two = by_axes[("x", "y")]
    assert two["final"] is False and two["evidence"]["partial"] is True
    assert len(two["evidence"]["group_loglik"]) == 230 and set(two["evidence"]["zones"]) == {"x", "y"}
    assert two["fusion"]["evidence_used"] is True
    request = next(r for r in requests if not r.final and r.axes == ["x", "y"])
    engine = pipeline_module.load_fusion(bundle)
    expected = offline_prediction(engine, backend, request, int(bundle.image_size))
    assert_same_fusion(two["fusion"], expected)
    # ... and the same answer without its evidence would differ (the check can fail)
    x, present = request.tensors(int(bundle.image_size))
    summed = backend.run(x[None], present[None]).logits[0]
    plain = engine.describe(engine.posterior_summed(summed[None], 2)[0]).to_json()
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(plain["top_groups"], expected["top_groups"])) > 1e-3

    # the batch path (xtalsym classify, a shutdown) combines it itself: the same message
    again = classify_batch([dataclasses.replace(request, combined=None)], backend=backend,
                           size=int(bundle.image_size), model={}, fusion=engine)
    message = again.messages[0][1]
    assert message["evidence"]["group_loglik"] == two["evidence"]["group_loglik"] and message["evidence"]["partial"]
    assert_same_fusion(message["fusion"], two["fusion"])
    assert len(again.combine_seconds) == 1

    # one view: this fusion weighs no evidence there, so the zone is not combined and not "used"
    one = by_axes[("x",)]
    assert one["fusion"]["evidence_used"] is False and "group_loglik" not in one["evidence"]
    assert one["evidence"]["partial"] is True and set(one["evidence"]["zones"]) == {"x"}

    final = by_axes[AXES]
    assert final["final"] is True and "partial" not in final["evidence"] and final["fusion"]["evidence_used"] is True
    request = next(r for r in requests if r.final)
    assert_same_fusion(final["fusion"], offline_prediction(engine, backend, request, int(bundle.image_size)))


def test_a_partial_request_superseded_on_the_combine_thread_is_not_combined(fused_components, monkeypatch):
    """While the combine thread is behind, a sample's 2-view partial request waits there behind
    its own final one: it goes out fused without evidence and its combine is saved."""
    combined, release = [], threading.Event()
    real_combine = pipeline_module.combine_timed

    def combine_spy(frames):
        combined.append(sorted(frames))
        if len(combined) == 1:
            release.wait(60)  # the first sample's 2-view partial holds the thread
        return real_combine(frames)

    monkeypatch.setattr(pipeline_module, "combine_timed", combine_spy)
    frames = list(DetectorSim([shipped_structures() / "NaCl.cif", shipped_structures() / "Si.cif"],
                              geometry=small_detector()).messages())
    with InProcessDaemon(components=fused_components) as run:
        # start, NaCl x, NaCl y: NaCl's 2-view partial holds the thread before anything else is sent
        # (sent together, its final could reach the thread before it starts, and supersede it there)
        run.send_messages(frames[:3])
        run.wait_until(lambda: len(combined) == 1, "NaCl's 2-view partial on the combine thread")
        run.send_messages(frames[3:])
        # NaCl's partial (running), NaCl's final, Si's partial and Si's final on the thread
        run.wait_until(lambda: run.pipeline._combining >= 4, "four requests on the combine thread")
        release.set()
        run.wait_final(2)
        counts = run.pipeline.metrics.snapshot()["counts"]
    two = [m for m in run.summary.messages if m["axes"] == ["x", "y"]]
    assert combined == [["x", "y"], ["x", "y", "z"], ["x", "y", "z"]], combined
    assert counts.get("partial_evidence_superseded") == 1, counts
    assert [m["fusion"]["evidence_used"] for m in two] == [True, False]
    assert "group_loglik" not in two[1]["evidence"] and set(two[1]["evidence"]["zones"]) == {"x", "y"}
    assert all(m["fusion"]["evidence_used"] for m in run.summary.messages if m["final"])
