"""Symmetry knowledge for the 230 groups: zone absences, zone symmetry, sets and ceilings."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources

import numpy as np
import pytest

from xtalsym import spacegroups, symmetry

ALL = range(1, 231)


def _named_sets(groups) -> set[frozenset[str]]:
    return {frozenset(spacegroups.symbol(g) for g in s) for s in symmetry.indistinguishable_sets(groups)}


# --------------------------------------------------------------------------- the figures


def test_signature_counts_over_230_and_the_papers_72():
    assert len({symmetry.signature(g) for g in ALL}) == 113
    assert len({symmetry.signature(g) for g in spacegroups.PAPER_72}) == 51
    sets = symmetry.indistinguishable_sets(spacegroups.PAPER_72)
    assert len(sets) == 51
    assert sum(len(s) > 1 for s in sets) == 19
    assert sorted(g for s in sets for g in s) == sorted(spacegroups.PAPER_72)  # a partition


def test_known_inseparable_sets_among_the_72():
    named = _named_sets(spacegroups.PAPER_72)
    for expected in (
        {"F-43m", "Fm-3m"}, {"P6_3mc", "P6_3/mmc"}, {"P1", "P-1"}, {"C2", "Cm", "C2/m"},
        {"I4mm", "I4/mmm"}, {"R3", "R-3"}, {"P-6m2", "P-62m", "P6/mmm"},
    ):  # fmt: skip
        assert frozenset(expected) in named, expected


def test_pnma_and_pna21_differ_by_where_the_a_glide_shows():
    assert symmetry.signature(62) != symmetry.signature(33)
    assert "hk0: h = 2n+1 absent" in symmetry.zone_symmetry(62, "z").conditions
    assert "h0l: h = 2n+1 absent" in symmetry.zone_symmetry(33, "y").conditions
    # the a-glide of Pnma is perpendicular to c: h0l shows only the axial rows
    assert symmetry.zone_symmetry(62, "y").conditions == ("00l: l = 2n+1 absent", "h00: h = 2n+1 absent")


def test_fm3m_and_im3m_differ_in_the_hk0_zone():
    fcc, bcc = symmetry.zone_symmetry(225, "z"), symmetry.zone_symmetry(229, "z")
    assert fcc.absent != bcc.absent
    assert fcc.point_group_2d == bcc.point_group_2d == "4mm"
    assert fcc.is_absent(1, 1) and not bcc.is_absent(1, 1)  # 110: F needs h, k even; I needs h+k even
    assert fcc.is_absent(1, 0) and bcc.is_absent(1, 0)
    assert not fcc.is_absent(2, 0) and not bcc.is_absent(2, 0)


def test_p63mc_and_p63mmc_share_a_set():
    assert symmetry.set_of(186, spacegroups.PAPER_72) == symmetry.set_of(194, spacegroups.PAPER_72) == {186, 194}
    # over all 230, P-62c joins: its hh-2hl: l = 2n shows exactly like the 6_3 screw
    assert symmetry.set_of(186) == frozenset({186, 190, 194})


def test_p21c_absences():
    h0l = symmetry.zone_symmetry(14, "y")
    assert h0l.plane == "h0l" and h0l.basis_hkl == ((0, 0, 1), (1, 0, 0))  # u = l (image x), v = h
    assert "h0l: l = 2n+1 absent" in h0l.conditions
    assert all(h0l.is_absent(m, n) == (m % 2 == 1) for m in range(-5, 6) for n in range(-5, 6) if (m, n) != (0, 0))
    row = symmetry.zone_symmetry(14, "z")
    assert (row.plane, row.rank, row.point_group_2d) == ("0k0", 1, "row")
    assert row.conditions == ("0k0: k = 2n+1 absent",)
    assert row.is_absent(1, 0) and row.is_absent(-3, 0) and not row.is_absent(2, 0)
    assert "0k0: k = 2n+1 absent" in symmetry.zone_symmetry(14, "x").conditions


def test_balanced_ceilings():
    assert symmetry.symmetry_ceiling(spacegroups.PAPER_72) == pytest.approx(51 / 72)  # 70.8 %
    assert round(100 * symmetry.symmetry_ceiling(spacegroups.PAPER_72), 1) == 70.8
    assert round(100 * symmetry.symmetry_ceiling(ALL), 1) == 49.1


def test_ceilings_at_materials_project_frequencies():
    labels_72 = symmetry.materials_project_labels(spacegroups.PAPER_72)
    labels_230 = symmetry.materials_project_labels()
    assert round(100 * symmetry.symmetry_ceiling(labels_72, spacegroups.PAPER_72), 1) == 81.6
    assert round(100 * symmetry.symmetry_ceiling(labels_230), 1) == 79.6


def test_the_committed_counts_say_how_they_were_made():
    path = resources.files("xtalsym") / "data" / symmetry.MP_COUNTS_FILE
    meta = json.loads(path.read_text())
    assert meta["symprec"] == 0.1 and "mp_space_group_counts.py" in meta["command"]
    assert meta["labelled"] == sum(meta["counts"].values()) == len(symmetry.materials_project_labels()) > 30000


# --------------------------------------------------------------------------- ceilings, by hand


def test_ceiling_takes_the_most_frequent_group_of_each_set():
    # {225, 216} cannot be told apart, 229 can: 225 x3, 216 x1, 229 x2 -> (3 + 2) / 6
    assert symmetry.symmetry_ceiling([225, 225, 225, 216, 229, 229]) == pytest.approx(5 / 6)
    assert symmetry.symmetry_ceiling([1, 2]) == pytest.approx(1 / 2)
    assert symmetry.symmetry_ceiling([62, 33]) == 1.0


def test_ceiling_rejects_bad_labels():
    with pytest.raises(ValueError, match="at least one label"):
        symmetry.symmetry_ceiling([])
    with pytest.raises(ValueError, match=r"outside the given groups: \[5\]"):
        symmetry.symmetry_ceiling([1, 5], groups=[1, 2])
    with pytest.raises(ValueError, match="231"):
        symmetry.symmetry_ceiling([231])


# --------------------------------------------------------------------------- cell scale unknown


def test_cell_unknown_merges_f_cubic_with_p_cubic_at_half_the_edge():
    assert symmetry.apparent_cell_divisors(225) == (2, 2, 2)
    assert symmetry.apparent_cell_divisors(221) == (1, 1, 1)
    assert symmetry.signature(225, cell_known=False) == symmetry.signature(221, cell_known=False)
    assert symmetry.signature(225) != symmetry.signature(221)


def test_cell_unknown_keeps_body_centring_visible():
    assert symmetry.apparent_cell_divisors(229) == (1, 1, 1)
    assert 229 not in symmetry.set_of(221, cell_known=False)
    # diamond's d-glide halves the apparent cell and leaves an I-like pattern
    assert symmetry.apparent_cell_divisors(227) == (2, 2, 2)
    assert symmetry.set_of(227, spacegroups.PAPER_72, cell_known=False) == frozenset({227, 229})
    # Ia-3d's d-glide halves the cell too
    assert symmetry.apparent_cell_divisors(230) == (2, 2, 2)


def test_apparent_cells_keep_the_metric():
    for group in ALL:
        p, q, r = symmetry.apparent_cell_divisors(group)
        if symmetry.metric_class(group) in ("tetragonal", "hexagonal", "cubic"):
            assert p == q, group
        if symmetry.metric_class(group) == "cubic":
            assert q == r, group
        assert {p, q, r} <= {1, 2}, group


def test_cell_unknown_sets_refine_the_known_ones():
    known = symmetry.indistinguishable_sets(ALL)
    unknown = symmetry.indistinguishable_sets(ALL, cell_known=False)
    assert len(unknown) < len(known)
    for s in known:  # knowing less can only merge sets
        assert any(s <= u for u in unknown)
    assert symmetry.symmetry_ceiling(ALL, cell_known=False) == pytest.approx(len(unknown) / 230)


# --------------------------------------------------------------------------- zone geometry


@pytest.mark.parametrize(
    "group, zone, plane, rank, basis",
    [
        (62, "x", "0kl", 2, ((0, 1, 0), (0, 0, 1))),
        (62, "y", "h0l", 2, ((0, 0, 1), (1, 0, 0))),
        (62, "z", "hk0", 2, ((1, 0, 0), (0, 1, 0))),
        (194, "x", "0kl", 2, ((0, 1, 0), (0, 0, 1))),
        (194, "y", "(-2k,k,l)", 2, ((0, 0, 1), (2, -1, 0))),
        (194, "z", "hk0", 2, ((1, 0, 0), (0, 1, 0))),
        (166, "y", "(-2k,k,l)", 2, ((0, 0, 1), (2, -1, 0))),
        (14, "z", "0k0", 1, ((0, 1, 0), (0, 0, 0))),
        (2, "x", "0kl", 2, ((0, 1, 0), (0, 0, 1))),
        (2, "y", "00l", 1, ((0, 0, 1), (0, 0, 0))),
        (2, "z", "none", 0, ((0, 0, 0), (0, 0, 0))),
    ],
)
def test_zone_planes_in_our_frame(group, zone, plane, rank, basis):
    zs = symmetry.zone_symmetry(group, zone)
    assert (zs.plane, zs.rank, zs.basis_hkl) == (plane, rank, basis)
    lattice = symmetry.vesta_lattice(*symmetry._GENERIC_CELLS[symmetry.metric_class(group)])
    beam = np.array(symmetry.zone_image_axes(zone)[0])
    for hkl in basis:  # reciprocal vectors perpendicular to the beam
        assert abs(np.array(hkl) @ np.linalg.inv(lattice).T @ beam) < 1e-12


def test_basis_points_along_the_image_axes():
    for metric in symmetry.METRIC_CLASSES:
        for zone in symmetry.ZONES:
            geometry = symmetry._zone_geometry(metric, zone)
            if geometry.rank < 2:
                continue
            rows = np.linalg.inv(symmetry.vesta_lattice(*symmetry._GENERIC_CELLS[metric])).T
            _, image_x, image_y = (np.array(a) for a in symmetry.zone_image_axes(zone))
            u, v = (np.array(h) @ rows for h in geometry.basis_hkl)
            assert u @ image_x > 0 and v @ image_y > 0, (metric, zone)


@pytest.mark.parametrize(
    "group, zone, point_group",
    [(221, "z", "4mm"), (200, "z", "2mm"), (75, "z", "4"), (123, "x", "2mm"), (191, "z", "6mm"),
     (175, "z", "6"), (147, "z", "6"), (164, "z", "6mm"), (164, "x", "2"), (162, "x", "2mm"),
     (14, "y", "2"), (14, "x", "2mm"), (2, "x", "2"), (1, "x", "2")],
)  # fmt: skip
def test_zone_point_groups(group, zone, point_group):
    assert symmetry.zone_symmetry(group, zone).point_group_2d == point_group


def test_condition_texts():
    assert symmetry.zone_symmetry(169, "x").conditions == ("00l: l ≠ 6n absent",)  # 6_1, not l odd + l ≠ 3n
    assert symmetry.zone_symmetry(92, "x").conditions == ("00l: l ≠ 4n absent", "0k0: k = 2n+1 absent")
    assert symmetry.zone_symmetry(166, "z").conditions == ("hk0: -h+k ≠ 3n absent",)  # R obverse
    assert symmetry.zone_symmetry(227, "z").conditions[-1] == "hk0: h+k ≠ 4n absent"  # d-glide
    for group in ALL:
        for zone in symmetry.ZONES:
            zs = symmetry.zone_symmetry(group, zone)
            assert bool(zs.conditions) == bool(zs.absent), (group, zone)


def test_mirror_lines_in_image_coordinates():
    square = symmetry.zone_symmetry(221, "z")
    assert square.mirror_lines == ((0, 1), (1, -1), (1, 0), (1, 1))
    assert sorted(square.mirror_angles_deg) == [0.0, 45.0, 90.0, 135.0]
    hexagon = symmetry.zone_symmetry(191, "z")
    assert sorted(hexagon.mirror_angles_deg) == [0.0, 30.0, 60.0, 90.0, 120.0, 150.0]
    assert symmetry.zone_symmetry(200, "z").mirror_angles_deg in ((90.0, 0.0), (0.0, 90.0))
    assert symmetry.zone_symmetry(175, "z").mirror_lines == ()


def test_mirror_angles_depend_only_on_the_metric_class():
    other_cells = {
        "monoclinic": (7.9, 4.1, 5.5, 90, 115.3, 90), "orthorhombic": (9.1, 3.3, 6.2, 90, 90, 90),
        "tetragonal": (3.1, 3.1, 11.7, 90, 90, 90), "hexagonal": (2.5, 2.5, 16.3, 90, 90, 120),
        "cubic": (11.0, 11.0, 11.0, 90, 90, 90),
    }  # fmt: skip
    for group in range(3, 231):
        lattice = symmetry.vesta_lattice(*other_cells[symmetry.metric_class(group)])
        for zone in symmetry.ZONES:
            zs = symmetry.zone_symmetry(group, zone)
            if not zs.mirror_lines:
                continue
            positions = np.array(zs.mirror_lines) @ zs.image_basis_inv_A(lattice)
            angles = np.degrees(np.arctan2(positions[:, 1], positions[:, 0])) % 180
            difference = (angles - np.array(zs.mirror_angles_deg) + 90) % 180 - 90
            assert np.allclose(difference, 0, atol=1e-6), (group, zone)


def _general_orbit(group: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two atoms in general positions (weights 1 and 0.6): one alone can add accidental
    symmetry (P3: all its images share one z, so |F(0kl)| does not depend on the sign of l)."""
    rotations, translations = symmetry._operations(group)
    orbits = [(rotations @ rng.random(3) + translations) % 1.0 for _ in range(2)]
    weights = np.repeat([1.0, 0.6], len(rotations))
    return np.concatenate(orbits), weights


def _structure_factors(orbit: tuple[np.ndarray, np.ndarray], hkl: np.ndarray) -> np.ndarray:
    positions, weights = orbit
    return np.exp(2j * np.pi * hkl @ positions.T) @ weights


@pytest.mark.slow
def test_absences_match_structure_factors_of_a_general_position_for_all_groups():
    # independent of the H·R = H rule: one atom in general position, kinematic F(H)
    rng = np.random.default_rng(14)
    for group in ALL:
        orbit = _general_orbit(group, rng)
        for zone in symmetry.ZONES:
            zs = symmetry.zone_symmetry(group, zone)
            nodes = symmetry._window_nodes(zs.rank)
            if not nodes:
                continue
            amplitude = np.abs(_structure_factors(orbit, symmetry._nodes_hkl(zs.basis_hkl, nodes))) / len(orbit[1])
            absent = np.array([node in zs.absent for node in nodes])
            assert np.all(amplitude[absent] < 1e-9), (group, zone)
            assert np.all(amplitude[~absent] > 1e-6), (group, zone)


@pytest.mark.slow
def test_zone_point_groups_match_the_intensities_of_a_general_position():
    # the 2D isometries of each zone lattice that leave |F|^2 of a general atom unchanged
    rng = np.random.default_rng(15)
    for group in ALL:
        orbit = _general_orbit(group, rng)
        metric = symmetry.metric_class(group)
        rows = np.linalg.inv(symmetry.vesta_lattice(*symmetry._GENERIC_CELLS[metric])).T
        for zone in symmetry.ZONES:
            zs = symmetry.zone_symmetry(group, zone)
            if zs.rank < 2:
                continue
            nodes = np.array([(m, n) for m in range(-6, 7) for n in range(-6, 7)])
            intensity = np.abs(_structure_factors(orbit, nodes @ np.array(zs.basis_hkl))) ** 2
            lookup = {tuple(node): value for node, value in zip(nodes, intensity)}
            basis_cart = np.array(zs.basis_hkl) @ rows
            gram = basis_cart @ basis_cart.T
            order, mirrors = 1, set()
            for entries in np.ndindex(3, 3, 3, 3):
                m2 = np.array(entries).reshape(2, 2) - 1
                if abs(round(np.linalg.det(m2))) != 1 or not np.allclose(m2 @ gram @ m2.T, gram):
                    continue  # not an isometry of the zone lattice
                images = nodes @ m2
                inside = np.all(np.abs(images) <= 6, axis=1)
                mapped = np.array([lookup[tuple(x)] for x in images[inside]])
                if not np.allclose(mapped, intensity[inside], rtol=1e-7, atol=1e-9 * len(orbit[1]) ** 2):
                    continue
                if round(np.linalg.det(m2)) == 1:
                    order = max(order, {2: 1, -2: 2, 0: 4, 1: 6, -1: 3}[int(np.trace(m2))])
                else:
                    mirrors.add(symmetry._null_vector(m2.T - np.eye(2, dtype=int)))
            assert (order, tuple(sorted(mirrors))) == (zs.rotation_order, zs.mirror_lines), (group, zone)


# --------------------------------------------------------------------------- classification


def test_bravais_lattices_and_lattice_systems():
    counts = Counter(symmetry.bravais_lattice(g) for g in ALL)
    assert counts == {
        "aP": 2, "mP": 8, "mS": 5, "oP": 30, "oS": 15, "oI": 9, "oF": 5, "tP": 49, "tI": 19,
        "hR": 7, "hP": 45, "cP": 15, "cI": 10, "cF": 11,
    }  # fmt: skip
    assert set(counts) == set(symmetry.BRAVAIS_LATTICES)
    assert symmetry.lattice_system(166) == "rhombohedral" and symmetry.lattice_system(164) == "hexagonal"
    assert symmetry.crystal_system(166) == "trigonal" and symmetry.metric_class(166) == "hexagonal"
    assert Counter(symmetry.lattice_system(g) for g in ALL)["rhombohedral"] == 7


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'w'"):
        symmetry.zone_symmetry(1, "w")
    with pytest.raises(ValueError, match="0"):
        symmetry.zone_symmetry(0, "x")
    with pytest.raises(ValueError, match="231"):
        symmetry.signature(231)
    with pytest.raises(ValueError, match="'x'"):
        symmetry.indistinguishable_sets([1, "x"])


def test_image_basis_of_a_real_cell():
    hexagonal = symmetry.vesta_lattice(3.25, 3.25, 5.21, 90, 90, 120)  # ZnO-like
    basis = symmetry.zone_symmetry(186, "z").image_basis_inv_A(hexagonal)
    assert np.allclose(np.linalg.norm(basis, axis=1), 2 / (3.25 * np.sqrt(3)))
    assert np.allclose(basis[1], [0.0, 2 / (3.25 * np.sqrt(3))])  # b* along image y
    side = symmetry.zone_symmetry(186, "y").image_basis_inv_A(hexagonal)  # u = c* on image x, v = 2a*-b* on y
    assert np.allclose(side, [[1 / 5.21, 0.0], [0.0, 2 / 3.25]])
    with pytest.raises(ValueError, match="non-singular"):
        symmetry.zone_symmetry(186, "z").image_basis_inv_A(np.zeros((3, 3)))


def test_absent_mask_accepts_any_reflections():
    # F-centring: h, k, l all even or all odd; 2 0 0 present, 1 0 0 and 1 1 0 absent, 1 1 1 present
    mask = symmetry.absent_mask(225, np.array([[2, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]]))
    assert mask.tolist() == [False, True, True, False, False]
    zs = symmetry.zone_symmetry(225, "z")
    assert zs.is_absent(13, 0) and not zs.is_absent(14, 2)  # beyond the tabulated window
