"""How far a frame is from a zone-axis pattern: the Friedel asymmetry of its spots.

On a zone axis the Ewald sphere's excitation error of a zero-layer node g is λ|g|²/2, the same
for g and −g, and kinematic intensities obey Friedel's law, so every spot has a partner of equal
intensity at −g. A crystal tilted by t from the axis gives g the excitation error g·t + λ|g|²/2:
the zone's reflections survive only in a band about the Laue circle, on one side of the beam,
and g and −g differ. The asymmetry

    A = Σ_spots max(|I(g) − I(−g)| − allowance, 0) / Σ_spots (I(g) + I(−g))

is 0 on an axis and grows with the tilt (a partner not found counts as 0 below the frame's
detection threshold; the allowance is 2σ of the pair plus that threshold, so counting noise is
not read as tilt). It needs no model of the crystal. A frame along a direction that is not a
zone axis of the crystal (monoclinic z, triclinic y and z: symmetry.zone_image_axes) is
asymmetric for the same reason, so a sample's score is taken over the zones that are zone axes
of the metric class the evidence fits (:func:`off_axis_score`). docs/EVIDENCE.md; the threshold
the fusion uses is fitted on validation (benchmarks/fusion_off_axis.py).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from xtalsym.evidence import cell as cellfit
from xtalsym.evidence.frame import FrameEvidence

FRIEDEL_TOLERANCE_PX = 1.5  # a spot's partner lies within this of −g (the node tolerance of sample.py)
ALLOWANCE_SIGMAS = 2.0


def friedel_asymmetry(frame: FrameEvidence) -> float | None:
    """A of one frame's spots (0 = Friedel-symmetric, 1 = no spot has a partner); None for a
    frame with fewer than two spots (nothing to compare)."""
    if frame.n_spots < 2:
        return None
    points = np.stack([frame.spots_x_px, frame.spots_y_px], 1)
    intensity = np.asarray(frame.spots_intensity, dtype=np.float64)
    sigma = np.asarray(frame.spots_sigma, dtype=np.float64)
    distance, partner = cKDTree(points).query(-points, distance_upper_bound=FRIEDEL_TOLERANCE_PX)
    found = np.isfinite(distance)
    partner = np.where(found, partner, 0)
    other = np.where(found, intensity[partner], 0.0)
    pair_sigma = np.hypot(sigma, np.where(found, sigma[partner], 0.0))
    allowance = ALLOWANCE_SIGMAS * pair_sigma + np.where(found, 0.0, float(frame.threshold))
    excess = np.maximum(np.abs(intensity - other) - allowance, 0.0)
    total = float((intensity + other).sum())
    return float(excess.sum() / total) if total > 0 else None


def zone_asymmetries(frames: dict[str, FrameEvidence | None]) -> dict[str, float]:
    """Each decided zone's Friedel asymmetry (zones with fewer than two spots left out)."""
    per_zone = {}
    for axis, frame in sorted(frames.items()):
        if frame is not None and frame.decided:
            value = friedel_asymmetry(frame)
            if value is not None:
                per_zone[axis] = value
    return per_zone


def off_axis_score(frames: dict[str, FrameEvidence | None], metric_class: str | None,
                   per_zone: dict[str, float] | None = None) -> tuple[float | None, dict[str, float]]:
    """(the largest asymmetry over the zones that are zone axes of ``metric_class`` — every zone
    when it is not known —, each decided zone's asymmetry); (None, {}) with no measurable zone.
    ``per_zone``: the zones' asymmetries when already computed (:func:`zone_asymmetries`)."""
    if per_zone is None:
        per_zone = zone_asymmetries(frames)
    true_zones = cellfit.TRUE_ZONES.get(metric_class or "", tuple(per_zone))
    scored = [v for a, v in per_zone.items() if a in true_zones]
    return (max(scored) if scored else None), per_zone
