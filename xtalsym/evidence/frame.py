"""Analysis of ONE calibrated zone-axis frame: spots, the 2D lattice, every node's intensity, and
likelihoods for absences and 2D symmetry elements — or an explicit "cannot decide" and why.

Input: the float (count) frame on the training grid — what
:func:`xtalsym.offline.simulate.simulate_pattern` returns offline and what
:func:`xtalsym.daemon.calibrate.apply_map` returns live (before the 8-bit scaling) — its
reciprocal-space scale (Å⁻¹ per pixel) and its zone axis. The beam is at the grid centre.

Frame-level absences are stated on the lattice the spots generate (basis u, v): rows of it with
odd orders missing (screw axes), and the half-nodes (the cell being finer than it looks). Glide
and centring conditions of the conventional cell need the other zones too; they are evaluated
per space group by :mod:`xtalsym.evidence.sample`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from xtalsym.evidence import lattice2d, stats
from xtalsym.evidence import spots as spotfind

log = logging.getLogger(__name__)

AXES = ("x", "y", "z")
MIN_FRAME_PX = 32
MIN_SPOTS = 3  # indexed spots needed for a lattice (two independent vectors and a check)
MIN_INDEXED_SHARE = 0.6  # of the spots' intensity, else "no lattice found"
CENTRAL_RADIUS_PX = 6.0  # the central beam's main lobe and first side lobes
MAX_HALF_NODES = 2500  # bound on the half-grid measurement (large cells): keeps a frame < 2 ms
EDGE_MARGIN_PX = spotfind.PAD + 1


@dataclass
class FrameEvidence:
    """What one zone-axis frame shows. Arrays are numpy; :meth:`to_json` gives plain JSON."""

    axis: str
    decided: bool
    reason: str | None
    q_per_pixel: float
    q_min: float = 0.0  # Å⁻¹, the analysed annulus
    q_max: float = 0.0
    spots_x_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spots_y_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spots_intensity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spots_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spots_index: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    spots_indexed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    spots_residual_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    threshold: float = 0.0  # integrated intensity below which no spot is reported
    background_sigma: float = 0.0
    basis: np.ndarray | None = None  # (2, 2) rows u, v in Å⁻¹ (image x, y)
    basis_sigma: np.ndarray | None = None
    rms_px: float = float("nan")
    nodes_half: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # 2 × (m, n)
    nodes_q: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nodes_intensity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nodes_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wilson_q: np.ndarray = field(default_factory=lambda: np.array([0.0]))
    wilson_mean: np.ndarray = field(default_factory=lambda: np.array([0.0]))
    max_order: int = 0
    conditions: dict = field(default_factory=dict)
    symmetry: dict = field(default_factory=dict)
    point_group_2d: str | None = None
    warnings: list = field(default_factory=list)

    @property
    def n_spots(self) -> int:
        return int(len(self.spots_intensity))

    def scale_at(self, q: np.ndarray) -> np.ndarray:
        return stats.scale_at(q, self.wilson_q, self.wilson_mean)

    def to_json(self, *, spots: bool = False) -> dict:
        """Plain JSON (documented in docs/EVIDENCE.md); ``spots`` adds the spot list."""
        out = {
            "axis": self.axis, "decided": self.decided, "reason": self.reason,
            "q_range_inv_angstrom": [_r(self.q_min), _r(self.q_max)],
            "spots": self.n_spots, "indexed": int(self.spots_indexed.sum()),
            "max_order": int(self.max_order),
            "basis_inv_angstrom": None if self.basis is None else _r(self.basis.tolist()),
            "basis_sigma_inv_angstrom": None if self.basis_sigma is None else _r(self.basis_sigma.tolist(), 7),
            "rms_residual_px": _r(self.rms_px),
            "absences": self.conditions, "symmetry": self.symmetry, "point_group_2d": self.point_group_2d,
            "warnings": list(self.warnings),
        }
        if spots:
            out["spot_list"] = [
                {"x_px": _r(x), "y_px": _r(y), "intensity": _r(i, 6), "sigma": _r(s, 6),
                 "index": [int(m), int(n)] if ok else None, "residual_px": _r(res)}
                for x, y, i, s, (m, n), ok, res in zip(self.spots_x_px, self.spots_y_px, self.spots_intensity,
                                                       self.spots_sigma, self.spots_index, self.spots_indexed,
                                                       self.spots_residual_px)]
        return out


def _r(value, digits: int = 5):
    if isinstance(value, list):
        return [_r(v, digits) for v in value]
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _undecided(axis: str, q_per_pixel: float, reason: str, **extra) -> FrameEvidence:
    ev = FrameEvidence(axis=axis, decided=False, reason=reason, q_per_pixel=q_per_pixel, **extra)
    log.debug("frame %s: cannot decide: %s", axis, reason)
    return ev


def analyse_frame(image, *, axis: str, q_per_pixel: float, d_min_angstrom: float | None = None,
                  counts: bool | None = None, beam_stop_radius_px: float = 0.0) -> FrameEvidence:
    """Evidence from one calibrated zone-axis frame (float counts on the training grid).

    ``q_per_pixel``: Å⁻¹ per pixel of the grid (``Geometry.q_per_pixel``). ``d_min_angstrom``:
    analyse only |q| <= 1/d_min (default: the whole inscribed disc). ``counts``: Poisson noise
    per unit (default: True when every value is an integer). Never raises on bad data: a frame
    that cannot be analysed comes back with ``decided=False`` and ``reason``.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if not (isinstance(q_per_pixel, (int, float)) and math.isfinite(q_per_pixel) and q_per_pixel > 0):
        raise ValueError(f"q_per_pixel must be a positive number (Å⁻¹ per pixel), got {q_per_pixel!r}")
    arr = np.asarray(image)
    if arr.ndim != 2:
        return _undecided(axis, q_per_pixel, f"frame must be 2-D, got shape {arr.shape}")
    if min(arr.shape) < MIN_FRAME_PX:
        return _undecided(axis, q_per_pixel, f"frame too small: {arr.shape[1]}x{arr.shape[0]} px "
                                             f"(need at least {MIN_FRAME_PX} per side)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        return _undecided(axis, q_per_pixel, f"frame has non-numeric dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)  # flat offsets index it (no copy when it already is)
    peak = float(arr.max())  # NaN when any pixel is; with the minimum, every pixel is finite or not
    if not (math.isfinite(peak) and math.isfinite(float(arr.min()))):
        bad = ~np.isfinite(arr)
        return _undecided(axis, q_per_pixel, f"frame has {int(bad.sum())} non-finite pixels (NaN/inf)")
    if counts is None:
        sample = arr.ravel()[::97]  # a float frame shows non-integers at once; counts need the full check
        counts = bool(np.all(sample == np.rint(sample))) and bool(np.all(arr == np.rint(arr)))
    cy, cx = (arr.shape[0] - 1) / 2, (arr.shape[1] - 1) / 2
    r_edge = min(cx, cy) - EDGE_MARGIN_PX
    r_max = r_edge if d_min_angstrom is None else min(r_edge, 1.0 / (d_min_angstrom * q_per_pixel))
    r_min = max(CENTRAL_RADIUS_PX, beam_stop_radius_px + spotfind.RING_OUTER)
    base = dict(q_min=r_min * q_per_pixel, q_max=r_max * q_per_pixel)
    if peak <= 0:
        return _undecided(axis, q_per_pixel, "empty frame: no positive intensity", **base)
    found = spotfind.find_spots(arr, r_min_px=r_min, r_max_px=r_max, counts=counts)
    spot_fields = dict(spots_x_px=found.x_px, spots_y_px=found.y_px, spots_intensity=found.intensity,
                       spots_sigma=found.sigma, spots_index=np.zeros((len(found), 2), np.int64),
                       spots_indexed=np.zeros(len(found), bool), spots_residual_px=np.full(len(found), np.nan),
                       threshold=found.threshold, background_sigma=found.background_sigma, **base)
    if len(found) < MIN_SPOTS:
        return _undecided(axis, q_per_pixel, f"too few spots: {len(found)} found above the background "
                                             f"(need {MIN_SPOTS})", **spot_fields)
    points = np.stack([found.x_px, found.y_px], axis=1)
    lat = lattice2d.find_lattice(points, found.intensity)
    if lat is None:
        return _undecided(axis, q_per_pixel, f"no lattice found: {len(found)} spots share no 2D lattice",
                          **spot_fields)
    spot_fields.update(spots_index=lat.indices, spots_indexed=lat.indexed, spots_residual_px=lat.residual_px)
    share = float(found.intensity[lat.indexed].sum() / max(found.intensity.sum(), 1e-300))
    if lat.indexed.sum() < MIN_SPOTS or share < MIN_INDEXED_SHARE:
        return _undecided(axis, q_per_pixel, f"no lattice found: the best 2D lattice indexes {int(lat.indexed.sum())} "
                                             f"of {len(found)} spots ({share:.0%} of the intensity)", **spot_fields)
    ev = FrameEvidence(axis=axis, decided=True, reason=None, q_per_pixel=q_per_pixel,
                       basis=lat.basis_px * q_per_pixel, basis_sigma=lat.sigma_px * q_per_pixel,
                       rms_px=lat.rms_px, **spot_fields)
    ev.max_order = int(np.abs(lat.indices[lat.indexed]).max())
    _measure_nodes(ev, arr, lat.basis_px, r_min, r_max, counts)
    _conditions(ev)
    _symmetry(ev, lat.basis_px)
    if ev.max_order <= 1:
        ev.warnings.append(f"zone {axis}: first-order reflections only")
    return ev


def _measure_nodes(ev: FrameEvidence, arr: np.ndarray, basis_px: np.ndarray,
                   r_min: float, r_max: float, counts: bool) -> None:
    """Integrated intensity at every node and half-node of the lattice inside the annulus."""
    binv = lattice2d.inverse2(basis_px)
    (i00, i01), (i10, i11) = binv.tolist()
    span = int(math.ceil(r_max * max(abs(i00) + abs(i10), abs(i01) + abs(i11)))) + 1
    half = lattice2d.disc_nodes(basis_px / 2.0, r_max, 2 * span)  # the half-grid's disc, not its square
    pos = half @ basis_px / 2.0
    r = np.hypot(pos[:, 0], pos[:, 1])
    keep = (r >= r_min) & (r <= r_max)
    half, pos, r = half[keep], pos[keep], r[keep]
    if len(half) > MAX_HALF_NODES:  # big cells: integer nodes first, then half-nodes by |q|
        integer = _integer_nodes(half)
        order = np.lexsort((r, ~integer))[:MAX_HALF_NODES]
        half, pos, r = half[order], pos[order], r[order]
    value, sigma = spotfind.measure_at(arr, pos[:, 0], pos[:, 1],
                                       sigma_bg=ev.background_sigma, counts=counts)
    ev.nodes_half, ev.nodes_q = half, r * ev.q_per_pixel
    ev.nodes_intensity, ev.nodes_sigma = value, sigma
    integer = _integer_nodes(half)
    ev.wilson_q, ev.wilson_mean = stats.wilson_scale(ev.nodes_q[integer], value[integer])


def _integer_nodes(half: np.ndarray) -> np.ndarray:
    """Which half-grid nodes (2m, 2n) are lattice nodes: both even (two's complement: & 1 is the parity)."""
    return ((half[:, 0] | half[:, 1]) & 1) == 0


def _node_llrs(ev: FrameEvidence) -> np.ndarray:
    """Per node: log p(absent) − log p(allowed) of its measured intensity."""
    scale = ev.scale_at(ev.nodes_q)
    sig = stats.total_sigma(ev.nodes_sigma, scale)
    val = ev.nodes_intensity
    return stats.log_absent(val, sig) - stats.log_allowed(val, sig, scale)


def _verdict(llr: float, n: int) -> str:
    if n < 2:
        return "cannot decide: fewer than 2 nodes measured"
    if llr > 5:
        return "absent"
    if llr < -5:
        return "present"
    return "cannot decide: the intensities are ambiguous"


_CONDITIONS = ("row u: odd orders absent", "row v: odd orders absent", "row u+v: odd orders absent",
               "row u-v: odd orders absent", "half-nodes (u/2) absent", "half-nodes (v/2) absent",
               "half-nodes ((u+v)/2) absent")


def _conditions(ev: FrameEvidence) -> None:
    h = ev.nodes_half
    m2, n2 = h[:, 0], h[:, 1]
    odd_m2, odd_n2 = m2 % 2 == 1, n2 % 2 == 1
    m, n = m2 // 2, n2 // 2
    odd_m = m % 2 == 1
    # the classes are disjoint (a node is in at most one row, and half-nodes by parity), so one
    # class code per node and a weighted count give every condition's sum; 7 = in none
    code = np.full(len(h), 7, np.int64)
    integer = ~odd_m2 & ~odd_n2
    code[integer & (n == 0) & odd_m] = 0
    code[integer & (m == 0) & (n % 2 == 1)] = 1
    code[integer & (m == n) & odd_m] = 2
    code[integer & (m == -n) & odd_m] = 3
    code[odd_m2 & ~odd_n2] = 4
    code[~odd_m2 & odd_n2] = 5
    code[odd_m2 & odd_n2] = 6
    per_node = _node_llrs(ev) if len(h) else np.zeros(0)
    llrs = np.bincount(code, weights=per_node, minlength=8).tolist()
    counts = np.bincount(code, minlength=8).tolist()
    for i, name in enumerate(_CONDITIONS):
        llr, k = llrs[i], counts[i]
        ev.conditions[name] = {"log_likelihood_ratio": round(llr, 3), "nodes": k, "verdict": _verdict(llr, k)}


def _symmetry(ev: FrameEvidence, basis_px: np.ndarray) -> None:
    """Log-likelihood ratio (equal vs independent intensities) for each lattice operation."""
    h = ev.nodes_half
    integer = _integer_nodes(h)
    nodes = h[integer] // 2
    value, sigma, q = ev.nodes_intensity[integer], ev.nodes_sigma[integer], ev.nodes_q[integer]
    scale = ev.scale_at(q)
    significant = value > np.maximum(3 * stats.total_sigma(sigma, scale), ev.threshold)
    span = int(np.abs(nodes).max()) + 1 if len(nodes) else 1
    width = 2 * span + 1
    lookup = np.full(width * width, -1, np.int64)
    keys = (nodes[:, 0] + span) * width + (nodes[:, 1] + span)
    lookup[keys] = np.arange(len(nodes))
    ops = lattice2d.lattice_operations(basis_px)
    # every operation at once, (ops, nodes): each node's image under each operation and its partner
    images = nodes @ np.array([op.matrix for op in ops], np.int64).reshape(-1, 2, 2)
    inside = np.all(np.abs(images) <= span, axis=2)
    partner = np.where(inside, lookup[np.where(inside, (images[..., 0] + span) * width + (images[..., 1] + span), 0)], -1)
    use = (partner > np.arange(len(nodes))) & (significant | significant[np.maximum(partner, 0)])
    op_of_pair, a = np.nonzero(use)  # operation-major, nodes ascending within one
    b = partner[op_of_pair, a]
    # every operation's pairs in one likelihood call (elementwise: the same numbers), summed per operation
    llr_all = stats.pair_llr(value[a], sigma[a], value[b], sigma[b], np.maximum(scale[a], scale[b]))
    start = 0
    for op, n_pairs in zip(ops, use.sum(axis=1).tolist()):
        total = float(llr_all[start:start + n_pairs].sum())
        start += n_pairs
        ev.symmetry[op.name] = {"kind": op.kind, "angle_deg": round(op.angle_deg, 2),
                                "log_likelihood_ratio": round(total, 3), "pairs": n_pairs,
                                "matrix": op.matrix.tolist(), "verdict": _verdict(total, n_pairs)
                                .replace("absent", "symmetric").replace("present", "not symmetric")}
    ev.point_group_2d = _summary_point_group(ev.symmetry)


def _summary_point_group(symmetry: dict) -> str:
    """The highest 2D group whose elements the intensities support (LLR > 0 each)."""
    ok = {name for name, s in symmetry.items() if s["log_likelihood_ratio"] > 0 and s["pairs"] >= 2}
    rot = 6 if "6" in ok else 4 if "4" in ok else 3 if "3" in ok else 2
    if rot == 3:
        rot = 6  # Friedel: a 3-fold intensity pattern is 6-fold
    mirrors = [n for n in ok if n.startswith("m")]
    return f"{rot}mm" if mirrors else str(rot)
