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
                received=t, series_number=1)


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
    with pytest.raises(AssemblyError, match="no_axis.*assembly.axis_from"):
        identify(series_id=3, series_unique_id=None, image_id=0, user_data={}, axis_from="user_data")
    with pytest.raises(AssemblyError, match="bad_axis"):
        identify(series_id=3, series_unique_id=None, image_id=0, user_data={"axis": "w"})
    # auto (the default): user_data when the frame has it, else the image-id order
    assert identify(series_id=3, series_unique_id=None, image_id=5, user_data=None) == ("3:1", "z")
    assert identify(series_id=3, series_unique_id=None, image_id=5, user_data={"axis": "x"}) == ("3:1", "x")
    # keyed by the daemon's series number: a reused series_unique_id cannot join two series
    assert identify(series_id=1, series_unique_id="same", image_id=1, user_data=None, series_number=7) \
        == ("same#7:0", "y")


def test_assembler_keys_samples_by_series_and_closes_them_at_the_end():
    a = Assembler(timeout_seconds=2.0)
    first, second = _view("k", "x"), _view("k", "y")
    second.series_number = 2  # same sample key, next series: two samples, never one
    a.add(first, 0.0)
    a.add(second, 0.1)
    assert len(a.open) == 2
    closed = a.close_series(1, "end")
    assert [(q.sample_key, q.closed_by, q.axes, q.final) for q in closed] == [("k", "end", ["x"], True)]
    assert list(a.open) == [(2, "k")]
    # a sample with a view still in the workers is not timed out (its late view would be an orphan)
    assert a.expire(10.0, busy={(2, "k")}) == [] and a.next_deadline(busy={(2, "k")}) is None
    assert [q.closed_by for q in a.expire(10.0)] == ["timeout"]


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


def test_auto_method_and_why_a_frame_calibrates_empty(nacl):
    """A detector ~4x finer than the training grid: auto picks area (bilinear point-sampling of a
    frame with one lit pixel between the sample points finds nothing, and the empty_frame
    message says so and names the fix); the same detector at the grid's q/px stays bilinear."""
    fine = DetectorGeometry(pixels_x=1024, pixels_y=1024, pixel_size_m=75e-6 / 4, distance_m=0.4)
    geometry = frame_geometry(fine)
    assert cal.footprint_px(geometry, TRAINING) == pytest.approx(4.0)
    assert cal.auto_method(geometry, TRAINING) == "area"
    coarse = DetectorGeometry(pixels_x=300, pixels_y=300, pixel_size_m=75e-6, distance_m=0.4)
    assert cal.auto_method(frame_geometry(coarse), TRAINING) == "bilinear"
    bilinear = cal.build_map(geometry, TRAINING, "bilinear")
    frame = np.zeros((1024, 1024), np.uint16)
    near = np.zeros(frame.shape, bool)  # pixels a bilinear sample point touches
    for dy in (0, 1):
        for dx in (0, 1):
            rows = np.clip(np.floor(bilinear.map_y[0]).astype(int) + dy, 0, 1023)
            cols = np.clip(np.floor(bilinear.map_x[0]).astype(int) + dx, 0, 1023)
            near[rows, cols] = True
    row, col = np.argwhere(~near[400:600, 400:600])[0] + 400  # a pixel between the sample points
    frame[row, col] = 500
    with pytest.raises(cal.CalibrationError, match="empty_frame"):
        cal.calibrate(frame, bilinear)
    why = cal.explain_empty(frame, bilinear, method="bilinear")
    assert "calibration.method = \"area\"" in why and "spans 4.0 detector pixels" in why, why
    assert cal.calibrate(frame, cal.build_map(geometry, TRAINING, "area")).max() == 255  # area sees it
    assert "no counts" in cal.explain_empty(np.zeros_like(frame), bilinear)
    assert "excluded" in cal.explain_empty(np.full_like(frame, 65535), bilinear)


def test_geometry_hint_names_the_stream_field_and_the_config_key():
    from xtalsym.daemon.ingest import geometry_hint
    from xtalsym.daemon.protocols import decode, encode_stream_v2_start

    geo = {"beam_center_x_px": 10.0, "beam_center_y_px": 10.0, "pixel_size_x_m": 75e-6, "pixel_size_y_m": 75e-6,
           "wavelength_m": 1e-10, "image_size_x_px": 20, "image_size_y_px": 20}
    start = decode("stream_v2", encode_stream_v2_start(series_id=1, geometry=geo, channels=["c"], image_dtype="uint16",
                                                       number_of_images=1,
                                                       extra={"detector_translation": [0.0, 0.0, -0.237]}))
    assert start.geometry["detector_distance_m"] is None  # a negative z is never a distance
    assert any("detector_translation" in w and "[geometry] detector_distance_m" in w for w in start.warnings)
    t = SeriesTracker()
    t.handle(start)
    with pytest.raises(cal.CalibrationError) as missing:
        cal.resolve_geometry(t.current.stream_geometry, {})
    hint = geometry_hint(t.current, {}, missing.value)
    assert "detector_translation [0.0, 0.0, -0.237] has no z > 0" in hint and "set [geometry] detector_distance_m" in hint
    negative = decode("stream_v2", encode_stream_v2_start(series_id=2, geometry={**geo, "detector_distance_m": -0.2},
                                                          channels=["c"], image_dtype="uint16", number_of_images=1))
    t.handle(negative)
    with pytest.raises(cal.CalibrationError) as bad:
        cal.resolve_geometry(t.current.stream_geometry, {})
    assert geometry_hint(t.current, {}, bad.value) == \
        "the stream's detector_distance gave it: set [geometry] detector_distance_m"


def test_image_id_gaps_counted_once_warned(caplog):
    counted = {}
    t = SeriesTracker(count=lambda key, n=1: counted.__setitem__(key, counted.get(key, 0) + n))
    t.handle(SeriesStart(series_id=1, series_unique_id="u", geometry={}, number_of_images=8))
    with caplog.at_level("WARNING", logger="xtalsym.daemon.ingest"):
        for image_id in (0, 2, 4, 5):  # 1 and 3 went to another client; 6, 7 never came
            assert isinstance(t.handle(_image(1, image_id, uid="u")), Accepted)
        t.handle(SeriesEnd(1, "u"))
    assert t.frames_missing == 4 and counted["frames_missing"] == 4
    assert counted["series_start"] == 1 and counted["series_end"] == 1
    assert [r.getMessage().count("round-robin") for r in caplog.records] == [1]
    assert t.take_closed() == [(1, "end")] and t.take_closed() == []
