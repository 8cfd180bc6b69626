"""Calibration: a detector frame -> the 256x256 reciprocal-space grid the model was trained on.

For every pixel of the training grid (the bundle's ``dataset_config.geometry``: a flat,
centred, square detector; see :class:`xtalsym.offline.simulate.Geometry`) we take its
scattering vector H and find where the frame's detector sees the *same* reflection:
same |H| (so 2θ = 2·asin(|H|·λ_frame/2)) and same azimuth. On a flat detector normal to
the beam at distance D that is radius r = D·tan 2θ from the beam centre. The frame is
sampled there; the result is scaled to 8 bits like the training data
(``round(I / max · 255)``, :func:`xtalsym.offline.simulate.to_raw_uint8`).

Conventions (docs/DAEMON.md):

* beam centre in pixels, pixel *centre* convention: pixel (row i, column j) covers
  [j − ½, j + ½] × [i − ½, i + ½], so the training grid's beam is at ((N−1)/2, (N−1)/2);
* ``beam_center_x_px`` is a column coordinate, ``beam_center_y_px`` a row coordinate;
* intensities are divided by the frame's solid-angle × polarisation weight at the source
  position and multiplied by the training grid's at the target (the simulator's
  ``cos³2θ (1 + cos²2θ)/2``), so a pattern rendered at another wavelength still matches;
  constant factors (pixel area, distance²) cancel in the max scaling.

Sampling methods: ``bilinear`` (default: point-samples the frame at each target pixel's
position like the simulator point-samples |F|², exact when the frame is at least as fine
as the training grid) and ``area`` (mean of an s×s grid of sub-samples over the target
pixel's footprint, s = ceil(footprint in frame pixels); use it when the frame's pixels are
much finer than the training grid's, or noisy).

Excluded pixels (weight 0, never in the max): the stream's pixel mask (any non-zero
bit), the value 2^n − 1 of an n-bit integer frame (EIGER gap/dead/NODATA), values at or
above ``saturation_value``, negative and non-finite values. Sampling is a *normalised*
interpolation: Σ w·I / Σ w over the valid neighbours, so a gap does not pull spots
towards 0; a target with no valid neighbour is 0.

The sampling map depends only on (frame geometry, training geometry, method): it is
computed once per series (:func:`build_map`, cached); :func:`prepare` adds the series' pixel
mask and flatfield once (:class:`PreparedMap`), and each frame is then applied in time that
does not grow with the frame's size for ``bilinear`` and grows only with its *non-zero*
pixels for ``area`` (a diffraction frame is mostly zeros):

* ``bilinear``: the four neighbours and weights of every target pixel are precomputed
  (N² × 4 indices); a frame costs a gather of 4·N² values, whatever its size.
* ``area`` (when a target pixel covers ≥ 2 frame pixels): every frame pixel is assigned to
  the target pixel its centre falls in (a per-series lookup over the part of the frame the
  grid covers); a frame costs one scan for its non-zero pixels and a weighted bincount of
  those. The denominator (valid pixels per target) is the per-series count less the
  frame's own invalid pixels, so zeros never need to be visited. Targets whose footprint
  holds no valid pixel centre fall back to the bilinear sample. A bslz4 frame can skip the
  dense frame and the scan altogether: :meth:`PreparedMap.apply_nonzero` bins the non-zero
  usable pixels as the decoder finds them (``CompressedFrame.nonzero``, bslz4-to-sparse).

:func:`apply_map_remap` is the earlier dense implementation (``cv2.remap`` of the whole
frame, ``area`` as s×s bilinear sub-samples); tests and ``benchmarks/calibration.py`` compare
the two.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, fields

import cv2
import numpy as np

from xtalsym.daemon.protocols import GEOMETRY_KEYS

log = logging.getLogger(__name__)

METHODS = ("bilinear", "area")
MAX_AREA_SUBSAMPLES = 8  # s per side; footprints above are averaged over 8x8 points


class CalibrationError(ValueError):
    """A frame or geometry that cannot be mapped; ``reason`` is a short key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # raised in a worker process: it must unpickle, or the whole pool breaks
        return type(self), (self.reason, self.message)


@dataclass(frozen=True)
class FrameGeometry:
    """The detector geometry of one series, SI units, beam centre in pixel-centre coordinates."""

    beam_center_x_px: float
    beam_center_y_px: float
    pixel_size_x_m: float
    pixel_size_y_m: float
    wavelength_m: float
    detector_distance_m: float
    image_size_x_px: int
    image_size_y_px: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CalibrationError("bad_geometry", f"{f.name} = {value!r} is not a finite number")
        for name in ("pixel_size_x_m", "pixel_size_y_m", "wavelength_m", "detector_distance_m",
                     "image_size_x_px", "image_size_y_px"):
            if getattr(self, name) <= 0:
                raise CalibrationError("bad_geometry", f"{name} = {getattr(self, name)!r} must be > 0")


@dataclass(frozen=True)
class TrainingGeometry:
    """The grid the model was trained on (from the bundle's settings)."""

    wavelength_m: float
    distance_m: float
    pixel_size_m: float
    pixels: int

    @classmethod
    def from_bundle(cls, bundle) -> TrainingGeometry:
        g = bundle.settings.get("dataset_config", {}).get("geometry")
        if not isinstance(g, dict):
            raise CalibrationError("bad_geometry", f"bundle {bundle.path}: settings.json has no dataset_config.geometry")
        try:
            return cls(float(g["wavelength_m"]), float(g["distance_m"]), float(g["pixel_size_m"]), int(g["pixels"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError("bad_geometry", f"bundle {bundle.path}: bad training geometry {g!r} ({exc})") from None


def resolve_geometry(stream: dict | None, override: dict | None, *, frame_shape: tuple[int, int] | None = None
                     ) -> FrameGeometry:
    """Merge the stream's geometry (SeriesStart.geometry) with the config's; config wins.

    The image size falls back to ``frame_shape`` (rows, cols) when neither gives it.
    Raises CalibrationError("missing_geometry") naming every missing key.
    """
    merged: dict = {}
    for key in GEOMETRY_KEYS:
        value = (override or {}).get(key)
        if value is None:
            value = (stream or {}).get(key)
        merged[key] = value
    if frame_shape is not None:
        merged["image_size_y_px"] = merged["image_size_y_px"] or frame_shape[0]
        merged["image_size_x_px"] = merged["image_size_x_px"] or frame_shape[1]
    missing = [k for k in GEOMETRY_KEYS if merged[k] is None]
    if missing:
        raise CalibrationError(
            "missing_geometry",
            f"{', '.join(missing)} not given by the stream's start message nor the config ([geometry] section)",
        )
    return FrameGeometry(**merged)


def _weight(cos2t: np.ndarray) -> np.ndarray:
    """Solid angle x polarisation, 1 at the beam (the simulator's)."""
    return cos2t**3 * (1.0 + cos2t**2) / 2.0


@dataclass(frozen=True)
class SamplingMap:
    """Where each target pixel samples the frame (``cv2.remap`` maps, one per sub-sample)."""

    map_x: np.ndarray  # (S, N, N) float32 frame column of each sub-sample
    map_y: np.ndarray  # (S, N, N) float32 frame row
    gain: np.ndarray  # (N, N) float32 w_train / w_frame; 0 outside the Ewald limit
    frame_shape: tuple[int, int]  # (rows, cols) the map expects
    coverage: float  # fraction of target pixels that land inside the frame
    # fast paths (module docstring): bilinear neighbours of each target pixel's centre
    gather_index: np.ndarray = field(default=None, repr=False)  # (4, N*N) int32 flat frame index
    gather_weight: np.ndarray = field(default=None, repr=False)  # (4, N*N) float32, 0 off the frame
    # area binning (None unless method "area" with >= 2x2 sub-samples)
    bins: _Bins | None = field(default=None, repr=False)

    @property
    def pixels(self) -> int:
        return self.gain.shape[0]


@dataclass(frozen=True)
class _Bins:
    """Frame pixel -> the target pixel its centre falls in."""

    target: np.ndarray  # (rows * cols,) int32 flat target index, N*N = off the grid
    count: np.ndarray  # (N*N,) float32 frame pixels per target
    gain: np.ndarray  # (N*N,) float32 w_train / w_frame at each target pixel's centre


@functools.lru_cache(maxsize=4)  # an area map of a 16M frame holds a 72 MB lookup
def build_map(frame: FrameGeometry, training: TrainingGeometry, method: str = "bilinear") -> SamplingMap:
    """The sampling map for one (frame, training) geometry pair; cached."""
    if method not in METHODS:
        raise CalibrationError("bad_config", f"calibration method {method!r}, choose from {METHODS}")
    n = training.pixels
    if method == "area":
        # footprint of one target pixel in frame pixels near the beam (q per pixel ratio)
        q_target = training.pixel_size_m / (training.distance_m * training.wavelength_m)
        q_frame = min(frame.pixel_size_x_m, frame.pixel_size_y_m) / (frame.detector_distance_m * frame.wavelength_m)
        s = int(min(MAX_AREA_SUBSAMPLES, max(1, math.ceil(q_target / q_frame - 1e-9))))
    else:
        s = 1
    offsets = (np.arange(s) + 0.5) / s - 0.5  # sub-pixel centres in target pixels
    maps_x, maps_y = [], []
    gain = None
    inside_any = np.zeros((n, n), bool)
    for oy in offsets:
        for ox in offsets:
            mx, my, g = _map_points(frame, training, ox, oy)
            maps_x.append(mx)
            maps_y.append(my)
            if gain is None:
                gain = g
            inside_any |= (mx >= -0.5) & (mx <= frame.image_size_x_px - 0.5) & \
                          (my >= -0.5) & (my <= frame.image_size_y_px - 0.5)
    coverage = float(inside_any.mean())
    if coverage < 0.5:
        log.warning("calibration: only %.0f%% of the training grid falls on the frame (%s)", coverage * 100, frame)
    shape = (int(frame.image_size_y_px), int(frame.image_size_x_px))
    cx, cy, centre_gain = _map_points(frame, training, 0.0, 0.0)
    index, weight = _bilinear_neighbours(cx, cy, shape)
    bins = _build_bins(frame, training, centre_gain) if s > 1 else None
    result = SamplingMap(np.stack(maps_x), np.stack(maps_y), gain, shape, coverage,
                         gather_index=index, gather_weight=weight, bins=bins)
    for arr in (result.map_x, result.map_y, result.gain, index, weight):
        arr.setflags(write=False)
    return result


def _bilinear_neighbours(map_x: np.ndarray, map_y: np.ndarray, shape: tuple[int, int]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and weights of the 4 frame pixels around each sample point (pixel-centre
    convention, as cv2.remap); a neighbour off the frame gets weight 0 (index 0)."""
    rows, cols = shape
    x = map_x.astype(np.float64).ravel()
    y = map_y.astype(np.float64).ravel()
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    index = np.zeros((4, x.size), np.int64)
    weight = np.zeros((4, x.size), np.float64)
    for k, (dx, dy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        xi, yi = x0 + dx, y0 + dy
        w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        inside = (xi >= 0) & (xi < cols) & (yi >= 0) & (yi < rows)
        index[k] = np.where(inside, yi * cols + xi, 0)
        weight[k] = np.where(inside, w, 0.0)
    return index.astype(np.intp), weight.astype(np.float32)  # intp: numpy gathers without converting


DENSE_FRACTION = 0.25  # above this share of non-zero pixels, area binning visits every pixel
_BIN_ROWS_PER_CHUNK = 256  # rows of the frame per step of the lookup build (bounds its memory)


def _build_bins(frame: FrameGeometry, training: TrainingGeometry, centre_gain: np.ndarray) -> _Bins | None:
    """Each frame pixel's target pixel: the inverse of :func:`_map_points` (same |H|, same azimuth)."""
    n = training.pixels
    rows, cols = int(frame.image_size_y_px), int(frame.image_size_x_px)
    centre = (n - 1) / 2
    ratio = training.wavelength_m / frame.wavelength_m
    sin_limit = math.sin(math.radians(89.0) / 2)
    dx = (np.arange(cols) - frame.beam_center_x_px) * frame.pixel_size_x_m
    target = np.full((rows, cols), n * n, np.int32)  # n*n: off the grid
    for r0 in range(0, rows, _BIN_ROWS_PER_CHUNK):
        dy = ((np.arange(r0, min(rows, r0 + _BIN_ROWS_PER_CHUNK)) - frame.beam_center_y_px)
              * frame.pixel_size_y_m)[:, None]
        rho2 = dx[None, :] ** 2 + dy**2
        # flat detector: cos 2θ = D / sqrt(ρ² + D²); sin θ = sqrt((1 − cos 2θ) / 2); same |H| at λ_train
        cos2t_f = frame.detector_distance_m / np.sqrt(rho2 + frame.detector_distance_m**2)
        sin_t = np.sqrt(np.clip((1.0 - cos2t_f) / 2.0, 0.0, None)) * ratio
        ok = sin_t < sin_limit
        cos2t_t = 1.0 - 2.0 * np.where(ok, sin_t, 0.0) ** 2
        tan2t_t = np.sqrt(np.clip(1.0 - cos2t_t**2, 0.0, None)) / cos2t_t
        rho = np.sqrt(rho2)
        # target radius in target pixels per metre of frame radius (0 at the beam: centre pixel)
        scale = np.where(rho > 0, (training.distance_m / training.pixel_size_m) * tan2t_t
                         / np.where(rho > 0, rho, 1.0), 0.0)
        tx = np.floor(centre + scale * dx[None, :] + 0.5)
        ty = np.floor(centre + scale * dy + 0.5)
        ok &= (tx >= 0) & (tx < n) & (ty >= 0) & (ty < n)
        target[r0:r0 + dy.shape[0]] = np.where(ok, ty * n + tx, n * n)
    target = target.ravel()
    count = np.bincount(target, minlength=n * n + 1)[:n * n].astype(np.float32)
    if not count.any():
        return None
    gain = centre_gain.ravel().astype(np.float32)
    for arr in (target, count, gain):
        arr.setflags(write=False)
    return _Bins(target, count, gain)


def _map_points(frame: FrameGeometry, training: TrainingGeometry, ox: float, oy: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = training.pixels
    coord = (np.arange(n) - (n - 1) / 2) * training.pixel_size_m
    py = (coord + oy * training.pixel_size_m)[:, None] * np.ones((1, n))
    px = np.ones((n, 1)) * (coord + ox * training.pixel_size_m)[None, :]
    d = training.distance_m
    inv_l = 1.0 / np.sqrt(px**2 + py**2 + d**2)
    cos2t_t = d * inv_l
    # |H| = 2 sin θ / λ; the same |H| at the frame's wavelength:
    sin_theta_t = np.sqrt(np.clip((1.0 - cos2t_t) / 2.0, 0.0, None))
    sin_theta_f = sin_theta_t * (frame.wavelength_m / training.wavelength_m)
    ok = sin_theta_f < math.sin(math.radians(89.0) / 2)  # stay off 2θ = 90° (flat detector)
    sin_theta_f = np.where(ok, sin_theta_f, 0.0)
    two_theta_f = 2.0 * np.arcsin(sin_theta_f)
    r = frame.detector_distance_m * np.tan(two_theta_f)
    rho = np.hypot(px, py)
    cos_phi = np.where(rho > 0, px / np.where(rho > 0, rho, 1.0), 1.0)
    sin_phi = np.where(rho > 0, py / np.where(rho > 0, rho, 1.0), 0.0)
    col = frame.beam_center_x_px + r * cos_phi / frame.pixel_size_x_m
    row = frame.beam_center_y_px + r * sin_phi / frame.pixel_size_y_m
    col = np.where(ok, col, -1e6)
    row = np.where(ok, row, -1e6)
    gain = np.where(ok, _weight(cos2t_t) / _weight(np.cos(two_theta_f)), 0.0)
    return col.astype(np.float32), row.astype(np.float32), gain.astype(np.float32)


def valid_pixels(frame: np.ndarray, pixel_mask: np.ndarray | None = None, *,
                 saturation_value: float | None = None) -> np.ndarray:
    """float32 (rows, cols): 1 where the pixel may be used, 0 where it is excluded."""
    valid = np.ones(frame.shape, dtype=bool)
    if np.issubdtype(frame.dtype, np.integer):
        info = np.iinfo(frame.dtype)
        if info.bits > 8 or info.min < 0:  # 8-bit frames use 255 as a real value
            valid &= frame != info.max  # EIGER: 2^n - 1 marks gaps, dead and NODATA pixels
        if info.min < 0:
            valid &= frame >= 0
    else:
        valid &= np.isfinite(frame) & (frame >= 0)
    if saturation_value is not None:
        valid &= frame < saturation_value
    if pixel_mask is not None:
        if pixel_mask.shape != frame.shape:
            raise CalibrationError("mask_mismatch", f"pixel mask {pixel_mask.shape} vs frame {frame.shape}")
        valid &= pixel_mask == 0
    return valid.astype(np.float32)


def _check_frame(frame: np.ndarray, sampling: SamplingMap) -> None:
    if frame.ndim != 2:
        raise CalibrationError("bad_frame", f"frame must be 2-D, got shape {frame.shape}")
    if frame.shape != sampling.frame_shape:
        raise CalibrationError(
            "size_mismatch", f"frame is {frame.shape[1]}x{frame.shape[0]} (x by y), the series geometry says "
            f"{sampling.frame_shape[1]}x{sampling.frame_shape[0]}")


def apply_map_remap(frame: np.ndarray, sampling: SamplingMap, *, pixel_mask: np.ndarray | None = None,
                    saturation_value: float | None = None, flatfield: np.ndarray | None = None) -> np.ndarray:
    """The dense implementation (``cv2.remap`` of the whole frame, ``area`` as s×s bilinear
    sub-samples): float32 (N, N). Kept as the reference the fast paths are tested against."""
    _check_frame(frame, sampling)
    valid = valid_pixels(frame, pixel_mask, saturation_value=saturation_value)  # on the raw counts
    data = np.where(valid > 0, frame, 0).astype(np.float32)
    if flatfield is not None:
        if flatfield.shape != frame.shape:
            raise CalibrationError("flatfield_mismatch", f"flatfield {flatfield.shape} vs frame {frame.shape}")
        usable = np.isfinite(flatfield) & (flatfield > 0)
        valid = np.where(usable, valid, 0).astype(np.float32)
        data = np.where(usable, data * np.nan_to_num(flatfield, nan=0.0, posinf=0.0), 0).astype(np.float32)
    num = np.zeros(sampling.gain.shape, np.float32)
    den = np.zeros(sampling.gain.shape, np.float32)
    for mx, my in zip(sampling.map_x, sampling.map_y):
        num += cv2.remap(data, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        den += cv2.remap(valid, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    good = den > 1e-3 * len(sampling.map_x)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=good)
    return out * sampling.gain


@dataclass(frozen=True)
class PreparedMap:
    """A sampling map with one series' pixel mask and flatfield folded in (:func:`prepare`):
    what stays the same for every frame of the series, computed once."""

    sampling: SamplingMap
    gather_index: np.ndarray  # (4, N*N) as sampling.gather_index
    gather_weight: np.ndarray  # (4, N*N) with masked / no-flatfield neighbours at weight 0
    gather_flatfield: np.ndarray | None  # (4, N*N) flatfield at each neighbour, or None
    excluded: np.ndarray | None  # (rows * cols,) True where masked or without a usable flatfield (bins only)
    flatfield_flat: np.ndarray | None  # (rows * cols,) the flatfield, 0 where excluded (bins only)
    bin_valid: np.ndarray | None  # (N*N,) valid frame pixels per target, mask and flatfield applied
    usable: np.ndarray | None = None  # (rows * cols,) ~excluded (bins only)

    def apply(self, frame: np.ndarray, *, saturation_value: float | None = None) -> np.ndarray:
        """Calibrated float32 (N, N) intensity of one frame (see :func:`apply_map`)."""
        return _apply_prepared(self, frame, saturation_value)

    @property
    def takes_nonzero(self) -> bool:
        """Whether :meth:`apply_nonzero` applies (area binning): a frame given as its non-zero pixels."""
        return self.sampling.bins is not None

    def apply_nonzero(self, indices: np.ndarray, values: np.ndarray, *,
                      saturation_value: float | None = None) -> np.ndarray:
        """:meth:`apply` of a frame given as its non-zero pixels where ``usable`` (flat C-order
        ``indices``, ascending, and their ``values``; every other pixel 0 or masked), as
        :meth:`CompressedFrame.nonzero <xtalsym.daemon.protocols.CompressedFrame.nonzero>` decodes
        a bslz4 frame; the same result, without a dense frame. Area binning only (:attr:`takes_nonzero`)."""
        if not self.takes_nonzero:
            raise ValueError("apply_nonzero needs an area map with binning (calibration.method = 'area')")
        return _bin_nonzero(self, indices, values, saturation_value)


def prepare(sampling: SamplingMap, *, pixel_mask: np.ndarray | None = None,
            flatfield: np.ndarray | None = None) -> PreparedMap:
    """Fold a series' pixel mask (non-zero = excluded) and flatfield (not finite or ≤ 0 =
    excluded) into the map once, for :meth:`PreparedMap.apply` on each frame."""
    shape = sampling.frame_shape
    if pixel_mask is not None and pixel_mask.shape != shape:
        raise CalibrationError("mask_mismatch", f"pixel mask {pixel_mask.shape} vs frame {shape}")
    if flatfield is not None and flatfield.shape != shape:
        raise CalibrationError("flatfield_mismatch", f"flatfield {flatfield.shape} vs frame {shape}")
    excluded_full = None if pixel_mask is None else np.asarray(pixel_mask) != 0
    ff = None
    if flatfield is not None:
        ff = np.asarray(flatfield, dtype=np.float32)
        usable = np.isfinite(ff) & (ff > 0)
        ff = np.where(usable, ff, 0).astype(np.float32)
        excluded_full = ~usable if excluded_full is None else excluded_full | ~usable
    index, weight = sampling.gather_index, sampling.gather_weight
    if excluded_full is not None:
        weight = np.where(excluded_full.ravel()[index], 0, weight).astype(np.float32)
    gather_ff = None if ff is None else ff.ravel()[index]
    excluded = ff_flat = bin_valid = None
    bins = sampling.bins
    if bins is not None:
        bin_valid = bins.count
        if excluded_full is not None:
            excluded = np.ascontiguousarray(excluded_full).ravel()
            lost = bins.target[excluded]
            bin_valid = bins.count - np.bincount(lost, minlength=bins.count.size + 1)[:-1].astype(np.float32)
        if ff is not None:
            ff_flat = ff.ravel()
    return PreparedMap(sampling, index, weight, gather_ff, excluded, ff_flat, bin_valid,
                       None if excluded is None else ~excluded)


def _invalid_values(values: np.ndarray, saturation_value: float | None) -> np.ndarray | None:
    """True where a pixel value is excluded (valid_pixels' value rules); None when none can be."""
    bad = None
    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(values.dtype)
        if info.bits > 8 or info.min < 0:
            bad = values == info.max
        if info.min < 0:
            bad = bad | (values < 0) if bad is not None else values < 0
    else:
        bad = ~np.isfinite(values) | (values < 0)
    if saturation_value is not None:
        sat = values >= saturation_value
        bad = sat if bad is None else bad | sat
    return bad


def _apply_gather(frame: np.ndarray | None, prepared: PreparedMap, saturation_value: float | None,
                  targets: np.ndarray | None = None, *, values_at=None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised bilinear sample (Σ w·I, Σ w) at each target (or at ``targets`` only);
    ``values_at(flat indices)``: the frame's values there, when there is no dense ``frame``."""
    index, weight, ff = prepared.gather_index, prepared.gather_weight, prepared.gather_flatfield
    if targets is not None:
        index, weight = index[:, targets], weight[:, targets]
        ff = None if ff is None else ff[:, targets]
    values = np.take(frame.ravel(), index) if values_at is None else values_at(index)
    bad = _invalid_values(values, saturation_value)
    if bad is not None and bad.any():
        weight = weight * ~bad
        if not np.issubdtype(values.dtype, np.integer):  # NaN/inf times a zero weight is still NaN
            values = np.where(bad, 0, values)
    values = values.astype(np.float32)
    if ff is not None:
        values *= ff
    return np.einsum("ij,ij->j", weight, values), weight.sum(axis=0)


def _apply_bins(frame: np.ndarray, prepared: PreparedMap, saturation_value: float | None) -> np.ndarray:
    """Mean of the valid frame pixels in each target pixel's footprint, visiting only non-zero pixels."""
    flat = frame.ravel()
    nonzero = flat != 0  # NaN counts as non-zero; a bool array's nonzero() is numpy's fast one
    if np.count_nonzero(nonzero) > DENSE_FRACTION * flat.size:  # whole-array operations beat gathering most
        return _bin_pixels(prepared, None, flat, saturation_value, frame=frame)
    # a diffraction frame: a few % of the pixels are non-zero
    if prepared.usable is not None:  # masked pixels (EIGER gaps: 2^n - 1, non-zero) never visited
        nonzero &= prepared.usable
    nz = np.flatnonzero(nonzero)
    return _bin_pixels(prepared, nz, flat[nz], saturation_value, frame=frame)


def _bin_nonzero(prepared: PreparedMap, indices: np.ndarray, values: np.ndarray,
                 saturation_value: float | None) -> np.ndarray:
    """:func:`_apply_bins` of a frame given as its non-zero usable pixels (ascending flat indices)."""
    size = prepared.sampling.frame_shape[0] * prepared.sampling.frame_shape[1]
    indices = np.asarray(indices)
    if indices.size and (int(indices[0]) < 0 or int(indices[-1]) >= size):
        raise CalibrationError("bad_frame", f"non-zero pixel index {int(indices[-1])} outside the "
                               f"{size}-pixel frame")
    index_of = indices.astype(np.intp, copy=False)

    def values_at(flat_index: np.ndarray) -> np.ndarray:  # the frame's value at any pixel: 0 unless listed
        if not index_of.size:
            return np.zeros(flat_index.shape, values.dtype)
        pos = np.minimum(np.searchsorted(index_of, flat_index), index_of.size - 1)
        return np.where(index_of[pos] == flat_index, values[pos], 0).astype(values.dtype)

    return _bin_pixels(prepared, index_of, values, saturation_value, values_at=values_at)


def _bin_pixels(prepared: PreparedMap, nz: np.ndarray | None, values: np.ndarray, saturation_value: float | None,
                *, frame: np.ndarray | None = None, values_at=None) -> np.ndarray:
    """The binning itself: ``nz`` the flat indices of ``values`` (None: ``values`` is every pixel;
    else they are the non-zero usable pixels); ``frame`` or ``values_at`` for the bilinear fallback."""
    bins = prepared.sampling.bins
    n_targets = bins.count.size  # bins.target holds n_targets for "off the grid": a bin that is dropped
    dense = nz is None
    static = None
    if dense:
        target = bins.target
        static = prepared.excluded  # masked pixels: already out of bin_valid
    else:
        target = bins.target[nz]
    bad = _invalid_values(values, saturation_value)
    newly_bad = bad if static is None or bad is None else bad & ~static
    drop = static if bad is None else (bad if static is None else bad | static)
    den = prepared.bin_valid
    if newly_bad is not None and newly_bad.any():
        den = den - np.bincount(target[newly_bad], minlength=n_targets + 1)[:n_targets]
    weights = values.astype(np.float64)
    if drop is not None:
        weights[drop] = 0.0
    if prepared.flatfield_flat is not None:
        weights *= prepared.flatfield_flat if dense else prepared.flatfield_flat[nz]
    num = np.bincount(target, weights=weights, minlength=n_targets + 1)[:n_targets]
    out = np.zeros(den.size, np.float32)
    filled = den > 0
    out[filled] = num[filled] / den[filled]
    empty = np.flatnonzero(~filled & (bins.gain > 0))
    if empty.size:  # no valid pixel centre in the footprint: the bilinear sample there
        gnum, gden = _apply_gather(frame, prepared, saturation_value, empty, values_at=values_at)
        ok = gden > 1e-3
        out[empty[ok]] = gnum[ok] / gden[ok]
    return (out * bins.gain).reshape(prepared.sampling.gain.shape)


def _apply_prepared(prepared: PreparedMap, frame: np.ndarray, saturation_value: float | None) -> np.ndarray:
    sampling = prepared.sampling
    _check_frame(frame, sampling)
    frame = np.ascontiguousarray(frame)
    if sampling.bins is not None:
        return _apply_bins(frame, prepared, saturation_value)
    num, den = _apply_gather(frame, prepared, saturation_value)
    out = np.zeros(den.shape, np.float32)
    np.divide(num, den, out=out, where=den > 1e-3)
    return out.reshape(sampling.gain.shape) * sampling.gain


def apply_map(frame: np.ndarray, sampling: SamplingMap, *, pixel_mask: np.ndarray | None = None,
              saturation_value: float | None = None, flatfield: np.ndarray | None = None) -> np.ndarray:
    """Calibrated float32 (N, N) intensity (arbitrary units; excluded targets are 0).

    ``flatfield``: per-pixel multiplicative correction (DECTRIS convention, values ≈ 1);
    pixels where it is not finite or not positive are excluded. For many frames of one
    series, :func:`prepare` once and :meth:`PreparedMap.apply` per frame."""
    _check_frame(frame, sampling)
    return prepare(sampling, pixel_mask=pixel_mask, flatfield=flatfield).apply(
        frame, saturation_value=saturation_value)


def to_uint8(intensity: np.ndarray) -> np.ndarray:
    """round(I / max · 255) like the training data; CalibrationError on an empty frame."""
    peak = float(intensity.max()) if intensity.size else 0.0
    if not math.isfinite(peak) or peak <= 0:
        raise CalibrationError("empty_frame", f"no positive intensity on the training grid (max {peak!r})")
    return np.rint(np.clip(intensity, 0, None) * (255.0 / peak)).astype(np.uint8)


def calibrate(frame: np.ndarray, sampling: SamplingMap, *, pixel_mask: np.ndarray | None = None,
              saturation_value: float | None = None, flatfield: np.ndarray | None = None) -> np.ndarray:
    """Frame -> uint8 (N, N) raw DP on the training grid."""
    return to_uint8(apply_map(frame, sampling, pixel_mask=pixel_mask, saturation_value=saturation_value,
                              flatfield=flatfield))


# ---------------------------------------------------------------- method choice, empty frames

AREA_FROM_FOOTPRINT = 2.0  # "auto" averages (area) once a grid pixel spans this many detector pixels


def footprint_px(frame: FrameGeometry, training: TrainingGeometry) -> float:
    """Detector pixels one training-grid pixel spans (along a side, near the beam): the ratio
    of their q per pixel."""
    q_target = training.pixel_size_m / (training.distance_m * training.wavelength_m)
    q_frame = min(frame.pixel_size_x_m, frame.pixel_size_y_m) / (frame.detector_distance_m * frame.wavelength_m)
    return q_target / q_frame


def auto_method(frame: FrameGeometry, training: TrainingGeometry) -> str:
    """``calibration.method = "auto"``: ``area`` when a grid pixel spans >= 2 detector pixels
    (bilinear point-sampling would fall between the bright pixels of a much finer detector:
    a 16M EIGER calibrated empty), else ``bilinear`` (exact when the detector is as coarse)."""
    return "area" if footprint_px(frame, training) >= AREA_FROM_FOOTPRINT else "bilinear"


def explain_empty(frame: np.ndarray, sampling: SamplingMap, *, pixel_mask: np.ndarray | None = None,
                  saturation_value: float | None = None, method: str = "bilinear") -> str:
    """Why a frame calibrated to an all-zero grid (the ``empty_frame`` message); only on that path."""
    valid = valid_pixels(frame, pixel_mask, saturation_value=saturation_value) > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        return (f"every one of the frame's {frame.size} pixels is excluded (pixel mask, the value 2^n-1 of an "
                "n-bit frame, saturation_value, negative or non-finite)")
    counts = np.where(valid, frame, 0)
    lit = counts > 0
    n_lit = int(lit.sum())
    if n_lit == 0:
        return f"the frame has no counts: its {n_valid} usable pixels are all 0"
    rows, cols = sampling.frame_shape
    mx = np.rint(sampling.map_x).astype(np.int64).ravel()
    my = np.rint(sampling.map_y).astype(np.int64).ravel()
    inside = (mx >= 0) & (mx < cols) & (my >= 0) & (my < rows)
    hits = int(lit[my[inside], mx[inside]].sum()) if inside.any() else 0
    spacing = np.abs(np.diff(sampling.map_x[0], axis=1))
    spacing = spacing[np.isfinite(spacing) & (spacing < cols)]
    span = float(np.median(spacing)) if spacing.size else float("nan")
    where = (f"its {n_lit} pixels with counts (max {float(counts.max()):g}) all lie where no training-grid "
             f"pixel samples ({sampling.coverage:.0%} of the grid falls on the frame)")
    if hits == 0 and method == "bilinear" and span >= 1.5:
        return (f"{where}: one grid pixel spans {span:.1f} detector pixels and bilinear point-sampling falls "
                "between the bright pixels; set calibration.method = \"area\" (or \"auto\")")
    if hits == 0:
        return f"{where}: check the beam centre, distance and wavelength against the detector"
    return (f"the sampled pixels with counts ({hits}) weigh nothing after the flatfield or the Ewald limit "
            f"({sampling.coverage:.0%} of the grid falls on the frame)")
