"""Fast per-group zone rules for scoring measured patterns: absences as a handful of linear rules
on zone-node indices, and the 2D intensity operations in image coordinates.

:mod:`xtalsym.symmetry` is the reference (it tabulates every node of a window, slow to build for
230 groups); this module derives the same absences from the same operations (spglib's
standard settings) in a form that evaluates any number of nodes in a few vector operations, so
that a sample's 230 group likelihoods cost milliseconds. tests/test_evidence.py checks the two
agree on the window for every group.

A node H = m·u + n·v of a zone plane is absent when an operation (R, t) fixes it (H R = H) and
H·t is not an integer. Per operation, the fixed nodes are the whole plane, a line through the
origin, or the origin only; so the rules are "plane: m·p_u + n·p_v ∉ Z" and
"line (m₀, n₀): k·p ∉ Z for nodes k·(m₀, n₀)".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
import spglib

from xtalsym import spacegroups, symmetry

ZONES = symmetry.ZONES
_REPRESENTATIVE = {"triclinic": 1, "monoclinic": 3, "orthorhombic": 16, "tetragonal": 75,
                   "hexagonal": 168, "cubic": 195}
MIRROR_MATCH_DEG = 3.0


@dataclass(frozen=True)
class ZonePlane:
    """The zone plane of a metric class: basis (u, v) in hkl, rank (2 plane, 1 row, 0 none)."""

    metric: str
    zone: str
    rank: int
    basis_hkl: tuple[tuple[int, int, int], tuple[int, int, int]]


@cache
def zone_plane(metric: str, zone: str) -> ZonePlane:
    """Plane basis of ``zone`` for cells of ``metric`` (the same for every group of the class)."""
    zs = symmetry.zone_symmetry(_REPRESENTATIVE[metric], zone)
    return ZonePlane(metric=metric, zone=zone, rank=zs.rank, basis_hkl=zs.basis_hkl)


@cache
def _operations(group: int) -> tuple[np.ndarray, np.ndarray]:
    hall = spacegroups.standard_hall_number(group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ops = spglib.get_symmetry_from_database(hall)
    return np.asarray(ops["rotations"], np.int64), np.asarray(ops["translations"], float)


@dataclass(frozen=True)
class AbsenceRules:
    """Absence rules of one group in one zone plane; evaluate with :meth:`absent`."""

    plane: tuple[tuple[float, float], ...]  # (p_u, p_v) phases per unit index
    line: tuple[tuple[int, int, float], ...]  # (m0, n0, phase per step)

    def absent(self, m: np.ndarray, n: np.ndarray) -> np.ndarray:
        m = np.asarray(m, np.int64)
        n = np.asarray(n, np.int64)
        out = np.zeros(m.shape, bool)
        for pu, pv in self.plane:
            ph = m * pu + n * pv
            out |= np.abs(ph - np.rint(ph)) > 1e-6
        for m0, n0, p in self.line:
            on = (m * n0 - n * m0) == 0
            k = np.where(m0 != 0, m // (m0 or 1), n // (n0 or 1))
            ph = k * p
            out |= on & (np.abs(ph - np.rint(ph)) > 1e-6)
        out &= (m != 0) | (n != 0)
        return out

    @property
    def key(self) -> tuple:
        return (self.plane, self.line)


def _denominator(x: float, limit: int = 48) -> int:
    """Smallest d <= limit with d·x an integer (phases are multiples of 1/2, 1/3, 1/4, 1/6, 1/8)."""
    for d in range(1, limit + 1):
        if abs(x * d - round(x * d)) <= 1e-6:
            return d
    raise ValueError(f"phase {x!r} is no fraction with denominator <= {limit}")


@dataclass(frozen=True)
class RuleSet:
    """Many groups' absence rules in one zone plane, evaluated together (the same masks as each
    :meth:`AbsenceRules.absent`, in a few vector operations for any number of rules and nodes).

    With every phase a multiple of 1/D, a plane rule depends only on (m mod D, n mod D): one
    lookup row per rule. A line rule concerns the nodes k·(m0, n0) of one line through the origin
    and depends on k mod D: a second lookup on (line, k mod D); a node off every line uses the
    extra line slot, which is never absent.
    """

    rules: tuple[AbsenceRules, ...]
    modulus: int
    plane_table: np.ndarray  # (R, D·D) bool: absent by the plane rules at (m mod D)·D + n mod D
    directions: tuple[tuple[int, int], ...]  # the lines (m0, n0) any rule names
    line_table: np.ndarray  # (R, (L + 1)·D) bool: absent by the line rules at line·D + k mod D

    @classmethod
    def build(cls, rules) -> RuleSet:
        rules = tuple(rules)
        phases = [x for r in rules for pu, pv in r.plane for x in (pu, pv)] + [p for r in rules for *_, p in r.line]
        d = math.lcm(1, *(_denominator(x) for x in phases))
        directions = tuple(sorted({(m0, n0) for r in rules for m0, n0, _ in r.line}))
        i, j = np.divmod(np.arange(d * d), d)
        k = np.arange(d)
        plane = np.zeros((len(rules), d * d), bool)
        line = np.zeros((len(rules), len(directions) + 1, d), bool)
        for row, r in enumerate(rules):
            for pu, pv in r.plane:
                plane[row] |= (i * round(pu * d) + j * round(pv * d)) % d != 0
            for m0, n0, p in r.line:
                line[row, directions.index((m0, n0))] |= (k * round(p * d)) % d != 0
        line = line.reshape(len(rules), -1)
        plane.setflags(write=False)
        line.setflags(write=False)
        return cls(rules, d, plane, directions, line)

    def codes(self, m: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per node its column in :attr:`plane_table` and in :attr:`line_table`: all a rule needs."""
        m = np.asarray(m, np.int64)
        n = np.asarray(n, np.int64)
        d = self.modulus
        lid = np.full(m.shape, len(self.directions), np.int64)
        k = np.zeros(m.shape, np.int64)
        for slot, (m0, n0) in enumerate(self.directions):
            on = (m * n0 - n * m0) == 0
            lid[on] = slot
            k[on] = (m[on] // m0) if m0 != 0 else (n[on] // n0)
        return (m % d) * d + n % d, lid * d + k % d

    def absent_at(self, codes: tuple[np.ndarray, np.ndarray], which: np.ndarray) -> np.ndarray:
        """(R, N) masks of rules ``which`` at nodes given by :meth:`codes` (the origin, whose codes
        are 0 and a line's k = 0, is never absent)."""
        plane_key, line_key = codes
        return self.plane_table[which][:, plane_key] | self.line_table[which][:, line_key]

    def absent(self, m: np.ndarray, n: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
        """(R, N) masks: rule ``which[r]`` (default: every rule) at nodes (m, n)."""
        m = np.asarray(m, np.int64)
        n = np.asarray(n, np.int64)
        which = np.arange(len(self.rules)) if which is None else np.asarray(which, np.int64)
        return self.absent_at(self.codes(m, n), which) & ((m != 0) | (n != 0))


def _frac(x: float) -> float:
    return round(x - math.floor(x), 9) % 1.0


@cache
def absence_rules(group: int, zone: str) -> AbsenceRules:
    """The rules for ``group`` (standard setting) in ``zone``'s plane of its metric class."""
    plane = zone_plane(symmetry.metric_class(group), zone)
    if plane.rank < 2:
        return AbsenceRules((), ())
    return _absence_rules_in(group, plane.basis_hkl)


# A monoclinic cell (b unique) whose β is close to 90° has z as a zone axis too: c* ∥ c within the
# tolerance, and the zone is the hk0 plane, as for an orthorhombic cell.
PSEUDO_ZONE = {"monoclinic": ("z", ((1, 0, 0), (0, 1, 0)))}


@cache
def pseudo_zone_rules(group: int) -> AbsenceRules:
    """The rules of ``group`` in the hk0 plane of a monoclinic cell with β ≈ 90° (z as a zone)."""
    return _absence_rules_in(group, PSEUDO_ZONE["monoclinic"][1])


def _absence_rules_in(group: int, basis_hkl) -> AbsenceRules:
    a = np.array(basis_hkl, np.int64)  # (2, 3)
    plane_rules: set[tuple[float, float]] = set()
    line_rules: set[tuple[int, int, float]] = set()
    for rot, t in zip(*_operations(group)):
        d = a @ (rot - np.eye(3, dtype=np.int64))  # [m n] @ d = 0 for fixed nodes
        pu, pv = float(a[0] @ t), float(a[1] @ t)
        rank = 0 if not d.any() else (1 if not np.cross(d[0], d[1]).any() else 2)
        if rank == 0:
            if abs(pu - round(pu)) > 1e-6 or abs(pv - round(pv)) > 1e-6:
                plane_rules.add((_frac(pu), _frac(pv)))
        elif rank == 1:
            j = int(np.flatnonzero(np.any(d != 0, axis=0))[0])
            m0, n0 = int(d[1, j]), -int(d[0, j])
            g = math.gcd(m0, n0)
            m0, n0 = m0 // g, n0 // g
            if m0 < 0 or (m0 == 0 and n0 < 0):
                m0, n0 = -m0, -n0
            p = m0 * pu + n0 * pv
            if abs(p - round(p)) > 1e-6:
                line_rules.add((m0, n0, _frac(p)))
    return AbsenceRules(tuple(sorted(plane_rules)), tuple(sorted(line_rules)))


@dataclass(frozen=True)
class IntensityOps:
    """2D intensity symmetry of one group in one zone, in image coordinates."""

    rotation_order: int  # 2, 4 or 6 (Friedel: 3 shows as 6); 0 for rank < 2
    mirror_angles_deg: tuple[float, ...]  # mirror lines from image x, [0, 180)

    def has(self, kind: str, angle_deg: float) -> bool:
        """Whether the group's zone pattern has the frame operation (kind, angle)."""
        if kind == "rotation":
            order = round(360 / angle_deg)
            return order in (3, 6) and self.rotation_order == 6 or order == 4 and self.rotation_order == 4
        return any(abs((angle_deg - a + 90) % 180 - 90) <= MIRROR_MATCH_DEG for a in self.mirror_angles_deg)


@cache
def intensity_ops(group: int, zone: str) -> IntensityOps:
    """The Laue group's operations that map the zone plane onto itself, as image operations."""
    metric = symmetry.metric_class(group)
    plane = zone_plane(metric, zone)
    if plane.rank < 2:
        return IntensityOps(0, ())
    return _intensity_ops_in(group, zone, plane.basis_hkl, symmetry.GENERIC_CELLS[metric])


@cache
def pseudo_zone_ops(group: int) -> IntensityOps:
    """The intensity operations of ``group`` in the hk0 plane of a monoclinic cell with β = 90°."""
    zone, basis = PSEUDO_ZONE["monoclinic"]
    a, b, c, al, _, ga = symmetry.GENERIC_CELLS["monoclinic"]
    return _intensity_ops_in(group, zone, basis, (a, b, c, al, 90.0, ga))


def _intensity_ops_in(group: int, zone: str, basis_hkl, cell) -> IntensityOps:
    a = np.array(basis_hkl, float)
    rec = np.linalg.inv(symmetry.vesta_lattice(*cell)).T
    _, ix, iy = (np.array(v) for v in symmetry.zone_image_axes(zone))
    p = a @ rec @ np.stack([ix, iy], 1)  # (2, 2): node index -> image coordinates
    pinv = np.linalg.inv(p)
    rotations, _ = _operations(group)
    order = 2
    mirrors: set[float] = set()
    for rot in {r.tobytes(): r for r in list(rotations) + [-r for r in rotations]}.values():
        image = a @ rot
        m2, *_ = np.linalg.lstsq(a.T, image.T, rcond=None)
        if not np.allclose(a.T @ m2, image.T, atol=1e-9):
            continue
        m2 = m2.T  # node (m, n) -> (m, n) @ m2
        q = pinv @ m2 @ p
        det = np.linalg.det(q)
        if det > 0:
            angle = math.degrees(math.atan2(q[0, 1], q[0, 0])) % 360
            step = min(angle, 360 - angle)
            if step > 1 and abs(step - 180) > 1:
                n_fold = round(360 / step)
                order = max(order, 6 if n_fold == 3 else n_fold)
        else:
            line = 0.5 * math.degrees(math.atan2(q[0, 1], q[0, 0])) % 180
            mirrors.add(round(line % 180, 3) % 180)
    return IntensityOps(order, tuple(sorted(mirrors)))


@cache
def apparent_divisors(group: int) -> tuple[int, int, int]:
    """(p, q, r): the zones of ``group`` look like a cell (a/p, b/q, c/r) — the gcd of h, k, l over
    the present nodes of its zones (symmetry.apparent_cell_divisors, from these fast rules)."""
    metric = symmetry.metric_class(group)
    w = symmetry.INDEX_WINDOW
    g = np.arange(-w, w + 1)
    mm, nn = (x.ravel() for x in np.meshgrid(g, g, indexing="ij"))
    gcds = [0, 0, 0]
    for zone in ZONES:
        plane = zone_plane(metric, zone)
        if plane.rank == 0:
            continue
        m, n = (mm, nn) if plane.rank == 2 else (g, np.zeros_like(g))
        present = ~absence_rules(group, zone).absent(m, n) & ((m != 0) | (n != 0))
        if plane.rank == 1:
            present &= _row_present(group, zone, m)
        hkl = np.outer(m[present], plane.basis_hkl[0]) + np.outer(n[present], plane.basis_hkl[1])
        for i in range(3):
            gcds[i] = math.gcd(gcds[i], int(np.gcd.reduce(np.abs(hkl[:, i])))) if len(hkl) else gcds[i]
    return tuple(x or 1 for x in gcds)


def _row_present(group: int, zone: str, m: np.ndarray) -> np.ndarray:
    """Present nodes of a rank-1 zone (a row), from the full operations."""
    plane = zone_plane(symmetry.metric_class(group), zone)
    hkl = np.outer(m, plane.basis_hkl[0])
    return ~symmetry.absent_mask(group, hkl)
