"""One structure (or one set of zone-axis patterns) to one fused prediction: the MSDN on the
shaped DPs, the symmetry evidence on the float patterns, the bundle's fusion on both.

Used by ``xtalsym predict``, ``xtalsym evaluate`` and ``xtalsym index query`` so that they
give the same answer as the daemon for the same patterns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from xtalsym import fusion, shaping
from xtalsym.offline import dataset as ds
from xtalsym.offline import simulate, structures

log = logging.getLogger(__name__)


@dataclass
class FusedResult:
    """A fused prediction with what it was made from."""

    prediction: fusion.FusedPrediction | None  # None: the bundle has no fusion (model only)
    msdn_probabilities: np.ndarray  # (C,) the model's own softmax over its classes
    view_logits: np.ndarray | None  # (3, C) per view, or None for single-stream models
    evidence: object | None  # xtalsym.evidence.SampleEvidence, or None
    present: np.ndarray  # (3,) bool


def evidence_of(patterns: Mapping[str, np.ndarray], *, q_per_pixel: float, axes: Sequence[str]):
    """SampleEvidence of the float patterns of ``axes`` (the views present)."""
    from xtalsym.evidence import analyse_frame, combine

    # counts=None: Poisson statistics when the frame holds integer counts (a dose), none for noise-free floats
    frames = {a: analyse_frame(patterns[a], axis=a, q_per_pixel=q_per_pixel, counts=None) for a in axes}
    return combine(frames)


def model_input(patterns: Mapping[str, np.ndarray], *, config: ds.BuildConfig) -> np.ndarray:
    """The network input (3, 3, H, W) uint8 of float zone-axis patterns {axis: (N, N)}: the
    8-bit raw DPs shaped as the training data were (one definition for every caller, so the
    fused answer and the index's embedding see the same pixels)."""
    raws = [simulate.to_raw_uint8(patterns[a]) for a in simulate.AXES]
    shaped = np.stack([shaping.shape(r, a, method=config.shaping_method) for r, a in zip(raws, simulate.AXES)])
    return np.ascontiguousarray(shaped.transpose(0, 3, 1, 2))


def simulate_structure(labelled: structures.LabelledStructure, *, config: ds.BuildConfig,
                       realism: simulate.Realism | None = None) -> dict[str, np.ndarray]:
    """Float zone-axis patterns {axis: (N, N)} of ``labelled``, simulated as the training data were made."""
    return simulate.simulate_axes(labelled.structure, geometry=config.geometry, scattering=config.scattering,
                                  realism=realism, **simulate.DATASET_OPTIONS)


def model_view_logits(model, x: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(summed logits (C,), per-view logits (3, C) or None) of one sample (x: (3, 3, H, W) uint8)."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(x[None]), torch.as_tensor(present[None]))
    summed = out.logits[0].float().numpy().astype(np.float64)
    view = out.view_logits[0].float().numpy().astype(np.float64)
    return summed, view if view.shape[0] == 3 else None


def predict_patterns(model, engine: fusion.Fusion | None, patterns: Mapping[str, np.ndarray], *,
                     config: ds.BuildConfig, axes: Sequence[str] | None = None,
                     use_evidence: bool = True) -> FusedResult:
    """Fused prediction from float zone-axis patterns {axis: (N, N)} (every axis of
    simulate.AXES must be there; ``axes`` picks the ones the prediction may use)."""
    axes = list(axes or simulate.AXES)
    present = np.array([a in axes for a in simulate.AXES])
    summed, view = model_view_logits(model, model_input(patterns, config=config), present)
    z = summed - summed.max()
    probs = np.exp(z) / np.exp(z).sum()
    evidence = None
    if engine is not None and use_evidence:
        evidence = evidence_of(patterns, q_per_pixel=config.geometry.q_per_pixel, axes=axes)
    prediction = None
    if engine is not None:
        ev = None if evidence is None else np.asarray(evidence.group_loglik, dtype=np.float64)
        post = engine.posterior_summed(summed[None], int(present.sum()), None if ev is None else ev[None],
                                       getattr(evidence, "off_axis", None))[0]
        # as the daemon: evidence the fusion gives no weight at this many views is not "used"
        used = ev is not None and engine.uses_evidence(int(present.sum()))
        warnings = list(getattr(evidence, "warnings", []) or []) if used else []
        prediction = engine.describe(post, views=axes, evidence_used=used, warnings=warnings,
                                     evidence_decided=bool(getattr(evidence, "decided", True)) if used else True,
                                     off_axis=getattr(evidence, "off_axis", None) if used else None)
    return FusedResult(prediction, probs, view, evidence, present)


def predict_structure(model, engine: fusion.Fusion | None, labelled: structures.LabelledStructure, *,
                      config: ds.BuildConfig, axes: Sequence[str] | None = None,
                      realism: simulate.Realism | None = None, use_evidence: bool = True) -> FusedResult:
    """Simulate ``labelled`` as the training data were made (plus ``realism``) and predict."""
    patterns = simulate_structure(labelled, config=config, realism=realism)
    return predict_patterns(model, engine, patterns, config=config, axes=axes, use_evidence=use_evidence)
