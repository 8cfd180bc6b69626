"""The zones of one sample together: cell, likelihoods of the 7 crystal systems, the 14 Bravais
lattices and each of the 230 space groups, and what the evidence cannot separate.

Group log-likelihood = metric term (the group's metric class fitted to the zones, with Occam
factors, :mod:`.cell`) + absence term + zone-symmetry term, with the group's conventional cell
taken as the measured apparent cell times the group's apparent-cell divisors (an F cubic group's
zones look like a P cell of half the edge; symmetry.apparent_cell_divisors). Groups of a metric
class that fits the zones ``PRUNE_METRIC_NATS`` worse than the best class are not scored (they
get the floor of the vector).

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
over groups within a class). A class is *decided* when its log-odds against all others together
reach ``DECIDE_LOG_ODDS``; otherwise the classes within reach are named in a warning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from xtalsym import spacegroups, symmetry
from xtalsym.evidence import cell as cellfit
from xtalsym.evidence import stats, zonerules
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


def _prepare(ev: FrameEvidence) -> _ZoneData:
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
    noise = float(np.median(ev.nodes_sigma)) if len(ev.nodes_sigma) else 0.0
    threshold = ev.threshold

    def empty_llr(q_nodes: np.ndarray) -> np.ndarray:
        sc = ev.scale_at(q_nodes)
        s = stats.total_sigma(noise, sc)
        return stats.log_below_allowed(threshold, s, sc) - stats.log_below_absent(threshold, s)

    return _ZoneData(ev, points, ev.q_min / ev.q_per_pixel, ev.q_max / ev.q_per_pixel, spot_llr, empty_llr)


def _node_scores(zd: _ZoneData, basis_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (m, n) of a 2D lattice (rows u, v in px) inside the annulus, and each node's score if
    allowed (relative to "nothing there"); an absent node scores 0."""
    binv = np.linalg.inv(basis_px)
    span = int(math.ceil(zd.r_max * np.abs(binv).sum(axis=0).max())) + 1
    span = min(span, 200)
    g = np.arange(-span, span + 1)
    mm, nn = np.meshgrid(g, g, indexing="ij")
    nodes = np.stack([mm.ravel(), nn.ravel()], 1)
    pos = nodes @ basis_px
    r = np.hypot(pos[:, 0], pos[:, 1])
    keep = (r >= zd.r_min) & (r <= zd.r_max)
    width = 2 * span + 1
    where = np.full(width * width, -1, np.int64)  # grid key -> position among the kept nodes
    where[np.flatnonzero(keep)] = np.arange(int(keep.sum()))
    nodes, r = nodes[keep], r[keep]
    score = zd.empty_llr_fn(r * zd.frame.q_per_pixel)
    if len(zd.points) and len(nodes):
        frac = zd.points @ binv
        idx = np.rint(frac).astype(np.int64)
        resid = np.hypot(*((frac - idx) @ basis_px).T)
        on = (resid <= NODE_TOLERANCE_PX) & np.all(np.abs(idx) <= span, axis=1)
        pos_on = where[(idx[on, 0] + span) * width + (idx[on, 1] + span)]
        hit = pos_on >= 0
        if hit.any():
            best = np.full(len(nodes), -np.inf)
            np.maximum.at(best, pos_on[hit], zd.spot_llr[on][hit])  # the brightest spot of a node
            score = np.where(np.isfinite(best), best, score)
    return nodes, score


def _own_lattice_score(zd: _ZoneData) -> float:
    nodes, score = _node_scores(zd, zd.frame.basis / zd.frame.q_per_pixel)
    return float(score.sum())


def _zone_basis_px(lattice: np.ndarray, plane: zonerules.ZonePlane, axis: str, q_per_pixel: float) -> np.ndarray:
    rec = np.linalg.inv(lattice).T  # rows a*, b*, c* (no 2π)
    _, ix, iy = (np.array(v) for v in symmetry.zone_image_axes(axis))
    g = np.array(plane.basis_hkl, float) @ rec
    return np.stack([g @ ix, g @ iy], 1) / q_per_pixel


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
    zone_vectors = {
        a: cellfit.ZoneVectors(a, cellfit.embed(a, ev.basis), ev.q_per_pixel,
                               float(np.max(ev.basis_sigma)) if ev.basis_sigma is not None else 0.0)
        for a, ev in usable.items()}
    fits = {m: cellfit.fit_metric(m, zone_vectors) for m in cellfit.METRIC_CLASSES}
    feasible = {m: f for m, f in fits.items() if f.feasible}
    if not feasible:
        return _undecided(frames, warnings_, "; ".join(f"{m}: {f.reason}" for m, f in fits.items()))
    prepared = {a: _prepare(ev) for a, ev in usable.items()}
    own = {a: _own_lattice_score(zd) for a, zd in prepared.items()}
    group_ll, group_scale = _group_logliks(fits, prepared, own)
    system_ll = _class_logliks(group_ll, _SYSTEM_LABELS, CRYSTAL_SYSTEMS)
    bravais_ll = _class_logliks(group_ll, _bravais_labels(), BRAVAIS_LATTICES)
    system, system_ok = _decide(system_ll)
    bravais, bravais_ok = _decide(bravais_ll)
    tested = {m: f for m, f in feasible.items() if not f.partial}
    best_metric = max(tested or feasible, key=lambda m: (tested or feasible)[m].loglik)
    best_fit = feasible[best_metric]
    cell_by_bravais = {}
    labels = _bravais_labels()
    for name in BRAVAIS_LATTICES:
        members = [int(g) for g, lab in zip(GROUPS, labels) if lab == name]
        g = max(members, key=lambda x: group_ll[x - 1])
        fit = fits[symmetry.metric_class(int(g))]
        if fit.feasible and not fit.partial and fit.cell is not None and np.isfinite(group_ll[g - 1]):
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
        warnings_.append(f"crystal system not decided: {'/'.join(_within_reach(system_ll))} remain possible")
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
    return SampleEvidence(
        cell=best_fit.cell, cell_sigma=best_fit.cell_sigma, metric_class=None if best_fit.partial else best_metric,
        crystal_system_loglik=system_ll, bravais_loglik=bravais_ll, group_loglik=group_ll,
        decided=system_ok, crystal_system=system if system_ok else None, bravais=bravais if bravais_ok else None,
        warnings=warnings_, reason=reason, cell_by_bravais=cell_by_bravais, zones=dict(frames),
        metric_loglik={m: round(f.loglik, 3) for m, f in fits.items() if f.feasible})


def _undecided(frames, warnings_, reason: str) -> SampleEvidence:
    return SampleEvidence(
        cell=None, cell_sigma=None, metric_class=None,
        crystal_system_loglik={s: 0.0 for s in CRYSTAL_SYSTEMS}, bravais_loglik={b: 0.0 for b in BRAVAIS_LATTICES},
        group_loglik=np.zeros(230), decided=False, crystal_system=None, bravais=None,
        warnings=warnings_ + [f"cannot decide: {reason}"], reason=reason, zones=dict(frames))


def _class_logliks(group_ll: np.ndarray, labels: list[str], names) -> dict[str, float]:
    out = {}
    labels = np.array(labels)
    for name in names:
        sel = group_ll[labels == name]
        sel = sel[np.isfinite(sel)]
        out[name] = float(logsumexp(sel) - math.log(len(labels[labels == name]))) if len(sel) else -1e4
    best = max(out.values())
    return {k: v - best for k, v in out.items()}


def _decide(table: dict[str, float]) -> tuple[str, bool]:
    keys = list(table)
    values = np.array([table[k] for k in keys])
    i = int(np.argmax(values))
    rest = logsumexp(np.delete(values, i))
    return keys[i], bool(values[i] - rest >= DECIDE_LOG_ODDS)


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


_GROUP_TABLE: list[_GroupInfo] = []


def group_table() -> list[_GroupInfo]:
    """Per-group metric class, apparent-cell divisors, zone rules (built once, ~seconds)."""
    if not _GROUP_TABLE:
        for g in GROUPS:
            g = int(g)
            _GROUP_TABLE.append(_GroupInfo(
                group=g, metric=symmetry.metric_class(g), divisors=zonerules.apparent_divisors(g),
                rules={a: zonerules.absence_rules(g, a) for a in symmetry.ZONES},
                ops={a: zonerules.intensity_ops(g, a) for a in symmetry.ZONES}))
    return _GROUP_TABLE


_SYSTEM_LABELS = [spacegroups.crystal_system(int(g)) for g in GROUPS]
_BRAVAIS_LABELS: list[str] = []


def _bravais_labels() -> list[str]:
    if not _BRAVAIS_LABELS:
        _BRAVAIS_LABELS.extend(symmetry.bravais_lattice(int(g)) for g in GROUPS)
    return _BRAVAIS_LABELS


def _group_logliks(fits: dict[str, cellfit.MetricFit], prepared: dict[str, _ZoneData], own: dict[str, float]
                   ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Log-likelihood of every group, and the cell multiple that gave it."""
    out = np.full(230, -np.inf)
    scales: list[tuple[int, int, int]] = [(1, 1, 1)] * 230
    node_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    sum_cache: dict[tuple, float] = {}  # (node set, rules) -> allowed score
    sym_cache: dict[tuple, float] = {}
    best_metric = max(f.loglik for f in fits.values() if f.feasible)
    for info in group_table():
        g, metric = info.group, info.metric
        fit = fits[metric]
        if not fit.feasible or fit.loglik < best_metric - PRUNE_METRIC_NATS:
            continue
        if fit.partial:  # the class is not tested: every usable zone by its own lattice
            out[g - 1] = fit.loglik + sum(own.values()) + cellfit.OWN_LATTICE_OCCAM * max(len(own) - 1, 0)
            continue
        true_zones = [a for a in cellfit.TRUE_ZONES[metric] if a in prepared]
        other = sum(own[a] + cellfit.OWN_LATTICE_OCCAM for a in prepared if a not in true_zones)
        sym = 0.0
        for a in true_zones:
            ops = info.ops[a]
            key = (a, ops)
            if key not in sym_cache:
                sym_cache[key] = sum(s["log_likelihood_ratio"] for s in prepared[a].frame.symmetry.values()
                                     if ops.rotation_order and ops.has(s["kind"], s["angle_deg"]))
            sym += sym_cache[key]
        scale = info.divisors
        best = -np.inf
        for choice, lattice in enumerate(fit.lattices(scale)):
            total = 0.0
            for a in true_zones:
                plane = zonerules.zone_plane(metric, a)
                if plane.rank < 2:
                    total += own[a]
                    continue
                ck = (metric, a, scale, choice)
                if ck not in node_cache:
                    basis_px = _zone_basis_px(lattice, plane, a, prepared[a].frame.q_per_pixel)
                    node_cache[ck] = _node_scores(prepared[a], basis_px)
                sk = (ck, info.rules[a].key)
                if sk not in sum_cache:
                    nodes, score = node_cache[ck]
                    absent = info.rules[a].absent(nodes[:, 0], nodes[:, 1])
                    sum_cache[sk] = float(score[~absent].sum())
                total += sum_cache[sk]
            best = max(best, total)
        best_scale = scale
        out[g - 1] = fit.loglik + best + other + sym
        scales[g - 1] = best_scale
    return out, scales
