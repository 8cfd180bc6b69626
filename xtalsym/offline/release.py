"""Release a trained model: weights without optimiser state, plus its card.

A training checkpoint carries the optimiser, scheduler and RNG states (three times the
weights); the released ``model.pt`` keeps only what inference needs — the model, its
class list, the simulation/shaping settings it was trained with, the training config
and metrics — so it is small enough to commit, and the bundle issue packages it.
``card.json`` and ``MODEL_CARD.md`` state the data, split, config and measured accuracy.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from xtalsym import __version__
from xtalsym.checksums import sha256_file
from xtalsym.offline import dataset as ds

CARD_VERSION = 1


def _dataset_description(extra: dict) -> dict:
    """The training dataset's settings and inputs, read from its dataset.json."""
    config = extra.get("config") or {}
    root = config.get("dataset")
    if not root or not Path(root, ds.METADATA_FILE).is_file():
        raise ValueError(
            f"the checkpoint's training dataset {root!r} is not readable here; release needs its dataset.json "
            "to record the simulation and shaping settings"
        )
    meta = ds.load_metadata(root)
    return {"path": str(root), "config": meta["config"], "inputs": meta.get("inputs"), "generator": meta.get("generator")}


def release_model(checkpoint: str | Path, evaluation: str | Path, out: str | Path, *, name: str) -> dict:
    """Write ``out/model.pt``, ``out/card.json`` and ``out/MODEL_CARD.md``; return the card.

    ``evaluation`` is the output folder of ``xtalsym evaluate`` on the held-out split
    (its metrics.json is copied into the card, with the confusion-matrix PNG).
    """
    from xtalsym import model as models

    model, extra = models.load_checkpoint(checkpoint)
    metrics_path = Path(evaluation) / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics.json in {evaluation} (run `xtalsym evaluate ... --out {evaluation}`)")
    evaluation_metrics = json.loads(metrics_path.read_text())
    dataset = _dataset_description(extra)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    release_extra = {
        "classes": [int(c) for c in extra["classes"]],
        "dataset_config": dataset["config"],
        "config": extra.get("config", {}),
        "metrics": extra.get("metrics", []),
        "epoch": int(extra.get("epoch", 0)),
        "release": name,
    }
    weights = out / "model.pt"
    models.save_checkpoint(weights, model, extra=release_extra)
    confusion = Path(evaluation) / "crystal_system_confusion.png"
    if confusion.is_file():
        (out / confusion.name).write_bytes(confusion.read_bytes())
    card = {
        "card_version": CARD_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generator": f"xtalsym {__version__}",
        "model": models.model_spec(model),
        "parameters": models.count_parameters(model),
        "weights": {"file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
        "classes": release_extra["classes"],
        "training": {
            "config": release_extra["config"],
            "epochs_completed": len(release_extra["metrics"]),
            "history": release_extra["metrics"],
            "source_checkpoint": str(checkpoint),
            # a fine-tune's starting weights, named by content: the path may hold another model later
            "init_from_sha256": _sha256_if_file(release_extra["config"].get("init_from")),
        },
        "data": {
            "dataset": dataset,
            "split_rule": "sha256(seed:material_id) -> train/val/test (80/10/10), by material",
        },
        "evaluation": {
            "split": (evaluation_metrics.get("source") or {}).get("split"),
            "top_k": evaluation_metrics.get("topk"),
            "samples": evaluation_metrics.get("samples"),
            "per_crystal_system": evaluation_metrics.get("per_crystal_system"),
            "source": str(metrics_path),
        },
    }
    (out / "card.json").write_text(json.dumps(card, indent=1))
    (out / "MODEL_CARD.md").write_text(model_card_markdown(card))
    return card


def _sha256_if_file(path) -> str | None:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def _pct(value) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else str(value)


def _epochs_trained(training: dict) -> str:
    """"9 epochs", or "9 epochs of a 10-epoch schedule" and why, when the run planned more."""
    done, cfg = training["epochs_completed"], training["config"]
    planned = cfg.get("epochs")
    if not isinstance(planned, int) or planned <= done:
        return f"{done} epochs"
    why = (f"the epoch with the best `{cfg.get('val_split')}` top-1" if Path(str(training.get("source_checkpoint"))).name == "best.pt"
           else "the run stopped there")
    return f"{done} epochs of a {planned}-epoch schedule ({why})"


def model_card_markdown(card: dict) -> str:
    """A human-readable card from card.json."""
    cfg = card["training"]["config"]
    model_cfg = cfg.get("model", {})
    geometry = card["data"]["dataset"]["config"].get("geometry", {})
    top_k = card["evaluation"].get("top_k") or {}
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"- Model: `{card['model']['name']}` ({card['parameters']:,} parameters), input {card['model']['input_size']} px, "
        f"options {json.dumps(card['model']['options'])}",
        f"- Classes: {len(card['classes'])} space groups ({', '.join(map(str, card['classes']))})",
        f"- Weights: `{card['weights']['file']}` ({card['weights']['bytes'] / 1e6:.1f} MB), "
        f"sha256 `{card['weights']['sha256']}`",
        f"- Created {card['created']} by {card['generator']}",
        "",
        "## Data",
        f"- Dataset `{card['data']['dataset']['path']}` ({card['data']['dataset'].get('generator')}), "
        f"inputs: {json.dumps(card['data']['dataset'].get('inputs'))}",
        f"- Geometry: {json.dumps(geometry)}; shaping `{card['data']['dataset']['config'].get('shaping_method')}`",
        f"- Split: {card['data']['split_rule']}; trained on `{cfg.get('train_split')}`, "
        f"model selection on `{cfg.get('val_split')}`, measured on `{card['evaluation'].get('split')}`",
        "",
        "## Training",
        f"- {_epochs_trained(card['training'])}, batch {cfg.get('batch_size')}, "
        f"optimiser {json.dumps(cfg.get('optim'))}, schedule {json.dumps(cfg.get('schedule'))}",
        *([f"- Started from the weights of `{cfg['init_from']}`"
           + (f" (sha256 `{card['training']['init_from_sha256']}` when this release was made)"
              if card["training"].get("init_from_sha256") else "") + ": a fine-tune, not a training from scratch"]
          if cfg.get("init_from") else []),
        *([f"- Also trained and selected on the same splits of {', '.join(f'`{d}`' for d in cfg['extra_datasets'])}"]
          if cfg.get("extra_datasets") else []),
        f"- Class imbalance: {json.dumps(cfg.get('imbalance'))}; augmentation: {json.dumps(cfg.get('augment'))}",
        f"- Model config: {json.dumps(model_cfg)}",
        "",
        "## Measured accuracy (held-out split)",
        "",
        "| top-1 | top-2 | top-3 | top-4 | top-5 | samples |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(_pct(top_k.get(f"top{k}")) for k in range(1, 6))
        + f" | {card['evaluation'].get('samples')} |",
        "",
        "Per-epoch history (validation):",
        "",
        "| epoch | train loss | val top-1 | val top-5 |",
        "|---|---|---|---|",
    ]
    for row in card["training"]["history"]:
        lines.append(
            f"| {row.get('epoch')} | {row.get('train_loss', float('nan')):.3f} | {_pct(row.get('val_top1'))} "
            f"| {_pct(row.get('val_top5'))} |"
        )
    return "\n".join(lines) + "\n"
