"""Physics fixtures for the Condor-equivalent simulator (xtalsym.offline.simulate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsym.offline import simulate as sim
from xtalsym.offline.simulate import (
    AXES,
    Geometry,
    Realism,
    SimulationError,
    block_size,
    simulate_axes,
    simulate_pattern,
    to_raw_uint8,
)

SMALL = Geometry(pixels=65)          # odd: pixel (32, 32) sits exactly on the beam
CENTRE = (SMALL.pixels - 1) // 2


def _spot_column(geometry: Geometry, g: float) -> float:
    """Fractional column offset where |H_x| = g (Å⁻¹) on the beam row of a flat detector."""
    t = geometry.wavelength_m * 1e10 * g  # = sin of the in-plane scattering angle
    return geometry.distance_m * t / math.sqrt(1 - t * t) / geometry.pixel_size_m


def _a_for_column(geometry: Geometry, column_offset: int) -> float:
    """Cubic a (Å) putting h = 1 exactly on the centre of that pixel of the beam row."""
    px = column_offset * geometry.pixel_size_m
    return geometry.wavelength_m * math.hypot(px, geometry.distance_m) / px * 1e10


@pytest.fixture(scope="module")
def cu_fcc() -> Structure:
    a = _a_for_column(SMALL, 8)
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Cu"], [[0, 0, 0]])


@pytest.fixture(scope="module")
def w_bcc() -> Structure:
    a = _a_for_column(SMALL, 8)
    return Structure.from_spacegroup("Im-3m", Lattice.cubic(a), ["W"], [[0, 0, 0]])


@pytest.fixture(scope="module")
def triclinic() -> Structure:
    lat = Lattice.from_parameters(4.1, 5.3, 6.2, 78, 85, 101, vesta=True)
    return Structure(lat, ["Fe2+", "O", "Si"], [[0.1, 0.2, 0.3], [0.55, 0.6, 0.15], [0.8, 0.35, 0.7]])


@pytest.fixture(scope="module")
def monoclinic() -> Structure:
    lat = Lattice.from_parameters(5.1, 6.3, 7.2, 90, 104, 90, vesta=True)
    return Structure.from_spacegroup("P2/m", lat, ["Mg", "O"], [[0.1, 0.0, 0.3], [0.3, 0.5, 0.2]])


def test_fcc_extinctions_on_the_beam_row(cu_fcc):
    img = simulate_pattern(cu_fcc, "z", geometry=SMALL, supercell=(6, 6, 6))
    row = img[CENTRE]
    # h = 1 lands exactly on column +8: F_cell vanishes on the whole line h=1, k=0.
    forbidden = [row[CENTRE + 8], row[CENTRE - 8], row[CENTRE + 24], row[CENTRE - 24]]
    allowed = max(row[CENTRE + 14:CENTRE + 19])  # (200) near 16 px
    assert allowed > 0
    assert max(forbidden[:2]) < 1e-6 * allowed
    # (300): not exactly on a pixel centre, so its Dirichlet tail remains; still tiny.
    assert max(forbidden[2:]) < 1e-3 * allowed


def test_bcc_extinctions(w_bcc):
    img = simulate_pattern(w_bcc, "z", geometry=SMALL, supercell=(6, 6, 6))
    row = img[CENTRE]
    allowed = max(row[CENTRE + 14:CENTRE + 19])  # (200)
    # (100): h+k+l odd. Exactly zero only at l = 0; Ewald curvature gives l ~ 1e-3 here.
    assert row[CENTRE + 8] < 1e-4 * allowed
    # (110) on the diagonal: allowed; (100)/(010) forbidden.
    assert img[CENTRE + 8, CENTRE + 8] > 1e3 * img[CENTRE, CENTRE + 8]
    # At exact reciprocal-lattice points F vanishes to rounding.
    lat = w_bcc.lattice
    cart = w_bcc.cart_coords
    g = lat.reciprocal_lattice_crystallographic.matrix
    f = np.ones((2, 1))
    amp = sim._amplitude_squared(np.array([g[0], 2 * g[0]]), cart, np.zeros(len(cart), int), f)
    assert amp[0] < 1e-20 * amp[1]


def test_spot_positions_match_lattice_spacings():
    geo = Geometry()
    lat = Lattice.orthorhombic(4.2, 5.5, 7.0)
    s = Structure(lat, ["Ni"], [[0, 0, 0]])
    img = simulate_pattern(s, "z", geometry=geo, supercell=(8, 8, 8))
    c = (geo.pixels - 1) / 2
    for h, k in [(1, 0), (2, 0), (0, 1), (0, 2), (1, 1), (-2, 1)]:
        gx, gy = h / 4.2, k / 5.5
        g = math.hypot(gx, gy)
        r = _spot_column(geo, g)
        x, y = c + r * gx / g, c + r * gy / g
        xi, yi = int(round(x)), int(round(y))
        win = img[yi - 3:yi + 4, xi - 3:xi + 4]
        dy, dx = np.unravel_index(np.argmax(win), win.shape)
        assert math.hypot(yi - 3 + dy - y, xi - 3 + dx - x) <= 1.0, (h, k)


def test_friedel_exact_and_image_symmetry(triclinic, monoclinic):
    # |F(H)| == |F(-H)| at any H (real form factors).
    rng = np.random.default_rng(1)
    h = rng.normal(scale=0.3, size=(50, 3))
    cart = triclinic.cart_coords
    f = np.ones((100, 1))
    both = sim._amplitude_squared(np.vstack([h, -h]), cart, np.zeros(len(cart), int), f)
    np.testing.assert_allclose(both[:50], both[50:], rtol=1e-10)
    # The image pixel at -(px, py) has H = (-Hx, -Hy, +Hz), so the 180° rotation is exact
    # only with a 2-fold axis (or mirror) along the beam: monoclinic b along the beam.
    img = simulate_pattern(monoclinic, "y", geometry=SMALL, supercell=(3, 3, 3))
    np.testing.assert_allclose(img, img[::-1, ::-1], rtol=1e-9, atol=1e-12 * img.max())
    # Without that symmetry it holds only up to the Ewald curvature (small, not zero).
    tri = simulate_pattern(triclinic, "z", geometry=SMALL, supercell=(3, 3, 3))
    diff = np.abs(tri - tri[::-1, ::-1]).max() / tri.max()
    assert 0 < diff < 0.05


@pytest.mark.parametrize("name", ["triclinic", "monoclinic", "cu_fcc"])
@pytest.mark.parametrize("axis", AXES)
def test_block_sum_equals_direct_sum(request, name, axis):
    s = request.getfixturevalue(name)
    kw = dict(geometry=Geometry(pixels=48), supercell=(2, 3, 2))
    fast = simulate_pattern(s, axis, **kw)
    direct = simulate_pattern(s, axis, method="direct", **kw)
    np.testing.assert_allclose(fast, direct, rtol=1e-9, atol=1e-12 * direct.max())


def test_thresholded_mode_is_exact_where_kept(triclinic):
    exact = simulate_pattern(triclinic, "z", geometry=Geometry(pixels=96), supercell=(4, 4, 4))
    cut = simulate_pattern(triclinic, "z", geometry=Geometry(pixels=96), supercell=(4, 4, 4),
                           cutoff=sim.DATASET_CUTOFF)
    kept = cut > 0
    np.testing.assert_allclose(cut[kept], exact[kept], rtol=1e-12)
    assert exact[~kept].max(initial=0) < sim.DATASET_CUTOFF * exact.max()
    np.testing.assert_array_equal(to_raw_uint8(cut), to_raw_uint8(exact))


def test_dataset_options_match_the_exact_pattern_in_8_bits(triclinic, monoclinic):
    # float32 phases + cutoff: within 1e-5 of the maximum where computed, below the
    # cutoff where not; 8-bit images identical but for one grey level on a rounding tie.
    for s in (triclinic, monoclinic):
        for axis in AXES:
            exact = simulate_pattern(s, axis, geometry=Geometry(pixels=96))
            fast = simulate_pattern(s, axis, geometry=Geometry(pixels=96), **sim.DATASET_OPTIONS)
            kept = fast > 0
            assert np.abs(fast - exact)[kept].max() < 1e-5 * exact.max()
            assert exact[~kept].max(initial=0) < sim.DATASET_CUTOFF * exact.max()
            diff = np.abs(to_raw_uint8(fast).astype(int) - to_raw_uint8(exact))
            assert diff.max() <= 1 and np.count_nonzero(diff) <= 5


def test_single_precision_is_fast_method_only(triclinic):
    with pytest.raises(SimulationError, match="precision"):
        simulate_pattern(triclinic, "z", method="direct", precision="single")
    with pytest.raises(SimulationError, match="'quad'"):
        simulate_pattern(triclinic, "z", precision="quad")


def test_axis_convention_spacings():
    a, b, c = 3.0, 4.0, 6.0
    s = Structure(Lattice.orthorhombic(a, b, c), ["Al"], [[0, 0, 0]])
    geo = Geometry(pixels=128)
    centre = (geo.pixels - 1) / 2
    # (image x spacing, image y spacing) for each zone axis.
    expected = {"z": (a, b), "x": (b, c), "y": (c, a)}
    imgs = simulate_axes(s, geometry=geo, supercell=(10, 10, 10))
    for axis, (dx, dy) in expected.items():
        img = imgs[axis]
        row = img[geo.pixels // 2]  # beam row (half a pixel off) runs along image x
        col = img[:, geo.pixels // 2]
        first_x = geo.pixels // 2 + 5 + int(np.argmax(row[geo.pixels // 2 + 5:]))
        first_y = geo.pixels // 2 + 5 + int(np.argmax(col[geo.pixels // 2 + 5:]))
        assert abs(first_x - centre - _spot_column(geo, 1 / dx)) <= 1.0, axis
        assert abs(first_y - centre - _spot_column(geo, 1 / dy)) <= 1.0, axis


def test_realism_off_by_default_and_seeded(triclinic):
    kw = dict(geometry=Geometry(pixels=48), supercell=(3, 3, 3))
    plain = simulate_pattern(triclinic, "x", **kw)
    np.testing.assert_array_equal(plain, simulate_pattern(triclinic, "x", realism=Realism(), **kw))
    noisy = Realism(dose=1e4, background=0.01, beam_stop_radius_px=3, misorientation_deg=0.5,
                    thermal_b_angstrom2=0.8, seed=7)
    one = simulate_pattern(triclinic, "x", realism=noisy, **kw)
    np.testing.assert_array_equal(one, simulate_pattern(triclinic, "x", realism=noisy, **kw))
    other = Realism(**{**noisy.__dict__, "seed": 8})
    assert not np.array_equal(one, simulate_pattern(triclinic, "x", realism=other, **kw))
    assert np.all(one[22:26, 22:26] == 0)  # beam stop
    assert np.all(one == np.round(one))    # counts


@pytest.mark.parametrize("kwargs", [dict(dose=0), dict(dose=float("nan")), dict(background=-1),
                                    dict(beam_stop_radius_px=float("inf")),
                                    dict(misorientation_deg=-0.1), dict(thermal_b_angstrom2=-2),
                                    dict(seed=-1)])
def test_realism_bad_values(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        Realism(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(wavelength_m=0), dict(distance_m=-1.0),
                                    dict(pixel_size_m=float("nan")), dict(pixels=4)])
def test_geometry_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Geometry(**kwargs)


def test_geometry_q_per_pixel():
    assert Geometry().q_per_pixel == pytest.approx(0.005357, rel=1e-3)
    h = Geometry(pixels=8).scattering_vectors()
    assert h.shape == (8, 8, 3) and np.all(h[..., 2] < 0)


def test_bad_input(cu_fcc):
    with pytest.raises(SimulationError, match="empty"):
        simulate_pattern(Structure(Lattice.cubic(4), [], []), "z")
    partial = Structure(Lattice.cubic(4), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(SimulationError, match="partial occupancy"):
        simulate_pattern(partial, "z")
    with pytest.raises(SimulationError, match="'w'"):
        simulate_pattern(cu_fcc, "w")
    with pytest.raises(SimulationError, match="absurd"):
        simulate_pattern(Structure(Lattice.cubic(0.1), ["Cu"], [[0, 0, 0]]), "z")
    with pytest.raises(SimulationError, match="'neutron'"):
        simulate_pattern(cu_fcc, "z", scattering="neutron")
    with pytest.raises(SimulationError, match="supercell"):
        simulate_pattern(cu_fcc, "z", supercell=(0, 1, 1))


def test_electron_scattering_and_species(triclinic):
    img = simulate_pattern(triclinic, "z", geometry=Geometry(pixels=32), supercell=(2, 2, 2),
                           scattering="electron")
    assert img.shape == (32, 32) and np.all(np.isfinite(img)) and img.max() > 0


def test_block_size_default():
    assert block_size(np.diag([5.64, 5.64, 5.64])) == (15, 15, 15)
    assert block_size(np.diag([200.0, 3.0, 1.0])) == (1, 28, 85)


def test_to_raw_uint8():
    out = to_raw_uint8(np.array([[0.0, 1.0], [2.0, 4.0]]))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 64], [128, 255]]
    for bad in (np.zeros((2, 2)), np.array([1.0, np.nan])):
        with pytest.raises(ValueError, match="to_raw_uint8"):
            to_raw_uint8(bad)
