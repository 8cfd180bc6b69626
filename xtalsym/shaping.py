"""Shaped diffraction patterns (Tiong et al. 2020) and Ziletti spot descriptors.

Shared by the offline dataset builder and the live daemon.

The authors' algorithm (their ``Shaped_DP.py``; DESIGN.md, "Shaped DP as the
authors compute it") on a 256x256 8-bit raw DP with the beam at (127, 127):

1. ``normalise``: the central 22x22 square is set aside, the rest rescaled to
   ``im / im.max() * 256`` (float32), the centre's raw values put back.
2. every pixel with ``im >= 50`` is a node.
3. over ordered node pairs sharing neither row nor column, the authors'
   distance ``sqrt((dx^2 - 1) + (dy^2 - 1))`` is collected when ``>= 10``;
   ``thr = 1.7 * min`` of those.
4. a line (255) joins every admissible pair (neither row nor column shared)
   whose true Euclidean distance is ``<= thr`` -- no ``>= 10`` condition when
   drawing -- or every admissible pair when at most 100 distances were
   collected. Lines are the authors' ``round(linspace(p, q, max(|dx|,|dy|)))``
   points (one point fewer than Bresenham), drawn in both directions.
5. the line channel (x->R, y->G, z->B) is 255 on line pixels where
   ``im <= 5`` and ``im`` elsewhere ("raw pixels > 5 kept on top"); the other
   two channels are ``im``. Conversion to uint8 truncates like their
   ``astype(np.uint8)`` but clips 256 to 255 instead of wrapping to 0.

``shape_reference`` follows this pixel for pixel (vectorised, bounded by
``MAX_REFERENCE_NODES``). ``shape_fast`` groups nodes into spots
(8-connected components), selects spot pairs -- exactly those the reference
joins by at least one segment when there are <= ``FAST_EXACT_MAX_NODES`` node
pixels, else by the 1.7 x min rule on estimated nearest-pixel spot gaps --
and fills the convex hull of the two spots' pixels for each, so band width
follows spot size and single-pixel spots give 1-px lines.

Line pixels are recoverable from any output: ``line_mask`` marks the pixels
where the line channel exceeds both other channels.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

AXES = ("x", "y", "z")
AXIS_CHANNEL = {"x": 0, "y": 1, "z": 2}
RAW_SIZE = 256
MODEL_SIZE = 224

# Authors' constants.
CENTRE_SLICE = (slice(116, 138), slice(116, 138))  # 22x22 around (127, 127)
NODE_THRESHOLD = 50.0
MIN_DISTANCE = 10.0
TOLERANCE = 1.7
ALL_PAIRS_MAX_DISTANCES = 100
KEEP_RAW_ABOVE = 5.0
LINE_VALUE = 255.0

# The reference is O(P^2) in node pixels: above this it raises ShapingError
# (a saturated frame has 65,536 nodes and would need ~4e9 pairs).
MAX_REFERENCE_NODES = 2000
# Segments per vectorised block in the reference (<= 255 points each: bounds memory).
_SEGMENT_BLOCK = 30_000


# The fast path selects spot pairs from exact pixel pairs up to this many node
# pixels (cheap there, and exact), and from spot gaps beyond (O(spots^2)).
FAST_EXACT_MAX_NODES = 128


class ShapingError(ValueError):
    """A frame that cannot be shaped (wrong shape/dtype, NaN/inf, negative...)."""


# --------------------------------------------------------------------------
# validation and normalisation


def _check_axis(axis: str) -> int:
    if axis not in AXIS_CHANNEL:
        raise ShapingError(f"axis must be one of {AXES}, got {axis!r}")
    return AXIS_CHANNEL[axis]


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ShapingError(f"size must be a positive int, got {size!r}")
    return int(size)


def _validated_float(raw: np.ndarray) -> np.ndarray:
    """Raw frame as float32 on the authors' 0..255 scale."""
    if not isinstance(raw, np.ndarray):
        raise ShapingError(f"raw frame must be a numpy array, got {type(raw).__name__}")
    if raw.shape != (RAW_SIZE, RAW_SIZE):
        raise ShapingError(f"raw frame must have shape {(RAW_SIZE, RAW_SIZE)}, got {raw.shape}")
    if raw.dtype == np.uint8:
        return raw.astype(np.float32)
    if not np.issubdtype(raw.dtype, np.floating):
        raise ShapingError(f"raw frame dtype must be uint8 or floating, got {raw.dtype}")
    values = raw.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite][0]
        raise ShapingError(f"raw frame has {int((~finite).sum())} non-finite pixels (e.g. {bad})")
    low = values.min()
    if low < 0:
        raise ShapingError(f"raw frame has negative pixels (min {low})")
    top = values.max()
    # Floats are scaled linearly to 0..255 by their own max (all-zero stays zero).
    scaled = values / top * 255.0 if top > 0 else values
    return scaled.astype(np.float32)


def _normalised_float(raw: np.ndarray) -> np.ndarray | None:
    """The authors' float32 ``im``; None when nothing outside the centre is lit.

    In that case the authors return the raw frame in all three channels.
    """
    temp = _validated_float(raw)
    aside = temp.copy()
    aside[CENTRE_SLICE] = 0.0
    top = aside.max()
    if top == 0:
        return None
    im = (aside / top) * np.float32(256.0)
    im[CENTRE_SLICE] = temp[CENTRE_SLICE]
    return im


def _to_uint8(values: np.ndarray) -> np.ndarray:
    # Truncation as their astype(np.uint8); 256 clipped instead of wrapped to 0.
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


def normalise(raw: np.ndarray) -> np.ndarray:
    """The authors' centre-aside rescale as uint8 (256, 256).

    Accepts uint8 or float raw frames (floats are first scaled linearly to
    0..255 by their max). A frame dark outside the centre is returned as is.
    """
    im = _normalised_float(raw)
    if im is None:
        return _to_uint8(_validated_float(raw))
    return _to_uint8(im)


# --------------------------------------------------------------------------
# reference: the authors' pixel-pair algorithm


def _node_pixels(im: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(im >= NODE_THRESHOLD)  # row-major, as their loops
    return rows.astype(np.int64), cols.astype(np.int64)


def _pair_geometry(
    rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Admissible mask, true distance and authors' min-distance for all ordered pairs."""
    dr = rows[:, None] - rows[None, :]
    dc = cols[:, None] - cols[None, :]
    admissible = (dr != 0) & (dc != 0)
    d2 = dr * dr + dc * dc
    true_dist = np.sqrt(d2.astype(np.float64))
    # Their min uses sqrt((dx^2 - 1) + (dy^2 - 1)); >= 0 on admissible pairs.
    their_dist = np.sqrt(np.maximum(d2 - 2, 0).astype(np.float64))
    return admissible, true_dist, their_dist


def _draw_threshold(admissible: np.ndarray, their_dist: np.ndarray) -> float:
    """Distance up to which admissible pairs are joined (inf: join all)."""
    far = admissible & (their_dist >= MIN_DISTANCE)
    if int(far.sum()) <= ALL_PAIRS_MAX_DISTANCES:
        return float("inf")
    return TOLERANCE * float(their_dist[far].min())


def _authors_line_points(
    start_r: np.ndarray, start_c: np.ndarray, end_r: np.ndarray, end_c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """round(linspace(start, end, max(|dr|, |dc|))) for many segments at once.

    Mirrors numpy.linspace arithmetic (arange * step + start, last = end) and
    np.round's half-to-even, so the pixels equal the authors' loop exactly.
    """
    counts = np.maximum(np.abs(end_r - start_r), np.abs(end_c - start_c))
    owner = np.repeat(np.arange(counts.size), counts)
    offsets = np.cumsum(counts) - counts
    t = np.arange(owner.size, dtype=np.float64) - offsets[owner]
    div = np.maximum(counts - 1, 1).astype(np.float64)
    step_r = (end_r - start_r) / div
    step_c = (end_c - start_c) / div
    r = t * step_r[owner] + start_r[owner]
    c = t * step_c[owner] + start_c[owner]
    last = (t == counts[owner] - 1) & (counts[owner] > 1)
    r[last] = end_r[owner][last]
    c[last] = end_c[owner][last]
    return np.rint(r).astype(np.intp), np.rint(c).astype(np.intp)


def _reference_drawn(im: np.ndarray) -> np.ndarray:
    """Boolean image of every pixel the authors' plot_edge sets to 255."""
    drawn = np.zeros(im.shape, dtype=bool)
    rows, cols = _node_pixels(im)
    if rows.size > MAX_REFERENCE_NODES:
        raise ShapingError(
            f"{rows.size} node pixels (>= {NODE_THRESHOLD:g}) exceed the reference "
            f"limit of {MAX_REFERENCE_NODES}; use method='fast'"
        )
    if rows.size < 2:
        return drawn
    admissible, true_dist, their_dist = _pair_geometry(rows, cols)
    threshold = _draw_threshold(admissible, their_dist)
    first, second = np.nonzero(admissible & (true_dist <= threshold))
    # Their line runs from the inner-loop pixel (second) to the outer one (first).
    for lo in range(0, first.size, _SEGMENT_BLOCK):
        f = first[lo : lo + _SEGMENT_BLOCK]
        s = second[lo : lo + _SEGMENT_BLOCK]
        r, c = _authors_line_points(rows[s], cols[s], rows[f], cols[f])
        drawn[r, c] = True
    return drawn


# --------------------------------------------------------------------------
# fast: spots and convex hulls


def _spots(im: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Node pixels grouped by 8-connected spot: rows, cols, label, spot starts."""
    mask = (im >= NODE_THRESHOLD).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    order = np.argsort(lab, kind="stable")
    rows, cols, lab = rows[order].astype(np.int64), cols[order].astype(np.int64), lab[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if lab.size else lab
    return rows, cols, lab, starts


def _spot_pairs_exact(rows: np.ndarray, cols: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(k, 2) spot pairs i<j for which the reference draws at least one segment.

    O(P^2) in node pixels, so used only up to ``FAST_EXACT_MAX_NODES``.
    """
    admissible, true_dist, their_dist = _pair_geometry(rows, cols)
    joined = admissible & (true_dist <= _draw_threshold(admissible, their_dist))
    # Any joined pixel pair between spots i and j -> spot pair (i, j).
    per_spot = np.logical_or.reduceat(np.logical_or.reduceat(joined, starts, axis=0), starts, axis=1)
    i, j = np.nonzero(np.triu(per_spot, k=1))
    return np.stack([i, j], axis=1)


def _spot_pairs_gap(rows: np.ndarray, cols: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(k, 2) spot pairs i<j joined by the 1.7 x min rule on spot gaps.

    The reference measures pixel pairs, so a spot pair's distance is its
    nearest-pixel gap, estimated in O(spots^2) as the centroid distance minus
    both spot radii (max pixel distance from the centroid). The ">= 10" rule,
    the 100-distance count (2 * n_i * n_j pixel pairs per spot pair) and the
    no-shared-row/column rule for single-pixel spots follow the reference.
    """
    sizes = np.diff(np.r_[starts, rows.size])
    owner = np.repeat(np.arange(sizes.size), sizes)
    cy = np.add.reduceat(rows, starts) / sizes
    cx = np.add.reduceat(cols, starts) / sizes
    radius = np.maximum.reduceat(np.hypot(rows - cy[owner], cols - cx[owner]), starts)
    centre_dist = np.hypot(cy[:, None] - cy[None, :], cx[:, None] - cx[None, :])
    gap = np.maximum(centre_dist - radius[:, None] - radius[None, :], 0.0)
    single = sizes == 1
    aligned = (single[:, None] & single[None, :]) & (
        (cy[:, None] == cy[None, :]) | (cx[:, None] == cx[None, :])
    )
    upper = np.triu(~aligned, k=1)
    far = upper & (gap >= MIN_DISTANCE)
    n_distances = 2 * float((np.outer(sizes, sizes) * far).sum())
    if n_distances <= ALL_PAIRS_MAX_DISTANCES:
        joined = upper
    else:
        joined = upper & (gap <= TOLERANCE * gap[far].min())
    i, j = np.nonzero(joined)
    return np.stack([i, j], axis=1)


def _fast_drawn(im: np.ndarray) -> np.ndarray:
    """Boolean image of the convex-hull bands between selected spot pairs."""
    canvas = np.zeros(im.shape, dtype=np.uint8)
    rows, cols, _, starts = _spots(im)
    if starts.size < 2:
        return canvas.astype(bool)
    if rows.size <= FAST_EXACT_MAX_NODES:
        pairs = _spot_pairs_exact(rows, cols, starts)
    else:
        pairs = _spot_pairs_gap(rows, cols, starts)
    if pairs.size == 0:
        return canvas.astype(bool)
    points = np.stack([cols, rows], axis=1).astype(np.int32)  # cv2 wants (x, y)
    ends = np.r_[starts[1:], rows.size]
    hulls = [cv2.convexHull(points[a:b]) for a, b in zip(starts, ends)]
    for i, j in pairs:
        hull = cv2.convexHull(np.concatenate([hulls[i], hulls[j]]))
        cv2.fillConvexPoly(canvas, hull, 1)
    return canvas.astype(bool)


# --------------------------------------------------------------------------
# assembly


def _compose(im: np.ndarray, drawn: np.ndarray, channel: int) -> np.ndarray:
    """Line channel: 255 on drawn pixels unless raw > 5 there; others: im."""
    line = np.where(drawn & ~(im > KEEP_RAW_ABOVE), np.float32(LINE_VALUE), im)
    out = np.repeat(_to_uint8(im)[:, :, None], 3, axis=2)
    out[:, :, channel] = _to_uint8(line)
    return out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if size == RAW_SIZE:
        return image
    # Pixel-centre nearest neighbour, as PIL's NEAREST the authors used.
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


def _shape_with(raw: np.ndarray, axis: str, size: int, drawer) -> np.ndarray:
    channel = _check_axis(axis)
    size = _check_size(size)
    im = _normalised_float(raw)
    if im is None:  # dark outside the centre: raw in all channels, no lines
        flat = _to_uint8(_validated_float(raw))
        return _resize(np.repeat(flat[:, :, None], 3, axis=2), size)
    return _resize(_compose(im, drawer(im), channel), size)


def shape_reference(raw: np.ndarray, axis: str, *, size: int = MODEL_SIZE) -> np.ndarray:
    """Shaped DP by the authors' pixel-pair algorithm: uint8 (size, size, 3).

    ``size=RAW_SIZE`` gives the 256 image to compare with the authors' samples.
    Raises ShapingError above ``MAX_REFERENCE_NODES`` node pixels.
    """
    return _shape_with(raw, axis, size, _reference_drawn)


def shape_fast(raw: np.ndarray, axis: str, *, size: int = MODEL_SIZE) -> np.ndarray:
    """Shaped DP from spots and convex-hull bands: uint8 (size, size, 3)."""
    return _shape_with(raw, axis, size, _fast_drawn)


_METHODS = {"fast": shape_fast, "reference": shape_reference}


def shape(
    raw: np.ndarray, axis: str, *, method: str = "fast", size: int = MODEL_SIZE
) -> np.ndarray:
    """Shaped DP by ``method`` ("fast" or "reference")."""
    if method not in _METHODS:
        raise ShapingError(f"method must be one of {tuple(_METHODS)}, got {method!r}")
    return _METHODS[method](raw, axis, size=size)


def line_mask(shaped: np.ndarray, axis: str, *, tolerance: int = 0) -> np.ndarray:
    """Visible line pixels of a shaped DP: line channel > both others + tolerance.

    Exact (tolerance 0) for this module's outputs, where the channels differ
    only on line pixels; use a tolerance (e.g. 100) for lossy JPEG samples.
    Lines hidden under raw pixels > 5 are, by construction, not visible.
    """
    channel = _check_axis(axis)
    if not isinstance(shaped, np.ndarray) or shaped.ndim != 3 or shaped.shape[2] != 3:
        shape_ = getattr(shaped, "shape", None)
        raise ShapingError(f"shaped image must be (h, w, 3), got {shape_}")
    values = shaped.astype(np.int16)
    others = [values[:, :, k] for k in range(3) if k != channel]
    return values[:, :, channel] > np.maximum(*others) + tolerance


def spot_descriptor(raws: Mapping[str, np.ndarray], *, size: int = MODEL_SIZE) -> np.ndarray:
    """Ziletti et al. spot DP: normalised x, y, z raw DPs as R, G, B (uint8)."""
    size = _check_size(size)
    missing = [a for a in AXES if a not in raws]
    if missing:
        raise ShapingError(f"spot_descriptor needs axes {AXES}, missing {missing}")
    image = np.stack([normalise(raws[a]) for a in AXES], axis=2)
    return _resize(image, size)
