"""The off-axis score of the evidence (xtalsym.evidence.axis) and the fusion's rule on it.

Patterns from the project's simulator: a zone-axis pattern obeys Friedel's law, a tilted one
does not (its reflections survive about the Laue circle, on one side of the beam)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsym import evidence
from xtalsym.evidence import axis
from xtalsym.offline import simulate

GEOMETRY = simulate.Geometry()
Q = GEOMETRY.q_per_pixel


@pytest.fixture(scope="module")
def nacl_frames():
    structure = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])

    def frames(tilt_deg: float, seed: int = 2):  # seed 2: every zone of NaCl tilted visibly at 2°
        realism = simulate.Realism(misorientation_deg=tilt_deg, seed=seed) if tilt_deg else None
        patterns = simulate.simulate_axes(structure, geometry=GEOMETRY, realism=realism)
        return {a: evidence.analyse_frame(patterns[a], axis=a, q_per_pixel=Q, counts=False) for a in "xyz"}

    return frames


def test_a_zone_axis_pattern_is_friedel_symmetric_and_a_tilted_one_is_not(nacl_frames):
    exact = nacl_frames(0.0)
    for frame in exact.values():
        assert frame.decided and axis.friedel_asymmetry(frame) < 0.02
    tilted = nacl_frames(2.0)
    values = [axis.friedel_asymmetry(f) for f in tilted.values() if f.n_spots >= 2]
    assert values and max(values) > 0.2
    score, per_zone = axis.off_axis_score(tilted, "cubic")
    assert score == max(v for a, v in per_zone.items())


def test_the_score_ignores_zones_that_are_no_zone_axes_of_the_metric_class(nacl_frames):
    exact, tilted = nacl_frames(0.0), nacl_frames(2.0)
    mixed = {"x": exact["x"], "y": exact["y"], "z": tilted["z"]}  # monoclinic z is no zone axis: asymmetric anyway
    assert axis.friedel_asymmetry(tilted["z"]) > 0.1
    mono, _ = axis.off_axis_score(mixed, "monoclinic")
    cubic, _ = axis.off_axis_score(mixed, "cubic")
    unknown, _ = axis.off_axis_score(mixed, None)
    assert mono < 0.02 and cubic == unknown == pytest.approx(axis.friedel_asymmetry(tilted["z"]))


def test_missing_partners_count_and_noise_within_the_allowance_does_not(nacl_frames):
    frame = nacl_frames(0.0)["x"]
    n = frame.n_spots
    # every spot's partner gone (keep the spots with x > 0): all the intensity is unpaired
    half = frame.spots_x_px > 0.5
    lopsided = dataclasses.replace(frame, spots_x_px=frame.spots_x_px[half], spots_y_px=frame.spots_y_px[half],
                                   spots_intensity=frame.spots_intensity[half], spots_sigma=frame.spots_sigma[half],
                                   threshold=0.0)
    assert axis.friedel_asymmetry(lopsided) == pytest.approx(1.0, abs=1e-3)  # less the 2σ allowance
    rng = np.random.default_rng(0)
    sigma = 0.01 * frame.spots_intensity
    noisy = dataclasses.replace(frame, spots_intensity=frame.spots_intensity + rng.normal(0, 1, n) * sigma * 0.5,
                                spots_sigma=sigma)
    assert axis.friedel_asymmetry(noisy) < 0.02
    single = dataclasses.replace(frame, spots_x_px=frame.spots_x_px[:1], spots_y_px=frame.spots_y_px[:1],
                                 spots_intensity=frame.spots_intensity[:1], spots_sigma=frame.spots_sigma[:1])
    assert axis.friedel_asymmetry(single) is None


def test_combine_reports_the_score_and_its_json(nacl_frames):
    ev = evidence.combine(nacl_frames(2.0))
    data = ev.to_json()
    assert set(data["friedel_asymmetry"]) <= {"x", "y", "z"}
    if ev.off_axis is not None:
        assert data["off_axis"] == pytest.approx(ev.off_axis, abs=1e-4)
    exact = evidence.combine(nacl_frames(0.0))
    assert exact.off_axis is not None and exact.off_axis < 0.02
