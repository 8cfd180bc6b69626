"""The paper's open-set experiment (Fig. 3f) and its report.

The materials of the open-set space groups are split 50/50 by material into reference and
test halves; the references are indexed, each test material is ranked by the neighbour
vote and by the per-class score, and the unknown thresholds are calibrated.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

import numpy as np

from xtalsym import dataset_format, spacegroups
from xtalsym.index.embed import Embedder, embed_dataset, select_samples
from xtalsym.index.scoring import ReferenceIndexError, Thresholds, calibrate, vote
from xtalsym.index.store import ReferenceIndex

PAPER_OPEN_SET = {"top1": 0.702, "top5": 0.875}

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


def _stats(
    index: ReferenceIndex, vectors: np.ndarray, probs: np.ndarray, k: int, *, exclude: np.ndarray | None = None
) -> dict:
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
    return {
        "p_max": np.asarray(probs, np.float64).max(axis=1) if probs.size else np.full(len(vectors), np.nan),
        "top_similarity": top_sim,
        "top_share": share,
    }


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
        e_ref.vectors,
        e_ref.entries,
        kind=kind,
        params=params,
        model_id=embedder.model_id,
        model_source=embedder.source,
        gpu=gpu,
        extra={"built_from": {"dataset": str(root), "open_set_groups": groups, "half": "reference", "seed": seed}},
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
    try:
        known = select_samples(root, splits=[calibration_split], space_groups=known_classes)[:calibration_limit]
    except dataset_format.DatasetError:  # no splits.json: nothing to calibrate on
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
        metrics["unknown_detection_note"] = (
            f"no {calibration_split!r} samples of the model's classes in the dataset: not calibrated"
        )
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
        f"{'per-class score (eq. 5-6)':<28} "
        + " ".join(f"{pct(metrics['class_score'][f'top{j}']):>6}" for j in range(1, 6)),
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
