"""`xtalsym train`: config validation, --set, class weights, a tiny run, exact resume, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtalsym import model as model_lib
from xtalsym.cli import train as train_cli
from xtalsym.offline import dataset as ds
from xtalsym.offline import structures
from xtalsym.offline import train as tr
from xtalsym.offline import train_config as tc
from xtalsym.testing import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine is small and shared: one torch thread is far faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """8 shipped CIFs + 4 pyxtal crystals (train only); half the real materials in val."""
    out = tmp_path_factory.mktemp("train") / "tiny"
    records, _ = ds.collect_records([structures.shipped_structures_dir()])
    records += structures.random_records([225, 14], 2, seed=0)
    config = ds.BuildConfig(shard_size=4, split_fractions={"train": 0.5, "val": 0.5})
    ds.build_dataset(records, out, config=config, workers=1, progress=False)
    return out


def _config(dataset: Path, **top) -> dict:
    base = {
        "dataset": str(dataset), "space_groups": "all", "epochs": 2, "batch_size": 4, "num_workers": 0,
        "device": "cpu", "progress": False, "log_every": 1,
        "model": {"name": "msdn", "input_size": 32, "dropout": 0.1},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_epochs": 0.5},
    }
    return tc.apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in top.items()])


# --------------------------------------------------------------------------- config


def test_config_errors_name_every_bad_key_and_value():
    with pytest.raises(tc.ConfigError) as info:
        tc.from_dict({
            "dataset": "d", "epochs": 0, "batch_size": "64", "bogus": 3,
            "model": {"name": "resnet", "input_size": 8, "extra": True},
            "optim": {"lr": -1.0, "betas": [0.9]},
            "imbalance": {"mode": "oversample"},
            "space_groups": "paper73",
        })
    text = str(info.value)
    for expected in [
        "epochs: must be > 0, got 0", "batch_size: expected int, got '64'", "bogus: unknown key (value 3)",
        "model.name: must be one of", "'resnet'", "model.input_size: must be >= 16, got 8",
        "model.extra: unknown key (value True", "optim.lr: must be > 0, got -1.0", "optim.betas:",
        "imbalance.mode: must be one of loss, sampler, none, got 'oversample'", "space_groups:", "'paper73'",
    ]:
        assert expected in text, expected
    assert len(info.value.problems) == 10
    assert "\n" not in text  # the CLI prints it as one line


def test_shipped_configs_are_valid():
    for path in sorted(CONFIGS.glob("*.toml")):
        config = tc.load(path)
        assert config.dataset


def test_set_overrides_parse_and_type_check():
    c = tc.load(None, ["dataset=/data/mp", "epochs=3", "model.input_size=112", "optim.lr=1e-4",
                       "space_groups=[14, 62]", "channels_last=false", 'val_split=""'])
    assert (c.dataset, c.epochs, c.model.input_size, c.optim.lr) == ("/data/mp", 3, 112, 1e-4)
    assert c.space_groups == [14, 62] and c.classes() == [14, 62] and c.channels_last is False
    assert c.val_split == ""
    assert tc.load(None, ["dataset=d", "space_groups=paper72"]).classes() == list(tc.spacegroups.PAPER_72)
    assert tc.load(None, ["dataset=d", "space_groups=1-3,225"]).classes() == [1, 2, 3, 225]
    with pytest.raises(tc.ConfigError) as info:
        tc.load(None, ["dataset=d", "epochs=three", "model.input_size=1.5", "noequals", "optim.lrr=1"])
    text = str(info.value)
    assert "epochs: expected int, got 'three'" in text
    assert "model.input_size: expected int, got 1.5" in text
    assert "'noequals': expected key=value" in text
    assert "optim.lrr: unknown key (value 1" in text


def test_class_weights_inverse_sqrt_with_unit_mean():
    counts = np.array([19, 0, 1900, 76])
    w = tr.class_weights(counts, 0.5)
    assert w[1] == 0
    seen = counts > 0
    assert np.allclose(w[seen] * np.sqrt(counts[seen]), (w[seen] * np.sqrt(counts[seen]))[0])
    assert (counts * w).sum() == pytest.approx(counts.sum())  # mean weight per sample is 1
    assert w[0] / w[2] == pytest.approx(10.0)
    assert np.allclose(tr.class_weights(counts, 0.0)[seen], 1.0)


def test_epoch_order_is_a_function_of_seed_and_epoch_and_shards_by_rank():
    labels = np.arange(10) % 3
    a = tr.epoch_indices(labels, seed=1, epoch=4)
    assert sorted(a) == list(range(10)) and (a == tr.epoch_indices(labels, seed=1, epoch=4)).all()
    assert not (a == tr.epoch_indices(labels, seed=1, epoch=5)).all()
    parts = [tr.epoch_indices(labels, seed=1, epoch=4, rank=r, world_size=3) for r in range(3)]
    assert all(len(p) == 4 for p in parts) and set(np.concatenate(parts)) == set(range(10))
    w = np.where(labels == 0, 1.0, 0.0)
    assert set(tr.epoch_indices(labels, seed=1, epoch=0, sample_weights=w)) <= {0, 3, 6, 9}


def test_lr_schedule_warmup_then_cosine():
    f = lambda s: tr.lr_factor(s, total_steps=100, warmup_steps=10, name="cosine", min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.505, abs=1e-3) and f(100) == pytest.approx(0.01)


def test_augment_shifts_and_keeps_a_view():
    x = torch.zeros(4, 3, 3, 8, 8, dtype=torch.uint8)
    x[..., 4, 4] = 255
    g = torch.Generator().manual_seed(0)
    y, present = tr.augment(x, 3, tc.AugmentConfig(shift_px=2, drop_view_p=0.9), g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert (y.flatten(-2).sum(-1) == 255).all()  # the spot moved by <= 2 px, not out of the image
    assert present.shape == (4, 3) and present.any(dim=1).all()


# --------------------------------------------------------------------------- runs


def test_run_writes_all_artefacts_and_learns(tiny, tmp_path):
    out = tmp_path / "run"
    config = _config(tiny, epochs=3)
    config["optim"]["lr"] = 3e-3
    final = tr.train(config, out)
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.json", "curves.png", tr.RESOLVED_CONFIG):
        assert (out / name).is_file(), name
    history = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3] and final == history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["val_top1"] is not None and 0 <= history[0]["val_top5"] <= 1
    assert all(row["samples_per_s"] > 0 for row in history)
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss")
    model, extra = model_lib.load_checkpoint(out / "last.pt")
    assert extra["epoch"] == 3 and extra["classes"] == list(range(1, 231)) and model.num_classes == 230
    assert extra["config"]["model"]["input_size"] == 32
    assert json.loads((out / tr.RESOLVED_CONFIG).read_text())["epochs"] == 3
    assert (torch.tensor([1e-39]) * 1.0).item() != 0  # flush-to-zero turned off again after training
    with pytest.raises(tr.TrainError, match="already holds a run"):
        tr.train(config, out)


def _params(path: Path) -> dict[str, torch.Tensor]:
    model, _ = model_lib.load_checkpoint(path)
    return model.state_dict()


@pytest.mark.parametrize("mode", ["epoch", "mid-epoch"])
def test_resume_gives_the_same_weights(tiny, tmp_path, monkeypatch, mode):
    config = _config(tiny, val_split="", space_groups="dataset")
    config["augment"] = {"shift_px": 1, "drop_view_p": 0.3}
    if mode == "mid-epoch":
        config["checkpoint_every_steps"] = 1
        config["imbalance"] = {"mode": "sampler"}
    tr.train(config, tmp_path / "straight")

    # Interrupt the same run (same schedule) right after a checkpoint: at the end of
    # epoch 1, or after the first step of epoch 2 (mid-epoch last.pt).
    interrupted = tmp_path / "interrupted"
    stop_at = 0 if mode == "epoch" else 1

    class Stop(Exception):
        pass

    original = tr.Trainer.save

    def save_then_stop(self, path, extra=None):
        original(self, path, extra)
        if self.epoch == 1 and self.batch_in_epoch == stop_at:
            raise Stop

    monkeypatch.setattr(tr.Trainer, "save", save_then_stop)
    with pytest.raises(Stop):
        tr.train(config, interrupted)
    monkeypatch.setattr(tr.Trainer, "save", original)
    assert torch.load(interrupted / "last.pt", weights_only=True)["extra"]["batch_in_epoch"] == stop_at
    tr.train(config, interrupted, resume=True)

    a, b = _params(tmp_path / "straight" / "last.pt"), _params(interrupted / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    ha = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    hb = json.loads((interrupted / "metrics.json").read_text())
    assert [r["train_loss"] for r in ha] == pytest.approx([r["train_loss"] for r in hb], abs=1e-6)
    assert not (interrupted / "best.pt").exists()  # no validation split, no best


def test_stop_after_epochs_trains_a_schedule_in_chunks(tiny, tmp_path):
    config = _config(tiny, val_split="", space_groups="dataset")
    tr.train(config, tmp_path / "straight")
    chunked = tmp_path / "chunked"
    tr.train({**config, "stop_after_epochs": 1}, chunked)
    assert [r["epoch"] for r in json.loads((chunked / "metrics.json").read_text())] == [1]
    tr.train({**config, "stop_after_epochs": 1}, chunked, resume=True)  # budget reached: nothing more
    assert len(json.loads((chunked / "metrics.json").read_text())) == 1
    tr.train({**config, "stop_after_epochs": 0}, chunked, resume=True)
    a, b = _params(tmp_path / "straight" / "last.pt"), _params(chunked / "last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_resume_refuses_a_changed_config(tiny, tmp_path):
    config = _config(tiny, epochs=1, val_split="train")
    tr.train(config, tmp_path)
    with pytest.raises(tr.TrainError, match="batch_size: run has 4, now 8"):
        tr.train({**config, "batch_size": 8}, tmp_path, resume=True)


def test_cli_via_register(tiny, tmp_path):
    parser = argparse.ArgumentParser(prog="xtalsym")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cli.register(commands)
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        f'dataset = "{tiny}"\nspace_groups = "dataset"\nnum_workers = 0\nprogress = false\n'
        '[model]\ninput_size = 32\n'
    )
    out = tmp_path / "run"
    args = parser.parse_args(["train", "--config", str(config_file), "--set", "epochs=1", "--set", "batch_size=6",
                              "--out", str(out), "--device", "cpu"])
    assert args.handler(args) == 0
    resolved = json.loads((out / tr.RESOLVED_CONFIG).read_text())
    assert resolved["epochs"] == 1 and resolved["batch_size"] == 6 and resolved["device"] == "cpu"
    # resume without --config (reads the resolved config), one more epoch
    args = parser.parse_args(["train", "--resume", "--out", str(out), "--set", "epochs=2"])
    assert args.handler(args) == 0
    assert len(json.loads((out / "metrics.json").read_text())) == 2
    bad = parser.parse_args(["train", "--config", str(config_file), "--set", "epochs=0", "--set", "model.x=1",
                             "--out", str(out)])
    with pytest.raises(tc.ConfigError, match=r"model\.x: unknown key.*epochs: must be > 0"):
        bad.handler(bad)


def _ddp_worker(rank: int, world_size: int, port: int, config: dict, out: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tr.train(config, Path(out))


@pytest.mark.slow
def test_ddp_gloo_two_processes_match_one_process(tiny, tmp_path):
    """2 ranks x batch 2 = 1 process x batch 4: same samples per step, gradients averaged
    (no dropout, augmentation or class weights, which are per-rank)."""
    import socket

    import torch.multiprocessing as mp

    from xtalsym.offline.torch_data import DiffractionDataset

    # an even number of training samples, so that no rank pads its share
    train = DiffractionDataset(tiny, "train")
    counts = dict(zip(train.classes, train.class_counts().tolist()))
    if sum(counts.values()) % 2:
        counts.pop(next(sg for sg, c in counts.items() if c % 2))
    config = _config(tiny, epochs=1, batch_size=2, space_groups=sorted(counts), val_split="train")
    config["model"]["dropout"] = 0.0
    config["imbalance"] = {"mode": "none"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, config, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = tr.train({**config, "batch_size": 4}, tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())[-1]
    assert ddp["step"] == single["step"]
    a, b = _params(tmp_path / "ddp" / "last.pt"), _params(tmp_path / "single" / "last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    assert ddp["val_top1"] == pytest.approx(single["val_top1"])
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)


def test_init_from_starts_from_another_runs_weights_and_refuses_another_model(tiny, tmp_path):
    """init_from (fine-tuning, e.g. on data off the zone axes): the new run's model starts with the
    checkpoint's weights; a checkpoint of another model or a missing file is one clear error."""
    config = tc.from_dict(_config(tiny, epochs=1, val_split=""))
    tr.train(config, tmp_path / "first")
    start = _params(tmp_path / "first" / "last.pt")
    try:
        _check_init_from(config, start, tmp_path)
    finally:
        torch.set_flush_denormal(False)  # Trainer turns it on; tr.train turns it off again, here we do


def _check_init_from(config, start, tmp_path):
    tuned = tr.Trainer(tc.from_dict({**config.to_dict(), "init_from": str(tmp_path / "first" / "last.pt")}),
                       tmp_path / "tuned", resume=False)
    fresh = tr.Trainer(config, tmp_path / "fresh", resume=False)
    for k, v in tuned.module.state_dict().items():
        assert torch.equal(v.cpu(), start[k]), k
    assert any(not torch.equal(v.cpu(), start[k]) for k, v in fresh.module.state_dict().items())
    other = {**config.to_dict(), "init_from": str(tmp_path / "first" / "last.pt")}
    other["model"] = {**other["model"], "input_size": 48}
    with pytest.raises(tr.TrainError, match="is not this run's"):
        tr.Trainer(tc.from_dict(other), tmp_path / "other", resume=False)
    with pytest.raises(tr.TrainError, match="init_from: checkpoint .* does not exist"):
        tr.Trainer(tc.from_dict({**config.to_dict(), "init_from": str(tmp_path / "missing.pt")}), tmp_path / "m",
                   resume=False)


def test_extra_datasets_join_the_train_and_val_splits(tiny, tmp_path):
    """extra_datasets (e.g. the same materials off the zone axes beside those on them): the run
    trains and validates on the union, in order, with one label set; a missing folder is one
    clear error."""
    from xtalsym.offline.torch_data import DiffractionDataset

    tilted = tmp_path / "tilted"
    records, _ = ds.collect_records([structures.shipped_structures_dir()])
    ds.build_dataset(records, tilted, config=ds.BuildConfig(shard_size=4, split_fractions={"train": 0.5, "val": 0.5},
                                                           misorientation_deg=0.5), workers=1, progress=False)
    config = tc.from_dict(_config(tiny, epochs=1, extra_datasets=[str(tilted)]))
    try:
        trainer = tr.Trainer(config, tmp_path / "run", resume=False)
    finally:
        torch.set_flush_denormal(False)
    own = DiffractionDataset(tiny, "train", classes=trainer.classes)
    other = DiffractionDataset(tilted, "train", classes=trainer.classes)
    assert len(trainer.train_set) == len(own) + len(other) and len(other) > 0
    assert list(trainer.train_set.labels) == list(own.labels) + list(other.labels)
    x, y = trainer.train_set[len(own)]
    x_other, y_other = other[0]
    assert y == y_other and torch.equal(x, x_other)
    where = {s["material_id"]: i for i, s in enumerate(other.samples)}
    shared = [(i, where[s["material_id"]]) for i, s in enumerate(own.samples) if s["material_id"] in where]
    assert shared and all(not torch.equal(own[i][0], other[j][0]) for i, j in shared)  # the tilt is there
    assert len(trainer.val_set) == len(DiffractionDataset(tiny, "val", classes=trainer.classes)) + len(
        DiffractionDataset(tilted, "val", classes=trainer.classes))
    with pytest.raises(tr.TrainError, match="dataset folder does not exist: .*nowhere"):
        tr.train(_config(tiny, extra_datasets=[str(tmp_path / "nowhere")]), tmp_path / "bad")
