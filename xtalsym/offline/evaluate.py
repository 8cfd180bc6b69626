"""Evaluate a trained model: top-k accuracy, per space group and crystal system, and the
crystal-system confusion matrix of the paper's Fig. 4e-f (`xtalsym evaluate`), and
classify one structure (`xtalsym predict`).

Two inputs:

- a dataset split (``--dataset DIR --split test``): the stored shaped or raw DPs, in the
  representation the model was trained on;
- structures (``--structures`` CIF files/folders or JSON lines): each is labelled with
  spglib, simulated and shaped with :func:`xtalsym.offline.dataset.make_sample` (the
  dataset's default geometry unless the checkpoint says otherwise) and classified.
  Structures that cannot be read or simulated are listed with the reason; structures
  whose true space group is not one of the model's classes are counted and listed
  apart, never scored as silently wrong.

The confusion matrix rows are true crystal systems, columns predicted ones (the crystal
system of the top-1 space group), each row divided by the number of samples of its true
system.  ``confusion.rates`` counts every prediction (the diagonal is the crystal-system
accuracy); ``confusion.error_rates`` counts only wrong space-group predictions, which is
how the paper's Fig. 4e-f is defined ("20 % of the monoclinic materials are incorrectly
classified as orthorhombic space groups").
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtalsym import shaping, spacegroups
from xtalsym.offline import dataset as ds
from xtalsym.offline import simulate, structures
from xtalsym.offline.samples import model_input, model_inputs, read_records  # noqa: F401 (model_input: part of this module's API)

log = logging.getLogger(__name__)

TOP_K = 5
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FILE = "crystal_system_confusion.png"
RELIABILITY_FILE = "reliability.png"


class EvaluationError(ValueError):
    """Bad evaluation input (checkpoint, axes, empty evaluation set); printed as one line."""


# --------------------------------------------------------------------------- pure metrics


def topk_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Class indices of the ``k`` highest scores per row, best first (ties: lower index first)."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (samples, classes), got shape {probs.shape}")
    k = min(int(k), probs.shape[1])
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def topk_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target class index is among the ``k`` highest scores.

    ``k`` larger than the number of classes counts every row as a hit; an empty input
    gives NaN (there is nothing to be accurate about).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probs = np.asarray(probs)
    targets = np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2 or targets.shape != (probs.shape[0],):
        raise ValueError(f"probs (N, C) and targets (N,) expected, got {probs.shape} and {targets.shape}")
    if len(targets) == 0:
        return float("nan")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must be class indices in [0, {probs.shape[1]}), got {targets.min()}..{targets.max()}")
    hits = (topk_indices(probs, k) == targets[:, None]).any(axis=1)
    return float(hits.mean())


@dataclass(frozen=True)
class Confusion:
    """Crystal-system confusion: ``counts[i, j]`` samples of true system i predicted as j;
    ``errors[i, j]`` the same restricted to wrong space-group predictions."""

    systems: tuple[str, ...]
    counts: np.ndarray
    errors: np.ndarray

    @property
    def totals(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    def _normalise(self, matrix: np.ndarray) -> np.ndarray:
        totals = self.totals[:, None].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, matrix / np.maximum(totals, 1), np.nan)

    @property
    def rates(self) -> np.ndarray:
        """Row-normalised counts (rows of absent systems are NaN)."""
        return self._normalise(self.counts)

    @property
    def error_rates(self) -> np.ndarray:
        """Row-normalised wrong predictions, as in the paper's Fig. 4e-f."""
        return self._normalise(self.errors)

    def to_json(self) -> dict:
        def clean(matrix: np.ndarray) -> list[list[float | None]]:
            return [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in matrix]

        return {
            "systems": list(self.systems),
            "rows": "true crystal system",
            "columns": "predicted crystal system (of the top-1 space group)",
            "totals": self.totals.astype(int).tolist(),
            "counts": self.counts.astype(int).tolist(),
            "rates": clean(self.rates),
            "error_rates": clean(self.error_rates),
        }


def crystal_system_confusion(
    true_groups: Sequence[int], predicted_groups: Sequence[int], *, systems: Sequence[str] = spacegroups.CRYSTAL_SYSTEMS
) -> Confusion:
    """Confusion between crystal systems from true and predicted space-group numbers."""
    if len(true_groups) != len(predicted_groups):
        raise ValueError(f"{len(true_groups)} true but {len(predicted_groups)} predicted space groups")
    index = {s: i for i, s in enumerate(systems)}
    counts = np.zeros((len(systems), len(systems)), dtype=np.int64)
    errors = np.zeros_like(counts)
    for true, pred in zip(true_groups, predicted_groups):
        i, j = index[spacegroups.crystal_system(int(true))], index[spacegroups.crystal_system(int(pred))]
        counts[i, j] += 1
        if int(true) != int(pred):
            errors[i, j] += 1
    return Confusion(tuple(systems), counts, errors)


def _rate(hits: np.ndarray) -> float | None:
    return round(float(hits.mean()), 6) if len(hits) else None


def compute_metrics(probs: np.ndarray, targets: np.ndarray, classes: Sequence[int], *, k: int = TOP_K) -> dict:
    """Top-1..k accuracy overall, per space group and per crystal system, and the
    crystal-system confusion, for class-index ``targets`` (all inside ``classes``)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    classes = [int(c) for c in classes]
    if probs.shape[1:] != (len(classes),):
        raise ValueError(f"probs have {probs.shape[1:]} classes but {len(classes)} class labels were given")
    n = len(targets)
    top = topk_indices(probs, k) if n else np.zeros((0, min(k, len(classes))), dtype=np.int64)
    hit_at = np.zeros((n, k), dtype=bool)  # hit_at[i, j]: target within the top j+1
    for j in range(k):
        hit_at[:, j] = (top[:, : j + 1] == targets[:, None]).any(axis=1) if n else False
    label = np.asarray(classes)
    true_sg = label[targets] if n else np.zeros(0, dtype=np.int64)
    pred_sg = label[top[:, 0]] if n else np.zeros(0, dtype=np.int64)
    true_sys = np.array([spacegroups.crystal_system(g) for g in true_sg])
    pred_sys = np.array([spacegroups.crystal_system(g) for g in pred_sg])
    per_group = {}
    for c in sorted(set(true_sg.tolist())):
        rows = true_sg == c
        per_group[str(c)] = {
            "symbol": spacegroups.symbol(c),
            "crystal_system": spacegroups.crystal_system(c),
            "count": int(rows.sum()),
            "top1": _rate(hit_at[rows, 0]),
            f"top{k}": _rate(hit_at[rows, k - 1]),
        }
    per_system = {}
    for system in spacegroups.CRYSTAL_SYSTEMS:
        rows = true_sys == system
        if rows.any():
            per_system[system] = {
                "count": int(rows.sum()),
                "space_groups": len(set(true_sg[rows].tolist())),
                "top1": _rate(hit_at[rows, 0]),
                f"top{k}": _rate(hit_at[rows, k - 1]),
                "system_accuracy": _rate(pred_sys[rows] == system),
            }
    return {
        "samples": n,
        "classes": classes,
        "topk": {f"top{j + 1}": _rate(hit_at[:, j]) for j in range(k)},
        "per_space_group": per_group,
        "per_crystal_system": per_system,
        "confusion": crystal_system_confusion(true_sg.tolist(), pred_sg.tolist()).to_json(),
    }


# --------------------------------------------------------------------------- model glue


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EvaluationError(f"device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} asked for but CUDA is not available")
    return device


def load_model(checkpoint: str | Path, *, device: str = "cpu"):
    """(model, classes, extra) from a training checkpoint; classes map label index -> space group."""
    from xtalsym import model as model_module

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    model, extra = model_module.load_checkpoint(path, map_location=device)
    extra = extra or {}
    classes = extra.get("classes")
    if not classes:
        raise EvaluationError(f"checkpoint {path} carries no class list (extra['classes']); was it written by training?")
    classes = [int(c) for c in classes]
    if len(classes) != model.num_classes:
        raise EvaluationError(f"checkpoint {path}: {len(classes)} classes listed but the model has {model.num_classes}")
    model.to(device).eval()
    return model, classes, extra


@dataclass
class LoadedModel:
    """A model ready to classify, with what it needs: its classes (space group of each
    output), the dataset settings its inputs are simulated with, where it came from."""

    model: object
    classes: list[int]
    config: ds.BuildConfig
    source: str
    device: str
    extra: dict
    fusion: object | None = None  # the bundle's xtalsym.fusion.Fusion (None: a checkpoint, or no fusion.json)


def load_for_inference(*, checkpoint: str | Path | None = None, bundle: str | Path | None = None,
                       device: str = "auto", prior=None) -> LoadedModel:
    """The model of a bundle (verified against its manifest; default: the shipped bundle)
    or of a training checkpoint. A checkpoint inside a bundle is verified as that bundle:
    a modified or truncated ``model.pt`` is refused, never used."""
    from xtalsym import bundle as bundles

    device = resolve_device(device)
    if checkpoint is not None:
        path = Path(checkpoint)
        bundles.verify_checkpoint(path)
        model, classes, extra = load_model(path, device=device)
        return LoadedModel(model, classes, build_config_from(extra), str(path), device, extra)
    b = bundles.load_bundle(bundle if bundle is not None else bundles.default_bundle_path())
    model = b.load_model(map_location=device).to(device).eval()
    extra = {"dataset_config": b.settings.get("dataset_config")}
    from xtalsym.fusion import load_fusion

    return LoadedModel(model, [int(c) for c in b.classes], build_config_from(extra), str(b.path), device, extra,
                       load_fusion(b, prior=prior))


def _representation(model) -> str:
    return getattr(model, "representation", "shaped")


def present_mask(axes: Sequence[str] | None, model) -> np.ndarray | None:
    """(3,) bool mask of the zone axes to use, or None for all of them."""
    if not axes:
        return None
    unknown = [a for a in axes if a not in shaping.AXES]
    if unknown:
        raise EvaluationError(f"unknown zone axes {unknown}: choose from {', '.join(shaping.AXES)}")
    mask = np.array([a in axes for a in shaping.AXES])
    if mask.all():
        return None
    if _representation(model) != "shaped":
        raise EvaluationError(
            f"model {getattr(model, 'name', '?')} sees the three axes as one {_representation(model)} image: "
            f"it cannot classify a subset of axes ({','.join(axes)}); use a shaped-DP model (msdn)"
        )
    return mask


def predict_probs(model, batches: Iterable, *, device: str = "cpu", present: np.ndarray | None = None) -> np.ndarray:
    """Softmax of the summed logits for every sample of ``batches`` (uint8 tensors/arrays)."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for x in batches:
            x = torch.as_tensor(x).to(device)
            mask = None
            if present is not None:
                mask = torch.as_tensor(np.broadcast_to(present, (x.shape[0], 3)).copy(), device=device)
            logits = model(x, mask).logits if mask is not None else model(x).logits
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    num_classes = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, num_classes))


def _batched(arrays: Sequence[np.ndarray], batch_size: int):
    for i in range(0, len(arrays), batch_size):
        yield np.stack(arrays[i : i + batch_size])


# --------------------------------------------------------------------------- evaluations


def _prediction_rows(material_ids, true_groups, probs, classes, k=TOP_K) -> list[dict]:
    top = topk_indices(probs, k) if len(probs) else np.zeros((0, k), dtype=np.int64)
    rows = []
    for mid, true, idx, p in zip(material_ids, true_groups, top, probs):
        row = {"material_id": mid, "true_space_group": int(true)}
        for j in range(k):
            if j < len(idx):
                row[f"top{j + 1}_space_group"] = int(classes[idx[j]])
                row[f"top{j + 1}_probability"] = round(float(p[idx[j]]), 6)
            else:
                row[f"top{j + 1}_space_group"] = row[f"top{j + 1}_probability"] = ""
        rows.append(row)
    return rows


def _excluded_summary(groups: Iterable[int]) -> dict:
    counts = Counter(int(g) for g in groups)
    return {
        "count": sum(counts.values()),
        "space_groups": {str(g): counts[g] for g in sorted(counts)},
    }


def evaluate_dataset(
    model,
    classes: Sequence[int],
    root: str | Path,
    split: str = "test",
    *,
    batch_size: int = 32,
    device: str = "cpu",
    present: np.ndarray | None = None,
    k: int = TOP_K,
    progress: bool = False,
    engine=None,
) -> dict:
    """Metrics of ``model`` on one split of a dataset directory (see :func:`compute_metrics`),
    plus ``predictions`` (per-sample rows) and ``out_of_classes`` (samples not scored)."""
    from torch.utils.data import DataLoader

    from xtalsym.offline.torch_data import DiffractionDataset

    start = time.perf_counter()
    data = DiffractionDataset(root, split, representation=_representation(model), classes=list(classes))
    splits = ds.load_splits(root)
    inside = set(int(c) for c in classes)
    excluded = [
        s["space_group"]
        for s in ds.iter_sample_metadata(root)
        if splits.get(s["material_id"]) == split and s["space_group"] not in inside
    ]
    from xtalsym.progress import progress as progress_bar

    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    bar = progress_bar(total=len(data), desc=f"evaluate: {split}", unit="sample", enabled=progress)

    def batches():
        for x, _ in loader:
            yield x
            bar.update(len(x))

    try:
        probs = predict_probs(model, batches(), device=device, present=present)
    finally:
        bar.close()
    targets = data.labels
    metrics = compute_metrics(probs, targets, classes, k=k)
    true_sg = [s["space_group"] for s in data.samples]
    if engine is not None:  # datasets keep 8-bit DPs only: the fusion runs without evidence here
        metrics["fusion"] = fusion_metrics(engine, probs, _n_views(present), true_sg, classes=classes, evidence=None)
    metrics.update(
        source={"dataset": str(root), "split": split, "representation": data.representation},
        out_of_classes=_excluded_summary(excluded),
        failed=[],
        predictions=_prediction_rows([s["material_id"] for s in data.samples], true_sg, probs, classes, k),
        seconds=round(time.perf_counter() - start, 3),
    )
    return metrics


def build_config_from(extra: dict | None) -> ds.BuildConfig:
    """The BuildConfig a checkpoint's training data was made with, else the defaults:
    ``extra['dataset_config']``, ``extra['dataset']['config']``, or the dataset.json of
    the training dataset directory (``extra['config']['dataset']``) if it still exists."""
    extra = extra or {}
    config = extra.get("dataset_config")
    if config is None and isinstance(extra.get("dataset"), dict):
        config = extra["dataset"].get("config")
    train_config = extra.get("config")
    if config is None and isinstance(train_config, dict) and train_config.get("dataset"):
        try:
            config = ds.load_metadata(train_config["dataset"]).get("config")
        except (ds.DatasetError, OSError, ValueError):
            config = None
    if not isinstance(config, dict):
        return ds.BuildConfig()
    geometry = config.get("geometry") or {}
    return ds.BuildConfig(
        geometry=simulate.Geometry(**{k: geometry[k] for k in ("wavelength_m", "distance_m", "pixel_size_m", "pixels") if k in geometry}),
        shaping_method=config.get("shaping_method", "fast"),
        symprec=config.get("symprec", structures.DEFAULT_SYMPREC),
        scattering=config.get("scattering", "xray"),
    )


def evaluate_structures(
    model,
    classes: Sequence[int],
    sources: Sequence[str | Path],
    *,
    config: ds.BuildConfig | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    present: np.ndarray | None = None,
    k: int = TOP_K,
    progress: bool = False,
    engine=None,
) -> dict:
    """Metrics of ``model`` on structures (CIF files/folders, JSON lines), simulated and
    shaped on the fly. Unusable structures go to ``failed``; structures of space groups
    the model does not know go to ``out_of_classes`` (with their ids), not into the scores."""
    from xtalsym.progress import progress as progress_bar

    start = time.perf_counter()
    config = config or ds.BuildConfig()
    records = read_records(sources)
    bar = progress_bar(total=len(records), desc="evaluate: simulate+shape", unit="structure", enabled=progress)
    try:
        inputs, labelled, failed = model_inputs(records, config, _representation(model), bar=bar)
    finally:
        bar.close()
    evidence, off_axis = [], []
    if engine is not None:  # the evidence of the float patterns (simulated again: samples keep the 8-bit DPs)
        axes = _axes_of(present)
        for item in labelled:
            sample = structure_evidence(item, config=config, axes=axes)
            evidence.append(np.asarray(sample.group_loglik, dtype=np.float64))
            off_axis.append(sample.off_axis)
    index = {int(c): i for i, c in enumerate(classes)}
    keep = [i for i, item in enumerate(labelled) if item.space_group in index]
    outside = [item for item in labelled if item.space_group not in index]
    all_probs = predict_probs(model, _batched(inputs, batch_size), device=device, present=present)
    probs = all_probs[keep] if len(keep) else np.zeros((0, len(classes)))
    kept = [labelled[i] for i in keep]
    targets = np.array([index[item.space_group] for item in kept], dtype=np.int64)
    metrics = compute_metrics(probs, targets, classes, k=k)
    excluded = _excluded_summary(item.space_group for item in outside)
    excluded["materials"] = [
        {"material_id": item.material_id, "space_group": item.space_group, "symbol": item.symbol} for item in outside
    ]
    metrics.update(
        source={"structures": [str(s) for s in sources], "representation": _representation(model), "geometry": vars(config.geometry)},
        out_of_classes=excluded,
        failed=failed,
        predictions=_prediction_rows([i.material_id for i in kept], [i.space_group for i in kept], probs, classes, k),
        seconds=round(time.perf_counter() - start, 3),
    )
    if engine is not None and labelled:  # every structure counts: the fusion answers over 230 groups
        metrics["fusion"] = fusion_metrics(engine, all_probs, _n_views(present), [i.space_group for i in labelled],
                                           classes=classes, evidence=np.stack(evidence), off_axis=off_axis)
    return metrics


def _n_views(present: np.ndarray | None) -> int:
    return 3 if present is None else int(np.asarray(present).sum())


def _axes_of(present: np.ndarray | None) -> list[str]:
    return list(shaping.AXES) if present is None else [a for a, p in zip(shaping.AXES, present) if p]


def fusion_metrics(engine, probs: np.ndarray, n_views: int, true_groups: Sequence[int], *, classes: Sequence[int],
                   evidence: np.ndarray | None, off_axis: Sequence[float | None] | None = None) -> dict:
    """The fusion's figures (group top-1/top-5, set top-1, crystal system, Bravais lattice, ECE, per-set
    confusion) for model probabilities (n, C), beside the symmetry ceiling of the same labels."""
    from xtalsym.offline import fusion_fit

    logits = np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-30))  # log-softmax = logits + const
    post = engine.posterior_summed(logits, n_views, evidence, off_axis)
    labels = np.asarray(true_groups, dtype=np.int64)
    m = fusion_fit.posterior_metrics(post, labels, tables=engine.tables, decide_at=engine.params.decide_at)
    inside = np.isin(labels, classes)
    m["ceiling"] = {
        "cell_known": fusion_fit.symmetry_ceiling(labels, None, True),
        "cell_unknown": fusion_fit.symmetry_ceiling(labels, None, False),
    }
    m["in_model_classes"] = int(inside.sum())
    m["evidence"] = evidence is not None
    m["prior"] = engine.prior_name
    return m


def predict_structure(
    model,
    classes: Sequence[int],
    structure: str | Path | structures.LabelledStructure,
    *,
    axes: Sequence[str] | None = None,
    config: ds.BuildConfig | None = None,
    device: str = "cpu",
    k: int = TOP_K,
) -> list[dict]:
    """Top-``k`` space groups for one structure (a CIF/JSON file or a labelled structure), best first:
    ``{"rank", "space_group", "symbol", "crystal_system", "probability"}``."""
    config = config or ds.BuildConfig()
    present = present_mask(axes, model)
    labelled = (
        structure
        if isinstance(structure, structures.LabelledStructure)
        else structures.load_structure(structure, symprec=config.symprec)
    )
    raws, shaped = ds.make_sample(labelled, config)
    x = model_input(raws, shaped, _representation(model))
    probs = predict_probs(model, [x[None]], device=device, present=present)[0]
    return _top_rows(probs, classes, k)


def output_dir(out: str | Path | None, what: str) -> Path:
    """Where an evaluation writes: ``out``, else ``evaluation-<what>`` in the working
    directory; never inside a bundle (a bundle holds exactly its manifest's files, and
    anything more makes `serve` and `bundle verify` refuse it)."""
    from xtalsym import bundle as bundles

    path = Path(out) if out else Path.cwd() / f"evaluation-{what}"
    for folder in (path.resolve(), *path.resolve().parents):
        if (folder / bundles.MANIFEST).is_file():
            raise EvaluationError(
                f"output folder {path} is inside the model bundle {folder}: a bundle must hold only the files of "
                f"its manifest; pass --out with a folder outside it"
            )
    return path


def axes_list(text: str | None) -> list[str] | None:
    """'x,z' -> ['x', 'z']; None or '' -> None (all axes)."""
    return [a.strip() for a in text.split(",") if a.strip()] if text else None


def run_evaluation(
    loaded: LoadedModel,
    *,
    dataset: str | Path | None = None,
    split: str = "test",
    sources: Sequence[str | Path] | None = None,
    out: str | Path | None = None,
    axes: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict, dict[str, Path]]:
    """`xtalsym evaluate`: metrics of a loaded model on a dataset split or on structures,
    written to :func:`output_dir` (metrics.json, predictions.csv, the confusion PNG)."""
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {batch_size}")
    if (dataset is None) == (not sources):
        raise EvaluationError("evaluate needs a dataset directory or structure sources (one of them)")
    what = split if dataset is not None else "structures"
    folder = output_dir(out, what)  # refused before any work is done
    model = loaded.model
    present = present_mask(axes, model)
    if dataset is not None:
        metrics = evaluate_dataset(model, loaded.classes, dataset, split, batch_size=batch_size, device=loaded.device,
                                   present=present, progress=progress, engine=loaded.fusion)
    else:
        metrics = evaluate_structures(model, loaded.classes, sources, config=loaded.config, batch_size=batch_size,
                                      device=loaded.device, present=present, progress=progress, engine=loaded.fusion)
    metrics["checkpoint"] = loaded.source
    metrics["model"] = getattr(model, "name", type(model).__name__)
    metrics["axes"] = list(axes) if axes else list(shaping.AXES)
    paths = write_outputs(metrics, folder, title=f"{metrics['model']} on {what} ({metrics['samples']} samples)")
    return metrics, paths


def predict_sources(loaded: LoadedModel, source: str | Path, *, axes: Sequence[str] | None = None, k: int = TOP_K):
    """`xtalsym predict`: for every structure of ``source`` (a structure file, a folder of
    them, or a JSON-lines file: all of its lines), ``(labelled, top-k rows)`` or
    ``(StructureError, None)`` for one that cannot be read, labelled or simulated."""
    from xtalsym.offline.samples import SampleFailure, sample_from_record

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"structure not found: {path}")
    if path.is_dir() or structures.is_json_lines(path):
        records = structures.iter_records(path)
    else:
        records = iter([structures.single_record(path)])
    present = present_mask(axes, loaded.model)
    representation = _representation(loaded.model)
    for record in records:
        sample = sample_from_record(record, loaded.config)
        if isinstance(sample, SampleFailure):
            yield structures.StructureError(sample.source, sample.reason), None
            continue
        probs = predict_probs(loaded.model, [sample.model_input(representation)[None]], device=loaded.device,
                              present=present)[0]
        yield sample.labelled, _top_rows(probs, loaded.classes, k)


def _top_rows(probs: np.ndarray, classes: Sequence[int], k: int) -> list[dict]:
    return [
        {
            "rank": rank + 1,
            "space_group": int(classes[i]),
            "symbol": spacegroups.symbol(int(classes[i])),
            "crystal_system": spacegroups.crystal_system(int(classes[i])),
            "probability": float(probs[i]),
        }
        for rank, i in enumerate(topk_indices(probs[None], k)[0])
    ]


# --------------------------------------------------------------------------- outputs


def write_outputs(metrics: dict, out: str | Path, *, title: str = "") -> dict[str, Path]:
    """metrics.json (everything but the per-sample rows), predictions.csv and the confusion PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / METRICS_FILE, "predictions": out / PREDICTIONS_FILE, "confusion": out / CONFUSION_FILE}
    rows = metrics.get("predictions", [])
    payload = {key: value for key, value in metrics.items() if key != "predictions"}
    paths["metrics"].write_text(json.dumps(payload, indent=1))
    fields = ["material_id", "true_space_group"] + [f"top{j}_{w}" for j in range(1, TOP_K + 1) for w in ("space_group", "probability")]
    with open(paths["predictions"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    save_confusion_png(metrics["confusion"], paths["confusion"], title=title)
    if metrics.get("fusion"):
        from xtalsym.offline import fusion_fit

        paths["reliability"] = fusion_fit.save_reliability_png(
            {"fusion, group": metrics["fusion"]["reliability"], "fusion, set": metrics["fusion"]["set_reliability"]},
            out / RELIABILITY_FILE, title=f"{title} - fusion ECE {metrics['fusion']['ece']:.3f}")
    return paths


def save_confusion_png(confusion: dict, path: str | Path, *, title: str = "") -> None:
    """Two row-normalised heatmaps: all predictions, and wrong space groups only (Fig. 4e-f)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = confusion["systems"]
    panels = [("all predictions (row %)", confusion["rates"]), ("wrong space group only (row %, paper Fig. 4e-f)", confusion["error_rates"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    for ax, (name, matrix) in zip(axes, panels):
        values = np.array([[np.nan if v is None else 100 * v for v in row] for row in matrix], dtype=float)
        ax.imshow(np.nan_to_num(values, nan=0.0), cmap="Blues", vmin=0, vmax=100)
        for i in range(len(systems)):
            for j in range(len(systems)):
                v = values[i, j]
                if not np.isnan(v) and v > 0:
                    ax.text(j, i, f"{v:.0f}" if v >= 1 else f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if v > 50 else "black")
        ax.set_xticks(range(len(systems)), [s[:5] for s in systems], rotation=45, ha="right")
        ax.set_yticks(range(len(systems)), [f"{s} ({t})" for s, t in zip(systems, confusion["totals"])])
        ax.set_xlabel("predicted crystal system")
        ax.set_ylabel("true crystal system (samples)")
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def format_summary(metrics: dict) -> str:
    """A short table: top-k overall, per crystal system, the worst space groups."""
    topk = metrics["topk"]
    lines = [
        f"scored samples: {metrics['samples']}   out of the model's classes: {metrics['out_of_classes']['count']}"
        f"   failed: {len(metrics.get('failed', []))}",
        "  ".join(f"{name}: {_pct(v)}" for name, v in topk.items()),
        "",
        f"{'crystal system':<14} {'count':>6} {'SGs':>4} {'top-1':>7} {'top-5':>7} {'system':>7}",
    ]
    last = f"top{len(topk)}"
    for system, row in metrics["per_crystal_system"].items():
        lines.append(
            f"{system:<14} {row['count']:>6} {row['space_groups']:>4} {_pct(row['top1']):>7} {_pct(row[last]):>7} "
            f"{_pct(row['system_accuracy']):>7}"
        )
    groups = sorted(metrics["per_space_group"].items(), key=lambda kv: (kv[1]["top1"], -kv[1]["count"]))[:8]
    if groups:
        lines += ["", f"{'space group':<16} {'count':>6} {'top-1':>7} {'top-5':>7}   (lowest top-1 first)"]
        for sg, row in groups:
            lines.append(f"{sg + ' ' + row['symbol']:<16} {row['count']:>6} {_pct(row['top1']):>7} {_pct(row[last]):>7}")
    outside = metrics["out_of_classes"]["space_groups"]
    if outside:
        lines.append("not scored (space group outside the model's classes): "
                     + ", ".join(f"{sg} x{n}" for sg, n in list(outside.items())[:12]) + (" ..." if len(outside) > 12 else ""))
    fused = metrics.get("fusion")
    if fused:
        ceiling = fused["ceiling"]
        lines += [
            "",
            f"fusion over 230 groups ({fused['n']} samples, evidence {'used' if fused['evidence'] else 'not used'}, "
            f"prior: {fused['prior']}):",
            f"{'':<16} {'measured':>9} {'ceiling (cell known / unknown)':>32}",
            f"{'group top-1':<16} {_pct(fused['group_top1']):>9} {_pct(ceiling['cell_known']):>16} / "
            f"{_pct(ceiling['cell_unknown'])}",
            f"{'set top-1':<16} {_pct(fused['set_top1']):>9} {'100.0 %':>16}",
            f"{'crystal system':<16} {_pct(fused['crystal_system']):>9} {'100.0 %':>16}",
            f"{'Bravais lattice':<16} {_pct(fused['bravais_lattice']):>9} {'100.0 %':>16}",
            f"{'group top-5':<16} {_pct(fused['group_top5']):>9}",
            f"ECE {fused['ece']:.3f} (set {fused['set_ece']:.3f}); decided {_pct(fused['decided_share'])}",
            "per set (true set: count, right, most often taken for):",
        ]
        for label, row in list(fused["set_confusion"].items())[:10]:
            taken = ", ".join(f"{k} x{v}" for k, v in row["taken_for"].items())
            lines.append(f"  {label:<34} {row['count']:>5} {_pct(row['right']):>7}  {taken}")
    for item in metrics.get("failed", [])[:10]:
        lines.append(f"failed: {item['source']}: {item['reason']}")
    if len(metrics.get("failed", [])) > 10:
        lines.append(f"failed: ... {len(metrics['failed']) - 10} more in {METRICS_FILE}")
    return "\n".join(lines)


def structure_evidence(labelled: structures.LabelledStructure, *, config: ds.BuildConfig | None = None, axes=None):
    """Symmetry evidence (:class:`xtalsym.evidence.SampleEvidence`) from the structure's simulated
    float patterns at the dataset's geometry: what `xtalsym predict` prints beside the model."""
    from xtalsym.evidence import analyse_sample
    from xtalsym.offline import simulate

    config = config or ds.BuildConfig()
    patterns = simulate.simulate_axes(labelled.structure, axes=axes or simulate.AXES, geometry=config.geometry,
                                      scattering=config.scattering, **simulate.DATASET_OPTIONS)
    return analyse_sample(patterns, q_per_pixel=config.geometry.q_per_pixel)
