"""FAISS reference index of shaped-DP embeddings: nearest materials, the paper's
per-class cosine score, an "unknown" decision and the open-set evaluation (Fig. 3f).

Embedding of a material (see docs/INDEX.md): the 960-wide feature of each of the three
zone-axis streams (before the heads), each L2-normalised, concatenated to 2,880 floats.
The inner product of two such vectors is Σ_views cos(P_v, V_v) = 3 − σ_total of the
paper's eq. 5. A missing view is a zero block: it adds 0 to every score, so a query
with m views present scores at most m (and class vectors only average present views).

Pieces:

- :class:`Embedder`: any ``embed(x uint8 (B,3,3,H,W), present bool (B,3)) ->
  (embeddings (B,3,960) float32, probabilities (B,C))`` plus the identity of the model
  (``model_id`` = sha256 of the weights file), its classes and simulation settings;
  built from a training checkpoint or a bundle.
- :class:`ReferenceIndex`: the FAISS index (exact ``flat`` inner product by default,
  ``hnsw`` / ``ivf`` approximate, moved to the GPU when FAISS has GPU support), one
  metadata entry per reference, one class vector per space group, thresholds; saved to
  and loaded from a directory (``index.faiss``, ``entries.jsonl``, ``class_vectors.npy``,
  ``index.json`` written last, with the sha256 of the others).
- :func:`vote`, :meth:`ReferenceIndex.class_scores`, :func:`gamma`, :class:`Thresholds`,
  :func:`calibrate`: the decisions; :func:`evaluate_open_set`: the paper's experiment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xtalsym import spacegroups
from xtalsym.checksums import sha256_file

log = logging.getLogger(__name__)

FORMAT = "xtalsym-index/1"
VIEWS = 3
VIEW_DIM = 960
DIM = VIEWS * VIEW_DIM
KINDS = ("flat", "hnsw", "ivf", "pq")
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
CLASS_VECTORS_FILE = "class_vectors.npy"
META_FILE = "index.json"
DEFAULT_TEMPERATURE = 0.1
DEFAULT_PARAMS = {
    "hnsw": {"m": 32, "ef_construction": 80, "ef_search": 128},
    "ivf": {"nlist": 256, "nprobe": 16},
    # 96 sub-quantisers of 30 dimensions, 8 bits each: 96 bytes per material instead of
    # 11,520 — what keeps an index of the whole MP set small enough for the repository.
    "pq": {"m": 96, "nbits": 8},
}
PAPER_OPEN_SET = {"top1": 0.702, "top5": 0.875}
ENTRY_FIELDS = ("material_id", "formula", "space_group", "symbol", "crystal_system", "source")


class ReferenceIndexError(ValueError):
    """A missing, corrupted or mismatched index directory, or bad index input."""





class ModelMismatchError(ReferenceIndexError):
    """The index was built with another model than the one used to query it."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency of the index
        raise ReferenceIndexError("the reference index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


# --------------------------------------------------------------------------- vectors


def normalise_views(embeddings: np.ndarray) -> np.ndarray:
    """(N, 3, 960) per-view features -> (N, 2880) float32, each view L2-normalised.

    A view whose feature is all zeros (absent view) stays a zero block."""
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 3 or e.shape[1:] != (VIEWS, VIEW_DIM):
        raise ReferenceIndexError(f"embeddings must have shape (N, {VIEWS}, {VIEW_DIM}), got {e.shape}")
    norms = np.linalg.norm(e, axis=2, keepdims=True)
    out = np.where(norms > 0, e / np.maximum(norms, 1e-30), 0.0).astype(np.float32)
    return np.ascontiguousarray(out.reshape(len(e), DIM))


def sigma_total(p: np.ndarray, v: np.ndarray) -> float:
    """The paper's eq. 5 computed directly: Σ_views (1 − cos(P_v, V_v)) for (3, 960) arrays."""
    total = 0.0
    for a, b in zip(np.asarray(p, np.float64), np.asarray(v, np.float64)):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos = 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))
        total += 1.0 - cos
    return total


def class_vectors(vectors: np.ndarray, groups: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """One reference vector per space group: per view, the normalised mean of the group's
    (normalised, present) view vectors. Returns (sorted groups, (G, 2880) float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    groups = np.asarray(groups, dtype=np.int64)
    classes = sorted(set(groups.tolist()))
    out = np.zeros((len(classes), DIM), dtype=np.float32)
    for i, g in enumerate(classes):
        block = vectors[groups == g].reshape(-1, VIEWS, VIEW_DIM).astype(np.float64)
        mean = block.sum(axis=0)  # absent (zero) views add nothing
        norms = np.linalg.norm(mean, axis=1, keepdims=True)
        mean = np.where(norms > 0, mean / np.maximum(norms, 1e-30), 0.0)
        out[i] = mean.reshape(DIM)
    return classes, out


def gamma(scores: np.ndarray, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Softmax over classes of the cosine-sum scores (3 − σ_total) divided by ``temperature``.

    The paper's eq. 6 writes γ = max_i σ_total; the class it picks is the one with the
    *smallest* distance, i.e. the largest Σ cos. The temperature only shapes the
    probabilities, never the ranking."""
    s = np.asarray(scores, dtype=np.float64) / float(temperature)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def vote(sims: np.ndarray, groups: Sequence[int]) -> list[dict]:
    """Similarity-weighted space-group vote over one query's neighbours (best first).

    Each neighbour adds max(similarity, 0) to its group; ``share`` is the group's part of
    the total weight. Ties: higher best single similarity, then lower group number."""
    score: dict[int, float] = {}
    best: dict[int, float] = {}
    count: dict[int, int] = {}
    for s, g in zip(np.asarray(sims, dtype=np.float64), groups):
        g = int(g)
        if g < 0:
            continue
        score[g] = score.get(g, 0.0) + max(float(s), 0.0)
        best[g] = max(best.get(g, -np.inf), float(s))
        count[g] = count.get(g, 0) + 1
    total = sum(score.values())
    ranked = sorted(score, key=lambda g: (-score[g], -best[g], g))
    return [
        {
            "space_group": g,
            "score": round(score[g], 6),
            "share": round(score[g] / total, 6) if total > 0 else round(1.0 / len(score), 6),
            "count": count[g],
            "best_similarity": round(best[g], 6),
        }
        for g in ranked
    ]


# --------------------------------------------------------------------------- unknown decision


@dataclass
class Thresholds:
    """Unknown iff the classifier is unsure (max probability < ``tau_p``) AND the index
    does not back any answer: nearest similarity (Σ cos, 0..3) < ``tau_s`` OR the vote's
    top share < ``min_share``. ``tau_p``, ``tau_s`` are calibrated (see :func:`calibrate`);
    ``min_share`` = 0.5 (a similarity-weighted majority) is fixed."""

    tau_p: float = 0.5
    tau_s: float = 2.4
    min_share: float = 0.5
    calibrated: bool = False
    method: str = "defaults (not calibrated)"
    details: dict = field(default_factory=dict)

    def is_unknown(self, p_max, top_similarity, top_share) -> np.ndarray:
        p = np.asarray(p_max, dtype=np.float64)
        unsure = np.where(np.isnan(p), True, p < self.tau_p)
        weak_index = (np.asarray(top_similarity, np.float64) < self.tau_s) | (np.asarray(top_share, np.float64) < self.min_share)
        return unsure & weak_index

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> Thresholds:
        if not data:
            return cls()
        return cls(**{k: data[k] for k in ("tau_p", "tau_s", "min_share", "calibrated", "method", "details") if k in data})


def calibrate(
    unknown: dict[str, np.ndarray],
    not_unknown: Sequence[dict[str, np.ndarray]],
    *,
    max_false_unknown: float | None = None,
    min_share: float = 0.5,
) -> Thresholds:
    """Grid search of (tau_p, tau_s) over the observed values.

    Each set is ``{"p_max", "top_similarity", "top_share"}`` arrays. Objective: balanced
    accuracy = ½ (unknown recall + mean over the ``not_unknown`` sets of their
    specificity); with ``max_false_unknown``, the highest unknown recall whose false-
    unknown rate on every not-unknown set stays ≤ that bound (ties: higher balanced
    accuracy)."""
    if len(unknown["p_max"]) == 0 or not not_unknown or any(len(s["p_max"]) == 0 for s in not_unknown):
        raise ReferenceIndexError("calibration needs unknown and not-unknown samples")
    every = [unknown, *not_unknown]

    def candidates(values: np.ndarray, top: float) -> np.ndarray:
        values = values[np.isfinite(values)]
        if len(np.unique(values)) > 400:
            values = np.quantile(values, np.linspace(0, 1, 401))
        u = np.unique(values)
        # midpoints between neighbouring observed values: the threshold sits in the gap
        return np.unique(np.concatenate([[0.0], (u[:-1] + u[1:]) / 2, [np.nextafter(max(top, u.max(initial=0)), np.inf)]]))

    p_grid = candidates(np.concatenate([s["p_max"] for s in every]), 1.0)
    s_grid = candidates(np.concatenate([s["top_similarity"] for s in every]), 3.0)

    def unknown_rates(stats: dict) -> np.ndarray:
        # (P, S): fraction called unknown for every (tau_p, tau_s) pair, vectorised
        p = np.asarray(stats["p_max"], np.float64)
        unsure = np.isnan(p)[None, :] | (p[None, :] < p_grid[:, None])  # (P, N)
        weak = (np.asarray(stats["top_similarity"])[None, :] < s_grid[:, None]) | (
            np.asarray(stats["top_share"])[None, :] < min_share
        )  # (S, N)
        return (unsure.astype(np.float64) @ weak.T.astype(np.float64)) / len(p)

    recall = unknown_rates(unknown)
    false = np.stack([unknown_rates(s) for s in not_unknown])  # (sets, P, S)
    bal = 0.5 * (recall + 1.0 - false.mean(axis=0))
    if max_false_unknown is not None:
        ok = false.max(axis=0) <= max_false_unknown + 1e-12
        key = np.where(ok, recall + 1e-3 * bal, -np.inf)
    else:
        key = bal + 1e-3 * recall
    # ties (a plateau of equally good thresholds): take the middle of the plateau,
    # first along tau_p, then along tau_s, so the thresholds sit inside the gaps
    rows, cols = np.nonzero(key >= key.max() - 1e-12)
    i = int(np.unique(rows)[len(np.unique(rows)) // 2])
    plateau = cols[rows == i]
    j = int(plateau[len(plateau) // 2])
    best = None
    if np.isfinite(key[i, j]):
        th = Thresholds(float(p_grid[i]), float(s_grid[j]), min_share)
        best = (None, th, float(recall[i, j]), [float(f) for f in false[:, i, j]], float(bal[i, j]))
    if best is None:
        raise ReferenceIndexError(f"no thresholds keep the false-unknown rate <= {max_false_unknown}")
    _, th, recall, false, bal = best
    th.calibrated = True
    th.method = (
        f"max unknown recall with false-unknown <= {max_false_unknown}" if max_false_unknown is not None
        else "max balanced accuracy (unknown recall, mean specificity)"
    )
    th.details = {
        "unknown_recall": round(recall, 6),
        "false_unknown": [round(f, 6) for f in false],
        "balanced_accuracy": round(bal, 6),
        "samples": {"unknown": int(len(unknown["p_max"])), "not_unknown": [int(len(s["p_max"])) for s in not_unknown]},
    }
    return th


# --------------------------------------------------------------------------- the index


def _entry(meta: dict) -> dict:
    sg = int(meta["space_group"])
    return {
        "material_id": str(meta.get("material_id", "")),
        "formula": meta.get("formula"),
        "space_group": sg,
        "symbol": meta.get("symbol") or spacegroups.symbol(sg),
        "crystal_system": meta.get("crystal_system") or spacegroups.crystal_system(sg),
        "source": meta.get("source"),
    }


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def make_faiss_index(vectors: np.ndarray, kind: str = "flat", params: dict | None = None):
    """A CPU FAISS inner-product index of ``vectors`` (N, DIM) float32.

    ``hnsw``: IndexHNSWFlat, params m (links per node), ef_construction, ef_search.
    ``ivf``: IndexIVFFlat over nlist k-means cells (reduced to N // 39 for small sets, so
    every cell has ~39 training points), nprobe cells searched.
    ``pq``: IndexPQ, product quantisation (m sub-vectors of nbits each): compressed
    storage, approximate inner products; nbits is lowered for small sets so each
    sub-quantiser has >= 4 training points per centroid."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    p = {**DEFAULT_PARAMS.get(kind, {}), **(params or {})}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(p["m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["ef_construction"])
        index.hnsw.efSearch = int(p["ef_search"])
    elif kind == "ivf":
        nlist = max(1, min(int(p["nlist"]), len(vectors) // 39))
        p["nlist"] = nlist
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(int(p["nprobe"]), nlist)
        p["nprobe"] = int(index.nprobe)
    elif kind == "pq":
        m = int(p["m"])
        if m < 1 or d % m:
            raise ReferenceIndexError(f"pq parameter m must divide the dimension {d}, got {m}")
        nbits = max(1, min(int(p["nbits"]), int(np.log2(max(len(vectors), 8) / 4))))
        p["nbits"] = nbits
        index = faiss.IndexPQ(d, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise ReferenceIndexError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if len(vectors):
        index.add(vectors)
    return index, p


def _apply_search_params(index, kind: str, params: dict) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivf":
        index.nprobe = int(params["nprobe"])


def _to_gpu(index, kind: str):
    """Move a flat/IVF index to all GPUs (HNSW and PQ stay on the CPU)."""
    faiss = _faiss()
    if kind in ("hnsw", "pq") or not gpu_available():  # pragma: no cover - needs faiss-gpu
        return index, False
    return faiss.index_cpu_to_all_gpus(index), True  # pragma: no cover - needs faiss-gpu


@dataclass
class QueryResult:
    neighbours: list[dict]
    vote: list[dict]
    class_scores: list[dict]  # top per-class scores with gamma
    classifier: list[dict]  # classifier top-5 (empty without probabilities)
    unknown: bool
    decision: dict

    def to_json(self) -> dict:
        return asdict(self)


class ReferenceIndex:
    """Reference embeddings, their metadata and class vectors behind a FAISS index."""

    def __init__(self, faiss_index, entries: list[dict], classes: list[int], class_vecs: np.ndarray, meta: dict):
        self.faiss_index = faiss_index
        self.entries = entries
        self.classes = [int(c) for c in classes]
        self.class_vectors = np.ascontiguousarray(class_vecs, dtype=np.float32)
        self.meta = meta
        self.thresholds = Thresholds.from_json(meta.get("thresholds"))
        self.on_gpu = False
        self._groups = np.array([e["space_group"] for e in entries], dtype=np.int64)

    # ---- construction

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        entries: Sequence[dict],
        *,
        kind: str = "flat",
        params: dict | None = None,
        model_id: str | None = None,
        model_source: str | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        thresholds: Thresholds | None = None,
        gpu: str = "auto",
        extra: dict | None = None,
    ) -> ReferenceIndex:
        """Index (N, 2880) normalised vectors (see :func:`normalise_views`) with one
        metadata dict per row (needs ``space_group``; other :data:`ENTRY_FIELDS` optional)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != DIM:
            raise ReferenceIndexError(f"vectors must have shape (N, {DIM}), got {vectors.shape}")
        if len(entries) != len(vectors):
            raise ReferenceIndexError(f"{len(vectors)} vectors but {len(entries)} entries")
        if len(vectors) == 0:
            raise ReferenceIndexError("no references to index")
        start = time.perf_counter()
        rows = [_entry(e) for e in entries]
        index, p = make_faiss_index(vectors, kind, params)
        classes, cvecs = class_vectors(vectors, [e["space_group"] for e in rows])
        meta = {
            "format": FORMAT,
            "kind": kind,
            "params": p,
            "dim": DIM,
            "views": VIEWS,
            "count": len(rows),
            "model_id": model_id,
            "model_source": model_source,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": None,
            "classes": classes,
            "class_counts": {str(c): int(sum(e["space_group"] == c for e in rows)) for c in classes},
            "temperature": float(temperature),
            "thresholds": (thresholds or Thresholds()).to_json(),
            **(extra or {}),
        }
        meta["build_seconds"] = round(time.perf_counter() - start, 3)
        self = cls(index, rows, classes, cvecs, meta)
        if gpu != "off":
            self._maybe_gpu(gpu)
        return self

    def _maybe_gpu(self, gpu: str) -> None:
        if gpu == "on" and not gpu_available():
            raise ReferenceIndexError("--gpu on, but this FAISS has no GPU support or sees no GPU (pip install faiss-gpu)")
        if gpu in ("auto", "on"):
            self.faiss_index, self.on_gpu = _to_gpu(self.faiss_index, self.meta["kind"])

    # ---- persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index directory; each file atomically, ``index.json`` (with the sha256
        of the other files) last, so a reader never sees a half-written index as valid."""
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        index = self.faiss_index
        if self.on_gpu:  # pragma: no cover - needs faiss-gpu
            index = faiss.index_gpu_to_cpu(index)
        _atomic_write(d / INDEX_FILE, faiss.serialize_index(index).tobytes())
        lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries)
        _atomic_write(d / ENTRIES_FILE, lines.encode())
        import io

        buf = io.BytesIO()
        np.save(buf, self.class_vectors, allow_pickle=False)
        _atomic_write(d / CLASS_VECTORS_FILE, buf.getvalue())
        self.meta["thresholds"] = self.thresholds.to_json()
        self.meta["files"] = {name: sha256_file(d / name) for name in (INDEX_FILE, ENTRIES_FILE, CLASS_VECTORS_FILE)}
        _atomic_write(d / META_FILE, json.dumps(self.meta, indent=1).encode())
        return d

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, expected_model_id: str | None = None, gpu: str = "auto", verify: bool = True
    ) -> ReferenceIndex:
        """Read an index directory; refuses a missing/corrupted one and, with
        ``expected_model_id``, one built by another model (:class:`ModelMismatchError`)."""
        faiss = _faiss()
        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise ReferenceIndexError(f"not a reference index (no {META_FILE}): {d}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ReferenceIndexError(f"{d}: unsupported index format {meta.get('format')!r} (expected {FORMAT})")
        check_model_id(meta, expected_model_id, d)
        for name, digest in (meta.get("files") or {}).items():
            path = d / name
            if not path.is_file():
                raise ReferenceIndexError(f"{d}: index file {name} is missing")
            if verify and sha256_file(path) != digest:
                raise ReferenceIndexError(f"{d}: {name} does not match the sha256 in {META_FILE} (corrupted or modified)")
        index = faiss.deserialize_index(np.frombuffer((d / INDEX_FILE).read_bytes(), dtype=np.uint8))
        _apply_search_params(index, meta["kind"], meta.get("params") or {})
        entries = [json.loads(line) for line in (d / ENTRIES_FILE).read_text().splitlines() if line.strip()]
        cvecs = np.load(d / CLASS_VECTORS_FILE, allow_pickle=False)
        if index.ntotal != len(entries) or index.ntotal != meta.get("count") or cvecs.shape != (len(meta["classes"]), DIM):
            raise ReferenceIndexError(f"{d}: inconsistent index ({index.ntotal} vectors, {len(entries)} entries, count {meta.get('count')})")
        self = cls(index, entries, meta["classes"], cvecs, meta)
        if gpu != "off":
            self._maybe_gpu(gpu)
        return self

    # ---- properties

    @property
    def model_id(self) -> str | None:
        return self.meta.get("model_id")

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", DEFAULT_TEMPERATURE))

    def __len__(self) -> int:
        return len(self.entries)

    # ---- queries

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k) = Σ cos, row indices (Q, k); -1 where fewer than k exist)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != DIM:
            raise ReferenceIndexError(f"queries must have shape (Q, {DIM}), got {q.shape}")
        k = max(1, min(int(k), len(self)))
        return self.faiss_index.search(q, k)

    def groups_of(self, idx: np.ndarray) -> np.ndarray:
        return np.where(idx >= 0, self._groups[np.maximum(idx, 0)], -1)

    def class_scores(self, queries: np.ndarray) -> np.ndarray:
        """(Q, G) Σ_views cos(P_v, V_class,v) = 3 − σ_total against every class vector."""
        return np.asarray(queries, dtype=np.float32) @ self.class_vectors.T

    def query(
        self,
        queries: np.ndarray,
        *,
        probabilities: np.ndarray | None = None,
        classes: Sequence[int] | None = None,
        k: int = 5,
        top: int = 5,
    ) -> list[QueryResult]:
        """Neighbours, vote, per-class scores and the unknown decision for each query.

        ``probabilities`` (Q, C) of the classifier over ``classes`` (space groups)."""
        sims, idx = self.search(queries, k)
        scores = self.class_scores(queries)
        g = gamma(scores, self.temperature)
        results = []
        for i in range(len(sims)):
            neighbours = [
                {**self.entries[j], "rank": r + 1, "similarity": round(float(s), 6), "sigma_total": round(3.0 - float(s), 6)}
                for r, (s, j) in enumerate(zip(sims[i], idx[i]))
                if j >= 0
            ]
            v = vote(sims[i], self.groups_of(idx[i]))
            order = np.argsort(-scores[i], kind="stable")[:top]
            per_class = [
                {"space_group": self.classes[c], "symbol": spacegroups.symbol(self.classes[c]),
                 "score": round(float(scores[i, c]), 6), "gamma": round(float(g[i, c]), 6)}
                for c in order
            ]
            clf: list[dict] = []
            p_max = float("nan")
            if probabilities is not None and classes is not None:
                p = np.asarray(probabilities[i], dtype=np.float64)
                p_max = float(p.max())
                clf = [
                    {"space_group": int(classes[c]), "symbol": spacegroups.symbol(int(classes[c])), "probability": round(float(p[c]), 6)}
                    for c in np.argsort(-p, kind="stable")[:top]
                ]
            top_sim = float(sims[i, 0]) if len(neighbours) else 0.0
            top_share = v[0]["share"] if v else 0.0
            unknown = bool(self.thresholds.is_unknown([p_max], [top_sim], [top_share])[0])
            if unknown:
                answer, by = None, "unknown"
            elif not np.isnan(p_max) and p_max >= self.thresholds.tau_p:
                answer, by = clf[0]["space_group"], "classifier"
            else:
                answer, by = v[0]["space_group"], "reference vote"
            decision = {
                "space_group": answer, "by": by, "p_max": None if np.isnan(p_max) else round(p_max, 6),
                "top_similarity": round(top_sim, 6), "vote_share": round(float(top_share), 6),
                "thresholds": {"tau_p": self.thresholds.tau_p, "tau_s": self.thresholds.tau_s,
                               "min_share": self.thresholds.min_share, "calibrated": self.thresholds.calibrated},
            }
            results.append(QueryResult(neighbours, v, per_class, clf, unknown, decision))
        return results


def check_model_id(meta: dict, expected: str | None, where: Any = "index") -> None:
    have = meta.get("model_id")
    if expected is not None and have is not None and have != expected:
        raise ModelMismatchError(
            f"{where}: the index was built with model {have[:12]} ({meta.get('model_source')}) but the model "
            f"in use is {expected[:12]}; embeddings of different models are not comparable: rebuild the index "
            f"with this model (xtalsym index build) or use the model it was built with"
        )


# --------------------------------------------------------------------------- embedders


EmbedFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Embedder:
    """``embed(x, present) -> (embeddings (B,3,960) float32, probabilities (B,C))`` and
    what identifies the model: ``model_id`` (sha256 of the weights file), its
    ``classes`` (space groups of the probability columns), the dataset ``config`` its
    inputs must be simulated/shaped with, and ``source`` (a path, for messages)."""

    embed: EmbedFn
    classes: list[int]
    model_id: str | None
    source: str
    config: Any = None  # xtalsym.offline.dataset.BuildConfig
    batch_size: int = 32

    def __call__(self, x: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x)
        if present is None:
            present = np.ones((x.shape[0], VIEWS), dtype=bool)
        return self.embed(x, present)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str = "cpu", batch_size: int = 32) -> Embedder:
        from xtalsym.offline import evaluate as ev

        model, classes, extra = ev.load_model(path, device=device)
        return cls.from_model(model, classes, model_id=sha256_file(path), source=str(path),
                              config=ev.build_config_from(extra), device=device, batch_size=batch_size)

    @classmethod
    def from_model(cls, model, classes, *, model_id, source, config=None, device="cpu", batch_size=32) -> Embedder:
        import torch

        if getattr(model, "views", 1) != VIEWS or getattr(model, "representation", "shaped") != "shaped":
            raise ReferenceIndexError(
                f"the reference index needs a three-stream shaped-DP model (msdn); {source} is {getattr(model, 'name', '?')}"
            )

        def embed(x: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                out = model(torch.as_tensor(x).to(device), torch.as_tensor(np.asarray(present, bool)).to(device))
                probs = torch.softmax(out.logits.float(), dim=1)
            return out.embeddings.float().cpu().numpy(), probs.cpu().numpy()

        return cls(embed, [int(c) for c in classes], model_id, source, config, batch_size)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, backend: str = "auto", batch_size: int = 32) -> Embedder:
        """From a model bundle: embeds with the bundle's fastest backend (``auto``, see
        ``xtalsym.inference.select_backend``) and takes its classes, settings and model_id."""
        from xtalsym import bundle as bundle_module
        from xtalsym.inference import select_backend
        from xtalsym.offline import evaluate as ev

        b = bundle_module.load_bundle(path)  # verifies the manifest (and the index against the model)
        runner = select_backend(b, backend)

        def embed(x: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            result = runner.run(np.ascontiguousarray(x, dtype=np.uint8), np.asarray(present, dtype=bool))
            return result.embeddings, result.probabilities

        settings = getattr(b, "settings", None) or {}
        config = ev.build_config_from({"dataset_config": settings.get("dataset_config")})
        return cls(embed, [int(c) for c in b.classes], b.model_id, str(path), config, batch_size)


def bundle_index_dir(path: str | os.PathLike) -> Path:
    """The reference index inside a bundle (``index/``)."""
    return Path(path) / "index"


# --------------------------------------------------------------------------- embedding data


@dataclass
class Embedded:
    vectors: np.ndarray  # (N, 2880) normalised
    probabilities: np.ndarray  # (N, C)
    entries: list[dict]
    failed: list[dict] = field(default_factory=list)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="material", desc=desc, disable=not enabled)


def select_samples(
    root: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    space_groups: Iterable[int] | None = None,
    real_only: bool = False,
) -> list[dict]:
    """Sample metadata of a dataset, filtered by split(s), space groups and source."""
    from xtalsym.offline import dataset as ds

    samples = list(ds.iter_sample_metadata(root))
    if splits:
        assigned = ds.load_splits(root)
        samples = [s for s in samples if assigned.get(s["material_id"]) in set(splits)]
    if space_groups is not None:
        wanted = set(int(g) for g in space_groups)
        samples = [s for s in samples if int(s["space_group"]) in wanted]
    if real_only:
        samples = [s for s in samples if not str(s.get("source", "")).startswith("pyxtal")]
    return samples


def embed_dataset(embedder: Embedder, root: str | os.PathLike, samples: Sequence[dict], *, progress: bool = False) -> Embedded:
    """Embed stored shaped DPs of ``samples`` (from :func:`select_samples`), in batches."""
    from xtalsym.offline import dataset as ds

    reader = ds.ShardReader(root)
    vecs, probs = [], []
    bar = _progress(len(samples), "embed", progress)
    try:
        for i in range(0, len(samples), embedder.batch_size):
            chunk = samples[i : i + embedder.batch_size]
            x = np.stack([reader.read(s["shard"], s["position"], "shaped").transpose(0, 3, 1, 2) for s in chunk])
            e, p = embedder(np.ascontiguousarray(x))
            vecs.append(normalise_views(e))
            probs.append(np.asarray(p, dtype=np.float32))
            bar.update(len(chunk))
    finally:
        bar.close()
        reader.close()
    return Embedded(
        np.concatenate(vecs) if vecs else np.zeros((0, DIM), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, len(embedder.classes)), np.float32),
        [_entry(s) for s in samples],
    )


def embed_structures(embedder: Embedder, sources: Sequence[str | os.PathLike], *, progress: bool = False) -> Embedded:
    """Read, label, simulate and shape structures with the model's settings, then embed them."""
    from xtalsym.offline import dataset as ds
    from xtalsym.offline import evaluate as ev
    from xtalsym.offline import structures

    config = embedder.config or ds.BuildConfig()
    records: list = []
    for source in sources:
        if not Path(source).exists():
            raise FileNotFoundError(f"structure source not found: {source}")
        records.extend(structures.iter_records(source))
    vecs, probs, entries, failed = [], [], [], []
    bar = _progress(len(records), "simulate+embed", progress)
    for i in range(0, len(records), embedder.batch_size):
        chunk = records[i : i + embedder.batch_size]
        inputs, labelled, bad, _ = ev._simulate_records(chunk, config, "shaped")
        failed += bad
        if inputs:
            e, p = embedder(np.stack(inputs))
            vecs.append(normalise_views(e))
            probs.append(np.asarray(p, dtype=np.float32))
            entries += [_entry(vars(item)) for item in labelled]
        bar.update(len(chunk))
    bar.close()
    return Embedded(
        np.concatenate(vecs) if vecs else np.zeros((0, DIM), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, len(embedder.classes)), np.float32),
        entries,
        failed,
    )


def embed_structure(embedder: Embedder, structure) -> tuple[np.ndarray, np.ndarray, Any]:
    """One structure (path or LabelledStructure) -> ((1, 2880) vector, (1, C) probabilities, labelled)."""
    from xtalsym.offline import dataset as ds
    from xtalsym.offline import evaluate as ev
    from xtalsym.offline import structures

    config = embedder.config or ds.BuildConfig()
    labelled = structure if isinstance(structure, structures.LabelledStructure) else structures.load_structure(structure, symprec=config.symprec)
    raws, shaped = ds.make_sample(labelled, config)
    e, p = embedder(ev.model_input(raws, shaped, "shaped")[None])
    return normalise_views(e), np.asarray(p, np.float32), labelled


# --------------------------------------------------------------------------- open-set evaluation


def reference_half(material_id: str, *, seed: int = 0, fraction: float = 0.5) -> bool:
    """True if a material is a reference (else a test) material of the open-set split:
    the first 8 bytes of sha256("openset:<seed>:<material_id>") as a fraction of 2^64 < ``fraction``."""
    digest = hashlib.sha256(f"openset:{seed}:{material_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def ranking_from_neighbours(sims: np.ndarray, groups: np.ndarray, k_vote: int, depth: int) -> list[int]:
    """Space groups ranked by the similarity-weighted vote of the ``k_vote`` nearest
    references, then the remaining groups in order of their nearest reference."""
    ranked = [v["space_group"] for v in vote(sims[:k_vote], groups[:k_vote])]
    for g in groups[k_vote:]:
        if len(ranked) >= depth:
            break
        if g >= 0 and int(g) not in ranked:
            ranked.append(int(g))
    return ranked[:depth]


def topk_from_rankings(rankings: Sequence[Sequence[int]], truth: Sequence[int], k: int = 5) -> dict[str, float | None]:
    out = {}
    for j in range(1, k + 1):
        hits = [int(t) in list(r[:j]) for r, t in zip(rankings, truth)]
        out[f"top{j}"] = round(float(np.mean(hits)), 6) if hits else None
    return out


def _stats(index: ReferenceIndex, vectors: np.ndarray, probs: np.ndarray, k: int, *, exclude: np.ndarray | None = None) -> dict:
    """p_max, nearest similarity and vote share of each query; with ``exclude`` (a space
    group per query) the references of that group are left out (leave-group-out)."""
    extra = 0 if exclude is None else max(int(n) for n in index.meta["class_counts"].values())
    sims, idx = index.search(vectors, k + extra)
    groups = index.groups_of(idx)
    top_sim, share = np.zeros(len(vectors)), np.zeros(len(vectors))
    for i in range(len(vectors)):
        keep = groups[i] >= 0
        if exclude is not None:
            keep &= groups[i] != exclude[i]
        s, g = sims[i][keep][:k], groups[i][keep][:k]
        top_sim[i] = float(s[0]) if len(s) else 0.0
        v = vote(s, g)
        share[i] = v[0]["share"] if v else 0.0
    return {"p_max": np.asarray(probs, np.float64).max(axis=1) if probs.size else np.full(len(vectors), np.nan),
            "top_similarity": top_sim, "top_share": share}


def _rates(th: Thresholds, stats: dict) -> float | None:
    if len(stats["p_max"]) == 0:
        return None
    return round(float(th.is_unknown(stats["p_max"], stats["top_similarity"], stats["top_share"]).mean()), 6)


def evaluate_open_set(
    embedder: Embedder,
    root: str | os.PathLike,
    *,
    groups: Sequence[int] = spacegroups.PAPER_OPEN_SET_30,
    seed: int = 0,
    reference_fraction: float = 0.5,
    k: int = 5,
    kind: str = "flat",
    params: dict | None = None,
    real_only: bool = False,
    calibration_split: str = "val",
    calibration_limit: int = 2000,
    max_false_unknown: float | None = None,
    progress: bool = False,
    gpu: str = "auto",
) -> tuple[dict, ReferenceIndex]:
    """The paper's Fig. 3f: open-set groups split by material into reference/test halves,
    test materials ranked by (a) the neighbour vote and (b) the per-class score.

    Unknown detection (when the dataset has ``calibration_split`` samples of the model's
    classes): three query sets — known-class materials (the classifier knows them),
    open-set test materials against the full index (the index knows them), and the same
    with their own group left out of the index (nobody knows them: should be "unknown");
    thresholds from :func:`calibrate`. Returns (metrics, the reference index)."""
    known_classes = set(embedder.classes)
    overlap = sorted(set(groups) & known_classes)
    groups = [int(g) for g in groups if int(g) not in known_classes]
    samples = select_samples(root, space_groups=groups, real_only=real_only)
    ref = [s for s in samples if reference_half(s["material_id"], seed=seed, fraction=reference_fraction)]
    test = [s for s in samples if not reference_half(s["material_id"], seed=seed, fraction=reference_fraction)]
    if not ref or not test:
        raise ReferenceIndexError(
            f"{root}: {len(samples)} materials of the open-set groups ({len(ref)} reference, {len(test)} test): "
            "need at least one of each"
        )
    start = time.perf_counter()
    e_ref = embed_dataset(embedder, root, ref, progress=progress)
    e_test = embed_dataset(embedder, root, test, progress=progress)
    index = ReferenceIndex.build(
        e_ref.vectors, e_ref.entries, kind=kind, params=params, model_id=embedder.model_id, model_source=embedder.source,
        gpu=gpu, extra={"built_from": {"dataset": str(root), "open_set_groups": groups, "half": "reference", "seed": seed}},
    )
    truth = np.array([e["space_group"] for e in e_test.entries])
    depth = 5
    sims, idx = index.search(e_test.vectors, min(len(index), max(50, k)))
    ngroups = index.groups_of(idx)
    vote_rank = [ranking_from_neighbours(sims[i], ngroups[i], k, depth) for i in range(len(truth))]
    scores = index.class_scores(e_test.vectors)
    class_rank = [[index.classes[c] for c in np.argsort(-scores[i], kind="stable")[:depth]] for i in range(len(truth))]
    metrics: dict = {
        "model_id": embedder.model_id,
        "model_source": embedder.source,
        "dataset": str(root),
        "open_set_groups": groups,
        "excluded_groups_known_to_model": overlap,
        "split_rule": f"reference iff sha256('openset:{seed}:'+material_id)[:8]/2^64 < {reference_fraction}",
        "real_only": real_only,
        "references": len(ref),
        "tests": len(test),
        "groups_with_references": len(index.classes),
        "test_groups_without_reference": sorted(set(truth.tolist()) - set(index.classes)),
        "k": k,
        "kind": kind,
        "vote": topk_from_rankings(vote_rank, truth),
        "class_score": topk_from_rankings(class_rank, truth),
        "paper": PAPER_OPEN_SET,
        "per_space_group": {},
    }
    for g in sorted(set(truth.tolist())):
        rows = truth == g
        metrics["per_space_group"][str(g)] = {
            "symbol": spacegroups.symbol(g),
            "references": int(index.meta["class_counts"].get(str(g), 0)),
            "tests": int(rows.sum()),
            "vote_top1": round(float(np.mean([vote_rank[i][:1] == [g] for i in np.where(rows)[0]])), 6),
            "class_score_top1": round(float(np.mean([class_rank[i][:1] == [g] for i in np.where(rows)[0]])), 6),
        }
    # unknown detection
    from xtalsym.offline import dataset as ds

    try:
        known = select_samples(root, splits=[calibration_split], space_groups=known_classes)[:calibration_limit]
    except ds.DatasetError:  # no splits.json: nothing to calibrate on
        known = []
    if known:
        e_known = embed_dataset(embedder, root, known, progress=progress)
        s_known = _stats(index, e_known.vectors, e_known.probabilities, k)
        s_indexed = _stats(index, e_test.vectors, e_test.probabilities, k)
        s_unknown = _stats(index, e_test.vectors, e_test.probabilities, k, exclude=truth)
        th = calibrate(s_unknown, [s_known, s_indexed], max_false_unknown=max_false_unknown)
        index.thresholds = th
        metrics["unknown_detection"] = {
            "thresholds": th.to_json(),
            "known_class_queries": len(known),
            "false_unknown_known_classes": _rates(th, s_known),
            "false_unknown_indexed_open_set": _rates(th, s_indexed),
            "unknown_recall_group_left_out": _rates(th, s_unknown),
            "note": "calibrated and reported on the same data (no held-out check)",
        }
    else:
        metrics["unknown_detection"] = None
        metrics["unknown_detection_note"] = f"no {calibration_split!r} samples of the model's classes in the dataset: not calibrated"
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics, index


def format_open_set(metrics: dict) -> str:
    def pct(v):
        return "    -" if v is None else f"{100 * v:5.1f}"

    lines = [
        f"open-set: {metrics['references']} reference / {metrics['tests']} test materials, "
        f"{len(metrics['open_set_groups'])} groups ({metrics['groups_with_references']} with references)",
        f"{'method':<28} " + " ".join(f"{f'top-{j}':>6}" for j in range(1, 6)),
        f"{'nearest-neighbour vote':<28} " + " ".join(f"{pct(metrics['vote'][f'top{j}']):>6}" for j in range(1, 6)),
        f"{'per-class score (eq. 5-6)':<28} " + " ".join(f"{pct(metrics['class_score'][f'top{j}']):>6}" for j in range(1, 6)),
        f"{'paper (Fig. 3f)':<28} {pct(PAPER_OPEN_SET['top1']):>6} {'':>6} {'':>6} {'':>6} {pct(PAPER_OPEN_SET['top5']):>6}",
    ]
    u = metrics.get("unknown_detection")
    if u:
        t = u["thresholds"]
        lines.append(
            f"unknown: tau_p={t['tau_p']:.4f} tau_s={t['tau_s']:.4f}; false-unknown known classes "
            f"{pct(u['false_unknown_known_classes'])}%, indexed open-set {pct(u['false_unknown_indexed_open_set'])}%; "
            f"unknown recall (own group left out) {pct(u['unknown_recall_group_left_out'])}%"
        )
    else:
        lines.append(metrics.get("unknown_detection_note", "unknown detection: not calibrated"))
    return "\n".join(lines)


__all__ = [
    "DIM", "ReferenceIndexError", "Embedder", "Embedded", "ModelMismatchError", "QueryResult", "ReferenceIndex", "Thresholds",
    "calibrate", "class_vectors", "embed_dataset", "embed_structure", "embed_structures", "evaluate_open_set",
    "format_open_set", "gamma", "normalise_views", "reference_half", "select_samples", "sigma_total", "vote",
]
