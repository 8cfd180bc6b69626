"""Per-material features of held-out materials, for fitting and measuring the fusion.

For each Materials Project material of the chosen splits (by the dataset's split rule,
sha256(seed:material_id)), this simulates the three zone-axis patterns exactly as the
training data were made, shapes them, runs the bundle's model (ONNX Runtime) and keeps
what the fusion needs:

- ``view_logits`` float32 (n, 3, C): the MSDN's per-view logits (its heads are linear, so
  they follow from the graph's per-view embeddings; their sum is checked against the
  graph's logits), which give the model's answer for any subset of views;
- the label (space group by spglib at the dataset's symprec), the cell, the formula;
- the float patterns, sparse (pixels above ``SPARSE_FLOOR`` × each view's peak, float16),
  so the symmetry evidence can be computed later without simulating again.

Work is cut into fixed chunks (val and test interleaved, so a partial run has both); each
chunk is one ``chunk-NNNNN.npz`` written atomically, so a rerun skips finished chunks.
Run: ``python -m xtalsym.offline.fusion_data --out data/fusion --val 1500``.
``--misorientation-deg σ`` simulates every zone of a material turned by N(0, σ) degrees about a random
axis (``simulate.Realism``, seeded by the material id, so a rerun and every split see the same tilts):
a cache for measuring and fitting the fusion off the exact zone axes (issue 15's realism target).
``--precision`` picks the graph (default fp32, what the fusion is fitted on; "auto" would take
the int8 graph on CPUs with VNNI / AMX); ``--from-cache DIR --precision int8`` recomputes the
logits of an existing cache from its stored patterns instead of simulating again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtalsym.offline import dataset as ds
from xtalsym.offline import simulate, structures
from xtalsym.offline.samples import simulate_patterns

log = logging.getLogger(__name__)

SPARSE_FLOOR = 1e-5  # relative to the view's peak; weaker pixels are dropped from the cache
CHUNK_SIZE = 32
RELOGIT_TOL = 1e-4  # |logit| agreement that counts as "reproduced" when recomputing a cache
DEFAULT_SOURCE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mp_structures" / "structures.jsonl.xz"


@dataclass(frozen=True)
class Job:
    index: int
    split: str
    records: tuple[structures.StructureRecord, ...]


def _rank(material_id: str) -> str:
    """A fixed pseudo-random order of materials (independent of the split hash)."""
    return hashlib.sha256(f"fusion-subset:{material_id}".encode()).hexdigest()


def select_records(
    source: str | Path,
    *,
    split_counts: dict[str, int | None],
    fractions: dict[str, float] | None = None,
    seed: int = 0,
) -> dict[str, list[structures.StructureRecord]]:
    """Records of each wanted split (``None`` = all of it, else the first n in a fixed
    pseudo-random order), by the dataset's split rule."""
    fractions = fractions or dict(ds.DEFAULT_SPLIT_FRACTIONS)
    chosen: dict[str, list[structures.StructureRecord]] = {name: [] for name in split_counts}
    for item in structures.iter_records(source):
        if isinstance(item, structures.StructureError):
            continue
        name = ds.split_of(item.material_id, fractions, seed)
        if name in chosen:
            chosen[name].append(item)
    for name, count in split_counts.items():
        chosen[name].sort(key=lambda r: _rank(r.material_id))
        if count is not None:
            chosen[name] = chosen[name][:count]
    return chosen


def make_jobs(chosen: dict[str, list[structures.StructureRecord]], chunk_size: int = CHUNK_SIZE) -> list[Job]:
    """Chunks of every split, interleaved round-robin so any prefix of the work has all splits."""
    per_split = {
        name: [tuple(recs[i : i + chunk_size]) for i in range(0, len(recs), chunk_size)] for name, recs in chosen.items()
    }
    jobs: list[Job] = []
    longest = max((len(c) for c in per_split.values()), default=0)
    for i in range(longest):
        for name in sorted(per_split):
            if i < len(per_split[name]):
                jobs.append(Job(len(jobs), name, per_split[name][i]))
    return jobs


def chunk_path(out: Path, index: int) -> Path:
    return out / f"chunk-{index:05d}.npz"


def sparse_pattern(pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(flat indices, uint16 up to 256² pixels, values/peak float16, peak) of one float pattern."""
    flat = np.asarray(pattern, dtype=np.float64).ravel()
    peak = float(flat.max())
    keep = np.flatnonzero(flat > SPARSE_FLOOR * peak)
    return keep.astype(np.uint16 if flat.size <= 1 << 16 else np.uint32), (flat[keep] / peak).astype(np.float16), peak


def dense_pattern(indices: np.ndarray, values: np.ndarray, peak: float, pixels: int) -> np.ndarray:
    out = np.zeros(pixels * pixels, dtype=np.float64)
    out[indices] = values.astype(np.float64) * peak
    return out.reshape(pixels, pixels)


class _Model:
    """The bundle's graph plus its per-view heads (one per worker process)."""

    def __init__(self, bundle_path: str, precision: str = "fp32"):
        import torch

        from xtalsym.bundle import load_bundle
        from xtalsym.inference import make_backend

        torch.set_num_threads(1)
        self.bundle = load_bundle(bundle_path)
        self.backend = make_backend(self.bundle, "onnxruntime", precision=precision, intra_op_threads=1)
        heads = self.bundle.load_model().heads  # the MSDN's linear per-view heads
        self.weights = np.stack([h.weight.detach().numpy() for h in heads]).astype(np.float32)
        self.biases = np.stack([h.bias.detach().numpy() for h in heads]).astype(np.float32)

    def view_logits(self, x: np.ndarray) -> np.ndarray:
        if self.backend.precision == "int8":
            # the quantised graph's own per-view logits, which its run() sums: its view_embeddings
            # output is not exactly what its heads see (up to 0.26 logit apart, measured)
            batch = len(x)
            views = x.reshape(batch * 3, *x.shape[2:])
            result = self.backend.run_views(views, np.tile(np.arange(3, dtype=np.int64), batch))
            return result.logits.reshape(batch, 3, -1).astype(np.float32)
        result = self.backend.run(x)
        view = np.einsum("bvd,vcd->bvc", result.embeddings, self.weights) + self.biases[None]
        gap = np.abs(view.sum(axis=1) - result.logits).max()
        if gap > 1e-2 * max(1.0, float(np.abs(result.logits).max())):
            raise RuntimeError(f"per-view logits do not add up to the graph's logits (gap {gap:.3g})")
        return view.astype(np.float32)


_MODEL: _Model | None = None


def _model(bundle_path: str, precision: str = "fp32") -> _Model:
    global _MODEL
    if _MODEL is None or _MODEL.backend.precision != precision:
        _MODEL = _Model(bundle_path, precision)
    return _MODEL


def run_job(job: Job, out: str, bundle_path: str, config: ds.BuildConfig, precision: str = "fp32"
            ) -> tuple[int, int, int, float]:
    """Simulate (as datasets are made, ``config.misorientation_deg`` included), shape and classify one
    chunk; write its npz. (index, ok, failed, cpu s)."""
    import cv2
    from threadpoolctl import threadpool_limits

    from xtalsym import shaping

    path = chunk_path(Path(out), job.index)
    if path.is_file():
        return job.index, -1, 0, 0.0
    start = time.process_time()
    with threadpool_limits(1):
        cv2.setNumThreads(1)
        model = _model(bundle_path, precision)
        rows, inputs, sparse, errors = [], [], [], []
        for record in job.records:
            try:
                labelled = structures.label(record, symprec=config.symprec)
                patterns = simulate_patterns(labelled, config)
                raws = [simulate.to_raw_uint8(patterns[a]) for a in simulate.AXES]
                shaped = np.stack([shaping.shape(r, a, method=config.shaping_method) for r, a in zip(raws, simulate.AXES)])
            except (structures.StructureError, simulate.SimulationError, shaping.ShapingError, ValueError) as exc:
                errors.append({"material_id": record.material_id, "reason": getattr(exc, "reason", str(exc))})
                continue
            lattice = labelled.structure.lattice
            rows.append(
                {
                    "material_id": labelled.material_id,
                    "formula": labelled.formula,
                    "space_group": labelled.space_group,
                    "abc": [float(v) for v in lattice.abc],
                    "angles": [float(v) for v in lattice.angles],
                    "atoms": len(labelled.structure),
                }
            )
            inputs.append(np.ascontiguousarray(shaped.transpose(0, 3, 1, 2)))
            sparse.append([sparse_pattern(patterns[a]) for a in simulate.AXES])
        arrays: dict[str, np.ndarray] = {}
        if inputs:
            arrays["view_logits"] = np.concatenate(
                [model.view_logits(np.stack(inputs[i : i + 16])) for i in range(0, len(inputs), 16)]
            )
            arrays["space_group"] = np.array([r["space_group"] for r in rows], dtype=np.int16)
            arrays["cell"] = np.array([r["abc"] + r["angles"] for r in rows], dtype=np.float32)
            counts = np.array([[len(s[v][0]) for v in range(3)] for s in sparse], dtype=np.int64)
            arrays["pattern_counts"] = counts
            arrays["pattern_peaks"] = np.array([[s[v][2] for v in range(3)] for s in sparse], dtype=np.float64)
            arrays["pattern_indices"] = np.concatenate([s[v][0] for s in sparse for v in range(3)])
            arrays["pattern_values"] = np.concatenate([s[v][1] for s in sparse for v in range(3)])
        meta = {"split": job.split, "rows": rows, "errors": errors}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    return job.index, len(rows), len(errors), time.process_time() - start


@dataclass
class Features:
    """Everything cached, concatenated over chunks (see :func:`load_features`)."""

    material_id: list[str]
    split: np.ndarray  # str
    space_group: np.ndarray  # int
    view_logits: np.ndarray  # float32 (n, 3, C)
    cell: np.ndarray  # (n, 6): a, b, c (Å), alpha, beta, gamma (deg)
    formula: list[str]
    chunk: np.ndarray  # chunk index of each row
    position: np.ndarray  # row inside its chunk

    def __len__(self) -> int:
        return len(self.material_id)


def load_features(out: str | Path) -> Features:
    out = Path(out)
    mids, splits, groups, logits, cells, formulas, chunks, positions = [], [], [], [], [], [], [], []
    for path in sorted(out.glob("chunk-*.npz")):
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if not meta["rows"]:
                continue
            index = int(path.stem.split("-")[1])
            mids += [r["material_id"] for r in meta["rows"]]
            formulas += [r["formula"] for r in meta["rows"]]
            splits += [meta["split"]] * len(meta["rows"])
            groups.append(data["space_group"].astype(np.int64))
            logits.append(data["view_logits"])
            cells.append(data["cell"])
            chunks += [index] * len(meta["rows"])
            positions += list(range(len(meta["rows"])))
    if not mids:
        raise FileNotFoundError(f"no feature chunks under {out}")
    return Features(
        material_id=mids,
        split=np.array(splits),
        space_group=np.concatenate(groups),
        view_logits=np.concatenate(logits),
        cell=np.concatenate(cells),
        formula=formulas,
        chunk=np.array(chunks),
        position=np.array(positions),
    )


def iter_patterns(out: str | Path, pixels: int = 256, *, only: Path | None = None
                  ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(chunk, position, {axis: float pattern}) of every cached material (or of chunk ``only``)."""
    out = Path(out)
    for path in [only] if only is not None else sorted(out.glob("chunk-*.npz")):
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if not meta["rows"]:
                continue
            index = int(path.stem.split("-")[1])
            counts = data["pattern_counts"].ravel()
            peaks = data["pattern_peaks"].ravel()
            ends = np.cumsum(counts)
            starts = ends - counts
            idx, val = data["pattern_indices"], data["pattern_values"]
            for position in range(len(meta["rows"])):
                views = {}
                for v, axis in enumerate(simulate.AXES):
                    k = position * 3 + v
                    views[axis] = dense_pattern(idx[starts[k] : ends[k]], val[starts[k] : ends[k]], peaks[k], pixels)
                yield index, position, views


EVIDENCE_DIR = "evidence"
VIEW_SUBSETS = tuple(m for m in itertools.product((False, True), repeat=3) if any(m))


def mask_key(mask: Sequence[bool]) -> str:
    """'101' for views x and z present."""
    return "".join("1" if v else "0" for v in mask)


def evidence_chunk(path: Path, out_dir: Path, q_per_pixel: float,
                   subsets: Sequence[tuple[bool, ...]] = ((True, True, True),)) -> tuple[int, float]:
    """Evidence log-likelihoods of every material of one feature chunk, for every view subset
    (one frame analysis per view, combined per subset); written as evidence/<chunk>.npz."""
    from threadpoolctl import threadpool_limits

    from xtalsym.evidence import analyse_frame, combine

    target = out_dir / path.name
    if target.is_file():
        return 0, 0.0
    start = time.process_time()
    arrays: dict[str, list] = {f"loglik_{mask_key(m)}": [] for m in subsets}
    arrays.update({f"decided_{mask_key(m)}": [] for m in subsets})
    arrays.update({f"offaxis_{mask_key(m)}": [] for m in subsets})  # NaN where not measurable
    ids: list[str] = []
    with threadpool_limits(1):
        meta = None
        for chunk, position, views in iter_patterns(path.parent, only=path):
            if meta is None:
                with np.load(path) as data:
                    meta = json.loads(bytes(data["meta"]).decode())
            needed = [a for i, a in enumerate(simulate.AXES) if any(m[i] for m in subsets)]
            frames = {a: analyse_frame(views[a], axis=a, q_per_pixel=q_per_pixel, counts=False) for a in needed}
            for m in subsets:
                ev = combine({a: frames[a] for a, keep in zip(simulate.AXES, m) if keep})
                arrays[f"loglik_{mask_key(m)}"].append(np.asarray(ev.group_loglik, dtype=np.float32))
                arrays[f"decided_{mask_key(m)}"].append(bool(ev.decided))
                arrays[f"offaxis_{mask_key(m)}"].append(np.nan if ev.off_axis is None else float(ev.off_axis))
            ids.append(meta["rows"][position]["material_id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, material_id=np.array(ids), **{k: np.array(v) for k, v in arrays.items()})
    os.replace(tmp, target)
    return len(ids), time.process_time() - start


def build_evidence(out: str | Path, *, q_per_pixel: float, workers: int = 1,
                   subsets: Sequence[tuple[bool, ...]] = ((True, True, True),)) -> Path:
    """Evidence for every finished feature chunk (resumable), then all of it in evidence.npz.
    ``subsets``: the view subsets to combine (each costs ~0.13 CPU-s per material)."""
    out = Path(out)
    chunks = sorted(out.glob("chunk-*.npz"))
    n_chunks = len(chunks)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for path, (n, seconds) in zip(chunks, pool.map(evidence_chunk, chunks, [out / EVIDENCE_DIR] * n_chunks,
                                                        [q_per_pixel] * n_chunks, [tuple(subsets)] * n_chunks)):
            if n:
                log.info("evidence %s: %d materials, %.3f CPU-s per material", path.name, n, seconds / n)
    target = out / "evidence.npz"
    np.savez_compressed(target, **_evidence_files(out / EVIDENCE_DIR))
    return target


def _evidence_files(folder: str | Path) -> dict[str, np.ndarray]:
    """Every array of the per-chunk evidence files of :func:`build_evidence`, concatenated over chunks."""
    merged: dict[str, list] = {}
    for path in sorted(Path(folder).glob("chunk-*.npz")):
        with np.load(path) as data:
            for key in data.files:
                merged.setdefault(key, []).append(data[key])
    return {key: np.concatenate(parts) for key, parts in merged.items()}


def _per_subset(arrays: dict[str, np.ndarray], prefix: str) -> dict[tuple, np.ndarray]:
    """{present mask: array} of the ``<prefix>_<mask>`` entries (e.g. ``loglik_101``)."""
    return {tuple(c == "1" for c in key.split("_")[1]): value for key, value in arrays.items()
            if key.startswith(prefix + "_")}


def load_off_axis(folder: str | Path, material_ids: Sequence[str]) -> dict[tuple, np.ndarray]:
    """{present mask: (n,) off-axis score (NaN: not measured)} of ``material_ids`` from the evidence
    files of :func:`build_evidence` (empty for files written before the score existed)."""
    arrays = _evidence_files(folder)
    scores = _per_subset(arrays, "offaxis")
    if not scores or sum(len(v) for v in scores.values()) != len(scores) * len(arrays["material_id"]):
        return {}  # no score, or some chunks written before it: nothing to go by
    where = {str(m): i for i, m in enumerate(arrays["material_id"])}
    pick = np.array([where.get(m, -1) for m in material_ids], dtype=np.int64)
    return {mask: np.where(pick >= 0, values.astype(np.float64)[np.maximum(pick, 0)], np.nan)
            for mask, values in scores.items()}


def load_evidence(folder: str | Path, material_ids: Sequence[str]) -> tuple[np.ndarray, dict[tuple, np.ndarray]]:
    """(row indices of ``material_ids`` that have evidence, {present mask: (m, 230)} for those rows),
    from the per-chunk evidence files of :func:`build_evidence`."""
    arrays = _evidence_files(folder)
    if not arrays:
        return np.zeros(0, dtype=np.int64), {}
    where = {str(m): i for i, m in enumerate(arrays["material_id"])}
    rows = np.array([i for i, m in enumerate(material_ids) if m in where], dtype=np.int64)
    src = np.array([where[material_ids[i]] for i in rows], dtype=np.int64)
    return rows, {mask: values[src].astype(np.float64) for mask, values in _per_subset(arrays, "loglik").items()}


def prior_counts_of(out: str | Path, features: Features) -> tuple[np.ndarray, str]:
    """(230,) counts behind the fusion's default prior and where they come from: the training
    split of ``<out>/mp_labels.json`` (:func:`label_all`) when built, else the cached validation
    materials (the same distribution by the hash split; never a test label)."""
    labels_file = Path(out) / "mp_labels.json"
    if labels_file.is_file():
        from xtalsym.offline.fusion_fit import prior_counts

        counts = prior_counts(json.loads(labels_file.read_text()), "train")
        return counts, f"train split ({int(counts.sum())} materials, spglib labels)"
    counts = np.bincount(features.space_group[features.split == "val"] - 1, minlength=230)
    return counts, "validation split (mp_labels.json not built)"


def label_all(source: str | Path, out: str | Path, *, symprec: float = structures.DEFAULT_SYMPREC,
              fractions: dict[str, float] | None = None, seed: int = 0) -> dict[str, dict]:
    """Split and space group of every material of ``source`` (spglib at ``symprec``), cached
    in ``out`` (JSON): the training frequencies behind the fusion's default prior."""
    out = Path(out)
    if out.is_file():
        return json.loads(out.read_text())
    fractions = fractions or dict(ds.DEFAULT_SPLIT_FRACTIONS)
    labels: dict[str, dict] = {}
    for item in structures.iter_records(source):
        if isinstance(item, structures.StructureError):
            continue
        try:
            number = structures.label(item, symprec=symprec).space_group
        except structures.StructureError:
            continue
        labels[item.material_id] = {"split": ds.split_of(item.material_id, fractions, seed), "space_group": number}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(labels))
    os.replace(tmp, out)
    return labels


def relogit_chunk(path: Path, out: Path, bundle_path: str, shaping_method: str, precision: str
                  ) -> tuple[int, int, float, float]:
    """Copy of one feature chunk with ``view_logits`` recomputed by the ``precision`` graph from
    the chunk's float patterns (8-bit raw, shaped, as :func:`run_job`); (rows, rows whose logits
    are within ``RELOGIT_TOL`` of the cached ones, max |new - cached| logit, CPU s). Skips a
    chunk already written."""
    import cv2
    from threadpoolctl import threadpool_limits

    from xtalsym import shaping

    target = chunk_path(out, int(path.stem.split("-")[1]))
    if target.is_file():
        return 0, 0, float("nan"), 0.0
    start = time.process_time()
    with threadpool_limits(1):
        cv2.setNumThreads(1)
        model = _model(bundle_path, precision)
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        gap, close = 0.0, 0
        if "view_logits" in arrays:
            inputs = []
            for _, _, views in iter_patterns(path.parent, only=path):
                shaped = np.stack([shaping.shape(simulate.to_raw_uint8(views[a]), a, method=shaping_method)
                                   for a in simulate.AXES])
                inputs.append(np.ascontiguousarray(shaped.transpose(0, 3, 1, 2)))
            logits = np.concatenate([model.view_logits(np.stack(inputs[i : i + 16])) for i in range(0, len(inputs), 16)])
            per_row = np.abs(logits - arrays["view_logits"]).max(axis=(1, 2))
            gap, close = float(per_row.max()), int((per_row <= RELOGIT_TOL).sum())
            arrays["view_logits"] = logits
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, target)
    return len(arrays["space_group"]) if "space_group" in arrays else 0, close, gap, time.process_time() - start


def relogit_cache(source: str | Path, out: str | Path, *, bundle_path: str | Path = "reference_index",
                  precision: str = "int8", workers: int = 1, max_jobs: int | None = None) -> tuple[float, float]:
    """A copy of the feature cache ``source`` under ``out`` whose per-view logits come from the
    ``precision`` graph (recomputed from the cached patterns, no simulation); labels, cells and
    patterns are copied unchanged (the evidence stays in ``source``). Returns the largest
    |recomputed - cached| logit seen and the share of materials within ``RELOGIT_TOL`` (with fp32
    this checks the recomputation: the patterns are stored as float16, so a pixel near a grey
    level's rounding edge can move by one level and some materials differ)."""
    from xtalsym.bundle import load_bundle
    from xtalsym.offline.evaluate import build_config_from

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError("--from-cache and --out are the same folder; the copy must go elsewhere")
    chunks = sorted(source.glob("chunk-*.npz"))[: max_jobs or None]
    if not chunks:
        raise FileNotFoundError(f"no feature chunks under {source}")
    bundle = load_bundle(bundle_path)
    method = build_config_from({"dataset_config": bundle.settings["dataset_config"]}).shaping_method
    out.mkdir(parents=True, exist_ok=True)
    plan = json.loads((source / "plan.json").read_text()) if (source / "plan.json").is_file() else {}
    (out / "plan.json").write_text(json.dumps({**plan, "bundle": bundle.model_id, "precision": precision,
                                               "logits_recomputed_from": str(source)}, indent=1))
    worst, rows_all, close_all = 0.0, 0, 0
    n = len(chunks)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for path, (rows, close, gap, seconds) in zip(chunks, pool.map(relogit_chunk, chunks, [out] * n, [str(bundle_path)] * n,
                                                               [method] * n, [precision] * n)):
            if rows:
                worst, rows_all, close_all = max(worst, gap), rows_all + rows, close_all + close
                log.info("%s: %d materials (%d within %g of the cached logits), max |%s - cached| logit %.3g, "
                         "%.3f CPU-s per material", path.name, rows, close, RELOGIT_TOL, precision, gap, seconds / rows)
    return worst, close_all / max(rows_all, 1)


def build(
    out: str | Path,
    *,
    source: str | Path = DEFAULT_SOURCE,
    bundle_path: str | Path = "reference_index",
    val: int | None = 1500,
    test: int | None = None,
    workers: int = 2,
    max_jobs: int | None = None,
    precision: str = "fp32",
    misorientation_deg: float = 0.0,
) -> None:
    from xtalsym.bundle import load_bundle
    from xtalsym.offline.evaluate import build_config_from

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_path)
    config = dataclasses.replace(build_config_from({"dataset_config": bundle.settings["dataset_config"]}),
                                 misorientation_deg=misorientation_deg)
    chosen = select_records(source, split_counts={"val": val, "test": test})
    plan = {"splits": {k: len(v) for k, v in chosen.items()}, "misorientation_deg": misorientation_deg}
    _check_plan(out, plan)
    _run_jobs(out, make_jobs(chosen), plan, bundle_path=bundle_path, model_id=bundle.model_id, config=config,
              workers=workers, max_jobs=max_jobs, precision=precision)


def _check_plan(out: Path, plan: dict) -> None:
    """Refuse to add chunks simulated otherwise to a folder that already holds some (a resumed run
    must keep the conditions of its first)."""
    previous = out / "plan.json"
    if not previous.is_file() or not any(out.glob("chunk-*.npz")):
        return
    before = float(json.loads(previous.read_text()).get("misorientation_deg", 0.0))
    if before != plan["misorientation_deg"]:
        raise ValueError(f"{out} holds chunks simulated at misorientation {before}°, not "
                         f"{plan['misorientation_deg']}°: use another --out")


def open_set_ids(labels: dict[str, dict], *, groups, seed: int = 0, exclude_splits: Sequence[str] = ("val",)) -> set[str]:
    """Material ids of the open-set test half: labelled in ``groups``, not a reference by
    ``xtalsym.index.open_set.reference_half``, not in the dataset splits ``exclude_splits``."""
    from xtalsym.index.open_set import reference_half

    wanted, excluded = {int(g) for g in groups}, set(exclude_splits)
    return {mid for mid, entry in labels.items() if int(entry["space_group"]) in wanted
            and entry["split"] not in excluded and not reference_half(mid, seed=seed)}


def build_open_set(
    out: str | Path,
    *,
    labels: dict[str, dict],
    groups: Sequence[int],
    source: str | Path = DEFAULT_SOURCE,
    bundle_path: str | Path = "reference_index",
    seed: int = 0,
    exclude_splits: Sequence[str] = ("val",),
    workers: int = 2,
    max_jobs: int | None = None,
) -> None:
    """Features of the test half of the open-set experiment (``xtalsym index evaluate``'s
    split: materials of ``groups`` that are not references by ``reference_half``), leaving out
    the dataset splits in ``exclude_splits`` (default the validation split, on which the
    fusion is fitted). ``labels``: :func:`label_all`'s {material_id: {split, space_group}}."""
    from xtalsym.bundle import load_bundle
    from xtalsym.offline.evaluate import build_config_from

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_path)
    config = build_config_from({"dataset_config": bundle.settings["dataset_config"]})
    wanted_groups = {int(g) for g in groups}
    wanted = open_set_ids(labels, groups=wanted_groups, seed=seed, exclude_splits=exclude_splits)
    records = [r for r in structures.iter_records(source)
               if not isinstance(r, structures.StructureError) and r.material_id in wanted]
    records.sort(key=lambda r: _rank(r.material_id))
    plan = {"open_set": {"groups": sorted(wanted_groups), "seed": seed, "excluded_splits": list(exclude_splits),
                         "rule": f"test half: sha256('openset:{seed}:'+material_id)[:8]/2^64 >= 0.5"},
            "splits": {"openset": len(records)}}
    _run_jobs(out, make_jobs({"openset": records}), plan, bundle_path=bundle_path, model_id=bundle.model_id,
              config=config, workers=workers, max_jobs=max_jobs)


def _run_jobs(out: Path, jobs: list[Job], plan: dict, *, bundle_path, model_id: str, config: ds.BuildConfig,
              workers: int, max_jobs: int | None, precision: str = "fp32") -> None:
    """Run the chunks of ``jobs`` not yet on disk (resumable), after writing the plan."""
    (out / "plan.json").write_text(json.dumps({**plan, "chunks": len(jobs), "bundle": model_id,
                                               "precision": precision}, indent=1))
    todo = [j for j in jobs if not chunk_path(out, j.index).is_file()][: max_jobs or None]
    log.info("%d chunks planned, %d to do", len(jobs), len(todo))
    done = ok = failed = 0
    cpu = 0.0
    wall = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for index, n_ok, n_failed, seconds in pool.map(
            run_job, todo, [str(out)] * len(todo), [str(bundle_path)] * len(todo), [config] * len(todo),
            [precision] * len(todo)
        ):
            done += 1
            ok += max(n_ok, 0)
            failed += n_failed
            cpu += seconds
            log.info(
                "chunk %d done (%d/%d): %d ok, %d failed, %.2f cpu-s/material, wall %.0f s",
                index, done, len(todo), n_ok, n_failed, seconds / max(n_ok, 1), time.perf_counter() - wall,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/fusion")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--val", type=int, default=1500, help="val materials (a fixed pseudo-random subset)")
    parser.add_argument("--test", type=int, default=None, help="test materials (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-chunks", type=int, default=None)
    parser.add_argument("--labels-only", action="store_true", help="only label every material (mp_labels.json)")
    parser.add_argument("--evidence", action="store_true", help="compute the evidence of the cached patterns")
    parser.add_argument("--subsets", default="111", help="view subsets for the evidence, e.g. 111,100,010,001")
    parser.add_argument("--open-set", action="store_true",
                        help="the test half of the paper's 30 unseen groups (xtalsym index evaluate's split), "
                        "outside the validation split; needs --labels (fusion_data --labels-only)")
    parser.add_argument("--labels", default=None, help="mp_labels.json of --labels-only (default: <out>/mp_labels.json)")
    parser.add_argument("--precision", choices=("fp32", "int8", "auto"), default="fp32",
                        help="graph for the logits (fp32: what the fusion is fitted on)")
    parser.add_argument("--misorientation-deg", type=float, default=0.0,
                        help="turn each zone by N(0, σ) degrees about a random axis (σ in degrees; seeded per material)")
    parser.add_argument("--from-cache", default=None,
                        help="recompute the logits of this cache's patterns with --precision into --out (no simulation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_cache:
        from xtalsym.inference import BackendUnavailable

        if not Path(args.from_cache).is_dir():
            parser.error(f"--from-cache: no folder {args.from_cache}")
        try:
            worst, share = relogit_cache(args.from_cache, args.out, bundle_path=args.bundle, precision=args.precision,
                                  workers=args.workers, max_jobs=args.max_chunks)
        except (ValueError, FileNotFoundError, BackendUnavailable) as exc:
            parser.error(str(exc))
        log.info("logits recomputed (%s) into %s; largest |new - cached| logit %.3g; %.1f %% of the materials within %g",
                 args.precision, args.out, worst, 100 * share, RELOGIT_TOL)
        return 0
    if args.evidence:
        from xtalsym.bundle import load_bundle
        from xtalsym.offline.evaluate import build_config_from

        bundle = load_bundle(args.bundle)
        geometry = build_config_from({"dataset_config": bundle.settings["dataset_config"]}).geometry
        subsets = [tuple(c == "1" for c in key) for key in args.subsets.split(",")]
        path = build_evidence(args.out, q_per_pixel=geometry.q_per_pixel, workers=args.workers, subsets=subsets)
        log.info("evidence written to %s", path)
        return 0
    if args.labels_only:
        labels = label_all(args.source, Path(args.out) / "mp_labels.json")
        log.info("%d materials labelled", len(labels))
        return 0
    if args.open_set:
        from xtalsym import spacegroups

        labels_file = Path(args.labels or Path(args.out) / "mp_labels.json")
        if not labels_file.is_file():
            parser.error(f"--open-set needs the material labels; no file {labels_file} (run --labels-only first)")
        build_open_set(args.out, labels=json.loads(labels_file.read_text()), groups=spacegroups.PAPER_OPEN_SET_30,
                       source=args.source, bundle_path=args.bundle, workers=args.workers, max_jobs=args.max_chunks)
        return 0
    if not (math.isfinite(args.misorientation_deg) and args.misorientation_deg >= 0):
        parser.error(f"--misorientation-deg must be a finite number of degrees >= 0, got {args.misorientation_deg}")
    try:
        build(args.out, source=args.source, bundle_path=args.bundle, val=args.val, test=args.test,
              workers=args.workers, max_jobs=args.max_chunks, precision=args.precision,
              misorientation_deg=args.misorientation_deg)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
