"""`xtalsym classify`: EIGER master/data HDF5 files written here (bitshuffle/LZ4 via hdf5plugin,
external links), TIFF / CBF / PNG / .npy images, the same frames streamed live through the
daemon over real sockets giving the same predictions, and bad inputs as one line."""

from __future__ import annotations

import csv
import json
import logging
import time

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
hdf5plugin = pytest.importorskip("hdf5plugin")
pytest.importorskip("torch")
pytest.importorskip("onnx")
zmq = pytest.importorskip("zmq")

from xtalsym.daemon.classify import classify_recorded  # noqa: E402
from xtalsym.daemon.config import load_config  # noqa: E402
from xtalsym.daemon.protocols import materialise  # noqa: E402
from xtalsym.daemon.recorded import RecordedError, open_recorded  # noqa: E402
from xtalsym.daemon.sim import DetectorGeometry, DetectorSim  # noqa: E402
from xtalsym.offline import structures  # noqa: E402
from xtalsym.testing import InProcessDaemon, tiny_bundle  # noqa: E402

SHIPPED = structures.shipped_structures_dir()
GEOMETRY = DetectorGeometry(
    pixels_x=300,
    pixels_y=290,
    pixel_size_m=55e-6,
    distance_m=0.33,
    wavelength_m=3.5e-12,
    beam_center_x_px=150.5,
    beam_center_y_px=140.5,
)
GEOMETRY_TOML = {
    "beam_center_x_px": 150.5,
    "beam_center_y_px": 140.5,
    "pixel_size_x_m": 55e-6,
    "pixel_size_y_m": 55e-6,
    "wavelength_m": 3.5e-12,
    "detector_distance_m": 0.33,
}


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return tiny_bundle(tmp_path_factory.mktemp("classify"))


@pytest.fixture(scope="module")
def components(bundle_path):
    from xtalsym.daemon.service import load_components

    return load_components(config(bundle_path))


def config(bundle_path, **sections):
    overrides = {
        "bundle": {"path": str(bundle_path), "backend": "onnxruntime", "device": "cpu"},
        "pipeline": {"workers": 1},
        "assembly": {"axis_from": "image_id"},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def sim():
    return DetectorSim([SHIPPED / "NaCl.cif", SHIPPED / "Si.cif"], geometry=GEOMETRY, gap_rows=(200, 204))


@pytest.fixture(scope="module")
def master(sim, tmp_path_factory):
    return sim.write_hdf5(tmp_path_factory.mktemp("eiger") / "series1", frames_per_file=4)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eiger_master_and_data_files_read_back(sim, master):
    assert sorted(p.name for p in master.parent.iterdir()) == [
        "series1_data_000001.h5",
        "series1_data_000002.h5",
        "series1_master.h5",
    ]
    with h5py.File(master) as f:  # the EIGER layout: external links, bitshuffle/LZ4 one-frame chunks
        link = f["/entry/data"].get("data_000002", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "series1_data_000002.h5"
        ds = f["/entry/data/data_000002"]
        assert ds.shape == (2, 290, 300) and ds.chunks == (1, 290, 300)
        assert ds.id.get_create_plist().get_filter(0)[0] == 32008
        assert ds.attrs["image_nr_low"] == 5
    (series,) = open_recorded([master])
    for key, value in GEOMETRY_TOML.items():
        assert series.geometry[key] == pytest.approx(value, rel=1e-12), key
    assert series.geometry["image_size_x_px"] == 300 and series.geometry["image_size_y_px"] == 290
    assert series.n_frames == 6 and series.pixel_mask is not None and series.pixel_mask[201].all()
    frames = list(series.frames())
    assert [f.image_id for f in frames] == list(range(6))
    expected = [a for _, a, _ in sim.images()]
    for frame, want in zip(frames, expected):
        assert type(frame.data).__name__ == "CompressedFrame"  # the chunk as stored, decompressed by our code
        np.testing.assert_array_equal(materialise(frame.data), want)
        assert frame.error is None


@pytest.mark.slow
def test_offline_equals_live_through_the_daemon(sim, master, bundle_path, components, tmp_path):
    """The same frames: recorded (HDF5) and classified offline, and streamed live (stream V2 over a
    real PUSH socket into the daemon): the same predictions for the same images."""
    out = tmp_path / "offline.jsonl"
    summary = classify_recorded(
        [master],
        config=config(bundle_path),
        components=components,
        jsonl_path=out,
        csv_path=tmp_path / "offline.csv",
        progress=False,
    )
    assert summary.frames == 6 and summary.samples == 2 and summary.complete == 2 and not summary.bad_frames
    offline = {tuple(f["image_id"] for f in m["frames"]): m for m in read_jsonl(out)}

    live_summary = InProcessDaemon(components=components, assembly={"axis_from": "image_id"}).run_sim(sim, finals=2)
    live = {tuple(f["image_id"] for f in m["frames"]): m for m in live_summary.messages if m["final"]}
    assert set(live) == set(offline) == {(0, 1, 2), (3, 4, 5)}
    for ids, m in live.items():
        o = offline[ids]
        assert [t["space_group"] for t in o["top"]] == [t["space_group"] for t in m["top"]]
        np.testing.assert_allclose(
            [t["probability"] for t in o["top"]], [t["probability"] for t in m["top"]], atol=1e-5
        )
        assert o["status"] == m["status"] == "complete" and o["axes"] == m["axes"]
        assert (o["open_set"]["space_group"], o["open_set"]["unknown"]) == (
            m["open_set"]["space_group"],
            m["open_set"]["unknown"],
        )
        assert [n["material_id"] for n in o["open_set"]["neighbours"]] == [
            n["material_id"] for n in m["open_set"]["neighbours"]
        ]
        assert o["schema"] == m["schema"] and set(m) <= set(o)  # the daemon's schema, field for field
    rows = list(csv.DictReader((tmp_path / "offline.csv").open()))
    assert [r["image_ids"] for r in rows] == ["0 1 2", "3 4 5"]
    assert rows[0]["space_group"] == str(offline[(0, 1, 2)]["top"][0]["space_group"])
    assert rows[0]["sources"].startswith("series1_master.h5:/entry/data/data_000001[0]")


@pytest.mark.slow
def test_images_in_every_format_give_the_hdf5_predictions(bundle_path, components, tmp_path):
    """TIFF, CBF, PNG (16-bit) and .npy of the same frames, geometry from the TOML only, classify like
    the HDF5 file with the geometry in its NeXus fields."""
    import fabio
    import tifffile
    from PIL import Image

    sim = DetectorSim([SHIPPED / "NaCl.cif"], geometry=GEOMETRY)
    frames = [a for _, a, _ in sim.images()]
    h5 = sim.write_hdf5(tmp_path / "ref")
    ref = tmp_path / "ref.jsonl"
    classify_recorded([h5], config=config(bundle_path), components=components, jsonl_path=ref, progress=False)
    (want,) = read_jsonl(ref)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(frames), photometric="minisblack")  # one 3-page TIFF
    for i, f in enumerate(frames):
        fabio.cbfimage.CbfImage(data=f.astype(np.int32)).write(str(tmp_path / f"f{i}.cbf"))
        Image.fromarray(f).save(tmp_path / f"f{i}.png")
        np.save(tmp_path / f"f{i}.npy", f)
    inputs = {
        "tiff": [tmp_path / "stack.tif"],
        "cbf": sorted(tmp_path.glob("f*.cbf")),
        "png": sorted(tmp_path.glob("f*.png")),
        "npy": sorted(tmp_path.glob("f*.npy")),
    }
    cfg = config(bundle_path, geometry=GEOMETRY_TOML)
    for kind, paths in inputs.items():
        out = tmp_path / f"{kind}.jsonl"
        summary = classify_recorded(paths, config=cfg, components=components, jsonl_path=out, progress=False)
        assert summary.frames == 3 and not summary.bad_frames, (kind, summary)
        (got,) = read_jsonl(out)
        assert [t["space_group"] for t in got["top"]] == [t["space_group"] for t in want["top"]], kind
        np.testing.assert_allclose(
            [t["probability"] for t in got["top"]], [t["probability"] for t in want["top"]], atol=1e-6, err_msg=kind
        )


def test_geometry_from_the_toml_overrides_and_missing_keys_named(sim, bundle_path, components, tmp_path, caplog):
    master = sim.write_hdf5(tmp_path / "nodist", omit=("detector_distance_m",))
    with pytest.raises(RecordedError, match=r"detector_distance_m not given.*\[geometry\]"):
        classify_recorded(
            [master], config=config(bundle_path), components=components, jsonl_path=tmp_path / "x.jsonl", progress=False
        )
    caplog.set_level(logging.INFO, logger="xtalsym.daemon.classify")
    summary = classify_recorded(
        [master],
        config=config(bundle_path, geometry={"detector_distance_m": 0.33}),
        components=components,
        jsonl_path=tmp_path / "y.jsonl",
        progress=False,
    )
    assert summary.samples == 2 and not summary.bad_frames
    assert "detector_distance_m = 0.33 from the configuration's [geometry]" in caplog.text
    assert "wavelength_m from /entry/instrument/beam/incident_wavelength = 0.035 angstrom" in caplog.text


def test_bad_inputs_are_one_line_and_a_corrupt_frame_is_counted(sim, master, bundle_path, components, tmp_path):
    cfg = config(bundle_path)
    with pytest.raises(RecordedError, match="no such file"):
        open_recorded([tmp_path / "absent_master.h5"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RecordedError, match="unknown file type '.txt'"):
        open_recorded([tmp_path / "notes.txt"])
    (tmp_path / "fake.h5").write_bytes(b"not hdf5")
    with pytest.raises(RecordedError, match="not a readable HDF5 file"):
        open_recorded([tmp_path / "fake.h5"])
    broken = sim.write_hdf5(tmp_path / "broken", frames_per_file=4)
    (tmp_path / "broken_data_000002.h5").unlink()
    with pytest.raises(RecordedError, match="data_000002: its external file 'broken_data_000002.h5' cannot"):
        open_recorded([broken])
    (tmp_path / "colour.png").write_bytes(b"")
    with pytest.raises(RecordedError, match="colour.png: cannot be read as PNG"):
        open_recorded([tmp_path / "colour.png"])

    corrupt = sim.write_hdf5(tmp_path / "corrupt", frames_per_file=6)
    with h5py.File(tmp_path / "corrupt_data_000001.h5", "r+") as f:
        ds = f["/entry/data/data"]
        _, blob = ds.id.read_direct_chunk((1, 0, 0))
        ds.id.write_direct_chunk((1, 0, 0), blob[:12] + b"\xff" * (len(blob) - 12))  # header fine, blocks not
    out = tmp_path / "c.jsonl"
    summary = classify_recorded([corrupt], config=cfg, components=components, jsonl_path=out, progress=False)
    assert summary.bad_frames == {"bad_compression": 1} and summary.frames == 6 and summary.views == 5
    finals = {tuple(f["image_id"] for f in m["frames"]): m for m in read_jsonl(out)}
    assert set(finals) == {(0, 2), (3, 4, 5)}  # image 1 (the y view) lost, and counted
    assert finals[(0, 2)]["axes"] == ["x", "z"] and finals[(0, 2)]["closed_by"] == "end"


def test_cli_classify_writes_jsonl_and_csv(master, bundle_path, tmp_path, capsys):
    from xtalsym.cli import main

    cfg = tmp_path / "daemon.toml"
    cfg.write_text(
        f'[bundle]\npath = "{bundle_path}"\nbackend = "onnxruntime"\ndevice = "cpu"\n[pipeline]\nworkers = 1\n'
    )
    prefix = tmp_path / "run"
    assert main(["classify", str(master), "--config", str(cfg), "-o", str(prefix)]) == 0
    err = capsys.readouterr().err
    assert "classified 6 frames of 1 series" in err and "2 samples (2 complete)" in err
    assert len(read_jsonl(tmp_path / "run.jsonl")) == 2 and (tmp_path / "run.csv").exists()
    assert main(["classify", str(master), "--config", str(cfg), "-o", str(prefix)]) == 2  # no overwrite
    assert "exists" in capsys.readouterr().err
    t0 = time.time()
    assert main(["classify", str(tmp_path / "nope.h5"), "--config", str(cfg), "-o", str(tmp_path / "z")]) == 2
    assert "nope.h5: no such file" in capsys.readouterr().err and time.time() - t0 < 60
