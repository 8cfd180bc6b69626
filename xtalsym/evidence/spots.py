"""Spots in one calibrated zone-axis frame: sub-pixel centroids and integrated intensities.

Works on the float (count) frame on the training grid (beam at ((N−1)/2, (N−1)/2)), never on
the 8-bit raw DP: normalised to the central beam, weak structures lose their reflections in
8 bits. Everything is vectorised over candidates (no per-spot Python loop): a 256² frame costs
well under a millisecond.

Integration: a BOX×BOX sum around the brightest pixel minus BOX² × the median of a ring of
pixels at 3.5–4.5 px (the local background: diffuse scattering, the tails of the central beam).
Noise per pixel: the background's robust spread (MAD) plus Poisson variance for count frames
(``counts=True``: one count is one unit). Noise-free simulated frames get no noise term;
the likelihoods add a systematic floor (:mod:`xtalsym.evidence.stats`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from xtalsym.evidence import stats

BOX = 5  # integration box (px): the main lobe of an 85 Å block is ~2.2 px to its first zero
RING_INNER, RING_OUTER = 3.5, 4.5  # local-background ring (px)
NMS_SIZE = 9  # local-maximum window (px): removes a spot's first side lobes (~3.3 px out)
# The shape transform of a finite block streaks every spot (the central beam most) along the
# block's edges: |Dirichlet|²/n² <= (w / (π d))² at d px, w = 1/(edge length) in px (2.2 px for
# 85 Å blocks at the default geometry). A candidate below SIDELOBE_SAFETY × that envelope of a
# brighter peak is taken for one of its side lobes.
SIDELOBE_WIDTH_PX = 2.5
SIDELOBE_SAFETY = 4.0
DETECT_SIGMA = 5.0  # a spot must exceed this many σ of its integrated intensity
DETECT_RELATIVE = 4e-3  # ... and this fraction of the strongest spots (noise-free frames, side lobes)
# ... and this fraction of the central beam: where the rods of strong reflections of other
# layers cross the zone plane (a block's shape transform) they leave spots at ~1e-3 of their
# parent; in a zone whose own reflections are weak those would otherwise pass as reflections.
DETECT_CENTRAL = 5e-4
BACKGROUND_STRIDE = 7
HALF = BOX // 2
PATCH = 2 * int(np.ceil(RING_OUTER)) + 1  # 9: the patch holding box and ring
PAD = PATCH // 2 + 1

_yy, _xx = np.mgrid[-(PATCH // 2):PATCH // 2 + 1, -(PATCH // 2):PATCH // 2 + 1]
_R = np.hypot(_yy, _xx)
_RING = (_R >= RING_INNER) & (_R <= RING_OUTER)
_BOXMASK = (np.abs(_yy) <= HALF) & (np.abs(_xx) <= HALF)
_NMS_KERNEL = np.ones((NMS_SIZE, NMS_SIZE), np.uint8)


@functools.lru_cache(maxsize=8)
def radius_grid(shape: tuple[int, int]) -> np.ndarray:
    """Distance of every pixel from the beam (read-only, cached per frame shape)."""
    cx, cy = beam_centre(shape)
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    r = np.hypot(yy - cy, xx - cx)
    r.setflags(write=False)
    return r


@functools.lru_cache(maxsize=32)
def _disc_index(shape: tuple[int, int], r_lo: float, r_hi: float, strict_hi: bool = False) -> np.ndarray:
    """Flat indices (ascending) of the pixels with r_lo <= r <= r_hi (r < r_hi when ``strict_hi``):
    the annuli used on every frame of a geometry, found once."""
    r = radius_grid(shape)
    inside = (r >= r_lo) & ((r < r_hi) if strict_hi else (r <= r_hi))
    index = np.flatnonzero(inside)
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=32)
def _sample_index(shape: tuple[int, int], r_lo: float, r_hi: float) -> np.ndarray:
    """Every BACKGROUND_STRIDE-th pixel of the annulus, contiguous: the strided view would read the
    whole 45 000-entry index through the cache on every frame."""
    index = np.ascontiguousarray(_disc_index(shape, r_lo, r_hi)[::BACKGROUND_STRIDE])
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=32)
def _disc_mask(shape: tuple[int, int], r_lo: float, r_hi: float) -> np.ndarray:
    r = radius_grid(shape)
    mask = (r >= r_lo) & (r <= r_hi)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=8)
def _offsets(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat offsets of the background ring and the integration box in an image ``width`` wide,
    in the row-major order of the PATCH×PATCH window."""
    flat = _yy * width + _xx
    return flat[_RING], flat[_BOXMASK]


@dataclass(frozen=True)
class Spots:
    """Detected spots, positions in px relative to the beam (x = column, y = row)."""

    x_px: np.ndarray
    y_px: np.ndarray
    intensity: np.ndarray  # integrated, background subtracted (frame units)
    sigma: np.ndarray  # its standard deviation from counting and background noise
    background_sigma: float  # per-pixel noise of the background
    threshold: float  # the integrated intensity below which nothing counts as a spot

    def __len__(self) -> int:
        return len(self.x_px)


def beam_centre(shape: tuple[int, int]) -> tuple[float, float]:
    """(x, y) pixel-centre coordinates of the beam on the training grid."""
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


def _spread(ordered: np.ndarray) -> float:
    """Robust per-pixel spread of the background: MAD × 1.4826 of a sample in ascending order."""
    if ordered.size == 0:
        return 0.0
    median = stats.median_of_sorted(ordered)
    return float(1.4826 * stats.median(np.abs(ordered - median)))


def integrate(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, sigma_bg: float,
              counts: bool) -> tuple[np.ndarray, np.ndarray]:
    """Integrated intensity and σ at integer pixels (rows, cols) of the (C-contiguous) frame."""
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    source, pad = _source(image, rows, cols, PATCH // 2)
    ring_off, box_off = _offsets(source.shape[1])
    base = (rows + pad) * source.shape[1] + (cols + pad)
    flat = source.ravel()
    ring = flat[base[:, None] + ring_off]
    k = ring.shape[1] // 2
    bg = np.partition(ring, k, axis=1)[:, k]  # the median (odd count: 28 -> upper middle)
    # (box pixel, candidate) layout: the box sums add the 25 pixels in turn, as they always have
    box = flat[box_off[:, None] + base[None, :]]
    n_box = box.shape[0]
    value = box.sum(axis=0) - n_box * bg
    var = np.full(len(value), n_box * sigma_bg**2 + (n_box**2) * (np.pi / 2) * sigma_bg**2 / ring.shape[1])
    if counts:
        var = var + np.maximum(box, 0.0).sum(axis=0) + n_box**2 * np.maximum(bg, 0.0) * (np.pi / 2) / ring.shape[1]
    return value, np.sqrt(var)


def _source(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, reach: int) -> tuple[np.ndarray, int]:
    """(array, offset) to read the patches of ``reach`` px around (rows, cols) from: the frame itself
    when they all lie inside it — always for positions in the analysed disc, which keeps
    EDGE_MARGIN_PX from the edge — else a copy padded by PAD edge pixels (a copy of the whole frame
    per call would cost more, in time and cache, than the integration itself)."""
    n_rows, n_cols = image.shape
    if len(rows) == 0 or (int(rows.min()) >= reach and int(cols.min()) >= reach
                          and int(rows.max()) < n_rows - reach and int(cols.max()) < n_cols - reach):
        return image, 0
    return pad(image), PAD


def _subpixel(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peak positions from a parabola through the logs of the 3 pixels along x and y (Gaussian-like
    peaks); a plain 3×3 centroid where a log is undefined."""
    # both directions at once, (2, K): the same elementwise arithmetic as one direction at a time
    source, pad = _source(image, rows, cols, 1)
    width = source.shape[1]
    at = (rows + pad) * width + (cols + pad)
    flat = source.ravel()
    step = np.array([1, width])[:, None]  # along x (columns), along y (rows)
    lo, hi = flat[at[None] - step], flat[at[None] + step]
    centre = flat[at]
    ok = (lo > 0) & (hi > 0) & (centre > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # logs of non-positive pixels are nan/-inf, and only used where ``ok`` is False
        llo, lc, lhi = np.log(lo), np.log(centre), np.log(hi)
        den = llo - 2 * lc + lhi
        para = np.where(ok & (den < 0), 0.5 * (llo - lhi) / den, np.nan)
        total = lo + centre + hi
        lin = (hi - lo) / np.where(total > 0, total, 1)
    offsets = np.minimum(np.maximum(np.where(np.isfinite(para), para, lin), -0.5), 0.5)  # = np.clip, cheaper
    return cols + offsets[0], rows + offsets[1]


def pad(image: np.ndarray) -> np.ndarray:
    """The frame padded by PAD pixels (edge values), for patches that reach beyond it."""
    image = np.ascontiguousarray(image)
    if image.dtype in (np.float32, np.float64) and image.ndim == 2:
        return cv2.copyMakeBorder(image, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE)  # = np.pad "edge", 3× faster
    return np.pad(image, PAD, mode="edge")


def _central_pixel(image: np.ndarray, r_min_px: float) -> int:
    """Flat index of the central beam's brightest pixel, or -1 when a beam stop hides it."""
    centre = _disc_index(image.shape, -1.0, min(r_min_px, 3.0), True)
    if not len(centre):
        return -1
    return int(centre[np.argmax(image.ravel()[centre])])


def _above_floor(flat: np.ndarray, usable: np.ndarray, usable_index: np.ndarray, ordered: np.ndarray,
                 margin: float, values: np.ndarray) -> np.ndarray:
    """values > median(usable pixels) + margin, exactly — usually without that median.

    ``values``: the local maxima's pixels; ``ordered``: a sample of the usable pixels, sorted.
    The median of ~45 000 pixels (one partition) would cost more than all the rest of the spot
    search. The sample's quantiles bracket it, proven by counting; values above the bracket's top
    (+ margin) pass, values below its bottom fail, and only when one falls in between is the
    median computed — from the pixels inside the bracket, whose ranks the counts give."""
    n = len(usable_index)
    if n == 0:
        return values > 0.0
    k = n // 2
    first = k if n % 2 else k - 1  # the lower of the middle order statistics
    if len(ordered) >= 64:
        m = len(ordered)
        spread = int(3 * math.sqrt(m) / 2) + 2  # 3 standard deviations of the sample median's rank
        lo, hi = float(ordered[max(m // 2 - spread, 0)]), float(ordered[min(m // 2 + spread, m - 1)])
        image = flat.reshape(usable.shape)
        below = int(np.count_nonzero((image < lo) & usable))
        up_to_hi = int(np.count_nonzero((image <= hi) & usable))
        if below <= first and up_to_hi >= k + 1:  # both middle order statistics lie in [lo, hi]
            passes = values > hi + margin  # floor <= hi + margin (rounding is monotone)
            if not (~passes & (values > lo + margin)).any():
                return passes
            # the median itself, from the pixels in the bracket alone: ranks below..up_to_hi-1 of all
            inside = image[usable & (image >= lo) & (image <= hi)]
            j = k - below
            part = np.partition(inside, j)
            median = float(part[j]) if n % 2 else float((part[:j].max() + part[j]) / 2.0)
            return values > median + margin
    return values > stats.median(flat[usable_index]) + margin


def find_spots(image: np.ndarray, *, r_min_px: float, r_max_px: float, counts: bool) -> Spots:
    """Spots between radii r_min_px (the central beam, a beam stop) and r_max_px (resolution) of a
    C-contiguous float frame."""
    n_rows, n_cols = image.shape
    cx, cy = beam_centre(image.shape)
    usable_index = _disc_index(image.shape, r_min_px, r_max_px)
    usable = _disc_mask(image.shape, r_min_px, r_max_px)
    # spots beyond r_max still streak into the analysed disc: find them too, report only inside
    r_edge = min(cx, cy) - PAD
    searched = _disc_mask(image.shape, r_min_px, max(r_max_px, r_edge))
    flat = image.ravel()
    # a sample is plenty for the background's spread and brackets its median (_above_floor); sorted
    # once, it gives every order statistic both need (a multi-index partition costs more)
    ordered = np.sort(flat[_sample_index(image.shape, r_min_px, r_max_px)])
    sigma_bg = _spread(ordered)
    image32 = image.astype(np.float32)
    maxima = np.flatnonzero(searched & (image32 >= cv2.dilate(image32, _NMS_KERNEL, borderType=cv2.BORDER_REPLICATE)))
    maxima = maxima[_above_floor(flat, usable, usable_index, ordered, 3 * sigma_bg, flat[maxima])]
    # the central beam's integrated intensity (a threshold below) in the same integration call
    beam = _central_pixel(image, r_min_px)
    rows, cols = np.divmod(maxima if beam < 0 else np.concatenate((maxima, [beam])), n_cols)
    value, sigma = integrate(image, rows, cols, sigma_bg=sigma_bg, counts=counts)
    central = 0.0
    if beam >= 0:
        central = max(float(value[-1]), 0.0)
        rows, cols, value, sigma = rows[:-1], cols[:-1], value[:-1], sigma[:-1]
    if len(value):
        top = np.sort(value)[-min(5, len(value)):]
        reference = stats.median(top)
    else:
        reference = 0.0
    typical_sigma = stats.median(sigma) if len(sigma) else 0.0
    threshold = max(DETECT_SIGMA * typical_sigma, DETECT_RELATIVE * max(reference, 0.0),
                    DETECT_CENTRAL * central)
    keep = (value > threshold) & (value > DETECT_SIGMA * sigma)
    rows, cols, value, sigma = rows[keep], cols[keep], value[keep], sigma[keep]
    peak = image[rows, cols]
    if len(rows) > 0:
        # side lobes of brighter spots and of the central beam (module constants)
        centre = _disc_index(image.shape, -1.0, r_min_px, True)
        ref_rows, ref_cols, ref_peak = rows, cols, peak
        if len(centre):
            k = int(centre[np.argmax(flat[centre])])
            ref_rows = np.concatenate((rows, [k // n_cols]))
            ref_cols = np.concatenate((cols, [k % n_cols]))
            ref_peak = np.concatenate((peak, [flat[k]]))
        d2 = (rows[:, None] - ref_rows[None, :]) ** 2 + (cols[:, None] - ref_cols[None, :]) ** 2
        envelope = SIDELOBE_SAFETY * SIDELOBE_WIDTH_PX**2 / (np.pi**2 * np.maximum(d2, 1.0))
        lobe = (peak[:, None] < ref_peak[None, :] * envelope) & (d2 >= 9)
        # a flat top gives several maxima within 2 px: keep the first of equals, drop lesser ones
        k = len(rows)
        order_rank = np.arange(len(ref_peak))
        same_spot = (d2 < 9) & ((ref_peak[None, :] > peak[:, None])
                                | ((ref_peak[None, :] == peak[:, None]) & (order_rank[None, :] < np.arange(k)[:, None])))
        keep = ~(lobe | same_spot).any(axis=1)
        rows, cols, value, sigma = rows[keep], cols[keep], value[keep], sigma[keep]
    inside = usable[rows, cols]
    rows, cols, value, sigma = rows[inside], cols[inside], value[inside], sigma[inside]
    x, y = _subpixel(image, rows, cols)
    return Spots(x_px=x - cx, y_px=y - cy, intensity=value, sigma=sigma, background_sigma=sigma_bg,
                 threshold=threshold)


def measure_at(image: np.ndarray, x_px: np.ndarray, y_px: np.ndarray, *,
               sigma_bg: float, counts: bool) -> tuple[np.ndarray, np.ndarray]:
    """Integrated intensity and σ at given positions (px from the beam), spot or not.

    Positions must lie inside the frame (callers keep nodes within the resolution disc)."""
    shape = image.shape
    cx, cy = beam_centre(shape)
    # round half up, not to even: mirror-related nodes then get mirror-related boxes
    cols = np.minimum(np.maximum(np.floor(np.asarray(x_px) + cx + 0.5).astype(np.int64), 0), shape[1] - 1)
    rows = np.minimum(np.maximum(np.floor(np.asarray(y_px) + cy + 0.5).astype(np.int64), 0), shape[0] - 1)
    return integrate(image, rows, cols, sigma_bg=sigma_bg, counts=counts)
