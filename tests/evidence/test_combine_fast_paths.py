"""combine's vectorised steps give the bits of the straightforward loops they replaced (issue 12:
combine cheaper, outputs unchanged), on the stored reference frames (tests/evidence/fixtures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from xtalsym import symmetry
from xtalsym.evidence import analyse_frame, combine, zonerules
from xtalsym.evidence import sample as sample_mod
from xtalsym.offline import simulate

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_reference  # noqa: E402


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    q = simulate.Geometry().q_per_pixel
    data = np.load(make_reference.FRAMES)
    meta = json.loads(str(data["meta"]))
    return [{a: analyse_frame(data[f"{k}_{a}"].astype(np.float64), axis=a, q_per_pixel=q,
                              beam_stop_radius_px=m["beam_stop_radius_px"]) for a in "xyz"}
            for k, m in enumerate(meta)]


def test_rule_sums_in_one_pass_are_the_per_rule_sums(samples, monkeypatch):
    """Every (lattice, rule) sum of a zone made at once equals, bit for bit, the sum of that
    lattice's allowed node scores taken one rule at a time (and one lattice at a time); so do the
    group likelihoods' sums with the measured empty nodes (and some of those differ from the plain)."""
    fast = sample_mod._rule_sums
    checked = []
    measured_differs = []

    def spy(rule_set, codes, node_set, slots, rules):
        plain, measured = fast(rule_set, codes, node_set, slots, rules)
        for slot in np.unique(slots):
            at = slots == slot
            ref_plain, ref_measured = sample_mod._rule_sums_reference(rule_set, codes, node_set, int(slot), rules[at])
            assert np.array_equal(plain[at], ref_plain)
            assert np.array_equal(measured[at], ref_measured)
            checked.append(int(at.sum()))
        measured_differs.append(bool(np.any(measured != plain)))
        return plain, measured

    monkeypatch.setattr(sample_mod, "_rule_sums", spy)
    for frames in samples:
        for subset in (("x", "y", "z"), ("x", "y"), ("y", "z")):
            combine({a: frames[a] for a in subset})
    assert sum(checked) > 100  # the reference frames exercise many lattices and rules
    assert any(measured_differs)  # the measured empty nodes change some sums


def test_stacked_zone_bases_are_the_one_by_one_bases(samples):
    """The batch's cell choices inverted and projected as stacks equal the one-matrix calls."""
    q = simulate.Geometry().q_per_pixel
    cells = [symmetry.vesta_lattice(*c) for c in ((5.43, 5.43, 5.43, 90, 90, 90), (7.1, 9.8, 13.5, 90, 114.6, 90),
                                                  (6.76, 6.76, 10.47, 90, 90, 120), (16.2, 9.7, 27.1, 90, 91.3, 90))]
    stack = np.linalg.inv(np.stack(cells)).transpose(0, 2, 1)
    for metric in ("monoclinic", "orthorhombic", "hexagonal", "cubic"):
        for axis in "xyz":
            plane = zonerules.zone_plane(metric, axis)
            bases = sample_mod._zone_basis_px(stack, plane, axis, q)
            for i, lattice in enumerate(cells):
                reciprocal = np.linalg.inv(lattice).T
                assert np.array_equal(stack[i], reciprocal)
                assert np.array_equal(bases[i], sample_mod._zone_basis_px(reciprocal, plane, axis, q))
