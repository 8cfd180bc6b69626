"""The FAISS reference index: build, save, load and query (all the daemon needs).

:class:`ReferenceIndex` holds the FAISS index (exact ``flat`` inner product by default,
``hnsw`` / ``ivf`` approximate, ``pq`` compressed; moved to the GPU when FAISS has GPU
support), one metadata entry per reference, one class vector per space group and the
unknown thresholds; it is saved to and loaded from a directory (``index.faiss``,
``entries.jsonl``, ``class_vectors.npy``, ``index.json`` written last, with the sha256 of
the others). Scores and decisions are :mod:`xtalsym.index.scoring`; see docs/INDEX.md.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xtalsym import spacegroups
from xtalsym.checksums import sha256_file
from xtalsym.index.scoring import (
    DEFAULT_TEMPERATURE,
    DIM,
    VIEWS,
    ReferenceIndexError,
    Thresholds,
    class_vectors,
    gamma,
    reference_entry,
    vote,
)

log = logging.getLogger(__name__)

FORMAT = "xtalsym-index/1"
KINDS = ("flat", "hnsw", "ivf", "pq")
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
CLASS_VECTORS_FILE = "class_vectors.npy"
META_FILE = "index.json"
DEFAULT_PARAMS = {
    "hnsw": {"m": 32, "ef_construction": 80, "ef_search": 128},
    "ivf": {"nlist": 256, "nprobe": 16},
    # 96 sub-quantisers of 30 dimensions, 8 bits each: 96 bytes per material instead of
    # 11,520 — what keeps an index of the whole MP set small enough for the repository.
    "pq": {"m": 96, "nbits": 8},
}


class ModelMismatchError(ReferenceIndexError):
    """The index was built with another model than the one used to query it."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency of the index
        raise ReferenceIndexError(
            "the reference index needs FAISS: pip install 'xtalsym[daemon]' (or faiss-cpu / faiss-gpu)"
        ) from exc
    return faiss


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
        rows = [reference_entry(e) for e in entries]
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
            raise ReferenceIndexError(
                "--gpu on, but this FAISS has no GPU support or sees no GPU (pip install faiss-gpu)"
            )
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
        cls,
        directory: str | os.PathLike,
        *,
        expected_model_id: str | None = None,
        gpu: str = "auto",
        verify: bool = True,
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
                raise ReferenceIndexError(
                    f"{d}: {name} does not match the sha256 in {META_FILE} (corrupted or modified)"
                )
        index = faiss.deserialize_index(np.frombuffer((d / INDEX_FILE).read_bytes(), dtype=np.uint8))
        _apply_search_params(index, meta["kind"], meta.get("params") or {})
        entries = [json.loads(line) for line in (d / ENTRIES_FILE).read_text().splitlines() if line.strip()]
        cvecs = np.load(d / CLASS_VECTORS_FILE, allow_pickle=False)
        if (
            index.ntotal != len(entries)
            or index.ntotal != meta.get("count")
            or cvecs.shape != (len(meta["classes"]), DIM)
        ):
            raise ReferenceIndexError(
                f"{d}: inconsistent index ({index.ntotal} vectors, {len(entries)} entries, count {meta.get('count')})"
            )
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
                {
                    **self.entries[j],
                    "rank": r + 1,
                    "similarity": round(float(s), 6),
                    "sigma_total": round(3.0 - float(s), 6),
                }
                for r, (s, j) in enumerate(zip(sims[i], idx[i]))
                if j >= 0
            ]
            v = vote(sims[i], self.groups_of(idx[i]))
            order = np.argsort(-scores[i], kind="stable")[:top]
            per_class = [
                {
                    "space_group": self.classes[c],
                    "symbol": spacegroups.symbol(self.classes[c]),
                    "score": round(float(scores[i, c]), 6),
                    "gamma": round(float(g[i, c]), 6),
                }
                for c in order
            ]
            clf: list[dict] = []
            p_max = float("nan")
            if probabilities is not None and classes is not None:
                p = np.asarray(probabilities[i], dtype=np.float64)
                p_max = float(p.max())
                clf = [
                    {
                        "space_group": int(classes[c]),
                        "symbol": spacegroups.symbol(int(classes[c])),
                        "probability": round(float(p[c]), 6),
                    }
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
                "space_group": answer,
                "by": by,
                "p_max": None if np.isnan(p_max) else round(p_max, 6),
                "top_similarity": round(top_sim, 6),
                "vote_share": round(float(top_share), 6),
                "thresholds": {
                    "tau_p": self.thresholds.tau_p,
                    "tau_s": self.thresholds.tau_s,
                    "min_share": self.thresholds.min_share,
                    "calibrated": self.thresholds.calibrated,
                },
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


def bundle_index_dir(path: str | os.PathLike) -> Path:
    """The reference index inside a bundle (``index/``)."""
    return Path(path) / "index"
