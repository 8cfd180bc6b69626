"""Zones turned back about the beam, for crystals that are not exactly on their zone axes.

A misoriented crystal is turned about the beam as well as off it, so each zone's lattice lies
turned in the image by the in-plane part of the misorientation (σ 2°: about 1° typically; at 40 px
from the beam that moves a node by 0.7 px, five times the cell fit's positional floor). The zones
then share no cell of the true class, and the true groups score at the floor. In the frame the
cell fit uses (a ∥ x, b in the xy plane), every true zone of every class but triclinic has a
lattice row along an image axis (hexagonal ones at a multiple of 30°): a zone whose shortest
such row lies within ``MAX_TURN_DEG`` of that direction, measurably off it, is turned back so
that it lies on it. Rotation about the beam moves positions only: node indices, intensities,
absences and the zone's symmetry stay as measured.

Session 5 measured the idea on 40–60 materials (docs/RESULTS.md, "zones turned back about the
beam"): at σ 2° the evidence put the truth at the top for 25 % of test materials instead of 12 %.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from xtalsym.evidence.frame import FrameEvidence

MAX_TURN_DEG = 4.0  # 2σ of the in-plane turn at the realism target's 2°; 0 turns nothing
MIN_TURN_DEG = 0.3  # below this a row is taken as on its axis (the fit's own scatter at 40 px)
ROW_STEP_DEG = 30.0  # rows lie at multiples of 30° (90° and 60° lattices both)
MIN_TURN_SIGMAS = 3.0  # and the offset must be this many of the row's angular uncertainties


def row_offset_deg(basis: np.ndarray, basis_sigma: np.ndarray | None = None) -> float | None:
    """Signed angle (degrees) by which the zone's shortest row near a multiple of ``ROW_STEP_DEG``
    misses it; None when no short row (u, v, u ± v) lies within ``MAX_TURN_DEG`` of one, or the
    miss is within the measurement's scatter."""
    u, v = np.asarray(basis, dtype=np.float64)
    rows = sorted((u, v, u + v, u - v), key=lambda r: float(r @ r))
    sigma = 0.0 if basis_sigma is None else float(np.max(basis_sigma))
    for row in rows:
        length = float(np.hypot(row[0], row[1]))
        if length == 0.0:
            continue
        angle = math.degrees(math.atan2(row[1], row[0]))
        offset = (angle + ROW_STEP_DEG / 2) % ROW_STEP_DEG - ROW_STEP_DEG / 2
        if abs(offset) <= MAX_TURN_DEG:
            floor = max(MIN_TURN_DEG, MIN_TURN_SIGMAS * math.degrees(math.sqrt(2.0) * sigma / length))
            return offset if abs(offset) >= floor else None
    return None


def turned(frame: FrameEvidence, angle_deg: float) -> FrameEvidence:
    """A copy of ``frame`` turned about the beam by ``angle_deg`` (counter-clockwise in image x, y)."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rotation_t = np.array([[c, s], [-s, c]])  # row vectors times Rᵀ
    points = np.stack([frame.spots_x_px, frame.spots_y_px], 1) @ rotation_t
    return dataclasses.replace(frame, basis=frame.basis @ rotation_t,
                               spots_x_px=np.ascontiguousarray(points[:, 0]),
                               spots_y_px=np.ascontiguousarray(points[:, 1]))


def turned_zones(frames: dict[str, FrameEvidence]) -> dict[str, FrameEvidence]:
    """{axis: the zone turned back} for each decided zone whose rows miss the image axes (see the
    module docstring); empty when every zone is on them, or ``MAX_TURN_DEG`` is 0."""
    if MAX_TURN_DEG <= 0:
        return {}
    out = {}
    for axis, frame in frames.items():
        if frame.decided and frame.basis is not None:
            offset = row_offset_deg(frame.basis, frame.basis_sigma)
            if offset is not None:
                out[axis] = turned(frame, -offset)
    return out
