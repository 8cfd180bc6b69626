"""The evidence of a final sample is combined on the combine thread, not on the inference
thread in front of its batch; a failed combine costs the message its evidence, not the
prediction, and is counted (real sockets, 127.0.0.1)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("zmq")

from xtalsym.daemon import pipeline as pipeline_module
from xtalsym.daemon.sim import DetectorSim
from xtalsym.testing import InProcessDaemon, shipped_structures, small_detector


def test_final_evidence_is_combined_off_the_inference_thread(components, monkeypatch):

    threads: list[str] = []
    real = pipeline_module.combine_timed

    def spying(frames):
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            raise RuntimeError("combine failed on purpose")  # the first sample only
        return real(frames)

    monkeypatch.setattr(pipeline_module, "combine_timed", spying)
    sim = DetectorSim([shipped_structures() / "NaCl.cif", shipped_structures() / "Si.cif"], geometry=small_detector())
    run = InProcessDaemon(components=components)
    summary = run.run_sim(sim, finals=2)
    finals = [m for m in summary.messages if m["final"]]
    assert len(finals) == 2 and all(m["status"] == "complete" and m["top"] for m in finals)
    assert len(threads) == 2 and all(name.startswith("xtalsym-combine") for name in threads), threads
    with_evidence = [m for m in finals if m["evidence"] is not None]
    assert len(with_evidence) == 1 and len(with_evidence[0]["evidence"]["group_loglik"]) == 230
    metrics = run.service.pipeline.metrics.snapshot()
    assert metrics["bad_frames"].get("evidence_error") == 1, metrics["bad_frames"]
    # the partial predictions still carry their zones' evidence (not combined: nothing to wait for)
    assert all(m["evidence"]["partial"] for m in summary.messages if not m["final"])
