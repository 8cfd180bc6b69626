"""The per-frame numerics that the speed work (issue 14) rewrote give numpy's numbers: medians and
quantiles, the spot floor decided from a bracket, edge patches, 2×2 algebra, least squares, and
frames that are not contiguous or hold an infinity. tests/evidence/test_reference_outputs.py checks
the whole analysis on stored frames; these check the pieces on inputs made to hit their edge cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym import evidence
from xtalsym.evidence import lattice2d, spots, stats
from xtalsym.offline import simulate

Q = simulate.Geometry().q_per_pixel


def test_median_and_quantiles_are_numpys():
    rng = np.random.default_rng(0)
    for n in list(range(1, 40)) + [1000, 1001]:
        v = rng.exponential(1.0, n) * rng.choice([1e-3, 1.0, 1e5])
        v[rng.integers(0, n, n // 3)] = v[0]  # ties
        assert stats.median(v) == np.median(v), n
        assert stats.median_of_sorted(np.sort(v)) == np.median(v), n
        for bins in range(1, 7):
            p = np.linspace(0, 1, bins + 1)
            assert np.array_equal(stats.quantiles(v, p), np.quantile(v, p)), (n, bins)


@pytest.mark.parametrize("shape, r_lo", [((256, 256), 6.0), ((255, 255), -1.0)])  # even and odd pixel counts
@pytest.mark.parametrize("kind", ["smooth", "quantised", "float32"])
def test_floor_from_the_bracket_is_the_exact_decision(kind, shape, r_lo):
    """values > median(annulus) + margin, with values on both sides of the bracket and at the floor."""
    rng = np.random.default_rng({"smooth": 1, "quantised": 2, "float32": 3}[kind])
    index, mask = spots._disc_index(shape, r_lo, 120.0), spots._disc_mask(shape, r_lo, 120.0)
    assert len(index) % 2 == (shape[0] % 2)
    for _ in range(40):
        image = rng.exponential(1.0, shape)
        if kind == "quantised":
            image = np.round(rng.normal(5, 2, shape) * 4) / 4  # many pixels equal to the median
        elif kind == "float32":
            image = image.astype(np.float32).astype(np.float64)
        flat = image.ravel()
        ordered = np.sort(flat[spots._sample_index(shape, r_lo, 120.0)])
        margin = 0.01
        floor = float(np.median(flat[index])) + margin
        values = np.concatenate([rng.choice(flat, 60), [floor, np.nextafter(floor, np.inf), floor - margin,
                                                         np.nextafter(floor, -np.inf)]])
        got = spots._above_floor(flat, mask, index, ordered, margin, values)
        assert np.array_equal(got, values > floor)


def test_patches_at_the_edge_read_edge_values():
    """Positions whose patch leaves the frame integrate the edge-padded frame, inside ones the frame."""
    rng = np.random.default_rng(4)
    image = rng.exponential(1.0, (64, 80))
    padded = np.pad(image, spots.PAD, mode="edge")
    rows = np.array([0, 3, 63, 30, 10])
    cols = np.array([0, 79, 40, 40, 4])
    value, sigma = spots.integrate(image, rows, cols, sigma_bg=0.5, counts=True)
    h = spots.PATCH // 2
    for (r, c), v in zip(zip(rows, cols), value):
        p = padded[r + spots.PAD - h:r + spots.PAD + h + 1, c + spots.PAD - h:c + spots.PAD + h + 1]
        ring = np.sort(p[spots._RING])
        expected = p[spots._BOXMASK].sum() - spots.BOX**2 * ring[len(ring) // 2]
        assert v == pytest.approx(expected, rel=1e-12, abs=1e-12), (r, c)
    inside, _ = spots.integrate(image, rows[3:], cols[3:], sigma_bg=0.5, counts=True)
    assert np.array_equal(inside, value[3:])  # the same pixels whichever array they are read from
    assert np.all(sigma > 0)


def test_two_by_two_algebra_and_least_squares():
    rng = np.random.default_rng(5)
    for _ in range(50):
        m = rng.normal(size=(2, 2)) * rng.choice([1e-3, 1.0, 50.0])
        assert np.allclose(lattice2d.inverse2(m), np.linalg.inv(m), rtol=1e-12, atol=0)
        a, b = rng.normal(size=(12, 2)), rng.normal(size=(12, 2))
        assert np.allclose(lattice2d._lstsq(a, b), np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-12, atol=1e-14)
    with pytest.raises(np.linalg.LinAlgError):
        lattice2d.inverse2(np.array([[1.0, 2.0], [2.0, 4.0]]))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_non_finite_pixel_cannot_decide(bad):
    frame = np.zeros((128, 128))
    frame[60:68, 60:68] = 10.0
    frame[5, 7] = bad
    ev = evidence.analyse_frame(frame, axis="z", q_per_pixel=Q)
    assert not ev.decided and "1 non-finite pixels" in ev.reason


def test_a_strided_frame_is_analysed_like_its_copy():
    structure = simulate_structure()
    pattern = simulate.simulate_axes(structure, **simulate.DATASET_OPTIONS)["z"]
    wide = np.zeros((pattern.shape[0], pattern.shape[1] + 16))
    wide[:, 8:-8] = pattern
    view = wide[:, 8:-8]  # not C-contiguous
    assert not view.flags.c_contiguous
    a = evidence.analyse_frame(view, axis="z", q_per_pixel=Q)
    b = evidence.analyse_frame(np.ascontiguousarray(view), axis="z", q_per_pixel=Q)
    assert a.decided and a.to_json(spots=True) == b.to_json(spots=True)
    assert np.array_equal(a.nodes_intensity, b.nodes_intensity)


def simulate_structure():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.0), ["Sr", "Ti", "O"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
