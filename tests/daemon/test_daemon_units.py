"""Calibration physics, configuration validation, assembly and the series state machine (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from xtalsym.daemon import calibrate as cal
from xtalsym.daemon.assemble import Assembler, AssemblyError, View, identify
from xtalsym.daemon.config import ConfigError, defaults, load_config, validate
from xtalsym.daemon.ingest import Accepted, Dropped, SeriesTracker
from xtalsym.daemon.protocols import Image, SeriesEnd, SeriesStart
from xtalsym.daemon.sim import DetectorGeometry, render, to_counts
from xtalsym.offline import simulate as sim
from xtalsym.offline import structures
from xtalsym.testing import REPO_ROOT

TRAINING = cal.TrainingGeometry(3.5e-12, 0.4, 75e-6, 256)


@pytest.fixture(scope="module")
def nacl():
    return structures.load_structure(structures.shipped_structures_dir() / "NaCl.cif").structure


def training_raw(structure, axis="z"):
    return sim.to_raw_uint8(sim.simulate_axes(structure, axes=(axis,), **sim.DATASET_OPTIONS)[axis])


def spots(raw, level=60):
    """Local maxima above level (row, col)."""
    import cv2

    dil = cv2.dilate(raw, np.ones((3, 3), np.uint8))
    return np.argwhere((raw == dil) & (raw >= level))


def frame_geometry(g: DetectorGeometry) -> cal.FrameGeometry:
    return cal.FrameGeometry(**g.stream_geometry())


@pytest.mark.parametrize("detector", [
    # finer, off-centre, rectangular, another wavelength
    DetectorGeometry(pixels_x=380, pixels_y=340, pixel_size_m=55e-6, distance_m=0.5, wavelength_m=2.5e-12,
                     beam_center_x_px=190.5, beam_center_y_px=160.5),
    # coarser pixels, shorter distance, integral beam centre
    DetectorGeometry(pixels_x=240, pixels_y=250, pixel_size_m=100e-6, distance_m=0.45, wavelength_m=3.5e-12,
                     beam_center_x_px=118.0, beam_center_y_px=126.0),
])
def test_calibrated_frame_matches_training_grid(nacl, detector):
    ref = training_raw(nacl)
    frame = to_counts(render(nacl, detector, axes=("z",))["z"], None)
    sampling = cal.build_map(frame_geometry(detector), TRAINING)
    assert sampling.coverage == 1.0
    out = cal.calibrate(frame, sampling)
    corr = np.corrcoef(out.ravel().astype(float), ref.ravel().astype(float))[0, 1]
    fine = detector.pixel_size_m / detector.distance_m / detector.wavelength_m < 75e-6 / 0.4 / 3.5e-12
    assert corr > (0.98 if fine else 0.9), corr
    # every bright spot of the training render is found within one pixel
    got = spots(out, 40)
    for r, c in spots(ref, 100):
        assert np.min(np.abs(got - [r, c]).max(axis=1)) <= 1, (r, c)


def test_mask_gap_and_saturation_excluded(nacl):
    det = DetectorGeometry(pixels_x=380, pixels_y=340, pixel_size_m=55e-6, distance_m=0.5,
                           beam_center_x_px=190.5, beam_center_y_px=160.5)
    frame = to_counts(render(nacl, det, axes=("z",))["z"], None)
    sampling = cal.build_map(frame_geometry(det), TRAINING)
    clean = cal.calibrate(frame, sampling)
    gapped = frame.copy()
    gapped[100:104] = 65535  # EIGER gap rows (2^16 - 1): excluded, never the max
    hot = gapped.copy()
    hot[5, 5] = 60000  # a hot pixel masked by the stream's pixel mask
    mask = np.zeros(frame.shape, np.uint32)
    mask[5, 5] = 8
    out = cal.calibrate(hot, sampling, pixel_mask=mask)
    assert out.max() == 255 and np.corrcoef(out.ravel(), clean.ravel())[0, 1] > 0.99
    sat = cal.calibrate(hot, sampling, saturation_value=50000)  # the same pixel excluded by saturation
    assert np.array_equal(sat, out)
    with pytest.raises(cal.CalibrationError, match="empty_frame"):
        cal.calibrate(np.zeros_like(frame), sampling)
    with pytest.raises(cal.CalibrationError, match="size_mismatch"):
        cal.calibrate(frame[:-1], sampling)


def test_flatfield_restores_a_weak_module(nacl):
    det = DetectorGeometry(pixels_x=380, pixels_y=340, pixel_size_m=55e-6, distance_m=0.5,
                           beam_center_x_px=190.5, beam_center_y_px=160.5)
    frame = to_counts(render(nacl, det, axes=("z",))["z"], None).astype(np.float32)
    sampling = cal.build_map(frame_geometry(det), TRAINING)
    clean = cal.calibrate(frame, sampling)
    weak = frame.copy()
    weak[:, :190] *= 0.25  # one half of the detector a quarter as sensitive
    flatfield = np.ones(frame.shape, np.float32)
    flatfield[:, :190] = 4.0
    assert np.corrcoef(cal.calibrate(weak, sampling).ravel(), clean.ravel())[0, 1] < 0.95
    fixed = cal.calibrate(weak, sampling, flatfield=flatfield)
    assert np.abs(fixed.astype(int) - clean.astype(int)).max() <= 1
    flatfield[200, 200] = np.nan  # a pixel without a flatfield value is excluded, not NaN everywhere
    flatfield[201, 201] = 0.0
    assert np.abs(cal.calibrate(weak, sampling, flatfield=flatfield).astype(int) - clean.astype(int)).max() <= 2
    with pytest.raises(cal.CalibrationError, match="flatfield_mismatch"):
        cal.calibrate(weak, sampling, flatfield=flatfield[:-1])


def test_flatfield_applied_is_read_from_either_stream():
    from xtalsym.daemon.ingest import flatfield_applied

    def start(raw):
        return SeriesStart(series_id=1, series_unique_id=None, geometry={}, raw=raw)

    assert flatfield_applied(start({"flatfield_enabled": False})) is False  # stream V2
    assert flatfield_applied(start({"flatfield_enabled": True})) is True
    assert flatfield_applied(start({"config": {"flatfield_correction_applied": False}})) is False  # stream V1
    assert flatfield_applied(start({"flatfield_enabled": "no"})) is None  # not a bool: the stream did not say
    assert flatfield_applied(start({})) is None


def test_area_method_runs_and_agrees(nacl):
    det = DetectorGeometry(pixels_x=380, pixels_y=340, pixel_size_m=30e-6, distance_m=0.3,
                           beam_center_x_px=190.5, beam_center_y_px=170.5)
    frame = to_counts(render(nacl, det, axes=("z",))["z"], None)
    a = cal.calibrate(frame, cal.build_map(frame_geometry(det), TRAINING, "area"))
    b = cal.calibrate(frame, cal.build_map(frame_geometry(det), TRAINING, "bilinear"))
    assert cal.build_map(frame_geometry(det), TRAINING, "area").map_x.shape[0] == 4  # 2x2 sub-samples
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_resolve_geometry_config_wins_and_missing_named():
    stream = {"beam_center_x_px": 10.0, "beam_center_y_px": 12.0, "pixel_size_x_m": 75e-6,
              "pixel_size_y_m": 75e-6, "wavelength_m": 3e-12, "detector_distance_m": None,
              "image_size_x_px": 100, "image_size_y_px": 90}
    with pytest.raises(cal.CalibrationError, match="detector_distance_m not given"):
        cal.resolve_geometry(stream, {})
    g = cal.resolve_geometry(stream, {"detector_distance_m": 0.2, "beam_center_x_px": 50.0})
    assert g.detector_distance_m == 0.2 and g.beam_center_x_px == 50.0 and g.beam_center_y_px == 12.0
    with pytest.raises(cal.CalibrationError) as err:
        cal.resolve_geometry({}, {}, frame_shape=(10, 10))
    assert "wavelength_m" in str(err.value) and "image_size" not in str(err.value)


def test_config_defaults_and_every_error_at_once(tmp_path):
    cfg = load_config()
    assert cfg.ingest.address == "tcp://127.0.0.1:31001" and cfg.ingest.socket == "pull"
    assert cfg.ingest.mode == "connect" and cfg.publish.address == "tcp://127.0.0.1:5556"
    assert cfg.geometry_override == {}
    path = tmp_path / "d.toml"
    path.write_text('[ingest]\nprotocol = "v9"\nbogus = 1\n[pipeline]\nworkers = 0\n[geometry]\n'
                    'wavelength_m = -1\n[nope]\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for expected in ("ingest.protocol = 'v9'", "ingest.bogus = 1: unknown key", "pipeline.workers = 0",
                     "geometry.wavelength_m = -1", "[nope]: unknown section"):
        assert expected in text
    assert len(err.value.errors) == 5
    # the example config documents exactly the defaults
    import tomllib

    example = REPO_ROOT / "systemd" / "xtalsym.example.toml"
    data = tomllib.loads(example.read_text())
    validate(data)
    d = defaults()
    for section, values in data.items():
        for key, value in values.items():
            assert d[section][key] == value, (section, key)
    # round trip of the resolved copy
    assert validate(tomllib.loads(cfg.to_toml())).to_dict() == cfg.to_dict()


def _view(key, axis, t=0.0):
    return View(sample_key=key, axis=axis, series_id=1, image_id=0, shaped=np.zeros((4, 4, 3), np.uint8),
                received=t)


def test_assembler_partial_complete_timeout():
    a = Assembler(timeout_seconds=2.0)
    r = a.add(_view("s", "x"), 0.0)
    assert [(q.status, q.final, q.axes) for q in r] == [("partial", False, ["x"])]
    a.add(_view("s", "z"), 0.5)
    r = a.add(_view("s", "y"), 1.0)
    assert [(q.status, q.final, q.closed_by, q.axes) for q in r] == [("complete", True, "complete", ["x", "y", "z"])]
    a.add(_view("t", "y"), 1.0)
    assert a.expire(2.9) == []
    r = a.expire(3.0)
    assert [(q.status, q.final, q.closed_by, q.axes) for q in r] == [("partial", True, "timeout", ["y"])]
    x, present = r[0].tensors(4)
    assert present.tolist() == [False, True, False] and x.shape == (3, 3, 4, 4)
    quiet = Assembler(publish_partial=False)
    assert quiet.add(_view("u", "x"), 0) == [] and [q.status for q in quiet.close_all()] == ["partial"]


def test_identify():
    assert identify(series_id=3, series_unique_id=None, image_id=4, user_data={"axis": "Z", "sample_id": "m1"}) \
        == ("m1", "z")
    assert identify(series_id=3, series_unique_id="u", image_id=4, user_data=None, axis_from="image_id",
                    axis_order=("z", "x", "y")) == ("u:1", "x")
    with pytest.raises(AssemblyError, match="no_axis"):
        identify(series_id=3, series_unique_id=None, image_id=0, user_data={})
    with pytest.raises(AssemblyError, match="bad_axis"):
        identify(series_id=3, series_unique_id=None, image_id=0, user_data={"axis": "w"})


def _start(sid, uid=None):
    return SeriesStart(series_id=sid, series_unique_id=uid, geometry={})


def _image(sid, iid=0, uid=None):
    return Image(series_id=sid, image_id=iid, data={"image": np.zeros((2, 2), np.uint16)}, series_unique_id=uid)


def test_series_state_machine():
    t = SeriesTracker()
    assert isinstance(t.handle(_image(1)), Dropped) and t.handle(_image(1)).reason == "no_start"
    assert t.handle(SeriesEnd(1)).reason == "stale_end"
    assert t.handle(_start(1, "a")) is None
    assert isinstance(t.handle(_image(1, uid="a")), Accepted)
    assert t.handle(_image(2)).reason == "wrong_series"
    assert t.handle(_image(1, uid="b")).reason == "wrong_series"
    assert t.handle(SeriesEnd(0)).reason == "stale_end"
    assert t.handle(_start(2, "c")) is None  # restart mid-series
    assert t.events["restart"] == 1
    assert t.handle(SeriesEnd(1, "a")).reason == "stale_end"
    assert t.handle(SeriesEnd(2, "c")) is None and t.current is None
    full = {"beam_center_x_px": 1.0, "beam_center_y_px": 1.0, "pixel_size_x_m": 1e-4, "pixel_size_y_m": 1e-4,
            "wavelength_m": 1e-12, "detector_distance_m": 0.1}
    c = SeriesTracker(geometry_override=full, frames_before_start="config")
    accepted = c.handle(_image(9))
    assert isinstance(accepted, Accepted) and accepted.series.from_config
