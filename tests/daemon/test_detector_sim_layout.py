"""detector-sim's EIGER2 module layouts (gaps, bad pixels, in the frames and the pixel mask),
its render cache, and a gapped EIGER2 frame calibrated back onto the training grid."""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym.daemon import calibrate as cal
from xtalsym.daemon import protocols as proto
from xtalsym.daemon import sim as ds
from xtalsym.offline import simulate as sim
from xtalsym.offline import structures

SHIPPED = structures.shipped_structures_dir()


@pytest.mark.parametrize("name, size", [("eiger2-4m", (2068, 2162)), ("eiger2-16m", (4148, 4362)),
                                        ("eiger2-1m", (1028, 1062)), ("eiger2-500k", (1028, 512))])
def test_eiger2_layout_sizes_gaps_and_bad_pixels(name, size):
    layout = ds.eiger2_layout(name, seed=1)
    assert (layout.pixels_x, layout.pixels_y) == size and layout.mask.shape == (size[1], size[0])
    geometry = ds.eiger2_geometry(name)
    assert (geometry.pixels_x, geometry.pixels_y) == size and geometry.pixel_size_m == 75e-6
    gap = (layout.mask & ds.MASK_GAP) != 0
    module_rows, module_cols = ds.EIGER2_MODULES[name]
    # gaps: 38 full rows between module rows, 12 full columns between module columns
    assert gap.all(axis=1).sum() == 38 * (module_rows - 1)
    assert gap.all(axis=0).sum() == 12 * (module_cols - 1)
    if module_rows > 1:
        assert gap[512:550].all() and not gap[511].all() and not gap[550].all()
    if module_cols > 1:
        assert gap[:, 1028:1040].all() and not gap[:, 1027].all()
    active = size[0] * size[1] - gap.sum()
    assert active == module_rows * module_cols * 512 * 1028
    dead = (layout.mask & ds.MASK_DEAD) != 0
    assert abs(dead.sum() - 1e-4 * layout.mask.size) <= 1
    assert ((layout.mask & ds.MASK_NOISY) != 0).sum() == round(2e-5 * layout.mask.size)


def test_layout_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown detector layout 'eiger2-32m'"):
        ds.eiger2_layout("eiger2-32m")
    with pytest.raises(ValueError, match="layout eiger2-500k is 1028 x 512 pixels"):
        ds.DetectorSim([SHIPPED / "NaCl.cif"], geometry=ds.DetectorGeometry(512, 512),
                       layout=ds.eiger2_layout("eiger2-500k"))


def test_layout_in_frames_mask_start_message_and_render_cache(tmp_path, monkeypatch):
    name = "eiger2-500k"
    layout = ds.eiger2_layout(name)
    s = ds.DetectorSim([SHIPPED / "NaCl.cif"], geometry=ds.eiger2_geometry(name), layout=layout,
                       cache_dir=tmp_path)
    bad = layout.mask != 0
    for frame in s.samples[0].axis_frames.values():
        assert frame.dtype == np.uint16 and (frame[bad] == 65535).all() and (frame[~bad] < 65535).all()
    start = proto.decode("stream_v2", s.start_message())
    np.testing.assert_array_equal(start.pixel_mask["threshold_1"], layout.mask)
    assert list(tmp_path.glob("NaCl-*.npz"))
    monkeypatch.setattr(ds, "render", lambda *a, **k: pytest.fail("rendered again despite the cache"))
    again = ds.DetectorSim([SHIPPED / "NaCl.cif"], geometry=ds.eiger2_geometry(name), layout=layout,
                           cache_dir=tmp_path)
    for axis, frame in again.samples[0].axis_frames.items():
        np.testing.assert_array_equal(frame, s.samples[0].axis_frames[axis])


@pytest.mark.slow
def test_gapped_eiger2_frame_calibrates_onto_the_training_grid():
    """An EIGER2 1M face (one 38-row gap through the pattern, bad pixels, the beam off-centre):
    `auto` picks area (a grid pixel spans 4 detector pixels) and the calibrated frame matches the
    training-grid render."""
    nacl = structures.load_structure(SHIPPED / "NaCl.cif").structure
    geometry = ds.eiger2_geometry("eiger2-1m", beam_offset_px=(6.0, -60.0))
    layout = ds.eiger2_layout("eiger2-1m")
    frame = ds.to_counts(ds.render(nacl, geometry, axes=("z",))["z"], None)
    frame[layout.mask != 0] = 65535
    training = cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256)
    fg = cal.FrameGeometry(**geometry.stream_geometry())
    assert cal.auto_method(fg, training) == "area"
    sampling = cal.build_map(fg, training, "area")
    out = cal.calibrate(frame, sampling, pixel_mask=layout.mask)
    ref = sim.to_raw_uint8(sim.simulate_axes(nacl, axes=("z",), **sim.DATASET_OPTIONS)["z"])
    # compare where the detector has data: targets mostly on active pixels, off the direct beam
    b = sampling.bins
    in_gap = np.bincount(b.target[layout.mask.ravel() != 0], minlength=b.count.size + 1)[:-1]
    keep = (in_gap < 0.5 * b.count) & (b.count > 0)
    keep = keep.reshape(256, 256)
    keep[116:138, 116:138] = False  # the direct beam sets the max of both
    assert keep.mean() > 0.8
    corr = np.corrcoef(out[keep].astype(float), ref[keep].astype(float))[0, 1]
    assert corr > 0.9, corr
    gapped = (in_gap >= 0.5 * b.count).reshape(256, 256) & (b.count.reshape(256, 256) > 0)
    assert gapped.any() and out[gapped].max() < 255  # 2^16 - 1 in the gap never makes the max
