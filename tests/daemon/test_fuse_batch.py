"""The daemon fuses a batch's requests with two batched posterior calls (with and without
evidence); every message's fusion object is what the request fused alone gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xtalsym.daemon.assemble import AXES, Request, View
from xtalsym.daemon.infer import fuse_batch
from xtalsym.fusion import Fusion, FusionParams

BUNDLE = Path(__file__).resolve().parents[2] / "reference_index"


def _request(i: int, axes: str, final: bool) -> Request:
    views = {a: View(sample_key=f"s{i}", axis=a, series_id=1, image_id=3 * i + k, shaped=np.zeros((2, 2, 3), np.uint8),
                     received=0.0) for k, a in enumerate(axes)}
    return Request(f"s{i}", views, "complete" if len(axes) == 3 else "partial", final, None, views[axes[-1]])


def _alone(fusion: Fusion, request: Request, logits: np.ndarray, ev: dict | None) -> dict:
    """One request fused by itself (the daemon's per-request path before batching)."""
    loglik = None if ev is None else np.asarray(ev["group_loglik"], dtype=np.float64)
    post = fusion.posterior_summed(np.asarray(logits, dtype=np.float64)[None], len(request.views),
                                   None if loglik is None else loglik[None])[0]
    return fusion.describe(post, views=request.axes, evidence_used=loglik is not None,
                           warnings=list(ev["warnings"]) if ev else [],
                           evidence_decided=bool(ev["decided"]) if ev else True).to_json()


@pytest.mark.skipif(not (BUNDLE / "fusion.json").exists(), reason="no shipped fusion.json")
def test_batched_fusion_equals_each_request_fused_alone():
    fusion = Fusion(FusionParams.load(BUNDLE / "fusion.json"))
    rng = np.random.default_rng(7)
    shapes = ["x", "xy", "xyz", "y", "xz", "xyz", "xyz", "z", "yz", "xyz", "xyz", "x"]
    batch = [_request(i, axes, final=len(axes) == 3) for i, axes in enumerate(shapes)]
    logits = rng.normal(0.0, 4.0, (len(batch), len(fusion.params.classes)))
    evidences: list[dict | None] = []
    for request in batch:  # final requests carry evidence, one of them none (its combine failed)
        if request.final and len(evidences) != 6:
            ll = rng.normal(0.0, 30.0, 230)
            ll[rng.integers(0, 230, 40)] = -1e4  # groups the evidence rules out
            evidences.append({"group_loglik": [round(float(x), 3) for x in ll], "warnings": ["w"],
                              "decided": bool(len(evidences) % 2)})
        else:
            evidences.append(None)
    present = np.array([[a in r.views for a in AXES] for r in batch], bool)
    fused = fuse_batch(fusion, batch, logits, present, evidences)
    alone = [_alone(fusion, r, logits[i], evidences[i]) for i, r in enumerate(batch)]
    assert [f["evidence_used"] for f in fused] == [ev is not None for ev in evidences]
    assert len({f["set"]["label"] for f in fused}) > 1  # the rows differ: a shuffled batch would show
    assert json.dumps(fused) == json.dumps(alone)
