"""Scores and decisions over shaped-DP embeddings, numpy only (no FAISS, no torch).

A material's embedding is the 960-wide feature of each of its three zone-axis streams,
each L2-normalised, concatenated to 2,880 floats (:func:`normalise_views`); the inner
product of two is Σ_views cos = 3 − σ_total of the paper's eq. 5. Here: the per-class
vectors and score, γ (eq. 6), the neighbour vote, the unknown thresholds and their
calibration. The FAISS store is :mod:`xtalsym.index.store`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from xtalsym import spacegroups

VIEWS = 3
VIEW_DIM = 960
DIM = VIEWS * VIEW_DIM
DEFAULT_TEMPERATURE = 0.1
ENTRY_FIELDS = ("material_id", "formula", "space_group", "symbol", "crystal_system", "source")


class ReferenceIndexError(ValueError):
    """A missing, corrupted or mismatched index directory, or bad index input."""


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
        weak_index = (np.asarray(top_similarity, np.float64) < self.tau_s) | (
            np.asarray(top_share, np.float64) < self.min_share
        )
        return unsure & weak_index

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> Thresholds:
        if not data:
            return cls()
        return cls(
            **{k: data[k] for k in ("tau_p", "tau_s", "min_share", "calibrated", "method", "details") if k in data}
        )


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
        return np.unique(
            np.concatenate([[0.0], (u[:-1] + u[1:]) / 2, [np.nextafter(max(top, u.max(initial=0)), np.inf)]])
        )

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
        f"max unknown recall with false-unknown <= {max_false_unknown}"
        if max_false_unknown is not None
        else "max balanced accuracy (unknown recall, mean specificity)"
    )
    th.details = {
        "unknown_recall": round(recall, 6),
        "false_unknown": [round(f, 6) for f in false],
        "balanced_accuracy": round(bal, 6),
        "samples": {"unknown": int(len(unknown["p_max"])), "not_unknown": [int(len(s["p_max"])) for s in not_unknown]},
    }
    return th


def reference_entry(meta: dict) -> dict:
    sg = int(meta["space_group"])
    return {
        "material_id": str(meta.get("material_id", "")),
        "formula": meta.get("formula"),
        "space_group": sg,
        "symbol": meta.get("symbol") or spacegroups.symbol(sg),
        "crystal_system": meta.get("crystal_system") or spacegroups.crystal_system(sg),
        "source": meta.get("source"),
    }
