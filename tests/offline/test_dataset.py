"""Datasets: build, resume, splits by material, Dask, the PyTorch view, `dataset show`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from xtalsym.offline import dataset as ds
from xtalsym.offline import structures

SHIPPED = structures.shipped_structures_dir()


def _records(extra_dir: Path | None = None):
    records, errors = ds.collect_records([SHIPPED] + ([extra_dir] if extra_dir else []))
    return records, errors


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, ds.BuildSummary]:
    out = tmp_path_factory.mktemp("data") / "shipped"
    records, errors = _records()
    summary = ds.build_dataset(
        records, out, config=ds.BuildConfig(shard_size=3), workers=2, progress=False, read_errors=errors
    )
    return out, summary


def test_build_writes_complete_shards_with_metadata(built):
    out, summary = built
    n = len(list(SHIPPED.glob("*.cif")))
    assert summary.samples == n and not summary.errors
    assert summary.shards == -(-n // 3)
    meta = ds.load_metadata(out)
    assert meta["config"]["geometry"]["wavelength_m"] == pytest.approx(3.5e-12)
    samples = list(ds.iter_sample_metadata(out))
    assert len(samples) == n
    reader = ds.ShardReader(out)
    for s in samples:
        raw = reader.read(s["shard"], s["position"], "raw")
        shaped = reader.read(s["shard"], s["position"], "shaped")
        assert raw.shape == (3, 256, 256) and raw.dtype == np.uint8
        assert shaped.shape == (3, 224, 224, 3) and shaped.dtype == np.uint8
        assert raw.max() == 255  # linear 8-bit scaling to the brightest pixel
        assert 1 <= s["space_group"] <= 230 and s["crystal_system"]


def test_splits_are_by_material_and_stable(built):
    out, _ = built
    splits = ds.load_splits(out)
    assert set(splits.values()) <= {"train", "val", "test"}
    assert all(splits[m] == ds.split_of(m, ds.DEFAULT_SPLIT_FRACTIONS) for m in splits)
    # over many ids the fractions come out close to 80/10/10
    ids = [f"mp-{i}" for i in range(20000)]
    counts = {k: 0 for k in ds.DEFAULT_SPLIT_FRACTIONS}
    for m in ids:
        counts[ds.split_of(m, ds.DEFAULT_SPLIT_FRACTIONS)] += 1
    assert abs(counts["train"] / len(ids) - 0.8) < 0.01
    assert abs(counts["test"] / len(ids) - 0.1) < 0.01


def test_resume_rebuilds_only_missing_shards(built, tmp_path):
    src, _ = built
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    npz, meta = ds.shard_paths(out / ds.SHARD_DIR, 1)
    npz.unlink()  # as if the run was killed while shard 1 was being written
    records, _ = _records()
    summary = ds.build_dataset(records, out, config=ds.BuildConfig(shard_size=3), workers=1, progress=False)
    assert summary.shards_built == 1
    assert summary.shards_skipped == summary.shards - 1
    assert summary.samples == len(records)
    assert npz.is_file()


def test_other_settings_are_refused_unless_overwrite(built, tmp_path):
    src, _ = built
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    records, _ = _records()
    with pytest.raises(ds.DatasetError, match="other config"):
        ds.build_dataset(records, out, config=ds.BuildConfig(shard_size=5), workers=1, progress=False)
    summary = ds.build_dataset(
        records, out, config=ds.BuildConfig(shard_size=5), workers=1, progress=False, overwrite=True
    )
    assert summary.shards_built == summary.shards


def test_bad_structures_are_reported_and_the_batch_goes_on(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.cif").write_text("this is not a CIF\n")
    shutil.copy(next(iter(sorted(SHIPPED.glob("*.cif")))), bad / "good.cif")
    records, read_errors = ds.collect_records([bad])
    summary = ds.build_dataset(records, tmp_path / "out", workers=1, progress=False, read_errors=read_errors)
    assert summary.samples == 1
    assert len(summary.errors) == 1 and "garbage.cif" in summary.errors[0]["source"]
    saved = json.loads((tmp_path / "out" / "build_errors.json").read_text())
    assert saved == summary.errors


def test_random_crystals_go_to_train_only(tmp_path):
    records = structures.random_records([14, 225], 1, seed=1)
    summary = ds.build_dataset(records, tmp_path / "rnd", workers=1, progress=False)
    assert summary.samples == 2 and summary.pyxtal_requested == 2
    assert summary.pyxtal_attempts >= 2
    assert set(ds.load_splits(tmp_path / "rnd").values()) == {"train"}
    groups = sorted(s["space_group"] for s in ds.iter_sample_metadata(tmp_path / "rnd"))
    assert groups == [14, 225]


@pytest.mark.slow
def test_build_on_a_local_dask_cluster(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    records, _ = _records()
    records = records[:4]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        summary = ds.build_dataset(
            records, tmp_path / "dask", config=ds.BuildConfig(shard_size=2), scheduler=cluster.scheduler_address,
            progress=False,
        )
    assert summary.samples == 4 and summary.shards_built == 2
    local = ds.build_dataset(records, tmp_path / "local", config=ds.BuildConfig(shard_size=2), workers=1, progress=False)
    reader_a, reader_b = ds.ShardReader(tmp_path / "dask"), ds.ShardReader(tmp_path / "local")
    for s in ds.iter_sample_metadata(tmp_path / "dask"):
        for kind in ("raw", "shaped"):
            assert np.array_equal(
                reader_a.read(s["shard"], s["position"], kind), reader_b.read(s["shard"], s["position"], kind)
            )
    assert local.samples == 4


def test_torch_dataset_views(built):
    torch = pytest.importorskip("torch")
    from xtalsym.offline.torch_data import DiffractionDataset

    out, _ = built
    full = DiffractionDataset(out, split=None)
    x, y = full[0]
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.uint8
    assert 0 <= y < len(full.classes)
    assert full.classes[y] == full.samples[0]["space_group"]
    raw, _ = DiffractionDataset(out, split=None, representation="raw")[0]
    assert raw.shape == (3, 256, 256)
    spot, _ = DiffractionDataset(out, split=None, representation="spot")[0]
    assert spot.shape == (3, 224, 224)
    # the lines of axis x are in the red channel of the x view
    sample = full.samples[0]
    only_225 = DiffractionDataset(out, split=None, classes=[225])
    assert all(s["space_group"] == 225 for s in only_225.samples)
    assert only_225.excluded == len(full) - len(only_225)
    loader = torch.utils.data.DataLoader(full, batch_size=4, num_workers=2)
    batch, labels = next(iter(loader))
    assert batch.shape[1:] == (3, 3, 224, 224) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="split 'nope'"):
        DiffractionDataset(out, split="nope")
    assert sample["material_id"]


def test_dataset_show(built, tmp_path):
    from xtalsym.offline import dataset_view

    out, _ = built
    summary = dataset_view.summarise(out)
    assert summary["samples"] == sum(summary["space_groups"].values())
    assert summary["samples"] == sum(summary["crystal_systems"].values())
    text = dataset_view.format_summary(summary)
    assert "Fm-3m" in text or "225" in text
    png = dataset_view.save_example_grid(out, tmp_path / "grid.png", rows=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_a_dataset(tmp_path):
    with pytest.raises(ds.DatasetError, match="not an xtalsym dataset"):
        ds.load_metadata(tmp_path)


def test_a_misoriented_dataset_is_reproducible_differs_from_the_axes_and_is_its_own_config(built, tmp_path):
    """BuildConfig.misorientation_deg (xtalsym simulate dataset --misorientation-deg): training data off
    the zone axes, each material's tilts seeded by its id (a rebuild gives the same bytes); the setting
    is part of dataset.json (a folder built on the axes refuses it), absent from it at 0 (datasets of
    earlier versions still resume); a bad value is one line, not a traceback."""
    src, _ = built
    records, _ = _records()
    records = records[:2]
    tilted = [tmp_path / "a", tmp_path / "b"]
    for out in tilted:
        ds.build_dataset(records, out, config=ds.BuildConfig(shard_size=3, misorientation_deg=1.0), workers=1,
                         progress=False)
    assert ds.load_metadata(tilted[0])["config"]["misorientation_deg"] == 1.0
    assert "misorientation_deg" not in ds.load_metadata(src)["config"]
    exact_reader, readers = ds.ShardReader(src), [ds.ShardReader(p) for p in tilted]
    exact = {s["material_id"]: s for s in ds.iter_sample_metadata(src)}
    for s in ds.iter_sample_metadata(tilted[0]):
        a, b = (r.read(s["shard"], s["position"], "raw") for r in readers)
        assert np.array_equal(a, b)
        e = exact[s["material_id"]]
        assert not np.array_equal(a, exact_reader.read(e["shard"], e["position"], "raw"))
    with pytest.raises(ds.DatasetError, match="misorientation_deg"):
        ds.build_dataset(records, tilted[0], config=ds.BuildConfig(shard_size=3), workers=1, progress=False)


def test_a_bad_misorientation_is_one_line(tmp_path, capsys):
    from xtalsym.cli import main

    code = main(["simulate", "dataset", "--structures", str(SHIPPED), "--out", str(tmp_path / "x"),
                 "--misorientation-deg", "nan", "--no-progress"])
    assert code != 0
    err = capsys.readouterr().err
    assert "--misorientation-deg must be" in err and "Traceback" not in err
