"""Releasing a trained model: small weights file, card with data, split, config, metrics."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from xtalsym import model as models
from xtalsym.cli import main
from xtalsym.offline import dataset as ds
from xtalsym.offline import structures


def test_release_from_a_training_checkpoint(tmp_path, capsys):
    records, _ = ds.collect_records([structures.shipped_structures_dir()])
    data = tmp_path / "data"
    ds.build_dataset(records, data, config=ds.BuildConfig(shard_size=4), workers=1, progress=False)
    classes = sorted({s["space_group"] for s in ds.iter_sample_metadata(data)})
    model = models.build_model("msdn", len(classes), input_size=32)
    optimiser = torch.optim.AdamW(model.parameters())
    checkpoint = tmp_path / "last.pt"
    history = [{"epoch": 1, "train_loss": 9.0, "val_top1": 0.25, "val_top5": 0.5}]
    models.save_checkpoint(checkpoint, model, extra={
        "classes": classes, "config": {"dataset": str(data), "train_split": "train", "val_split": "val"},
        "metrics": history, "epoch": 1, "optimizer": optimiser.state_dict(),
    })
    evaluation = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--dataset", str(data), "--split", "train",
                 "--out", str(evaluation)]) == 0
    out = tmp_path / "release"
    assert main(["model", "release", "--checkpoint", str(checkpoint), "--evaluation", str(evaluation),
                 "--out", str(out)]) == 0
    assert "released release" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    measured = json.loads((evaluation / "metrics.json").read_text())
    assert card["evaluation"]["top_k"] == measured["topk"]
    assert card["evaluation"]["split"] == "train"
    assert card["classes"] == classes and card["parameters"] == models.count_parameters(model)
    assert card["data"]["dataset"]["config"]["geometry"]["wavelength_m"] == pytest.approx(3.5e-12)
    released, extra = models.load_checkpoint(out / "model.pt")
    assert "optimizer" not in extra and extra["classes"] == classes and "geometry" in extra["dataset_config"]
    x = torch.randint(0, 255, (2, 3, 3, 224, 224), dtype=torch.uint8)
    model.eval()
    assert torch.equal(released(x).logits, model(x).logits)
    assert (out / "model.pt").stat().st_size < checkpoint.stat().st_size
    text = (out / "MODEL_CARD.md").read_text()
    assert "top-1" in text and card["weights"]["sha256"] in text


def test_release_needs_an_evaluation(tmp_path):
    model = models.build_model("msdn", 3, input_size=32)
    models.save_checkpoint(tmp_path / "c.pt", model, extra={"classes": [1, 2, 3]})
    assert main(["model", "release", "--checkpoint", str(tmp_path / "c.pt"), "--evaluation", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r")]) == 2


def test_card_says_when_the_checkpoint_is_short_of_its_schedule():
    from xtalsym.offline.release import _epochs_trained

    cfg = {"epochs": 10, "val_split": "val"}
    assert _epochs_trained({"epochs_completed": 10, "config": cfg, "source_checkpoint": "r/best.pt"}) == "10 epochs"
    best = _epochs_trained({"epochs_completed": 9, "config": cfg, "source_checkpoint": "r/best.pt"})
    assert best == "9 epochs of a 10-epoch schedule (the epoch with the best `val` top-1)"
    stopped = _epochs_trained({"epochs_completed": 5, "config": cfg, "source_checkpoint": "r/last.pt"})
    assert stopped == "5 epochs of a 10-epoch schedule (the run stopped there)"
    assert _epochs_trained({"epochs_completed": 3, "config": {}, "source_checkpoint": "x.pt"}) == "3 epochs"
