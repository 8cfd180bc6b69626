"""Zones off their axes: turned back about the beam (xtalsym.evidence.derotate), and the zone
symmetry left out of the group likelihoods where the Friedel pairs disagree.

A zone turned in the image by a crystal's in-plane misorientation fits no cell of the true class;
turned back, its rows lie on the image axes again and the true group is back at the top. A zone
tilted off its axis excites g and its symmetry images differently, so its intensities no longer
show the zone's symmetry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsym import evidence
from xtalsym.evidence import axis as zoneaxis
from xtalsym.evidence import derotate
from xtalsym.evidence import sample as evsample
from xtalsym.offline import simulate

GEOMETRY = simulate.Geometry()
Q = GEOMETRY.q_per_pixel


def _turn(basis: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return basis @ np.array([[c, s], [-s, c]])


@pytest.mark.parametrize("degrees", [-3.5, -1.0, 0.7, 2.0, 3.9])
def test_the_offset_of_a_turned_rectangular_zone_is_its_turn(degrees):
    basis = _turn(np.array([[0.20, 0.0], [0.0, 0.31]]), degrees)
    assert derotate.row_offset_deg(basis) == pytest.approx(degrees, abs=1e-9)


def test_a_hexagonal_zone_is_measured_against_multiples_of_30_degrees():
    a_star = 0.25 * np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])  # rows at 0° and 60°
    assert derotate.row_offset_deg(_turn(_turn(a_star, 30.0), 1.5)) == pytest.approx(1.5, abs=1e-9)


def test_rows_on_the_axes_far_off_them_or_off_by_less_than_their_scatter_are_not_turned():
    basis = np.array([[0.20, 0.0], [0.0, 0.31]])
    assert derotate.row_offset_deg(basis) is None
    assert derotate.row_offset_deg(_turn(basis, 0.2)) is None  # below MIN_TURN_DEG
    assert derotate.row_offset_deg(_turn(basis, 10.0)) is None  # no row within MAX_TURN_DEG
    # a 1° miss on a row measured with a 1° scatter is no miss
    sigma = np.full((2, 2), math.radians(1.0) * 0.20)
    assert derotate.row_offset_deg(_turn(basis, 1.0), sigma) is None
    assert derotate.row_offset_deg(_turn(basis, 1.0), sigma / 10) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def cubic_frames():
    structure = Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.0), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    patterns = simulate.simulate_axes(structure, geometry=GEOMETRY)
    return {a: evidence.analyse_frame(patterns[a], axis=a, q_per_pixel=Q, counts=False) for a in "xyz"}


def test_turning_moves_spots_and_basis_together_and_keeps_what_was_measured(cubic_frames):
    frame = cubic_frames["z"]
    turned = derotate.turned(frame, 2.0)
    np.testing.assert_allclose(turned.basis, _turn(frame.basis, 2.0))
    np.testing.assert_allclose(np.hypot(turned.spots_x_px, turned.spots_y_px),
                               np.hypot(frame.spots_x_px, frame.spots_y_px))
    np.testing.assert_array_equal(turned.nodes_intensity, frame.nodes_intensity)
    np.testing.assert_array_equal(turned.spots_index, frame.spots_index)
    back = derotate.turned_zones({"z": turned})["z"]
    np.testing.assert_allclose(back.basis, frame.basis, atol=1e-6)  # 2e-4 px: the exact zone's own scatter


def test_a_zone_turned_about_the_beam_no_longer_rules_the_true_group_out(cubic_frames, monkeypatch):
    truth = 221  # Pm-3m
    exact = evidence.combine(cubic_frames)
    assert exact.group_loglik[truth - 1] == pytest.approx(0.0)
    frames = dict(cubic_frames) | {"z": derotate.turned(cubic_frames["z"], 1.5)}  # 1 px at 40 px
    monkeypatch.setattr(derotate, "MAX_TURN_DEG", 0.0)
    as_measured = evidence.combine(frames)
    monkeypatch.setattr(derotate, "MAX_TURN_DEG", 4.0)
    turned_back = evidence.combine(frames)
    assert as_measured.group_loglik[truth - 1] < -20.0  # the true cubic cell does not fit
    assert turned_back.group_loglik[truth - 1] == pytest.approx(0.0, abs=1e-9)
    # the turn costs TURNED_ZONE_NATS against the exact zones, relative to the groups the turn does not help
    assert np.argmax(turned_back.group_loglik) == np.argmax(exact.group_loglik)
    # the class likelihoods and the decision are those of the zones as measured
    assert turned_back.crystal_system_loglik == as_measured.crystal_system_loglik
    assert turned_back.decided == as_measured.decided
    assert evsample.TURNED_ZONE_NATS > 0


def test_a_tilted_zone_gives_group_loglik_no_symmetry_term_and_an_exact_one_does(cubic_frames, monkeypatch):
    structure = Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.0), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    patterns = simulate.simulate_axes(structure, geometry=GEOMETRY,
                                      realism=simulate.Realism(misorientation_deg=0.5, seed=2))
    tilted = {a: evidence.analyse_frame(patterns[a], axis=a, q_per_pixel=Q, counts=False) for a in "xyz"}
    exact = evsample._prepare(cubic_frames["z"], zoneaxis.friedel_asymmetry(cubic_frames["z"]))
    assert exact.friedel_ok
    off = [evsample._prepare(f, zoneaxis.friedel_asymmetry(f)) for f in tilted.values() if f.decided]
    assert off and not any(z.friedel_ok for z in off)
    cut = evidence.combine(tilted)
    # the true group is not ruled out by the tilted zones' intensities
    assert cut.group_loglik.max() - cut.group_loglik[221 - 1] < 20.0
    monkeypatch.setattr(evsample, "SYMMETRY_MAX_FRIEDEL_ASYMMETRY", math.inf)  # every zone's term kept
    kept = evidence.combine(tilted)
    assert kept.group_loglik.max() - kept.group_loglik[221 - 1] > 20.0  # with it, the truth is ruled out
    # the class likelihoods, and so the calibrated decision, keep the term either way
    assert kept.crystal_system_loglik == cut.crystal_system_loglik
    assert kept.bravais_loglik == cut.bravais_loglik and kept.decided == cut.decided
