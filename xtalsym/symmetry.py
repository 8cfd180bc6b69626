"""What three zone-axis patterns can tell about a space group, computed from its operations.

For every one of the 230 groups (spglib's database, standard setting) and each of the three
zones of our frame (beam along x, y, z of the conventional standard cell, a ∥ x, b in the xy
plane; DESIGN.md gives the image axes), this module derives

- the zone plane: the integer reciprocal vectors perpendicular to the beam, with a basis
  (u, v) whose directions lie nearest image x and image y;
- the systematic absences of the nodes in that plane: H is absent when some operation
  (R, t), centring translations included, has H·R = H and H·t not an integer, because then
  F(H) = exp(2πi H·t) F(H);
- the 2D point group of the zone's intensities: the operations of the Laue group (point group
  plus inversion, Friedel's law) that map the plane onto itself, restricted to it.

From these and the metric class (the lattice metric an observer measures) follow the signature
of a group, the sets of groups no symmetry evidence can separate, and the best top-1 any
classifier can reach from symmetry alone ("ceiling") for a given label distribution.

Zone planes that are not lattice planes: in a monoclinic cell (unique axis b, β ≠ 90°) the
plane perpendicular to z contains only the 0k0 row; in a triclinic cell the plane perpendicular
to y contains only the 00l row and the one perpendicular to z no node but the origin. Those
zones get ``rank`` 1 (nodes (m, 0) only, point group "row") or 0 (no nodes, point group "none");
what such patterns show comes from the finite crystal and the Ewald sphere, not from the zone.

Cell scale unknown (``cell_known=False``): the observer does not know the conventional cell,
only the three zones with the crystal axes along the beams. The apparent cell keeps the axis
directions and is the largest rescaled cell (a/p, b/q, c/r) on whose reciprocal lattice every
present node of every zone lies (p, q, r: gcd of the h, k, l of the present nodes). The zone
patterns are then compared in units of that apparent cell: Fm-3m at edge a matches Pm-3m at
a/2; body centring keeps a 45°-rotated square of present nodes and stays visible; the d-glides
of Fd-3m / Ia-3d halve the apparent cell too.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, lru_cache
from importlib import resources
from itertools import product

import numpy as np
import spglib

from xtalsym import spacegroups

log = logging.getLogger(__name__)

ZONES = ("x", "y", "z")

# Nodes (m, n) with |m|, |n| <= INDEX_WINDOW are tabulated. Reflection conditions repeat with
# period 2, 3, 4 or 6 along any row (6_1 screws, d-glides: 4n), so 12 covers every period.
INDEX_WINDOW = 12

POINT_GROUPS_2D = ("2", "2mm", "4", "4mm", "6", "6mm", "row", "none")

METRIC_CLASSES = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "hexagonal", "cubic")

LATTICE_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "rhombohedral", "hexagonal", "cubic")

BRAVAIS_LATTICES = ("aP", "mP", "mS", "oP", "oS", "oI", "oF", "tP", "tI", "hR", "hP", "cP", "cI", "cF")

# Cartesian directions of (beam, image x, image y) per zone (DESIGN.md, "Cartesian frame"):
# z: no rotation; x: crystal y -> image x, z -> image y; y: crystal z -> image x, x -> image y.
_ZONE_AXES = {
    "x": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "y": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
    "z": ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}

# One generic cell per metric class (lengths Å, angles degrees), chosen without accidental
# relations so that only the relations the metric class imposes show up in the zone planes.
_GENERIC_CELLS = {
    "triclinic": (5.13, 6.07, 7.71, 83.3, 101.7, 94.1),
    "monoclinic": (5.13, 6.91, 8.07, 90.0, 100.7, 90.0),
    "orthorhombic": (5.13, 6.71, 8.29, 90.0, 90.0, 90.0),
    "tetragonal": (5.13, 5.13, 7.37, 90.0, 90.0, 90.0),
    "hexagonal": (5.13, 5.13, 8.11, 90.0, 90.0, 120.0),
    "cubic": (5.13, 5.13, 5.13, 90.0, 90.0, 90.0),
}

GENERIC_CELLS = _GENERIC_CELLS  # public name; mirror angles and zone bases do not depend on the choice

_CENTRING_OF_SYMBOL = {"P": "P", "A": "S", "B": "S", "C": "S", "I": "I", "F": "F", "R": "R"}
_LETTERS = ("h", "k", "l")

Node = tuple[int, int]
HKL = tuple[int, int, int]


# --------------------------------------------------------------------------- classification


def crystal_system(group: int) -> str:
    """Crystal system ('triclinic' ... 'cubic') of space group ``group``."""
    return spacegroups.crystal_system(group)


def lattice_system(group: int) -> str:
    """Lattice system: the crystal system, with trigonal split into 'rhombohedral' (R) and 'hexagonal' (P)."""
    system = spacegroups.crystal_system(group)
    if system == "trigonal":
        return "rhombohedral" if _centring_letter(group) == "R" else "hexagonal"
    return system


def bravais_lattice(group: int) -> str:
    """Bravais lattice in Pearson notation: 'aP', 'mP', 'mS', 'oP', 'oS', 'oI', 'oF', 'tP', ... 'cF'."""
    family = {
        "triclinic": "a", "monoclinic": "m", "orthorhombic": "o", "tetragonal": "t",
        "trigonal": "h", "hexagonal": "h", "cubic": "c",
    }[spacegroups.crystal_system(group)]  # fmt: skip
    return family + _CENTRING_OF_SYMBOL[_centring_letter(group)]


def metric_class(group: int) -> str:
    """Metric of the standard conventional cell an observer measures (R groups: hexagonal axes)."""
    system = spacegroups.crystal_system(group)
    return "hexagonal" if system == "trigonal" else system


def _centring_letter(group: int) -> str:
    return spacegroups.symbol(group)[0]


# --------------------------------------------------------------------------- operations


@cache
def _operations(group: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotations (n, 3, 3) and translations (n, 3) of the standard setting, centrings included."""
    hall = spacegroups.standard_hall_number(group)
    with warnings.catch_warnings():  # spglib's notice about its error-handling mode
        warnings.simplefilter("ignore", DeprecationWarning)
        ops = spglib.get_symmetry_from_database(hall)
    if ops is None:
        raise RuntimeError(f"spglib has no operations for Hall number {hall} (space group {group})")
    rotations = np.asarray(ops["rotations"], dtype=np.int64)
    translations = np.asarray(ops["translations"], dtype=float)
    return rotations, translations


@cache
def _laue_rotations(group: int) -> tuple[np.ndarray, ...]:
    rotations, _ = _operations(group)
    unique = {r.tobytes(): r for r in rotations}
    unique.update({(-r).tobytes(): -r for r in rotations})  # Friedel: inversion added
    return tuple(unique.values())


def absent_mask(group: int, hkl: np.ndarray) -> np.ndarray:
    """True where reflections ``hkl`` (n, 3 integers) are systematically absent in ``group``."""
    spacegroups.check_number(group)
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    _, hit = _extinguishing(group, hkl)
    return hit.any(axis=0) & np.any(hkl != 0, axis=1)


def _extinguishing(group: int, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Operations that extinguish some of ``hkl`` and where: (indices, (n_hit, n) booleans).

    Operation (R, t) extinguishes H when H·R = H and H·t is not an integer (F(H) = 0).
    """
    rotations, translations = _operations(group)
    hkl_f = hkl.astype(float)
    # most rotations fix no node of the list: skip them before the (n_ops, n) work
    fixed = np.all(np.abs(np.matmul(hkl_f[None], rotations.astype(float)) - hkl_f[None]) < 0.5, axis=2)
    phase = translations @ hkl_f.T
    hit = fixed & (np.abs(phase - np.round(phase)) > 1e-6)
    rows = np.flatnonzero(hit.any(axis=1))
    return rows, hit[rows]


# --------------------------------------------------------------------------- zone geometry


def vesta_lattice(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Rows a, b, c in our frame (a ∥ x, b in the xy plane), lengths as given, angles in degrees."""
    al, be, ga = (math.radians(x) for x in (alpha, beta, gamma))
    cx = c * math.cos(be)
    cy = c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cz = math.sqrt(max(c * c - cx * cx - cy * cy, 0.0))
    return np.array([[a, 0.0, 0.0], [b * math.cos(ga), b * math.sin(ga), 0.0], [cx, cy, cz]])


@cache
def _reciprocal_rows(metric: str) -> np.ndarray:
    # rows a*, b*, c* (no 2π): G = H @ rows
    return np.linalg.inv(vesta_lattice(*_GENERIC_CELLS[metric])).T


@dataclass(frozen=True)
class _ZoneGeometry:
    rank: int
    basis_hkl: tuple[HKL, HKL]
    plane: str
    letters: tuple[str, ...]  # free index letters of the plane name, e.g. ("k", "l")
    letter_vectors: tuple[HKL, ...]  # H = sum(letter value * vector)


@cache
def _zone_geometry(metric: str, zone: str) -> _ZoneGeometry:
    beam, image_x, image_y = (np.array(v) for v in _ZONE_AXES[zone])
    rows = _reciprocal_rows(metric)
    span = 4
    # primitive vectors only (gcd 1): the zone lattice is Z^3 cut by a plane, so these are
    # exactly the vectors that can belong to a basis of it
    candidates = [h for h in product(range(-span, span + 1), repeat=3) if math.gcd(*h) == 1]
    g = np.array(candidates) @ rows
    in_plane = np.abs(g @ beam) < 1e-9 * np.linalg.norm(g, axis=1)
    if not in_plane.any():
        return _ZoneGeometry(0, ((0, 0, 0), (0, 0, 0)), "none", (), ())
    vectors = np.array(candidates)[in_plane]
    rank = int(np.linalg.matrix_rank(vectors))
    lengths = np.linalg.norm(vectors @ rows, axis=1)

    def angle(h: np.ndarray, axis: np.ndarray) -> float:
        g = h @ rows
        return math.acos(max(-1.0, min(1.0, float(g @ axis / np.linalg.norm(g)))))

    def pick(pool: list[np.ndarray], axis: np.ndarray) -> np.ndarray:
        # smallest angle to the image axis; exact symmetric ties go to the larger hkl
        return min(pool, key=lambda h: (round(angle(h, axis), 9), tuple(-h)))

    if rank == 1:
        shortest = vectors[np.argmin(lengths)]
        g = shortest @ rows
        sign = 1 if (round(g @ image_x, 12), round(g @ image_y, 12)) > (0.0, 0.0) else -1
        u = tuple(int(x) for x in sign * shortest)
        letters, letter_vectors, name = _row_name(u)
        return _ZoneGeometry(1, (u, (0, 0, 0)), name, letters, letter_vectors)

    order = np.argsort(lengths, kind="stable")
    first = vectors[order[0]]
    second = next(vectors[i] for i in order if np.linalg.matrix_rank(np.array([first, vectors[i]])) == 2)
    limit = max(lengths[order[0]], float(np.linalg.norm(second @ rows))) * (1 + 1e-9)
    short = [vectors[i] for i in order if lengths[i] <= limit]
    u = pick(short, image_x)
    partners = [h for h in short if _is_basis(first, second, u, h)]
    v = pick(partners, image_y)
    basis = (tuple(int(x) for x in u), tuple(int(x) for x in v))
    letters, letter_vectors, name = _plane_name(basis)
    return _ZoneGeometry(2, basis, name, letters, letter_vectors)


def _is_basis(b1: np.ndarray, b2: np.ndarray, u: np.ndarray, v: np.ndarray) -> bool:
    # (u, v) generates the same lattice as (b1, b2) iff its coordinates have determinant ±1
    basis = np.array([b1, b2], dtype=float)
    coords = np.linalg.lstsq(basis.T, np.array([u, v], dtype=float).T, rcond=None)[0]
    return abs(abs(np.linalg.det(coords)) - 1.0) < 1e-9


def _plane_name(basis: tuple[HKL, HKL]) -> tuple[tuple[str, ...], tuple[HKL, ...], str]:
    """Name the plane spanned by ``basis`` by its free indices, e.g. '0kl' or '(-2k,k,l)'."""
    normal = np.cross(basis[0], basis[1])
    normal = normal // math.gcd(*(int(abs(x)) for x in normal))
    # the dependent index: one with coefficient ±1 in the plane equation normal·H = 0
    dependent = next(i for i in range(3) if abs(normal[i]) == 1) if np.count_nonzero(normal) > 1 else None
    zero = int(np.flatnonzero(normal)[0]) if dependent is None else None
    free = [i for i in range(3) if i != dependent and i != zero]
    vectors = []
    for i in free:
        vec = [0, 0, 0]
        vec[i] = 1
        if dependent is not None:
            vec[dependent] = int(-normal[i] * normal[dependent])  # normal[dep] = ±1
        vectors.append(tuple(vec))
    entries = []
    for j in range(3):
        if j == zero:
            entries.append("0")
        elif j == dependent:
            entries.append(_linear_text({_LETTERS[i]: v[j] for i, v in zip(free, vectors)}))
        else:
            entries.append(_LETTERS[j])
    letters = tuple(_LETTERS[i] for i in free)
    name = "".join(entries) if all(len(e) == 1 for e in entries) else "(" + ",".join(entries) + ")"
    return letters, tuple(vectors), name


def _row_name(direction: HKL) -> tuple[tuple[str, ...], tuple[HKL, ...], str]:
    """Name the row along ``direction`` (primitive hkl), e.g. '00l', 'hh0' or '(-2k,k,0)'."""
    nonzero = [i for i in range(3) if direction[i]]
    param = min(nonzero, key=lambda i: (abs(direction[i]), i))
    sign = 1 if direction[param] > 0 else -1
    vec = tuple(sign * x // abs(direction[param]) for x in direction)
    letter = _LETTERS[param]
    entries = ["0" if x == 0 else _linear_text({letter: x}) for x in vec]
    name = "".join(entries) if all(len(e) == 1 for e in entries) else "(" + ",".join(entries) + ")"
    return (letter,), (vec,), name


def _linear_text(coefficients: dict[str, int]) -> str:
    text = ""
    for letter, c in coefficients.items():
        if c == 0:
            continue
        sign = "-" if c < 0 else ("+" if text else "")
        text += sign + ("" if abs(c) == 1 else str(abs(c))) + letter
    return text or "0"


def zone_image_axes(zone: str) -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]:
    """Cartesian (beam, image x, image y) directions of ``zone`` in our crystal frame."""
    return _ZONE_AXES[_check_zone(zone)]


def _check_zone(zone: str) -> str:
    if zone not in ZONES:
        raise ValueError(f"zone must be one of {', '.join(ZONES)}, got {zone!r}")
    return zone


# --------------------------------------------------------------------------- zone symmetry


@dataclass(frozen=True)
class ZoneSymmetry:
    """Absences and intensity symmetry of one zone of one group (standard setting, our frame).

    Nodes (m, n) stand for hkl = m * basis_hkl[0] + n * basis_hkl[1]; rank-1 zones use (m, 0)
    only and rank-0 zones have no node but the origin.
    """

    group: int
    zone: str  # "x" | "y" | "z"
    plane: str  # e.g. "0kl", "h0l", "hk0", "(-2k,k,l)", "0k0" (row), "none"
    rank: int  # 2: a lattice plane; 1: only a row; 0: only the origin
    basis_hkl: tuple[HKL, HKL]  # u nearest image x, v nearest image y ((0,0,0) where absent)
    absent: frozenset[Node]  # (m, n), |m|, |n| <= INDEX_WINDOW, (0, 0) excluded
    conditions: tuple[str, ...]  # e.g. ("h0l: l = 2n+1 absent", "0k0: k = 2n+1 absent")
    point_group_2d: str  # "2", "2mm", "4", "4mm", "6", "6mm" ("row"/"none" for rank 1/0)
    rotation_order: int  # highest rotation of the 2D intensity group (2, 4 or 6; 0 for rank < 2)
    mirror_lines: tuple[Node, ...]  # (m, n) directions of the intensity mirror lines
    mirror_angles_deg: tuple[float, ...]  # the same lines in image coordinates, from image x, [0, 180)
    orientation_note: str  # the mirror lines and the basis in words

    def is_absent(self, m: int, n: int) -> bool:
        """Whether node (m, n) of this zone is systematically absent (any indices)."""
        if self.rank == 0 or (m, n) == (0, 0) or (self.rank == 1 and n != 0):
            return False
        if max(abs(m), abs(n)) <= INDEX_WINDOW:
            return (m, n) in self.absent
        return bool(absent_mask(self.group, np.array([self.hkl(m, n)]))[0])

    def image_basis_inv_A(self, lattice_A: np.ndarray) -> np.ndarray:
        """Image (x, y) coordinates in Å⁻¹ (no 2π) of u and v (rows) for a cell in our frame.

        ``lattice_A``: rows a, b, c in Å (a ∥ x, b in the xy plane). Node (m, n) lies at
        (m, n) @ result; rank-1 zones have a zero second row, rank-0 zones two.
        """
        lattice = np.asarray(lattice_A, dtype=float)
        if lattice.shape != (3, 3) or not np.all(np.isfinite(lattice)) or abs(np.linalg.det(lattice)) < 1e-9:
            raise ValueError(f"lattice_A must be a finite, non-singular 3x3 matrix, got {lattice_A!r}")
        _, image_x, image_y = (np.array(v) for v in _ZONE_AXES[self.zone])
        g = np.array(self.basis_hkl, dtype=float) @ np.linalg.inv(lattice).T
        return np.stack([g @ image_x, g @ image_y], axis=1)

    def hkl(self, m: int, n: int) -> HKL:
        """Miller indices of node (m, n)."""
        u, v = self.basis_hkl
        return (m * u[0] + n * v[0], m * u[1] + n * v[1], m * u[2] + n * v[2])


def zone_symmetry(group: int, zone: str) -> ZoneSymmetry:
    """Absences and 2D intensity symmetry of ``zone`` ('x', 'y', 'z') of space group ``group``."""
    return _zone_symmetry(spacegroups.check_number(group), _check_zone(zone))


@cache
def _zone_symmetry(group: int, zone: str) -> ZoneSymmetry:
    metric = metric_class(group)
    geometry = _zone_geometry(metric, zone)
    nodes = _window_nodes(geometry.rank)
    hkl = _window_hkl(metric, zone)
    rows, hit = _zone_extinguishing(group, metric, zone)
    absent = frozenset(nodes[i] for i in np.flatnonzero(hit.any(axis=0))) if nodes else frozenset()
    order, mirrors = _intensity_symmetry(group, geometry)
    angles = tuple(_image_angle_deg(metric, zone, geometry.basis_hkl, line) for line in mirrors)
    if geometry.rank == 2:
        point_group = f"{order}mm" if mirrors else str(order)
    else:
        point_group = "row" if geometry.rank == 1 else "none"
    return ZoneSymmetry(
        group=group,
        zone=zone,
        plane=geometry.plane,
        rank=geometry.rank,
        basis_hkl=geometry.basis_hkl,
        absent=absent,
        conditions=_conditions(group, geometry, hkl, rows, hit),
        point_group_2d=point_group,
        rotation_order=order if geometry.rank == 2 else 0,
        mirror_lines=mirrors,
        mirror_angles_deg=angles,
        orientation_note=_orientation_note(geometry, point_group, mirrors, angles),
    )


@cache
def _window_nodes(rank: int) -> tuple[Node, ...]:
    w = INDEX_WINDOW
    if rank == 2:
        return tuple((m, n) for m in range(-w, w + 1) for n in range(-w, w + 1) if (m, n) != (0, 0))
    if rank == 1:
        return tuple((m, 0) for m in range(-w, w + 1) if m)
    return ()


def _zone_extinguishing(group: int, metric: str, zone: str) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_extinguishing` on the zone's window nodes, reusing what each rotation fixes."""
    rotations, translations = _operations(group)
    hkl = _window_hkl(metric, zone).astype(float)
    rows, hits = [], []
    for index, (rotation, translation) in enumerate(zip(rotations, translations)):
        fixed = _fixed_nodes(metric, zone, rotation.tobytes())
        if fixed is None:
            continue
        phase = hkl @ translation
        bad = fixed & (np.abs(phase - np.round(phase)) > 1e-6)
        if bad.any():
            rows.append(index)
            hits.append(bad)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(hkl)), dtype=bool)
    return np.array(rows), np.array(hits)


@cache
def _fixed_nodes(metric: str, zone: str, rotation_bytes: bytes) -> np.ndarray | None:
    """Window nodes H with H·R = H (None if only the origin), shared by all groups with R."""
    rotation = np.frombuffer(rotation_bytes, dtype=np.int64).reshape(3, 3)
    hkl = _window_hkl(metric, zone)
    if not len(hkl):
        return None
    fixed = np.all(hkl @ rotation == hkl, axis=1)
    return fixed if fixed.any() else None


@cache
def _window_hkl(metric: str, zone: str) -> np.ndarray:
    geometry = _zone_geometry(metric, zone)
    hkl = _nodes_hkl(geometry.basis_hkl, _window_nodes(geometry.rank))
    hkl.setflags(write=False)
    return hkl


def _nodes_hkl(basis: tuple[HKL, HKL], nodes: Sequence[Node]) -> np.ndarray:
    mn = np.array(nodes, dtype=np.int64).reshape(-1, 2)
    return mn @ np.array(basis, dtype=np.int64)


def _intensity_symmetry(group: int, geometry: _ZoneGeometry) -> tuple[int, tuple[Node, ...]]:
    """Highest rotation order and mirror-line directions of the Laue group restricted to the plane."""
    if geometry.rank < 2:
        return 0, ()
    order = 1
    mirrors: set[Node] = set()
    for rotation in _laue_rotations(group):
        action = _plane_action(geometry.basis_hkl, rotation.tobytes())
        if action is None:
            continue  # does not map the plane onto itself
        kind, value = action
        if kind == "rotation":
            order = max(order, value)
        else:
            mirrors.add(value)
    return (6 if order == 3 else order), tuple(sorted(mirrors))


@cache
def _plane_action(basis_hkl: tuple[HKL, HKL], rotation_bytes: bytes) -> tuple[str, object] | None:
    """How H -> H·R acts on the plane spanned by ``basis_hkl``: ('rotation', order), ('mirror', line) or None."""
    rotation = np.frombuffer(rotation_bytes, dtype=np.int64).reshape(3, 3)
    basis = np.array(basis_hkl, dtype=np.int64)  # rows u, v
    image = basis @ rotation  # rows u R, v R
    if np.any(image @ np.cross(basis[0], basis[1]) != 0):  # H in the plane iff H·(u×v) = 0
        return None
    cols = next((i, j) for i, j in ((0, 1), (0, 2), (1, 2)) if round(np.linalg.det(basis[:, [i, j]].astype(float))))
    m2 = np.round(image[:, cols] @ np.linalg.inv(basis[:, cols].astype(float))).astype(np.int64)  # (m,n) -> (m,n) @ m2
    if round(float(np.linalg.det(m2))) == 1:
        return "rotation", {2: 1, -2: 2, 0: 4, 1: 6, -1: 3}[int(np.trace(m2))]
    return "mirror", _null_vector(m2.T - np.eye(2, dtype=np.int64))  # line: (m, n) @ m2 = (m, n)


def _null_vector(matrix: np.ndarray) -> Node:
    a, b = int(matrix[0, 0]), int(matrix[0, 1])
    if a == 0 and b == 0:
        a, b = int(matrix[1, 0]), int(matrix[1, 1])
    m, n = b, -a
    g = math.gcd(m, n) or 1
    m, n = m // g, n // g
    if (m, n) < (0, 0) and not (m == 0 and n > 0):
        m, n = -m, -n
    if m < 0 or (m == 0 and n < 0):
        m, n = -m, -n
    return (m, n)


def _image_angle_deg(metric: str, zone: str, basis: tuple[HKL, HKL], line: Node) -> float:
    _, image_x, image_y = (np.array(v) for v in _ZONE_AXES[zone])
    h = line[0] * np.array(basis[0]) + line[1] * np.array(basis[1])
    g = h @ _reciprocal_rows(metric)
    return round(math.degrees(math.atan2(float(g @ image_y), float(g @ image_x))) % 180.0, 6) % 180.0


def _orientation_note(geometry: _ZoneGeometry, point_group: str, mirrors: tuple[Node, ...], angles: tuple[float, ...]) -> str:
    if geometry.rank == 0:
        return "no reciprocal node but the origin lies in this zone plane"
    u, v = geometry.basis_hkl
    if geometry.rank == 1:
        return f"only the row {geometry.plane} along {u} lies in this zone plane"
    text = f"{geometry.plane}: u={u} nearest image x, v={v} nearest image y; {point_group}"
    if mirrors:
        lines = ", ".join(f"({m},{n}) at {a:g} deg" for (m, n), a in zip(mirrors, angles))
        text += f", mirror lines {lines}"
    return text


# --------------------------------------------------------------------------- conditions as text


def _conditions(group: int, geometry: _ZoneGeometry, hkl: np.ndarray, rows: np.ndarray, hit: np.ndarray) -> tuple[str, ...]:
    """Human-readable reflection conditions of the zone, each one adding absences.

    ``rows``, ``hit``: the extinguishing operations and the window nodes each one extinguishes.
    """
    if geometry.rank == 0:
        return ()
    rotations, translations = _operations(group)
    candidates: dict[bytes, tuple[tuple[int, int, int, int], str]] = {}
    for index, bad in zip(rows, hit):
        rotation, translation = rotations[index], translations[index]
        domain = _domain(geometry, rotation.tobytes())
        if domain is None:
            continue
        letters, vectors, name = domain
        coefficients = [Fraction(float(np.dot(vec, translation))).limit_denominator(24) for vec in vectors]
        modulus = math.lcm(*(c.denominator for c in coefficients))
        integers = {letter: int(c * modulus) % modulus for letter, c in zip(letters, coefficients)}
        integers = {k: (c - modulus if c > modulus // 2 else c) for k, c in integers.items()}
        if all(c <= 0 for c in integers.values()):  # "-h ≠ 4n" reads better as "h ≠ 4n"
            integers = {k: -c for k, c in integers.items()}
        form = _linear_text(integers)
        text = f"{name}: {form} = 2n+1 absent" if modulus == 2 else f"{name}: {form} ≠ {modulus}n absent"
        key = np.packbits(bad).tobytes()
        # planes before rows, simple forms first, then the condition that removes the most
        rank_key = -len(letters), sum(1 for c in integers.values() if c), -int(bad.sum()), modulus
        if key not in candidates or rank_key < candidates[key][0]:
            candidates[key] = (rank_key, text)
    kept: list[tuple[str, np.ndarray]] = []
    covered = np.zeros(len(hkl), dtype=bool)
    for key, (_, text) in sorted(candidates.items(), key=lambda item: (item[1][0], item[1][1])):
        bad = np.unpackbits(np.frombuffer(key, dtype=np.uint8), count=len(hkl)).astype(bool)
        if (bad & ~covered).any():
            kept.append((text, bad))
            covered |= bad
    # drop a condition that another one implies ("00l: l = 2n+1" beside "00l: l ≠ 4n")
    return tuple(
        text for i, (text, bad) in enumerate(kept)
        if not any(j != i and not (bad & ~other).any() for j, (_, other) in enumerate(kept))
    )  # fmt: skip


@cache
def _domain(geometry: _ZoneGeometry, rotation_bytes: bytes):
    """Free letters, their hkl vectors and the name of the zone nodes that rotation R fixes."""
    rotation = np.frombuffer(rotation_bytes, dtype=np.int64).reshape(3, 3)
    hkl = _nodes_hkl(geometry.basis_hkl, _window_nodes(geometry.rank))
    fixed_hkl = hkl[np.all(hkl @ rotation == hkl, axis=1)]
    if not len(fixed_hkl):
        return None
    rank = int(np.linalg.matrix_rank(fixed_hkl.astype(float)))
    if rank == geometry.rank:
        return geometry.letters, geometry.letter_vectors, geometry.plane
    if rank == 1:
        direction = fixed_hkl[np.argmin(np.abs(fixed_hkl).sum(axis=1))]
        g = math.gcd(*(int(abs(x)) for x in direction))
        return _row_name(tuple(int(x) // g for x in direction))
    return None


# --------------------------------------------------------------------------- signatures and sets


@cache
def _scales(group: int) -> tuple[int, int, int]:
    """Apparent-cell divisors (p, q, r): gcd of h, k, l over the present nodes of the three zones."""
    gcds = np.zeros(3, dtype=np.int64)
    for zone in ZONES:
        zs = _zone_symmetry(group, zone)
        nodes = [node for node in _window_nodes(zs.rank) if node not in zs.absent]
        if nodes:
            gcds = np.gcd(gcds, np.gcd.reduce(np.abs(_nodes_hkl(zs.basis_hkl, nodes)), axis=0))
    return tuple(int(g) or 1 for g in gcds)  # an index no zone shows (triclinic h) stays unscaled


def apparent_cell_divisors(group: int) -> tuple[int, int, int]:
    """(p, q, r) such that the three zones look like a cell (a/p, b/q, c/r) (cell scale unknown)."""
    return _scales(spacegroups.check_number(group))


@cache
def _apparent_absent(group: int, zone: str) -> frozenset[Node]:
    zs = _zone_symmetry(group, zone)
    nodes = _window_nodes(zs.rank)
    if not nodes:
        return frozenset()
    if _scales(group) == (1, 1, 1):
        return zs.absent
    hkl = _nodes_hkl(zs.basis_hkl, nodes) * np.array(_scales(group), dtype=np.int64)
    mask = absent_mask(group, hkl)
    return frozenset(node for node, a in zip(nodes, mask) if a)


@cache
def _signature(group: int, cell_known: bool) -> Hashable:
    zones = []
    for zone in ZONES:
        zs = _zone_symmetry(group, zone)
        absent = zs.absent if cell_known else _apparent_absent(group, zone)
        zones.append((zone, zs.rank, zs.point_group_2d, zs.mirror_lines, absent))
    return (metric_class(group), tuple(zones))


def signature(group: int, *, cell_known: bool = True) -> Hashable:
    """What the three zones show of ``group``: metric class, and per zone absences and intensity symmetry.

    Two groups with equal signatures cannot be told apart by symmetry evidence. With
    ``cell_known=False`` the absences are taken in units of the apparent cell (module docstring).
    """
    return _signature(spacegroups.check_number(group), bool(cell_known))


def indistinguishable_sets(groups: Iterable[int] = range(1, 231), *, cell_known: bool = True) -> list[frozenset[int]]:
    """Partition ``groups`` into sets of equal signature, ordered by their smallest member."""
    by_signature: dict[Hashable, set[int]] = {}
    for group in dict.fromkeys(spacegroups.check_number(g) for g in groups):
        by_signature.setdefault(_signature(group, bool(cell_known)), set()).add(group)
    return sorted((frozenset(s) for s in by_signature.values()), key=min)


def set_of(group: int, groups: Iterable[int] = range(1, 231), *, cell_known: bool = True) -> frozenset[int]:
    """The groups among ``groups`` (plus ``group`` itself) that ``group`` cannot be told apart from."""
    group = spacegroups.check_number(group)
    own = _signature(group, bool(cell_known))
    members = {g for g in (spacegroups.check_number(x) for x in groups) if _signature(g, bool(cell_known)) == own}
    return frozenset(members | {group})


def symmetry_ceiling(labels: Sequence[int], groups: Iterable[int] | None = None, *, cell_known: bool = True) -> float:
    """Best top-1 accuracy reachable from symmetry alone on a test set with true ``labels``.

    A classifier that sees only the symmetry evidence can at best answer, for each set of
    indistinguishable groups, the group most frequent among ``labels``. ``groups`` is the label
    space (default: all 230); every label must belong to it.
    """
    counts = Counter(spacegroups.check_number(g) for g in labels)
    if not counts:
        raise ValueError("symmetry_ceiling needs at least one label, got none")
    space = set(range(1, 231)) if groups is None else {spacegroups.check_number(g) for g in groups}
    outside = sorted(set(counts) - space)
    if outside:
        raise ValueError(f"labels outside the given groups: {outside[:10]}")
    best = sum(max(counts[g] for g in members) for members in indistinguishable_sets(counts, cell_known=cell_known))
    return best / sum(counts.values())


# --------------------------------------------------------------------------- label frequencies

MP_COUNTS_FILE = "mp_space_group_counts.json"


@lru_cache(maxsize=1)
def materials_project_counts() -> dict[int, int]:
    """Structures per space group in the shared Materials Project set (spglib, symprec 0.1).

    Made once by ``benchmarks/mp_space_group_counts.py``; the JSON records the command.
    """
    text = (resources.files("xtalsym") / "data" / MP_COUNTS_FILE).read_text()
    return {int(g): int(n) for g, n in json.loads(text)["counts"].items()}


def materials_project_labels(groups: Iterable[int] | None = None) -> list[int]:
    """One label per Materials Project structure, restricted to ``groups`` (default: all)."""
    keep = None if groups is None else {spacegroups.check_number(g) for g in groups}
    return [g for g, n in sorted(materials_project_counts().items()) if keep is None or g in keep for _ in range(n)]
