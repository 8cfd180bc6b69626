"""The cell from the zones: the 3D reciprocal lattice the zones' 2D lattices generate, and for each
metric class the conventional cell in our frame (a ∥ x, b in the xy plane) with its misfit.

Which zones are true zones depends on the metric class (symmetry.py's module docstring):
x, y, z for orthorhombic and higher (hexagonal: y is [120]), x and y for monoclinic (z meets only
the 0k0 row), x alone for triclinic. Only true zones enter the lattice of a class.

The lattice is the coarsest one that indexes every measured zone vector (basis vectors and their
sums/differences, embedded in 3D by DESIGN.md's image → crystal map) within tolerance: the
*apparent* lattice; centring and glides that remove nodes from all zones make it finer in
reciprocal space (a smaller real cell) than the conventional one, which is why the group
likelihoods try the cell multiples each group would show (:mod:`.sample`).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from xtalsym import symmetry
from xtalsym.evidence import stats

METRIC_CLASSES = symmetry.METRIC_CLASSES
TRUE_ZONES = {"triclinic": ("x",), "monoclinic": ("x", "y"), "orthorhombic": ("x", "y", "z"),
              "tetragonal": ("x", "y", "z"), "hexagonal": ("x", "y", "z"), "cubic": ("x", "y", "z")}
# Free cell parameters of each class, as (lengths, angles).
FREE_PARAMETERS = {"triclinic": (3, 3), "monoclinic": (3, 1), "orthorhombic": (3, 0), "tetragonal": (2, 0),
                   "hexagonal": (2, 0), "cubic": (1, 0)}
LENGTH_SIGMA_FLOOR = 0.004  # relative: calibration drift, peak-position systematics
ANGLE_SIGMA_FLOOR_DEG = 0.3
POSITION_SIGMA_FLOOR_PX = 0.15  # a zone vector's scatter (finite-crystal peak shifts ~0.1–0.5 px)
INDEX_TOLERANCE_PX = 1.5
DIRECTION_TOLERANCE_DEG = 3.0
# Occam factors (nats per free parameter): sqrt(2π)·σ / prior range, lengths over ln(30/2)
# in relative terms, angles over 30°. Without them a lower class always fits at least as well.
OCCAM_LENGTH = math.log(math.sqrt(2 * math.pi) * LENGTH_SIGMA_FLOOR / math.log(15.0))
OCCAM_ANGLE = math.log(math.sqrt(2 * math.pi) * ANGLE_SIGMA_FLOOR_DEG / 30.0)
# One zone alone fixes two lengths and an angle of its plane: what a class with fewer than two
# usable true zones (and the triclinic class, whose only true zone is x) is scored with. Every
# class then scores the same, so one zone never decides a crystal system.
PARTIAL_LOGLIK = 2 * OCCAM_LENGTH + OCCAM_ANGLE
# A zone that is not a zone axis of the class is explained by its own 2D lattice (two lengths,
# an angle and an in-plane orientation): its Occam factor.
OWN_LATTICE_OCCAM = 2 * OCCAM_LENGTH + 2 * OCCAM_ANGLE
CENTRING_MULTIPLES = {"monoclinic": (1, 2), "orthorhombic": (1, 2, 4), "tetragonal": (1, 2),
                      "hexagonal": (1, 3), "cubic": (1, 2, 4)}
_N = np.array(list(itertools.product(range(-4, 5), repeat=3)))
_N = _N[np.any(_N != 0, axis=1)]


@dataclass(frozen=True)
class ZoneVectors:
    """One zone's measured basis embedded in the crystal frame."""

    axis: str
    basis_3d: np.ndarray  # (2, 3) Å⁻¹
    q_per_pixel: float
    sigma: float  # Å⁻¹, positional uncertainty of one vector


def embed(axis: str, basis_2d: np.ndarray) -> np.ndarray:
    """Image-plane vectors (rows, Å⁻¹) of zone ``axis`` as crystal-frame 3D vectors."""
    _, ix, iy = (np.array(v) for v in symmetry.zone_image_axes(axis))
    return basis_2d[:, :1] * ix + basis_2d[:, 1:] * iy


@dataclass(frozen=True)
class MetricFit:
    metric: str
    feasible: bool
    reason: str | None
    zones: tuple[str, ...] = ()
    vectors: np.ndarray | None = None  # (3, 3) rows a, b, c in Å (measured, our frame)
    cell: tuple[float, ...] | None = None  # idealised a, b, c, α, β, γ (Å, degrees)
    cell_sigma: tuple[float, ...] | None = None
    chi2: float = float("inf")
    loglik: float = -1e4
    partial: bool = False  # too few true zones: the class is not tested (PARTIAL_LOGLIK)
    alternatives: tuple = ()  # other idealised cells of the same lattice (monoclinic cell choices)

    def lattices(self, scale=(1, 1, 1)) -> list[np.ndarray]:
        """The idealised cell and its alternative choices, times ``scale`` per axis."""
        out = [self.lattice(scale)]
        for a, b, c, al, be, ga in self.alternatives:
            out.append(symmetry.vesta_lattice(a * scale[0], b * scale[1], c * scale[2], al, be, ga))
        return out

    def lattice(self, scale=(1, 1, 1)) -> np.ndarray:
        """Rows a, b, c (Å) of the idealised cell times ``scale`` per axis (our frame)."""
        a, b, c, al, be, ga = self.cell
        return symmetry.vesta_lattice(a * scale[0], b * scale[1], c * scale[2], al, be, ga)


@functools.lru_cache(maxsize=16)
def _triples(n: int) -> np.ndarray:
    out = np.array(list(itertools.combinations(range(n), 3)))
    out.setflags(write=False)
    return out


def _lattice_3d(vectors: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Coarsest reciprocal basis B (rows) with vectors ≈ idx @ B, idx integer; (B, residuals)."""
    n = len(vectors)
    if n < 3:
        return None
    triples = _triples(n)
    bases = vectors[triples]  # (T, 3, 3)
    det = np.linalg.det(bases)
    scale = stats.median(np.linalg.norm(vectors, axis=1)) ** 3
    ok = np.abs(det) > 1e-3 * scale
    if not ok.any():
        return None
    bases, det = bases[ok], det[ok]
    inv = np.linalg.inv(bases)
    frac = vectors @ inv  # (T, N, 3); stacked matmul: the einsum it replaced took ~3x longer
    rem = frac - np.rint(frac)
    cart = rem @ bases
    resid = np.sqrt((cart * cart).sum(axis=2))
    good = np.all(resid <= tol[None, :], axis=1)
    if not good.any():
        return None
    best = np.flatnonzero(good)[np.argmax(np.abs(det[good]))]
    basis = bases[best]
    idx = np.rint(vectors @ np.linalg.inv(basis))
    refined, *_ = np.linalg.lstsq(idx, vectors, rcond=None)
    if abs(np.linalg.det(refined)) < 1e-6 * scale:
        return None
    residuals = np.linalg.norm(idx @ refined - vectors, axis=1)
    return refined, residuals


def _along(v: np.ndarray, direction: np.ndarray, tol_deg: float) -> np.ndarray:
    cos = (v @ direction) / np.linalg.norm(v, axis=1)
    return cos >= math.cos(math.radians(tol_deg))


def _in_plane(v: np.ndarray, normal: np.ndarray, tol_deg: float) -> np.ndarray:
    return np.abs(v @ normal) / np.linalg.norm(v, axis=1) <= math.sin(math.radians(tol_deg))


def _shortest(v: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    if not mask.any():
        return None
    cand = v[mask]
    return cand[np.argmin(np.linalg.norm(cand, axis=1))]


def _conventional_vectors(metric: str, real: np.ndarray, memo: dict | None = None) -> np.ndarray | None:
    """Rows a, b, c of the smallest conventional cell of ``metric`` in our frame, from a real lattice.

    ``memo``: a dict kept per ``real`` lattice; the classes share its lattice vectors, their shortest
    vectors along x, y, z and the monoclinic c choices (the same numbers, computed once)."""
    memo = {} if memo is None else memo
    if "v" not in memo:
        memo["v"] = _N @ real
    v = memo["v"]
    tol = DIRECTION_TOLERANCE_DEG

    def along(i: int) -> np.ndarray | None:
        key = ("along", i)
        if key not in memo:
            memo[key] = _shortest(v, _along(v, np.eye(3)[i], tol))
        return memo[key]

    a = along(0)
    if a is None:
        return None
    if metric in ("orthorhombic", "tetragonal", "cubic"):
        b, c = along(1), along(2)
    elif metric == "hexagonal":
        c = along(2)
        cosang = (v @ a) / (np.linalg.norm(v, axis=1) * np.linalg.norm(a))
        b = _shortest(v, _in_plane(v, np.eye(3)[2], tol)
                      & (np.abs(np.degrees(np.arccos(np.clip(cosang, -1, 1))) - 120) <= tol) & (v[:, 1] > 0))
    elif metric == "monoclinic":
        b = along(1)
        alts = _monoclinic_choices(memo, a)
        c = alts[0] if alts else None
    else:
        return None
    if b is None or c is None:
        return None
    return np.array([a, b, c])


def _monoclinic_choices(memo: dict, a: np.ndarray) -> list[np.ndarray]:
    key = ("monoclinic", a.tobytes())
    if key not in memo:
        memo[key] = monoclinic_c_choices(memo["v"], a)
    return memo[key]


MONOCLINIC_CHOICES = 3


def monoclinic_c_choices(v: np.ndarray, a: np.ndarray) -> list[np.ndarray]:
    """Lattice vectors c in the xz plane (c_z > 0, not ∥ a), shortest first (β >= 90° first among
    equals): the cell choices a group's standard setting may use (C2/c vs I2/a, ...)."""
    lengths = np.linalg.norm(v, axis=1)
    off_a = np.linalg.norm(np.cross(v, a), axis=1) / (lengths * np.linalg.norm(a)) > math.sin(math.radians(5))
    mask = _in_plane(v, np.array([0.0, 1.0, 0.0]), DIRECTION_TOLERANCE_DEG) & off_a & (v[:, 2] > 0)
    if not mask.any():
        return []
    cand, lc = v[mask], lengths[mask]
    order = np.lexsort((cand[:, 0], np.round(lc / lc.min(), 2)))
    out: list[np.ndarray] = []
    for i in order:
        if all(np.linalg.norm(cand[i] - o) > 1e-6 for o in out):
            out.append(cand[i])
        if len(out) >= MONOCLINIC_CHOICES:
            break
    return out


def _params(vectors: np.ndarray) -> np.ndarray:
    a, b, c = vectors
    la, lb, lc = (float(np.linalg.norm(x)) for x in vectors)

    def ang(p, q, lp, lq):
        return math.degrees(math.acos(max(-1.0, min(1.0, float(p @ q) / (lp * lq)))))

    return np.array([la, lb, lc, ang(b, c, lb, lc), ang(a, c, la, lc), ang(a, b, la, lb)])


def _idealise(metric: str, p: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(idealised parameters, χ² of the constraints, which parameters are constrained)."""
    la, lb, lc, al, be, ga = p
    ideal = p.copy()
    if metric == "cubic":
        ideal[:3] = np.mean(p[:3])
        ideal[3:] = 90.0
    elif metric == "tetragonal":
        ideal[:2] = np.mean(p[:2])
        ideal[3:] = 90.0
    elif metric == "hexagonal":
        ideal[:2] = np.mean(p[:2])
        ideal[3:] = (90.0, 90.0, 120.0)
    elif metric == "orthorhombic":
        ideal[3:] = 90.0
    elif metric == "monoclinic":
        ideal[3], ideal[5] = 90.0, 90.0
    return ideal, 0.0, ideal != p


def fit_metrics(zones: dict[str, ZoneVectors]) -> dict[str, MetricFit]:
    """:func:`fit_metric` for every metric class; classes using the same zones share one 3D lattice
    search (orthorhombic to cubic all use x, y, z)."""
    shared: dict = {}
    return {m: fit_metric(m, zones, _lattices=shared) for m in METRIC_CLASSES}


def fit_metric(metric: str, zones: dict[str, ZoneVectors], *, _lattices: dict | None = None) -> MetricFit:
    """The conventional cell of ``metric`` from the zones that are true zones of that class.

    ``_lattices``: a dict shared between calls on the same zones, caching the 3D lattice per zone set."""
    used = tuple(a for a in TRUE_ZONES[metric] if a in zones)
    if metric == "triclinic" or len(used) < 2:
        why = ("a triclinic cell has one zone axis among x, y, z" if metric == "triclinic"
               else f"only zone {', '.join(used) or 'none'} of its zone axes {', '.join(TRUE_ZONES[metric])} measured")
        return MetricFit(metric, True, why, zones=used, chi2=0.0, loglik=PARTIAL_LOGLIK, partial=True)
    rows, tol, sig = [], [], []
    for axis in used:
        zv = zones[axis]
        b = zv.basis_3d
        for vec in (b[0], b[1], b[0] + b[1], b[0] - b[1]):
            rows.append(vec)
            tol.append(INDEX_TOLERANCE_PX * zv.q_per_pixel)
            sig.append(max(zv.sigma, POSITION_SIGMA_FLOOR_PX * zv.q_per_pixel))
    vectors, tol, sig = np.array(rows), np.array(tol), np.array(sig)
    # classes fitted to the same zones share the lattice, its real cell and their conventional axes
    shared = {} if _lattices is None else _lattices.setdefault(used, {})
    if "found" not in shared:
        shared["found"] = _lattice_3d(vectors, tol)
    found = shared["found"]
    if found is None:
        return MetricFit(metric, False, f"zones {', '.join(used)} share no 3D lattice", zones=used)
    basis, resid = found
    chi2_fit = float(((resid / sig) ** 2).sum())
    if "real" not in shared:
        shared["real"] = np.linalg.inv(basis).T
    real = shared["real"]
    conv = _conventional_vectors(metric, real, shared)
    if conv is not None:
        # a conventional cell holds 1, 2, 3 (R) or 4 (F) primitive cells; any other multiple means
        # the "axis" vectors are long near-rational combinations, not symmetry directions
        ratio = abs(np.linalg.det(conv)) / abs(np.linalg.det(real))
        if min(abs(ratio - k) for k in CENTRING_MULTIPLES[metric]) > 0.05:
            conv = None
    if conv is None:
        return MetricFit(metric, False, f"no {metric} cell with a ∥ x (b, c as the class needs) in the lattice of "
                                        f"zones {', '.join(used)}", zones=used)
    p = _params(conv)
    ideal, _, constrained = _idealise(metric, p)
    rel = float(np.sqrt(np.mean((resid / np.linalg.norm(vectors, axis=1)) ** 2)))
    s_len = math.hypot(LENGTH_SIGMA_FLOOR, rel)
    s_ang = math.hypot(ANGLE_SIGMA_FLOOR_DEG, math.degrees(rel))
    dev = p - ideal
    chi2_metric = float(((dev[:3] / (s_len * ideal[:3])) ** 2).sum() + ((dev[3:] / s_ang) ** 2).sum())
    chi2 = chi2_fit + chi2_metric
    n_len, n_ang = FREE_PARAMETERS[metric]
    loglik = -0.5 * chi2 + n_len * OCCAM_LENGTH + n_ang * OCCAM_ANGLE
    free = np.array([True] * 3 + [True] * 3) & ~constrained
    sigma = np.concatenate([s_len * ideal[:3], [s_ang] * 3])
    sigma = np.where(free | np.array([1, 1, 1, 0, 0, 0], bool), sigma, 0.0)
    if metric in ("orthorhombic", "tetragonal", "cubic", "hexagonal"):
        sigma[3:] = 0.0
    elif metric == "monoclinic":
        sigma[3] = sigma[5] = 0.0
    alternatives = []
    if metric == "monoclinic":
        for c in _monoclinic_choices(shared if "v" in shared else {"v": _N @ real}, conv[0])[1:]:
            q = _params(np.array([conv[0], conv[1], c]))
            q[3], q[5] = 90.0, 90.0
            alternatives.append(tuple(float(x) for x in q))
    return MetricFit(metric, True, None, zones=used, vectors=conv, cell=tuple(float(x) for x in ideal),
                     cell_sigma=tuple(float(x) for x in sigma), chi2=chi2, loglik=loglik,
                     alternatives=tuple(alternatives))


# A zone lattice can be made finer by spots that are no zero-layer reflections: in the hexagonal
# [120] zone the first-order Laue zone's nodes lie 0.105 Å⁻¹ off the plane (mp-3186), yet the block's
# shape transform still puts ~1e-3 of them on half-nodes of the true zone lattice, and the zone's
# lattice then takes a*/2, which no cell of the class indexes (misfit ~6,500 nats). Spots that weak
# next to the zone's strongest (SIDE_LOBE_SHARE of its intensity, at most) may be left out of the cell.
SIDE_LOBE_SHARE = 0.01


def coarser_zone_bases(basis: np.ndarray, points: np.ndarray, intensity: np.ndarray,
                       share: float = SIDE_LOBE_SHARE) -> list[np.ndarray]:
    """The index-2 superlattices of a zone's reciprocal lattice that leave out only weak spots.

    ``basis`` (2, 2) rows u, v and ``points`` (K, 2) in the same units, ``intensity`` (K,). The three
    coarser lattices of index 2 keep the nodes with m even, n even, or m + n even; one is returned
    (as its basis) when the spots it leaves out are all at most ``share`` of the brightest spot it keeps."""
    if len(points) < 2:
        return []
    idx = np.rint(points @ np.linalg.inv(basis)).astype(np.int64)
    u, v = basis
    out = []
    for off, coarse in ((idx[:, 0] % 2 == 1, (2 * u, v)), (idx[:, 1] % 2 == 1, (u, 2 * v)),
                        ((idx[:, 0] + idx[:, 1]) % 2 == 1, (u + v, u - v))):
        if off.any() and not off.all() and intensity[off].max() <= share * intensity[~off].max():
            out.append(np.array(coarse))
    return out
