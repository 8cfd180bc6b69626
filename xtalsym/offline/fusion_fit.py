"""Fit the fusion (xtalsym.fusion) on cached validation features and measure it.

Fitting: for each number of views present (1, 2, 3) the weights of the fusion's features
are the maximum-likelihood conditional-logit weights (convex given the MSDN temperature;
the temperature on a coarse grid), with a small L2 penalty. The samples are every
subset of that many views of every validation material, so partial predictions get their
own calibration.

Measuring: :func:`posterior_metrics` scores any (n, 230) posterior against labels with the
figures the issue asks for (group top-1/top-5, set top-1, crystal system, Bravais lattice,
NLL, expected calibration error) and the symmetry ceiling of the same labels.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from xtalsym import fusion, spacegroups

log = logging.getLogger(__name__)

L2 = 1e-3
# The MSDN temperature is searched on a coarse grid: the weight of the MSDN's log-probability
# already rescales it, so T only shapes the system/Bravais masses and the entropy.
TEMPERATURES = (0.7, 1.0, 1.5, 2.2)
EVIDENCE_CLIPS = (32.0, 128.0, 512.0)
ECE_BINS = 15
SUBSETS = {k: [np.array([i in c for i in range(3)]) for c in itertools.combinations(range(3), k)] for k in (1, 2, 3)}
INITIAL = {"msdn": 1.0, "msdn_system": 0.0, "msdn_bravais": 0.0, "outside": -3.0, "outside_entropy": 0.5,
           "evidence": 0.2, "evidence_top": 0.5, "prior": 0.3} | {f: 0.0 for f in fusion.STACKED_FEATURES}


def prior_counts(labels: Mapping[str, Mapping], split: str = "train") -> np.ndarray:
    """(230,) materials per space group in ``split`` of mp_labels.json."""
    counts = np.zeros(fusion.N_GROUPS, dtype=np.int64)
    for entry in labels.values():
        if entry["split"] == split:
            counts[int(entry["space_group"]) - 1] += 1
    return counts


@dataclass
class FitData:
    """Samples for one number of views: summed MSDN logits, evidence, labels (0-based groups),
    the evidence's off-axis scores."""

    logits: np.ndarray  # (m, C)
    evidence: np.ndarray | None  # (m, 230)
    target: np.ndarray  # (m,) group - 1
    off_axis: np.ndarray | None = None  # (m,), NaN where not measured; None: none measured


def subset_samples(view_logits: np.ndarray, groups: np.ndarray, evidence: Mapping[tuple, np.ndarray] | None, k: int,
                   off_axis: Mapping[tuple, np.ndarray] | None = None) -> FitData:
    """Every k-view subset of every material. ``evidence`` maps a present-mask tuple to (n, 230),
    ``off_axis`` to (n,) off-axis scores of those zones."""
    logits, ev, target, tilt = [], [], [], []
    for mask in SUBSETS[k]:
        key = tuple(bool(v) for v in mask)
        logits.append((view_logits * mask[None, :, None]).sum(axis=1))
        target.append(groups - 1)
        if evidence is not None:
            ev.append(evidence[key])
        tilt.append(off_axis[key] if off_axis is not None and key in off_axis else np.full(len(groups), np.nan))
    return FitData(np.concatenate(logits), np.concatenate(ev) if evidence is not None else None, np.concatenate(target),
                   np.concatenate(tilt) if off_axis is not None else None)


def _nll_and_grad(w: np.ndarray, feats: np.ndarray, target: np.ndarray, free: np.ndarray) -> tuple[float, np.ndarray]:
    full = np.zeros(feats.shape[-1])
    full[free] = w
    s = feats @ full
    s -= s.max(axis=1, keepdims=True)
    logz = np.log(np.exp(s).sum(axis=1))
    rows = np.arange(len(target))
    nll = float((logz - s[rows, target]).mean()) + L2 * float(w @ w)
    p = np.exp(s - logz[:, None])
    expected = np.einsum("ng,ngf->nf", p, feats)
    grad = (expected - feats[rows, target]).mean(axis=0)[free] + 2 * L2 * w
    return nll, grad


def fit_weights(data: FitData, *, classes: Sequence[int], temperature: float, evidence_clip: float,
                log_prior_train: np.ndarray, tables: fusion.SymmetryTables,
                use: Sequence[str] = fusion.FEATURES, start: Mapping[str, float] | None = None,
                ) -> tuple[dict[str, float], float]:
    """(weights, mean NLL) at a given temperature; features not in ``use`` stay at weight 0."""
    feats = fusion.feature_tensor(data.logits, data.evidence, classes=classes, temperature=temperature,
                                  evidence_clip=evidence_clip, log_prior_train=log_prior_train, tables=tables,
                                  off_axis=data.off_axis)
    # the tilt features are fitted only where some sample's zones were measured off their axes
    tilted = data.off_axis is not None and bool((np.nan_to_num(data.off_axis) > 0).any())
    free = np.array([f in use and (f not in fusion.EVIDENCE_FEATURES or data.evidence is not None)
                     and (f not in fusion.TILT_FEATURES or tilted) for f in fusion.FEATURES])
    x0 = np.array([(start or INITIAL)[f] for f, keep in zip(fusion.FEATURES, free) if keep])
    result = minimize(_nll_and_grad, x0, args=(feats, data.target, free), jac=True, method="L-BFGS-B")
    full = np.zeros(len(fusion.FEATURES))
    full[free] = result.x
    return {f: float(v) for f, v in zip(fusion.FEATURES, full)}, float(result.fun)


def fit(view_logits: np.ndarray, groups: np.ndarray, *, classes: Sequence[int], counts: np.ndarray,
        evidence: Mapping[tuple, np.ndarray] | None = None, evidence_clip: float | None = None,
        cell_known: bool = True, fitted: dict | None = None,
        use: Sequence[str] = fusion.FEATURES, tables: fusion.SymmetryTables | None = None,
        fit_no_evidence: bool = True, off_axis: Mapping[tuple, np.ndarray] | None = None,
        views: Sequence[int] = (1, 2, 3)) -> fusion.FusionParams:
    """Fusion parameters fitted on validation materials (per-view logits (n, 3, C), groups (n,)),
    for ``views`` numbers of views; ``off_axis`` (present mask -> (n,) scores) feeds the tilt
    features. Weights are fitted for the numbers of views in ``views`` only."""
    tables = tables or fusion.symmetry_tables(cell_known)
    log_prior = np.log(fusion.training_prior(counts))
    if evidence is not None and evidence_clip is None:
        # how far below the best group the evidence may push one (a wrong hard rule must not
        # make the truth impossible): chosen by validation NLL with every view present
        scored = []
        for clip in EVIDENCE_CLIPS:
            _, _, rep = _fit_per_views(view_logits, groups, evidence, classes=classes, log_prior=log_prior,
                                       tables=tables, use=use, evidence_clip=clip, ks=(3,), off_axis=off_axis)
            scored.append((rep["3"]["nll"], clip))
        evidence_clip = min(scored)[1]
        log.info("evidence clip chosen on validation NLL: %s (%s)", evidence_clip, scored)
    evidence_clip = 20.0 if evidence_clip is None else evidence_clip
    weights, temperature, report = _fit_per_views(view_logits, groups, evidence, classes=classes, log_prior=log_prior,
                                                  tables=tables, use=use, evidence_clip=evidence_clip, ks=tuple(views),
                                                  off_axis=off_axis)
    weights_ne, temperature_ne = {}, {}
    if evidence is not None and fit_no_evidence:  # the same without evidence, for callers that cannot measure it
        weights_ne, temperature_ne, report_ne = _fit_per_views(
            view_logits, groups, None, classes=classes, log_prior=log_prior, tables=tables,
            use=[f for f in use if f not in fusion.EVIDENCE_FEATURES], evidence_clip=evidence_clip, ks=tuple(views))
        report = {**report, "no_evidence": report_ne}
    return fusion.FusionParams(
        classes=[int(c) for c in classes], prior_counts=np.asarray(counts), weights=weights, temperature=temperature,
        weights_no_evidence=weights_ne, temperature_no_evidence=temperature_ne,
        evidence_clip=evidence_clip, cell_known=cell_known, sets=[list(m) for m in tables.sets],
        bravais=[tables.bravais_names[i] for i in tables.bravais], fitted={**(fitted or {}), "per_views": report},
    )


def _fit_per_views(view_logits, groups, evidence, *, classes, log_prior, tables, use, evidence_clip, ks=(1, 2, 3),
                   off_axis=None):
    weights, temperature, report = {}, {}, {}
    for k in ks:
        ev_k = evidence if evidence is not None and all(tuple(bool(v) for v in m) in evidence for m in SUBSETS[k]) else None
        data = subset_samples(view_logits, groups, ev_k, k, off_axis if ev_k is not None else None)
        best = None
        with threadpool_limits(1):  # small matrices: BLAS threads only contend on a shared machine
            for t in TEMPERATURES:
                w, nll = fit_weights(data, classes=classes, temperature=t, evidence_clip=evidence_clip,
                                     log_prior_train=log_prior, tables=tables, use=use,
                                     start=None if best is None else best[1])
                if best is None or nll < best[2]:
                    best = (t, w, nll)
        t, w, nll = best
        weights[k], temperature[k] = w, t
        report[str(k)] = {"samples": int(len(data.target)), "nll": round(nll, 4), "temperature": round(t, 4)}
        log.info("fusion fit, %d view(s)%s: T = %.3f, NLL %.4f on %d samples, weights %s", k,
                 "" if ev_k is not None else " (no evidence)", t, nll, len(data.target),
                 {f: round(v, 3) for f, v in w.items()})
        report[str(k)]["evidence"] = ev_k is not None
    return weights, temperature, report


def evidence_pays(with_evidence: Mapping, without: Mapping, n_extra: int) -> bool:
    """Whether one number of views' evidence pays on validation: the fit with it (its
    ``fitted["per_views"][k]`` report) has a mean NLL below the fit without it, on the same
    samples, by more than Akaike's penalty for its ``n_extra`` weights (n_extra / samples per
    sample). Where it does not, the fusion keeps the no-evidence weights for that many views and
    a caller need not combine those zones (one zone: no cell, every class the same partial fit)."""
    if with_evidence["samples"] != without["samples"]:
        raise ValueError(f"the two fits saw different samples ({with_evidence['samples']} vs {without['samples']})")
    return without["nll"] - with_evidence["nll"] > n_extra / with_evidence["samples"]


DECIDED_SET_ACCURACY = 0.97  # a decided prediction's set must be right this often (on validation)


def choose_decide_at(post: np.ndarray, labels: np.ndarray, tables: fusion.SymmetryTables,
                     target: float = DECIDED_SET_ACCURACY) -> float:
    """The lowest set probability above which the predicted set is right at least ``target`` of
    the time on these (validation) materials: below it a prediction says "cannot decide"."""
    labels = np.asarray(labels, dtype=np.int64)
    set_mass = np.zeros((len(labels), len(tables.sets)))
    np.add.at(set_mass.T, tables.set_of, post.T)
    best = set_mass.argmax(axis=1)
    confidence = set_mass[np.arange(len(labels)), best]
    right = best == tables.set_of[labels - 1]
    for t in np.round(np.arange(0.5, 0.991, 0.01), 2):
        keep = confidence >= t
        if keep.sum() >= 20 and right[keep].mean() >= target:
            return float(t)
    return 0.99


# --------------------------------------------------------------------------- measuring


def msdn_posterior(summed_logits: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """The MSDN alone as a 230-group posterior (zero outside its classes)."""
    z = summed_logits - summed_logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros((len(p), fusion.N_GROUPS))
    out[:, np.asarray(classes) - 1] = p
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE over equal-width confidence bins, and the bins (for the reliability diagram)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
        ece += sel.mean() * abs(conf - acc)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(sel.sum()), "confidence": conf,
                      "accuracy": acc})
    return float(ece), table


def symmetry_ceiling(labels: Sequence[int], groups: Sequence[int] | None, cell_known: bool = True) -> float:
    from xtalsym import symmetry

    return float(symmetry.symmetry_ceiling(list(int(g) for g in labels), None if groups is None else list(groups),
                                           cell_known=cell_known))


def posterior_metrics(post: np.ndarray, labels: np.ndarray, *, tables: fusion.SymmetryTables | None = None,
                      decide_at: float = fusion.DEFAULT_DECIDE_AT) -> dict:
    """Every figure of one posterior (n, 230) against true groups (n,)."""
    tables = tables or fusion.symmetry_tables(True)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rows = np.arange(n)
    order = np.argsort(-post, axis=1, kind="stable")
    top1 = order[:, 0] + 1
    top5 = (order[:, :5] + 1 == labels[:, None]).any(axis=1)
    set_mass = np.zeros((n, len(tables.sets)))
    np.add.at(set_mass.T, tables.set_of, post.T)
    best_set = set_mass.argmax(axis=1)
    true_set = tables.set_of[labels - 1]
    sys_mass = np.zeros((n, len(spacegroups.CRYSTAL_SYSTEMS)))
    np.add.at(sys_mass.T, tables.system, post.T)
    brav_mass = np.zeros((n, len(tables.bravais_names)))
    np.add.at(brav_mass.T, tables.bravais, post.T)
    correct = top1 == labels
    ece, bins = expected_calibration_error(post[rows, order[:, 0]], correct)
    set_correct = best_set == true_set
    set_ece, set_bins = expected_calibration_error(set_mass[rows, best_set], set_correct)
    decided = set_mass[rows, best_set] >= decide_at
    p_true = post[rows, labels - 1]
    # the answer holds the truth: the decided set is right, or an undecided one lists it as a candidate
    order_sets = np.argsort(-set_mass, axis=1, kind="stable")
    in_answer = set_correct.copy()
    for i in np.flatnonzero(~decided):
        cum = np.cumsum(set_mass[i, order_sets[i]])
        n_cand = min(int(np.searchsorted(cum, fusion.CANDIDATE_MASS)) + 1, fusion.MAX_CANDIDATES)
        in_answer[i] = true_set[i] in order_sets[i, :n_cand]
    return {
        "n": int(n),
        "group_top1": float(correct.mean()),
        "group_top5": float(top5.mean()),
        "set_top1": float(set_correct.mean()),
        "crystal_system": float((sys_mass.argmax(axis=1) == tables.system[labels - 1]).mean()),
        "bravais_lattice": float((brav_mass.argmax(axis=1) == tables.bravais[labels - 1]).mean()),
        "nll": float(-np.log(np.maximum(p_true, 1e-12)).mean()),
        "ece": ece,
        "set_ece": set_ece,
        "decided_share": float(decided.mean()),
        "set_top1_when_decided": float(set_correct[decided].mean()) if decided.any() else None,
        "truth_in_answer": float(in_answer.mean()),
        "reliability": bins,
        "set_reliability": set_bins,
        "set_confusion": set_confusion(true_set, best_set, tables),
    }


def set_confusion(true_set: np.ndarray, predicted_set: np.ndarray, tables: fusion.SymmetryTables, top: int = 15) -> dict:
    """Per true set: count, share right, and the sets it is most often taken for."""
    out = {}
    for s in np.unique(true_set):
        sel = true_set == s
        wrong = Counter(int(p) for p in predicted_set[sel] if p != s)
        out[fusion.set_label(tables.sets[s])] = {
            "count": int(sel.sum()),
            "right": float((predicted_set[sel] == s).mean()),
            "taken_for": {fusion.set_label(tables.sets[p]): c for p, c in wrong.most_common(3)},
        }
    ranked = sorted(out.items(), key=lambda kv: -kv[1]["count"])
    return dict(ranked[: top if top else None])


def save_reliability_png(curves: Mapping[str, list[dict]], path: str | Path, *, title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for name, bins in curves.items():
        conf = [b["confidence"] for b in bins]
        acc = [b["accuracy"] for b in bins]
        size = [max(6.0, 60.0 * b["count"] / max(1, max(x["count"] for x in bins))) for b in bins]
        line, = ax.plot(conf, acc, marker="", lw=1.5, label=name)
        ax.scatter(conf, acc, s=size, color=line.get_color(), zorder=3)
    ax.set_xlabel("predicted probability (top-1)")
    ax.set_ylabel("observed accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
