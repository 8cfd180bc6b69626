"""The calibrated decision rule of the evidence (xtalsym/evidence/decision.py, issue 14)."""

from __future__ import annotations

import math

import pytest

from xtalsym.evidence import analyse_frame, combine, decision
from xtalsym.offline import simulate, structures

GEOMETRY = simulate.Geometry()


def test_margin_is_log_odds_against_all_others():
    best, m = decision.margin({"a": 0.0, "b": -math.log(3.0), "c": -math.log(3.0)})
    assert best == "a" and m == pytest.approx(math.log(1.5))


def test_rule_thresholds_and_friedel_gate():
    system, threshold = next(iter(decision.SYSTEM_MIN_LOG_ODDS.items()))
    kw = dict(bravais="no such lattice", bravais_margin=1e6)
    assert decision.rule(system=system, system_margin=threshold, friedel=0.0, **kw) == (True, False)
    assert decision.rule(system=system, system_margin=threshold - 0.1, friedel=0.0, **kw)[0] is False
    # a zone off its axis: nothing is named, however large the margin
    assert decision.rule(system=system, system_margin=1e6, friedel=decision.MAX_FRIEDEL_ASYMMETRY + 0.01,
                         **kw)[0] is False
    assert decision.rule(system=system, system_margin=1e6, friedel=math.nan, **kw)[0] is True  # not measured
    never = [s for s in ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
             if s not in decision.SYSTEM_MIN_LOG_ODDS]
    for s in never:
        assert decision.rule(system=s, system_margin=1e6, friedel=0.0, **kw)[0] is False


def _frames(name: str, misorientation_deg: float):
    lab = structures.load_structure(structures.shipped_structures_dir() / f"{name}.cif")
    rz = simulate.Realism(misorientation_deg=misorientation_deg, seed=0) if misorientation_deg else None
    pats = simulate.simulate_axes(lab.structure, geometry=GEOMETRY, realism=rz, **simulate.DATASET_OPTIONS)
    return {a: analyse_frame(p, axis=a, q_per_pixel=GEOMETRY.q_per_pixel) for a, p in pats.items()}


@pytest.mark.slow
def test_on_axis_zones_obey_friedel_and_tilted_ones_are_refused():
    on_axis = _frames("Si", 0.0)
    for ev in on_axis.values():
        asym, pairs = decision.friedel_asymmetry(ev)
        assert pairs >= decision.MIN_FRIEDEL_PAIRS and asym < 0.02, (ev.axis, asym, pairs)
    tilted = combine(_frames("Si", 2.0))
    assert tilted.crystal_system is None and tilted.bravais is None and not tilted.decided
    assert any("tilted off its axis" in w for w in tilted.warnings), tilted.warnings
