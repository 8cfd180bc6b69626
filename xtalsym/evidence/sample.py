"""The zones of one sample together: cell, likelihoods of the 7 crystal systems, the 14 Bravais
lattices and each of the 230 space groups, and what the evidence cannot separate.

Group log-likelihood = metric term (the group's metric class fitted to the zones, with Occam
factors, :mod:`.cell`) + absence term + zone-symmetry term, with the group's conventional cell
taken as the measured apparent cell times the group's apparent-cell divisors (an F cubic group's
zones look like a P cell of half the edge; symmetry.apparent_cell_divisors). Groups of a metric
class that fits the zones ``PRUNE_METRIC_NATS`` worse than the best class are not scored (they
get the floor of the vector). Where the zones' cell is wrong — weak rows left out of a zone's
lattice (``CELL_MULTIPLES``), first-order Laue side lobes put into it (:func:`_rescued_fits`) — the
group likelihoods also try the corrected cells; the class likelihoods and the decision do not.

Absence term, per true zone of the group's class: the group's conventional zone nodes inside the
analysed annulus, each scored *relative to "no reflection there"*: an allowed node with a spot
gains log p(Î | allowed) − log p(Î | noise), an allowed node without a spot pays
log P(no spot | allowed), and an absent node (or a position that is no node) scores 0. So an F
cell of edge a and a P cell of edge a/2, whose ⟨100⟩ zones put spots on the same positions, score
exactly the same: positions alone never prefer either. Zones that are not true zones of the
group's class (monoclinic z, triclinic y and z) are scored by their own measured lattice, the
same for every group that treats them so.

Zone-symmetry term: Σ over the frame's lattice operations of its log-likelihood ratio (equal vs
independent intensities) where the group's zone pattern has that operation.

Bravais lattice and crystal system: log of the mean likelihood of their groups (a uniform prior
over groups within a class). Whether a class is *decided* is :mod:`.decision`'s rule (log-odds
thresholds and an on-axis check calibrated on the validation split); otherwise the classes within
``DECIDE_LOG_ODDS`` of the best are named in a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from xtalsym import spacegroups, symmetry
from xtalsym.evidence import axis as zoneaxis
from xtalsym.evidence import cell as cellfit
from xtalsym.evidence import decision, derotate, stats, zonerules
from xtalsym.evidence.frame import FrameEvidence

log = logging.getLogger(__name__)

SCHEMA = "xtalsym.evidence/1"
GROUPS = np.arange(1, 231)
CRYSTAL_SYSTEMS = spacegroups.CRYSTAL_SYSTEMS
BRAVAIS_LATTICES = symmetry.BRAVAIS_LATTICES
DECIDE_LOG_ODDS = 5.0  # ≈ 99.3 % posterior under a uniform prior over classes
NODE_TOLERANCE_PX = 1.5
SPURIOUS_SPOT = 0.02
PRUNE_METRIC_NATS = 200.0
# Sub-threshold intensity at an empty node (group_loglik only; the class likelihoods and the
# calibrated decision keep "spot / no spot"): a node of a group's zone lattice that holds no spot but
# lies within MEASURED_TOLERANCE_PX of a node of the frame's measured half-grid
# (FrameEvidence.nodes_half: the nodes and half-nodes of the zone's own lattice) is scored by that
# integrated intensity Î (floored at 0, capped at the detection threshold: no spot was found there)
# instead of by P(no spot). Relative to the Wilson mean Σ at its |q|:
# - absent: a mixture of exponentials, (mean, share) in ABSENT_LEAK, the means times LEAK_SCALE. The
#   shares are the EM fit to the validation frames' half-nodes below the threshold
#   (benchmarks/evidence_leak.py: a true extinction of a noise-free kinematic frame reads exactly 0
#   about half the time, else side lobes and the rods of other layers crossing the plane, up to
#   ~0.1 Σ); LEAK_SCALE, chosen on validation (1 … 64), widens them 16-fold: an absent node of a
#   group's lattice lies among strong reflections and crossing rods and leaks more than the average
#   half-node. In effect (noise-free frames) a node reading exactly 0 costs "allowed" 5.8 nats, one
#   reading 0.01 / 0.02 / 0.05 Σ 1.6 / 1.2 / 0.8 nats (a nearly extinct sublattice: heavy atoms
#   obeying a glide the whole structure breaks), where P(no spot) costs ~4 at the median threshold;
# - allowed: Wilson's Exp(Σ) (WEAK_SHARE > 0 adds weak reflections Exp(WEAK_MEAN · Σ): no better on
#   validation, 0);
# every component ⊗ N(0, σ² + (MEASURED_FLOOR · Σ)²), σ the node's noise (background MAD, Poisson for
# count frames). Choice and measurements: docs/RESULTS.md, issue 15, session 6, s6weak.
ABSENT_LEAK = ((1e-4, 0.4992), (1e-3, 0.0494), (1e-2, 0.4102), (1e-1, 0.0412))
LEAK_SCALE = 16.0
WEAK_SHARE = 0.0
WEAK_MEAN = 0.01
MEASURED_FLOOR = 1e-5
MEASURED_TOLERANCE_PX = 1.0
# A monoclinic cell whose β is this close to 90° is scored in zone z too (zonerules.PSEUDO_ZONE): with
# 85 Å blocks a tilt of c* from the beam under ~1° keeps the hk0 reflections on the Ewald plane, and
# the zone then shows the cell's nodes and the 2mm intensity symmetry an orthorhombic cell would.
PSEUDO_ZONE_DEG = 1.0
# Cell multiples tried for every group's likelihood (group_loglik only; the class likelihoods and the
# calibrated decision keep the zones' cell): a zone's lattice takes the coarser of two lattices when
# the rows between are weak (P2₁/c at large β: the l-odd rows of 0kl; a heavy-atom pseudo-translation),
# so the apparent cell can be half the true one along an axis, and on it the group's glides forbid
# strong nodes. Doubling along one axis (a and b together where the class ties them; all three for
# cubic) puts those rows back as nodes; the choice costs CELL_MULTIPLE_NATS, a prior against cells
# larger than the zones show. Its new nodes (off the zones' lattice) count as weak rows — an empty
# one costs nothing — in a zone where at least WEAK_ROW_SPOTS of them hold a spot favouring
# "allowed"; elsewhere they are scored as any node. Both chosen on validation (docs/RESULTS.md,
# issue 15, session 4, i17cell).
CELL_MULTIPLES = {"monoclinic": ((2, 1, 1), (1, 2, 1), (1, 1, 2)),
                  "orthorhombic": ((2, 1, 1), (1, 2, 1), (1, 1, 2)),
                  "tetragonal": ((2, 2, 1), (1, 1, 2)), "hexagonal": ((2, 2, 1), (1, 1, 2)),
                  "cubic": ((2, 2, 2),)}
CELL_MULTIPLE_NATS = 5.0
WEAK_ROW_SPOTS = 3
# A class whose fit to the zones is pruned or infeasible is fitted again with one zone's lattice made
# coarser where that leaves out only weak spots (cellfit.coarser_zone_bases: first-order Laue zone
# side lobes); such a rescued fit costs SIDE_LOBE_NATS and enters group_loglik only.
SIDE_LOBE_NATS = 5.0
# what a zone turned back about the beam (derotate.py) pays for its free angle: an Occam factor,
# log(√(2π)·0.3° / 8°) ≈ −2.4 nats for a turn anywhere in ±4°, rounded up
TURNED_ZONE_NATS = 3.0
# A zone whose Friedel asymmetry (zoneaxis.friedel_asymmetry) exceeds this is off its axis: its
# zone-symmetry term is left out. True zone axes show < 0.02 noise-free; chosen on validation
# (0.05–0.3 tried on 128 materials per condition, on and off the axes: 0.1 best or level in
# each; docs/RESULTS.md, session 10).
SYMMETRY_MAX_FRIEDEL_ASYMMETRY = 0.1


def logsumexp(values) -> float:
    """log Σ exp (numpy; scipy's version costs ~1 ms of call overhead)."""
    v = np.asarray(values, float)
    if v.size == 0:
        return -np.inf
    m = float(v.max())
    if not np.isfinite(m):
        return m
    return m + math.log(float(np.exp(v - m).sum()))  # groups of a metric class this far below the best class are not scored


@dataclass
class SampleEvidence:
    """Evidence of one sample's zones; the input the fusion step takes (docs/EVIDENCE.md).

    ``group_loglik[g − 1]`` is the log-likelihood of space group g (natural log, up to one
    common constant; all zeros when nothing could be measured — uninformative).
    """

    cell: tuple[float, ...] | None  # a, b, c (Å), α, β, γ (°) of the best metric class (apparent cell)
    cell_sigma: tuple[float, ...] | None
    metric_class: str | None
    crystal_system_loglik: dict[str, float]
    bravais_loglik: dict[str, float]
    group_loglik: np.ndarray  # (230,)
    decided: bool  # the crystal system is decided
    crystal_system: str | None
    bravais: str | None  # decided Bravais lattice, or None
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None  # why nothing is decided, when so
    cell_by_bravais: dict[str, tuple[float, ...]] = field(default_factory=dict)
    zones: dict[str, FrameEvidence] = field(default_factory=dict)
    metric_loglik: dict[str, float] = field(default_factory=dict)
    # how far the zones are from zone-axis patterns (axis.off_axis_score): the largest Friedel
    # asymmetry over the zone axes of the metric class, and each decided zone's
    off_axis: float | None = None
    friedel_asymmetry: dict[str, float] = field(default_factory=dict)

    def probabilities(self, which: str = "bravais") -> dict[str, float]:
        """Posterior over the classes under a uniform prior over classes."""
        table = self.bravais_loglik if which == "bravais" else self.crystal_system_loglik
        keys = list(table)
        values = np.array([table[k] for k in keys])
        p = np.exp(values - logsumexp(values))
        return {k: float(v) for k, v in zip(keys, p)}

    def top_groups(self, k: int = 10) -> list[dict]:
        order = np.argsort(-self.group_loglik, kind="stable")[:k]
        best = float(self.group_loglik[order[0]])
        return [{"space_group": int(g + 1), "symbol": spacegroups.symbol(int(g + 1)),
                 "log_likelihood": round(float(self.group_loglik[g]) - best, 3)} for g in order]

    def to_json(self, *, spots: bool = False) -> dict:
        """The documented JSON form (schema ``xtalsym.evidence/1``, docs/EVIDENCE.md)."""
        def cell_dict(c):
            return None if c is None else dict(zip(("a", "b", "c", "alpha", "beta", "gamma"),
                                                   (round(float(x), 4) for x in c)))
        return {
            "schema": SCHEMA,
            "decided": self.decided,
            "reason": self.reason,
            "crystal_system": self.crystal_system,
            "bravais": self.bravais,
            "metric_class": self.metric_class,
            "cell": cell_dict(self.cell),
            "cell_sigma": cell_dict(self.cell_sigma),
            "cell_by_bravais": {k: cell_dict(v) for k, v in self.cell_by_bravais.items()},
            "crystal_system_loglik": {k: round(v, 3) for k, v in self.crystal_system_loglik.items()},
            "bravais_loglik": {k: round(v, 3) for k, v in self.bravais_loglik.items()},
            "crystal_system_probability": {k: round(v, 5) for k, v in self.probabilities("system").items()},
            "bravais_probability": {k: round(v, 5) for k, v in self.probabilities("bravais").items()},
            "top_groups": self.top_groups(),
            "group_loglik": [round(float(x), 3) for x in self.group_loglik],
            "zones": {a: ev.to_json(spots=spots) for a, ev in self.zones.items()},
            "off_axis": None if self.off_axis is None else round(float(self.off_axis), 4),
            "friedel_asymmetry": {a: round(float(v), 4) for a, v in self.friedel_asymmetry.items()},
            "warnings": list(self.warnings),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), allow_nan=False)


# --------------------------------------------------------------------------- node scoring


@dataclass(frozen=True)
class _ZoneData:
    """A decided frame, prepared for scoring many node lattices."""

    frame: FrameEvidence
    points: np.ndarray  # (K, 2) spot positions, px
    r_min: float
    r_max: float
    spot_llr: np.ndarray  # (K,) log p(Î | allowed) − log p(Î | noise)
    empty_llr_fn: object
    half_inverse: np.ndarray | None = None  # (2, 2): px -> half-grid coordinates of the frame's lattice
    half_basis: np.ndarray | None = None  # its inverse: the half-grid's basis (rows u/2, v/2) in px
    half_lookup: np.ndarray | None = None  # (w·w,) half-grid key -> measured node's index, −1 where none
    half_span: int = 0
    measured_llr: np.ndarray | None = None  # (len(nodes_half),) _measured_empty_llr
    # whether the zone's intensities stand for |F|²: its Friedel pairs agree (see _symmetry_term)
    friedel_ok: bool = True


def _prepare(ev: FrameEvidence, asymmetry: float | None) -> _ZoneData:
    """``asymmetry``: the zone's Friedel asymmetry (axis.zone_asymmetries; None: not measurable)."""
    points = np.stack([ev.spots_x_px, ev.spots_y_px], 1)
    q = np.hypot(points[:, 0], points[:, 1]) * ev.q_per_pixel
    scale = ev.scale_at(q)
    sig = stats.total_sigma(ev.spots_sigma, scale)
    allowed = stats.log_allowed(ev.spots_intensity, sig, scale)
    # the base model ("no reflection here") keeps a share SPURIOUS_SPOT of spots nothing explains
    # (rods of other layers crossing the plane, pseudo-symmetry): one spot is then worth at most
    # −log SPURIOUS_SPOT nats, and a lattice that happens to cover one more stray spot gains little
    base = np.logaddexp(math.log1p(-SPURIOUS_SPOT) + stats.log_absent(ev.spots_intensity, sig),
                        math.log(SPURIOUS_SPOT) + allowed)
    spot_llr = allowed - base
    noise = stats.median(ev.nodes_sigma) if len(ev.nodes_sigma) else 0.0
    threshold = ev.threshold

    def empty_llr(q_nodes: np.ndarray) -> np.ndarray:
        sc = ev.scale_at(q_nodes)
        return stats.log_below_ratio(threshold, stats.total_sigma(noise, sc), sc)

    half_inverse, half_basis, lookup, span, measured = None, None, None, 0, None
    if ev.basis is not None and len(ev.nodes_half):
        measured = _measured_empty_llr(ev)
        half_basis = ev.basis / ev.q_per_pixel / 2.0
        half_inverse = np.linalg.inv(half_basis)
        span = int(np.abs(ev.nodes_half).max()) + 1
        width = 2 * span + 1
        lookup = np.full(width * width, -1, np.int64)
        lookup[(ev.nodes_half[:, 0] + span) * width + ev.nodes_half[:, 1] + span] = np.arange(len(ev.nodes_half))
    friedel_ok = asymmetry is None or asymmetry <= SYMMETRY_MAX_FRIEDEL_ASYMMETRY
    return _ZoneData(ev, points, ev.q_min / ev.q_per_pixel, ev.q_max / ev.q_per_pixel, spot_llr, empty_llr,
                     half_inverse, half_basis, lookup, span, measured, friedel_ok)


def _measured_empty_llr(ev: FrameEvidence) -> np.ndarray:
    """Per measured node of the frame (nodes_half), its score as an empty node:
    log p(Î | allowed) − log p(Î | absent), Î in [0, detection threshold]."""
    scale = ev.scale_at(ev.nodes_q)
    sig = np.sqrt(ev.nodes_sigma ** 2 + (MEASURED_FLOOR * scale) ** 2) + 1e-300
    value = np.minimum(np.maximum(ev.nodes_intensity, 0.0), ev.threshold)
    absent = np.logaddexp.reduce([math.log(w) + stats.log_allowed(value, sig, LEAK_SCALE * k * scale) for k, w in ABSENT_LEAK])
    allowed = stats.log_allowed(value, sig, scale)
    if WEAK_SHARE > 0:
        allowed = np.logaddexp(math.log1p(-WEAK_SHARE) + allowed,
                               math.log(WEAK_SHARE) + stats.log_allowed(value, sig, WEAK_MEAN * scale))
    return allowed - absent


MAX_NODE_SPAN = 200  # |m|, |n| bound of the node enumeration (a lattice finer than 0.6 px is no lattice)


@dataclass(frozen=True)
class _NodeSets:
    """The nodes of several lattices inside a zone's annulus, lattice after lattice (each m-major,
    n ascending), and their scores; lattice j is ``[bounds[j]:bounds[j + 1]]``."""

    m: np.ndarray
    n: np.ndarray
    score: np.ndarray  # if allowed, relative to "nothing there"; an absent node scores 0
    bounds: np.ndarray  # (k + 1,)
    # group_loglik's score minus ``score``: an empty node's measured sub-threshold intensity
    # (_measured_empty_llr) in place of P(no spot); 0 elsewhere
    delta: np.ndarray | None = None


def _node_scores(zd: _ZoneData, bases_px: list[np.ndarray]) -> _NodeSets:
    """Score the nodes of several 2D lattices (each (2, 2), rows u, v in px) of one zone together.

    Per lattice: the nodes (m, n) with |m|, |n| <= its span and m·u + n·v inside the annulus, each
    scored by its brightest spot within NODE_TOLERANCE_PX, or as an empty node. All lattices'
    nodes go through the scoring at once (a sample has ~30 lattices: per-lattice calls would cost
    more than the arithmetic). The nodes of a lattice are those of the square |m|, |n| <= span, so
    the enumeration per row m covers only the disc's chord (plus one node each side)."""
    k = len(bases_px)
    bases = np.stack(bases_px)
    binv = np.linalg.inv(bases)
    spans = np.minimum(np.ceil(zd.r_max * np.abs(binv).sum(axis=1).max(axis=1)).astype(np.int64) + 1, MAX_NODE_SPAN)
    uu = np.einsum("ki,ki->k", bases[:, 0], bases[:, 0])
    vv = np.einsum("ki,ki->k", bases[:, 1], bases[:, 1])
    uv = np.einsum("ki,ki->k", bases[:, 0], bases[:, 1])
    det2 = np.maximum(uu * vv - uv * uv, 1e-300)
    m_max = np.minimum(spans, np.floor(zd.r_max * np.sqrt(vv / det2)).astype(np.int64) + 1)
    rows_per_set = 2 * m_max + 1
    row_set = np.repeat(np.arange(k), rows_per_set)
    row_m = np.arange(len(row_set)) - np.repeat(np.cumsum(rows_per_set) - rows_per_set + m_max, rows_per_set)
    vv_r, uv_r, det2_r, span_r = vv[row_set], uv[row_set], det2[row_set], spans[row_set]
    half = np.sqrt(np.maximum(vv_r * zd.r_max * zd.r_max - row_m * row_m * det2_r, 0.0)) / vv_r
    centre = -row_m * (uv_r / vv_r)
    lo = np.maximum(np.floor(centre - half).astype(np.int64) - 1, -span_r)
    hi = np.minimum(np.ceil(centre + half).astype(np.int64) + 1, span_r)
    count = np.maximum(hi - lo + 1, 0)
    starts = np.cumsum(count) - count
    node_set = np.repeat(row_set, count)
    mm = np.repeat(row_m, count)
    nn = np.arange(int(count.sum())) - np.repeat(starts - lo, count)
    nodes = np.stack([mm, nn], 1)
    bounds = np.searchsorted(node_set, np.arange(k + 1))
    pos = np.concatenate([nodes[bounds[j]:bounds[j + 1]] @ bases[j] for j in range(k)])  # per-lattice matmul
    r = np.hypot(pos[:, 0], pos[:, 1])
    keep = np.flatnonzero((r >= zd.r_min) & (r <= zd.r_max))  # 1-D takes: cheaper than a (N, 2) mask
    node_set, mm, nn, r = node_set[keep], mm[keep], nn[keep], r[keep]
    # the empty-node score depends on |q| alone, and Friedel pairs and the nodes the lattices share
    # have bit-identical radii: score each distinct radius once
    radii, back = np.unique(r, return_inverse=True)
    score = zd.empty_llr_fn(radii * zd.frame.q_per_pixel)[back]
    spotted = np.zeros(len(mm), bool)
    if len(zd.points) and len(mm):
        frac = zd.points[None] @ binv  # (k, K, 2)
        idx = np.rint(frac).astype(np.int64)
        cart = (frac - idx) @ bases
        resid = np.hypot(cart[..., 0], cart[..., 1])
        on = (resid <= NODE_TOLERANCE_PX) & np.all(np.abs(idx) <= spans[:, None, None], axis=2)
        if on.any():
            # nodes are sorted by (lattice, m, n): find each spot's node by its key
            width = 2 * MAX_NODE_SPAN + 1
            keys = (node_set * width + mm + MAX_NODE_SPAN) * width + nn + MAX_NODE_SPAN
            which, spot = np.nonzero(on)
            spot_keys = (which * width + idx[which, spot, 0] + MAX_NODE_SPAN) * width + idx[which, spot, 1] + MAX_NODE_SPAN
            at = np.minimum(np.searchsorted(keys, spot_keys), len(keys) - 1)
            hit = keys[at] == spot_keys
            if hit.any():
                best = np.full(len(mm), -np.inf)
                np.maximum.at(best, at[hit], zd.spot_llr[spot[hit]])  # the brightest spot of a node
                spotted = np.isfinite(best)
                score = np.where(spotted, best, score)
    delta = np.zeros(len(mm))
    if zd.half_lookup is not None and len(mm):
        # empty nodes within MEASURED_TOLERANCE_PX of a node of the frame's measured half-grid
        # take its sub-threshold intensity; the others keep P(no spot)
        empty = np.flatnonzero(~spotted)
        frac = pos[keep[empty]] @ zd.half_inverse
        idx = np.rint(frac)
        off = (frac - idx) @ zd.half_basis
        span = zd.half_span
        ok = (off[:, 0] ** 2 + off[:, 1] ** 2 <= MEASURED_TOLERANCE_PX ** 2) & (np.abs(idx).max(axis=1) < span)
        idx = idx[ok].astype(np.int64)
        where = zd.half_lookup[(idx[:, 0] + span) * (2 * span + 1) + idx[:, 1] + span]
        got = where >= 0
        target = empty[ok][got]
        delta[target] = zd.measured_llr[where[got]] - score[target]
    return _NodeSets(mm, nn, score, np.searchsorted(node_set, np.arange(k + 1)), delta)


@functools.cache
def _image_axes(axis: str) -> np.ndarray:
    """(3, 2): crystal-frame vector -> image (x, y) of zone ``axis``."""
    _, ix, iy = (np.array(v) for v in symmetry.zone_image_axes(axis))
    return np.stack([ix, iy], 1)


def _zone_basis_px(reciprocal: np.ndarray, plane: zonerules.ZonePlane, axis: str, q_per_pixel: float) -> np.ndarray:
    """The zone plane's basis in px, from the reciprocal lattice (rows a*, b*, c*, no 2π; or a stack
    of them: a stack of bases)."""
    g = _plane_hkl(plane) @ reciprocal
    return (g @ _image_axes(axis)) / q_per_pixel


@functools.cache
def _plane_hkl(plane: zonerules.ZonePlane) -> np.ndarray:
    return np.array(plane.basis_hkl, float)


# --------------------------------------------------------------------------- combine


def combine(frames: dict[str, FrameEvidence | None]) -> SampleEvidence:
    """Evidence from the zones of one sample ({"x": ..., "y": ..., "z": ...}, any subset)."""
    frames = {a: ev for a, ev in frames.items() if ev is not None}
    warnings_: list[str] = []
    for axis, ev in sorted(frames.items()):
        if not ev.decided:
            warnings_.append(f"zone {axis}: cannot decide: {ev.reason}")
    usable = {a: ev for a, ev in frames.items() if ev.decided}
    missing = [a for a in symmetry.ZONES if a not in frames]
    if missing:
        warnings_.append(f"zone{'s' if len(missing) > 1 else ''} {', '.join(missing)} not measured")
    if not usable:
        return _undecided(frames, warnings_, "no zone shows a lattice")
    zone_vectors = _zone_vectors(usable)
    fits = cellfit.fit_metrics(zone_vectors)
    feasible = {m: f for m, f in fits.items() if f.feasible}
    if not feasible:
        return _undecided(frames, warnings_, "; ".join(f"{m}: {f.reason}" for m, f in fits.items()))
    # once per zone: the symmetry term, the turned zones (a turn about the beam keeps the Friedel
    # pairs) and the off-axis score all take it
    asymmetry = zoneaxis.zone_asymmetries(usable)
    prepared = {a: _prepare(ev, asymmetry.get(a)) for a, ev in usable.items()}
    group_ll, plain_ll, group_scale = _group_logliks(fits, prepared, _rescued_fits(fits, zone_vectors, usable))
    turned = derotate.turned_zones(usable)
    if turned:
        group_ll = _with_turned_zones(usable, turned, prepared, group_ll, asymmetry)
    tables = _tables()
    # the classes and their decision keep the likelihoods without the monoclinic pseudo-zone: the
    # rule's thresholds were calibrated on those (≤ 1 % wrong); with it, orthorhombic test crystals
    # were named monoclinic at log-odds up to 220 (docs/RESULTS.md, issue 15, i16soft)
    system_ll = _class_logliks(plain_ll, tables.system_members)
    bravais_ll = _class_logliks(plain_ll, tables.bravais_members)
    verdict = decision.decide(system_ll=system_ll, bravais_ll=bravais_ll, frames=usable)
    system, system_ok = verdict.system, verdict.system_ok
    bravais, bravais_ok = verdict.bravais, verdict.bravais_ok
    warnings_.extend(verdict.warnings)
    tested = {m: f for m, f in feasible.items() if not f.partial}
    best_metric = max(tested or feasible, key=lambda m: (tested or feasible)[m].loglik)
    best_fit = feasible[best_metric]
    cell_by_bravais = {}
    for name, members in tables.bravais_members.items():
        g = int(members[np.argmax(plain_ll[members])]) + 1  # the first of the best, like max()
        fit = fits[symmetry.metric_class(int(g))]
        if fit.feasible and not fit.partial and fit.cell is not None and np.isfinite(plain_ll[g - 1]):
            s = group_scale[g - 1]
            a, b, c, al, be, ga = fit.cell
            cell_by_bravais[name] = (a * s[0], b * s[1], c * s[2], al, be, ga)
    orders = [ev.max_order for ev in usable.values()]
    first_only = max(orders) <= 1
    if not bravais_ok:
        close = _within_reach(bravais_ll)
        cells = ", ".join(f"{k} a = {cell_by_bravais[k][0]:.3f} Å" for k in close if k in cell_by_bravais)
        prefix = "first-order reflections only: " if first_only else ""
        warnings_.append(f"{prefix}{'/'.join(close)} not separable from these zones ({cells})")
    if not system_ok:
        reach = _within_reach(system_ll)
        verb = "remains" if len(reach) == 1 else "remain"
        warnings_.append(f"crystal system not decided: {'/'.join(reach)} {verb} possible")
    if best_metric == "monoclinic":
        warnings_.append("cell from zones x and y only: z is not a zone axis of a monoclinic cell")
    if best_fit.partial:
        warnings_.append(f"cell undetermined: {best_fit.reason}")
    if first_only and bravais_ok:
        warnings_.append("first-order reflections only in every zone")
    group_ll = np.where(np.isfinite(group_ll), group_ll, np.nan)
    floor = np.nanmin(group_ll) - 50.0 if np.isfinite(np.nanmin(group_ll)) else -1e4
    group_ll = np.nan_to_num(group_ll - np.nanmax(group_ll), nan=floor - np.nanmax(group_ll))
    reason = None if system_ok else "crystal system not decided (see warnings)"
    metric_class = None if best_fit.partial else best_metric
    off_axis, asymmetry = zoneaxis.off_axis_score(usable, metric_class, asymmetry)
    return SampleEvidence(
        cell=best_fit.cell, cell_sigma=best_fit.cell_sigma, metric_class=metric_class,
        crystal_system_loglik=system_ll, bravais_loglik=bravais_ll, group_loglik=group_ll,
        decided=system_ok, crystal_system=system if system_ok else None, bravais=bravais if bravais_ok else None,
        warnings=warnings_, reason=reason, cell_by_bravais=cell_by_bravais, zones=dict(frames),
        metric_loglik={m: round(f.loglik, 3) for m, f in fits.items() if f.feasible},
        off_axis=off_axis, friedel_asymmetry=asymmetry)


def _undecided(frames, warnings_, reason: str) -> SampleEvidence:
    return SampleEvidence(
        cell=None, cell_sigma=None, metric_class=None,
        crystal_system_loglik={s: 0.0 for s in CRYSTAL_SYSTEMS}, bravais_loglik={b: 0.0 for b in BRAVAIS_LATTICES},
        group_loglik=np.zeros(230), decided=False, crystal_system=None, bravais=None,
        warnings=warnings_ + [f"cannot decide: {reason}"], reason=reason, zones=dict(frames))


def _class_logliks(group_ll: np.ndarray, members: dict[str, np.ndarray]) -> dict[str, float]:
    """log of the mean likelihood of each class's groups (``members``: group − 1 indices)."""
    out = {}
    for name, index in members.items():
        sel = group_ll[index]
        sel = sel[np.isfinite(sel)]
        out[name] = float(logsumexp(sel) - math.log(len(index))) if len(sel) else -1e4
    best = max(out.values())
    return {k: v - best for k, v in out.items()}


def _within_reach(table: dict[str, float]) -> list[str]:
    best = max(table.values())
    return [k for k, v in sorted(table.items(), key=lambda kv: -kv[1]) if v >= best - DECIDE_LOG_ODDS]


@dataclass(frozen=True)
class _GroupInfo:
    group: int
    metric: str
    divisors: tuple[int, int, int]
    rules: dict  # zone -> zonerules.AbsenceRules
    ops: dict  # zone -> zonerules.IntensityOps


@dataclass(frozen=True)
class _Batch:
    """Groups of one metric class and one set of apparent-cell divisors: they share node lattices."""

    metric: str
    divisors: tuple[int, int, int]
    index: np.ndarray  # group − 1
    rule_index: dict  # zone -> (len(index),) index into _Tables.rule_sets[zone].rules
    ops_index: dict  # zone -> (len(index),) index into _Tables.ops[zone]
    rules_unique: dict  # zone -> (distinct rule indices, each group's position among them)
    pseudo_unique: tuple | None = None  # monoclinic: rules_unique of the z pseudo-zone (_Tables.pseudo_rules)
    pseudo_ops_index: np.ndarray | None = None  # monoclinic: index into _Tables.pseudo_ops


@dataclass(frozen=True)
class _Tables:
    """The per-group tables as arrays, so that a sample's 230 likelihoods are a few vector operations."""

    batches: tuple[_Batch, ...]
    rule_sets: dict  # zone -> zonerules.RuleSet of the distinct absence rules
    rule_index: dict  # zone -> (230,) index into rule_sets[zone].rules
    ops: dict  # zone -> tuple of distinct IntensityOps
    ops_index: dict  # zone -> (230,) index into ops[zone]
    system_members: dict  # crystal system -> group − 1 indices
    bravais_members: dict  # Bravais lattice -> group − 1 indices
    pseudo_rules: zonerules.RuleSet | None = None  # the monoclinic groups' rules in the z pseudo-zone
    pseudo_ops: tuple = ()  # their distinct intensity operations there


_GROUP_TABLE: list[_GroupInfo] = []
_TABLES: list[_Tables] = []


def group_table() -> list[_GroupInfo]:
    """Per-group metric class, apparent-cell divisors, zone rules (built once, ~seconds)."""
    if not _GROUP_TABLE:
        for g in GROUPS:
            g = int(g)
            _GROUP_TABLE.append(_GroupInfo(
                group=g, metric=symmetry.metric_class(g), divisors=zonerules.apparent_divisors(g),
                rules={a: zonerules.absence_rules(g, a) for a in symmetry.ZONES},
                ops={a: zonerules.intensity_ops(g, a) for a in symmetry.ZONES}))
    if not _TABLES:
        _TABLES.append(_build_tables(_GROUP_TABLE))
    return _GROUP_TABLE


def _tables() -> _Tables:
    if not _TABLES:
        group_table()
    return _TABLES[0]


def _build_tables(table: list[_GroupInfo]) -> _Tables:
    keys: dict[tuple[str, tuple], list[int]] = {}
    for info in table:  # batches in order of first appearance, groups ascending within each
        keys.setdefault((info.metric, info.divisors), []).append(info.group - 1)
    rule_sets, rule_index, ops, ops_index = {}, {}, {}, {}
    for a in symmetry.ZONES:
        distinct = {info.rules[a].key: info.rules[a] for info in table}
        order = {k: i for i, k in enumerate(distinct)}
        rule_sets[a] = zonerules.RuleSet.build(distinct.values())
        rule_index[a] = np.array([order[info.rules[a].key] for info in table], np.int64)
        distinct_ops = list(dict.fromkeys(info.ops[a] for info in table))
        where = {o: i for i, o in enumerate(distinct_ops)}
        ops[a] = tuple(distinct_ops)
        ops_index[a] = np.array([where[info.ops[a]] for info in table], np.int64)
    mono = [info.group for info in table if info.metric == "monoclinic"]
    distinct = {zonerules.pseudo_zone_rules(g).key: zonerules.pseudo_zone_rules(g) for g in mono}
    order = {k: i for i, k in enumerate(distinct)}
    pseudo_rule_index = {g: order[zonerules.pseudo_zone_rules(g).key] for g in mono}
    pseudo_ops = tuple(dict.fromkeys(zonerules.pseudo_zone_ops(g) for g in mono))
    pseudo_ops_index = {g: pseudo_ops.index(zonerules.pseudo_zone_ops(g)) for g in mono}

    def batch(m, d, ix):
        pseudo = m == "monoclinic"
        return _Batch(m, d, np.array(ix, np.int64), rule_index={a: rule_index[a][ix] for a in symmetry.ZONES},
                      ops_index={a: ops_index[a][ix] for a in symmetry.ZONES},
                      rules_unique={a: np.unique(rule_index[a][ix], return_inverse=True) for a in symmetry.ZONES},
                      pseudo_unique=np.unique([pseudo_rule_index[i + 1] for i in ix], return_inverse=True) if pseudo else None,
                      pseudo_ops_index=np.array([pseudo_ops_index[i + 1] for i in ix], np.int64) if pseudo else None)

    batches = tuple(batch(m, d, ix) for (m, d), ix in keys.items())
    systems = np.array(_SYSTEM_LABELS)
    bravais = np.array(_bravais_labels())
    return _Tables(batches=batches, rule_sets=rule_sets, rule_index=rule_index, ops=ops, ops_index=ops_index,
                   pseudo_rules=zonerules.RuleSet.build(distinct.values()), pseudo_ops=pseudo_ops,
                   system_members={s: np.flatnonzero(systems == s) for s in CRYSTAL_SYSTEMS},
                   bravais_members={b: np.flatnonzero(bravais == b) for b in BRAVAIS_LATTICES})


_SYSTEM_LABELS = [spacegroups.crystal_system(int(g)) for g in GROUPS]
_BRAVAIS_LABELS: list[str] = []


def _bravais_labels() -> list[str]:
    if not _BRAVAIS_LABELS:
        _BRAVAIS_LABELS.extend(symmetry.bravais_lattice(int(g)) for g in GROUPS)
    return _BRAVAIS_LABELS


def _symmetry_term(zone: _ZoneData, ops: zonerules.IntensityOps) -> float:
    """Σ of the zone's symmetry log-likelihood ratios over the operations the group's zone has."""
    return sum(s["log_likelihood_ratio"] for s in zone.frame.symmetry.values()
               if ops.rotation_order and ops.has(s["kind"], s["angle_deg"]))


PSEUDO_SLOT = "pseudo"
_PSEUDO_PLANES = {m: zonerules.ZonePlane(metric=m, zone=z, rank=2, basis_hkl=basis)
                  for m, (z, basis) in zonerules.PSEUDO_ZONE.items()}


def _beta_deg(lattice: np.ndarray) -> float:
    """The angle between a and c of a lattice (rows a, b, c), degrees."""
    a, c = lattice[0], lattice[2]
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ c) / float(np.linalg.norm(a) * np.linalg.norm(c))))))


def _rule_sums(rule_set: zonerules.RuleSet, codes, node_set, slots: np.ndarray, rules: np.ndarray) -> np.ndarray:
    """Per pair (``slots[i]``, ``rules[i]``): the node score of scored lattice ``slots[i]`` of
    ``node_set`` summed over the nodes rule ``rules[i]`` of ``rule_set`` allows. The masks of all
    pairs are made at once (one call per lattice and batch cost more than the arithmetic); each sum
    is numpy's sum of that pair's allowed scores in node order, as :func:`_rule_sums_reference` takes
    it: the same bits (a matrix product or reduceat would round differently)."""
    lo = node_set.bounds[slots]
    count = node_set.bounds[slots + 1] - lo
    pair = np.repeat(np.arange(len(slots)), count)
    node = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count - lo, count)
    rule = rules[pair]
    allowed = ~(rule_set.plane_table[rule, codes[0][node]] | rule_set.line_table[rule, codes[1][node]])
    kept = node[allowed]
    kept_pair = pair[allowed]
    values = node_set.score[kept]
    ends = np.cumsum(np.bincount(kept_pair, minlength=len(slots))).tolist()
    add = np.add.reduce
    plain = np.array([add(values[s:e]) for s, e in zip([0] + ends[:-1], ends)], float)
    if node_set.delta is None:
        return plain, plain
    # group_loglik's sums: plus the measured empty nodes' changes (bincount adds in node order, so
    # pairs with the same allowed nodes keep equal sums)
    return plain, plain + np.bincount(kept_pair, weights=node_set.delta[kept], minlength=len(slots))


def _rule_sums_reference(rule_set: zonerules.RuleSet, codes, node_set, slot: int, rules: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_rule_sums` for one slot, a rule at a time (what it replaced; tests pin the two equal):
    the plain sums, and those plus the measured empty nodes' changes added one after another."""
    lo, hi = node_set.bounds[slot], node_set.bounds[slot + 1]
    absent = rule_set.absent_at((codes[0][lo:hi], codes[1][lo:hi]), rules)
    score = node_set.score[lo:hi]
    plain = np.array([float(score[~row].sum()) for row in absent])
    if node_set.delta is None:
        return plain, plain
    delta = node_set.delta[lo:hi]
    added = np.array([float(np.cumsum(delta[~row])[-1]) if (~row).any() else 0.0 for row in absent])
    return plain, plain + added


@functools.cache
def _new_nodes(plane: zonerules.ZonePlane, multiple: tuple[int, int, int]) -> tuple | None:
    """((u, v, k), ...): node (m, n) of the zone plane on a cell ``multiple`` times the zones' apparent
    cell is new (no node of the apparent cell) where (m·u + n·v) mod k ≠ 0 for any of them (one per multiplied
    axis in the plane); None when the multiple adds no node here."""
    out = tuple((plane.basis_hkl[0][axis], plane.basis_hkl[1][axis], k) for axis, k in enumerate(multiple)
                if k > 1 and (plane.basis_hkl[0][axis] or plane.basis_hkl[1][axis]))
    return out or None


def _zone_vectors(frames: dict[str, FrameEvidence]) -> dict[str, cellfit.ZoneVectors]:
    return {a: cellfit.ZoneVectors(a, cellfit.embed(a, ev.basis), ev.q_per_pixel,
                                   float(np.max(ev.basis_sigma)) if ev.basis_sigma is not None else 0.0)
            for a, ev in frames.items()}


def _with_turned_zones(usable: dict[str, FrameEvidence], turned: dict[str, FrameEvidence],
                       prepared: dict[str, _ZoneData], group_ll: np.ndarray,
                       asymmetry: dict[str, float]) -> np.ndarray:
    """Each group's better log-likelihood of the zones as measured and with ``turned`` ones turned
    back about the beam (:mod:`.derotate`), the latter less ``TURNED_ZONE_NATS`` per turned zone
    (the turn is a free parameter). The class likelihoods and the decision keep the zones as
    measured: the decision rule's thresholds were calibrated on those."""
    frames = usable | turned
    zone_vectors = _zone_vectors(frames)
    fits = cellfit.fit_metrics(zone_vectors)
    if not any(f.feasible for f in fits.values()):
        return group_ll
    prepared = prepared | {a: _prepare(ev, asymmetry.get(a)) for a, ev in turned.items()}
    turned_ll, _, _ = _group_logliks(fits, prepared, _rescued_fits(fits, zone_vectors, frames))
    return np.maximum(group_ll, turned_ll - TURNED_ZONE_NATS * len(turned))


def _rescued_fits(fits: dict[str, cellfit.MetricFit], zones: dict[str, cellfit.ZoneVectors],
                  frames: dict[str, FrameEvidence]) -> dict[str, cellfit.MetricFit]:
    """Refits of the classes that fit the zones ``PRUNE_METRIC_NATS`` worse than the best (or not at
    all), each with one zone's lattice made coarser where that leaves out only weak spots
    (cellfit.coarser_zone_bases); a refit is kept where it brings the class within reach, its
    log-likelihood lowered by ``SIDE_LOBE_NATS``."""
    best_metric = max(f.loglik for f in fits.values() if f.feasible)
    poor = [m for m, f in fits.items() if not f.partial and (not f.feasible or f.loglik < best_metric - PRUNE_METRIC_NATS)]
    if not poor:
        return {}
    alternatives = []
    for a, zv in zones.items():
        ev = frames[a]
        points = np.stack([ev.spots_x_px, ev.spots_y_px], 1) * ev.q_per_pixel
        for coarse in cellfit.coarser_zone_bases(ev.basis, points, ev.spots_intensity):
            alternatives.append(dict(zones) | {a: cellfit.ZoneVectors(a, cellfit.embed(a, coarse), zv.q_per_pixel, zv.sigma)})
    out = {}
    for m in poor:
        for alt in alternatives:
            f = cellfit.fit_metric(m, alt)
            if f.feasible and not f.partial and f.loglik >= best_metric - PRUNE_METRIC_NATS and \
                    (m not in out or f.loglik - SIDE_LOBE_NATS > out[m].loglik):
                out[m] = dataclasses.replace(f, loglik=f.loglik - SIDE_LOBE_NATS)
    return out


def _group_logliks(fits: dict[str, cellfit.MetricFit], prepared: dict[str, _ZoneData],
                   rescued: dict[str, cellfit.MetricFit] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Log-likelihood of every group, the same without the monoclinic pseudo-zone, the cell
    multiples and the rescued fits (what the calibrated decision rule and the class likelihoods
    take), and the cell multiple that gave it.

    ``rescued``: per metric class a fit from coarser zone lattices (:func:`_rescued_fits`) whose
    groups are scored for the first output only.

    Groups come in batches sharing a metric class and divisors: each cell choice's node lattice
    in each true zone is scored once (all lattices of a zone together), and each distinct
    absence rule set sums it once."""
    tables = _tables()
    out = np.full(230, -np.inf)
    plain = np.full(230, -np.inf)
    scales: list[tuple[int, int, int]] = [(1, 1, 1)] * 230
    best_metric = max(f.loglik for f in fits.values() if f.feasible)
    # what to score: the frame's own lattice in every zone, then the lattices of the scored batches
    requests: dict[str, list[np.ndarray]] = {a: [zd.frame.basis / zd.frame.q_per_pixel] for a, zd in prepared.items()}
    plan = []
    seen: dict[tuple, int] = {}  # (zone, rounded basis, new nodes) -> slot of a requested lattice
    weak_rows: dict[str, list] = {a: [] for a in prepared}  # zone -> (slot, new nodes) of the multiples
    rescued = rescued or {}
    # (zone or PSEUDO_SLOT) -> the sums any batch needs, as keys slot · R + distinct rule (R rules in
    # the zone's rule set), made together after the node scoring (batches sharing a lattice share them)
    wanted: dict[str, list[np.ndarray]] = {a: [] for a in prepared} | {PSEUDO_SLOT: []}
    offset = dict.fromkeys(wanted, 0)
    n_rules = {a: len(tables.rule_sets[a].rules) for a in prepared} | {PSEUDO_SLOT: len(tables.pseudo_rules.rules)}

    def columns(key: str, slot: int, unique) -> tuple[int, int, np.ndarray]:
        """Where a batch's sums of ``slot`` will be among ``key``'s wanted sums (start, stop), and
        each group's position among them."""
        wanted[key].append(slot * n_rules[key] + unique[0])
        start = offset[key]
        offset[key] += len(unique[0])
        return start, offset[key], unique[1]

    for batch, fit, rescue in [(b, fits[b.metric], False) for b in tables.batches] + \
            [(b, rescued[b.metric], True) for b in tables.batches if b.metric in rescued]:
        if not fit.feasible or fit.loglik < best_metric - PRUNE_METRIC_NATS:
            continue
        if fit.partial:
            plan.append((batch, fit, None, rescue))
            continue
        true_zones = [a for a in cellfit.TRUE_ZONES[batch.metric] if a in prepared]
        choices = []
        multiples = [((1, 1, 1), False)] + [(k, True) for k in CELL_MULTIPLES.get(batch.metric, ())]
        cells = [(lat, larger, scale) for k, larger in multiples
                 for scale in [tuple(d * x for d, x in zip(batch.divisors, k))] for lat in fit.lattices(scale)]
        # every cell choice of the batch at once: numpy inverts a stack and multiplies stacked small
        # matrices one at a time with the same routines, so these are the bits of one-by-one calls
        reciprocal = np.linalg.inv(np.stack([lat for lat, _, _ in cells])).transpose(0, 2, 1)  # rows a*, b*, c*
        planes = {a: zonerules.zone_plane(batch.metric, a) for a in true_zones}
        bases = {a: _zone_basis_px(reciprocal, plane, a, prepared[a].frame.q_per_pixel)
                 for a, plane in planes.items() if plane.rank == 2}
        rounded = {a: np.round(basis, 6) + 0.0 for a, basis in bases.items()}
        pseudo = zonerules.PSEUDO_ZONE.get(batch.metric)
        for i, (lattice, larger, scale) in enumerate(cells):
            slots, cols = {}, {}
            for a in bases:
                # the multiple's new nodes in this plane: off the zones' own (apparent) lattice, the
                # group's divisors times the multiple (None: a multiple along the zone axis leaves
                # the zone's lattice as it is, scored once)
                new = _new_nodes(planes[a], scale) if larger else None
                key = (a, rounded[a][i].tobytes(), new)
                same = seen.get(key) if larger else None
                slots[a] = same if same is not None else len(requests[a])
                if same is None:
                    seen.setdefault(key, len(requests[a]))
                    if new is not None:
                        weak_rows[a].append((len(requests[a]), new))
                    requests[a].append(bases[a][i])
                cols[a] = columns(a, slots[a], batch.rules_unique[a])
            if pseudo and pseudo[0] in prepared and abs(_beta_deg(lattice) - 90.0) <= PSEUDO_ZONE_DEG:
                a = pseudo[0]
                slots[PSEUDO_SLOT] = len(requests[a])
                requests[a].append(_zone_basis_px(reciprocal[i], _PSEUDO_PLANES[batch.metric], a,
                                                  prepared[a].frame.q_per_pixel))
                cols[PSEUDO_SLOT] = columns(PSEUDO_SLOT, slots[PSEUDO_SLOT], batch.pseudo_unique)
            choices.append((slots, cols, larger))
        plan.append((batch, fit, (true_zones, choices), rescue))
    node_sets = {a: _node_scores(prepared[a], requests[a]) for a in prepared}
    for a, slots_new in weak_rows.items():
        # a multiple's new nodes are allowed but may be weak as a class (a pseudo-translation: the
        # rows the zone's lattice left out), so an empty one costs nothing and a spot there counts.
        # All of a zone's multiples at once (their node ranges are disjoint: each is independent)
        if not slots_new:
            continue
        ns = node_sets[a]
        slot = np.array([s for s, _ in slots_new], np.int64)
        lo = ns.bounds[slot]
        count = ns.bounds[slot + 1] - lo
        seg = np.repeat(np.arange(len(slot)), count)
        node = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count - lo, count)
        m, n = ns.m[node], ns.n[node]
        fresh = np.zeros(len(node), bool)
        for t in range(max(len(new) for _, new in slots_new)):  # (0, 0, 1) where a multiple has fewer
            u, v, k = np.array([new[t] if t < len(new) else (0, 0, 1) for _, new in slots_new], np.int64).T
            fresh |= (m * u[seg] + n * v[seg]) % k[seg] != 0
        spots = np.bincount(seg[fresh & (ns.score[node] > 0)], minlength=len(slot))
        # too few spots on a multiple's new nodes to speak of weak rows: scored as they are
        lift = node[fresh & (spots >= WEAK_ROW_SPOTS)[seg]]
        if ns.delta is not None:  # the measured score of a lifted node: max(score + delta, 0) as well
            measured = np.maximum(ns.score[lift] + ns.delta[lift], 0.0)
        ns.score[lift] = np.maximum(ns.score[lift], 0.0)
        if ns.delta is not None:
            ns.delta[lift] = measured - ns.score[lift]
    own = {a: float(ns.score[ns.bounds[0]:ns.bounds[1]].sum()) for a, ns in node_sets.items()}
    own_m = {a: own[a] + float(ns.delta[ns.bounds[0]:ns.bounds[1]].sum()) if ns.delta is not None else own[a]
             for a, ns in node_sets.items()}
    pz = zonerules.PSEUDO_ZONE["monoclinic"][0]
    sums, sums_m = {}, {}  # key -> every wanted sum, in the order columns() handed out (plain, group_loglik's)
    for key, keys in wanted.items():
        if keys:
            rule_set, ns = (tables.pseudo_rules, node_sets[pz]) if key == PSEUDO_SLOT else (tables.rule_sets[key], node_sets[key])
            distinct, back = np.unique(np.concatenate(keys), return_inverse=True)
            slots, rules = np.divmod(distinct, n_rules[key])
            plain_sums, measured_sums = _rule_sums(rule_set, rule_set.codes(ns.m, ns.n), ns, slots, rules)
            sums[key], sums_m[key] = plain_sums[back], measured_sums[back]
    sym = {a: np.array([_symmetry_term(prepared[a], ops) for ops in tables.ops[a]]) for a in prepared}
    # group_loglik takes no symmetry term from a zone whose Friedel pairs disagree: off its axis a
    # node's intensity is |F|² times its excitation, which differs between g and its images, so equal
    # |F| no longer means equal intensities and the term would favour the groups with the fewest
    # operations. The class likelihoods keep it: the decision rule was calibrated on them.
    sym_m = {a: v if prepared[a].friedel_ok else np.zeros_like(v) for a, v in sym.items()}
    pseudo_sym = None
    if wanted[PSEUDO_SLOT]:
        pseudo_sym = np.array([_symmetry_term(prepared[pz], ops) for ops in tables.pseudo_ops])
        if not prepared[pz].friedel_ok:
            pseudo_sym = np.zeros_like(pseudo_sym)
    for batch, fit, scored, rescue in plan:
        index = batch.index
        if scored is None:  # the class is not tested: every usable zone by its own lattice
            plain[index] = fit.loglik + sum(own.values()) + cellfit.OWN_LATTICE_OCCAM * max(len(own) - 1, 0)
            if not rescue:
                out[index] = fit.loglik + sum(own_m.values()) + cellfit.OWN_LATTICE_OCCAM * max(len(own_m) - 1, 0)
            continue
        true_zones, choices = scored
        other = sum(own[a] + cellfit.OWN_LATTICE_OCCAM for a in prepared if a not in true_zones)
        other_m = sum(own_m[a] + cellfit.OWN_LATTICE_OCCAM for a in prepared if a not in true_zones)
        sym_term = sym_term_m = 0.0
        for a in true_zones:
            sym_term = sym_term + sym[a][batch.ops_index[a]]
            sym_term_m = sym_term_m + sym_m[a][batch.ops_index[a]]
        best = np.full(len(index), -np.inf)
        best_pseudo = np.full(len(index), -np.inf)
        for slots, cols, larger in choices:
            total = np.zeros(len(index))
            total_m = np.zeros(len(index))  # group_loglik's: measured empty nodes
            for a in true_zones:  # (a cell multiple enters group_loglik alone: no plain total)
                if a not in slots:  # rank < 2: not a zone plane of this class
                    if not larger:
                        total = total + own[a]
                    total_m = total_m + own_m[a]
                else:
                    start, stop, pick = cols[a]
                    if not larger:
                        total = total + sums[a][start:stop][pick]
                    total_m = total_m + sums_m[a][start:stop][pick]
            if larger:  # a cell multiple: group_loglik only, the decision keeps the zones' cell
                total_m = total_m - CELL_MULTIPLE_NATS
            else:
                best = np.maximum(best, total)
            if PSEUDO_SLOT in slots:  # z as a zone of this β ≈ 90° cell, where that explains z better
                start, stop, pick = cols[PSEUDO_SLOT]
                zone = sums_m[PSEUDO_SLOT][start:stop][pick] + pseudo_sym[batch.pseudo_ops_index]
                total_m = total_m + np.maximum(zone - (own_m[pz] + cellfit.OWN_LATTICE_OCCAM), 0.0)
            best_pseudo = np.maximum(best_pseudo, total_m)
        if rescue:  # a class the zones' own fit prunes: group_loglik only
            out[index] = np.maximum(out[index], fit.loglik + best_pseudo + other_m + sym_term_m)
            continue
        plain[index] = fit.loglik + best + other + sym_term
        out[index] = fit.loglik + best_pseudo + other_m + sym_term_m
        for i in index:
            scales[i] = batch.divisors
    return out, plain, scales
