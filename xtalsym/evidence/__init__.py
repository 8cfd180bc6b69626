"""Symmetry evidence measured in zone-axis patterns: one frame (:mod:`.frame`), the zones of one
sample together (:mod:`.sample`), and what the evidence can and cannot tell apart.

Typical use::

    frames = {axis: analyse_frame(pattern, axis=axis, q_per_pixel=geometry.q_per_pixel)
              for axis, pattern in patterns.items()}
    evidence = combine(frames)          # SampleEvidence; evidence.group_loglik is (230,)
"""

from xtalsym.evidence.frame import FrameEvidence, analyse_frame
from xtalsym.evidence.sample import SampleEvidence, combine


def analyse_sample(patterns: dict, *, q_per_pixel: float, d_min_angstrom: float | None = None,
                   counts: bool | None = None) -> SampleEvidence:
    """analyse_frame on each zone's calibrated float pattern, then combine."""
    frames = {axis: analyse_frame(p, axis=axis, q_per_pixel=q_per_pixel, d_min_angstrom=d_min_angstrom,
                                  counts=counts) for axis, p in patterns.items()}
    return combine(frames)


__all__ = ["FrameEvidence", "SampleEvidence", "analyse_frame", "analyse_sample", "combine"]
