"""The calibration fast paths (gather for bilinear, non-zero binning for area) against the
dense cv2.remap implementation they replaced, on sparse and dense frames, with masks, gaps,
saturation, flatfield and NaN; and the case the dense area sampling got wrong (a target
pixel covering more than 8x8 frame pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym.daemon import calibrate as cal
from xtalsym.daemon.sim import DetectorGeometry, render, to_counts
from xtalsym.offline import structures

TRAINING = cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256)
# detector pixels ~3x finer than the training grid's (area: 3x3 sub-samples), beam off-centre
# on a fractional pixel, another wavelength: nothing lines up with the training grid
FINE = DetectorGeometry(pixels_x=720, pixels_y=700, pixel_size_m=25e-6, distance_m=0.45, wavelength_m=3.1e-12,
                        beam_center_x_px=371.5, beam_center_y_px=338.5)


def geometry(det: DetectorGeometry) -> cal.FrameGeometry:
    return cal.FrameGeometry(**det.stream_geometry())


@pytest.fixture(scope="module")
def sparse_frame():
    nacl = structures.load_structure(structures.shipped_structures_dir() / "NaCl.cif").structure
    return to_counts(render(nacl, FINE, axes=("z",))["z"], None)


def outside_centre(image: np.ndarray) -> np.ndarray:
    """The direct beam dominates the max; compare what the shaping sees (it sets the centre aside)."""
    out = image.astype(np.float64).copy()
    out[116:138, 116:138] = 0
    return out


def agree(new: np.ndarray, old: np.ndarray, corr: float) -> None:
    a, b = outside_centre(new), outside_centre(old)
    assert b.max() > 0 and a.max() > 0
    c = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert c > corr, c
    # the same bright pixels light up (within one pixel)
    for r, col in np.argwhere(b > 0.3 * b.max()):
        assert a[max(0, r - 1):r + 2, max(0, col - 1):col + 2].max() > 0.1 * b.max(), (r, col)


def test_fast_area_uses_binning_and_agrees_with_remap_on_a_sparse_frame(sparse_frame):
    sampling = cal.build_map(geometry(FINE), TRAINING, "area")
    assert sampling.bins is not None and sampling.map_x.shape[0] == 9  # 3x3 sub-samples in the dense path
    assert (sparse_frame > 0).mean() < cal.DENSE_FRACTION  # the sparse path runs
    agree(cal.apply_map(sparse_frame, sampling), cal.apply_map_remap(sparse_frame, sampling), 0.98)


def test_fast_area_agrees_with_remap_on_a_dense_frame(sparse_frame):
    dense = (sparse_frame + np.random.default_rng(1).poisson(30, sparse_frame.shape)).astype(np.uint16)
    assert (dense > 0).mean() > cal.DENSE_FRACTION  # the dense path runs
    sampling = cal.build_map(geometry(FINE), TRAINING, "area")
    agree(cal.apply_map(dense, sampling), cal.apply_map_remap(dense, sampling), 0.98)


def test_sparse_and_dense_binning_give_the_same_result(sparse_frame, monkeypatch):
    sampling = cal.build_map(geometry(FINE), TRAINING, "area")
    mask = np.zeros(sparse_frame.shape, np.uint32)
    mask[200:212] = 1
    frame = sparse_frame.copy()
    frame[200:212] = 65535
    frame[400, 400] = 65535  # dead pixel not in the mask: excluded by value
    sparse = cal.apply_map(frame, sampling, pixel_mask=mask, saturation_value=9000)
    monkeypatch.setattr(cal, "DENSE_FRACTION", 0.0)  # every frame counts as dense
    dense = cal.apply_map(frame, sampling, pixel_mask=mask, saturation_value=9000)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6 * float(dense.max()))


@pytest.mark.parametrize("method", ["bilinear", "area"])
def test_fast_paths_match_remap_with_mask_gaps_saturation_and_flatfield(sparse_frame, method):
    sampling = cal.build_map(geometry(FINE), TRAINING, method)
    frame = sparse_frame.copy()
    frame[300:310] = 65535  # EIGER gap rows
    frame[50, 60] = 60000  # hot pixel, masked
    mask = np.zeros(frame.shape, np.uint32)
    mask[300:310] = 1
    mask[50, 60] = 8
    flatfield = np.full(frame.shape, 1.0, np.float32)
    flatfield[:, :200] = 2.0
    flatfield[10, 10] = np.nan
    kwargs = dict(pixel_mask=mask, saturation_value=9500, flatfield=flatfield)
    new, old = cal.apply_map(frame, sampling, **kwargs), cal.apply_map_remap(frame, sampling, **kwargs)
    if method == "bilinear":  # the same samples; cv2.remap quantises its weights to 1/32
        assert np.abs(cal.to_uint8(new).astype(int) - cal.to_uint8(old)).max() <= 2
        np.testing.assert_allclose(new, old, atol=0.02 * float(old.max()))
    else:
        agree(new, old, 0.98)
    prepared = cal.prepare(sampling, pixel_mask=mask, flatfield=flatfield)  # once per series, as the workers do
    np.testing.assert_array_equal(prepared.apply(frame, saturation_value=9500), new)


def test_float_frames_with_nan_and_negative_values(sparse_frame):
    frame = sparse_frame.astype(np.float32)
    frame[100, :] = np.nan
    frame[101, :] = -5.0
    for method in ("bilinear", "area"):
        sampling = cal.build_map(geometry(FINE), TRAINING, method)
        new = cal.apply_map(frame, sampling)
        assert np.isfinite(new).all() and new.min() >= 0
        agree(new, cal.apply_map_remap(frame, sampling), 0.98)


def test_area_binning_sees_every_pixel_of_a_footprint_wider_than_8():
    """One target pixel covers ~24x24 frame pixels. The dense sampling (at most 8x8 points,
    3 pixels apart) misses single-pixel spots between its points; the binning cannot."""
    det = DetectorGeometry(pixels_x=1200, pixels_y=1200, pixel_size_m=75e-6, distance_m=9.6)
    sampling = cal.build_map(geometry(det), TRAINING, "area")
    rng = np.random.default_rng(3)
    frame = np.zeros((1200, 1200), np.uint16)
    rows, cols = rng.integers(200, 1000, 40), rng.integers(200, 1000, 40)
    frame[rows, cols] = 5000
    new = cal.apply_map(frame, sampling)
    b = sampling.bins
    hit = np.unique(b.target[rows * 1200 + cols])
    assert (new.ravel()[hit] > 0).all()  # every spot lands in its target pixel
    assert np.count_nonzero(new) == hit.size
    # the mean over the footprint: 5000 x spots / pixels in the bin, times the gain
    spots_per_target = np.bincount(b.target[rows * 1200 + cols], minlength=256 * 256)
    expected = 5000 * spots_per_target[hit] / b.count[hit] * b.gain[hit]
    np.testing.assert_allclose(new.ravel()[hit], expected, rtol=1e-5)
    old = cal.apply_map_remap(frame, sampling)
    assert np.count_nonzero(old) < 0.8 * np.count_nonzero(new)  # the reason for the binning


def test_coarse_frame_area_is_the_bilinear_gather():
    det = DetectorGeometry(pixels_x=240, pixels_y=250, pixel_size_m=100e-6, distance_m=0.45,
                           beam_center_x_px=118.0, beam_center_y_px=126.0)
    sampling = cal.build_map(geometry(det), TRAINING, "area")
    assert sampling.bins is None and sampling.map_x.shape[0] == 1
    frame = np.random.default_rng(0).integers(0, 1000, (250, 240)).astype(np.uint16)
    np.testing.assert_allclose(cal.apply_map(frame, sampling), cal.apply_map_remap(frame, sampling),
                               atol=0.02 * 1000)
