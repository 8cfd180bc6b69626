"""Fusion: the product of experts against a small stacked model, why indistinguishable sets are
missed (the MSDN or the evidence), and how far the test ECE is from what sampling alone gives.

Both models are xtalsym.fusion's conditional logit over the 230 groups, fitted by maximum
likelihood on the validation materials with evidence (3 views): the product of experts on
fusion.PRODUCT_FEATURES (8 weights), the stacked model on fusion.FEATURES (16: also the evidence
at three clip depths, the evidence's mass on each group's indistinguishable set, Bravais lattice
and crystal system, the MSDN's mass on the set, and the evidence scaled by the MSDN's entropy). The choice between them is made on K-fold
cross-validation over the validation materials (out-of-fold NLL), then both are refitted on all
of validation and measured on the test split.

    python benchmarks/fusion_compare.py --features data/fusion [--evidence DIR] [--folds 5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym import fusion  # noqa: E402
from xtalsym.offline import fusion_data, fusion_fit  # noqa: E402

log = logging.getLogger("benchmarks.fusion_compare")
HARD_MISS_NATS = 20.0  # the evidence puts the truth this far below its best group: a wrong hard rule
DRAWS = 1000


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=1, keepdims=True)


class ConditionalLogit:
    """xtalsym.fusion's model on a set of its features, 3 views; the MSDN temperature and the
    evidence clip by in-sample NLL on the fitting materials (as fusion_fit.fit)."""

    def __init__(self, name: str, use: tuple[str, ...]):
        self.name, self.use = name, use

    def fit(self, logits, ev, target, *, classes, log_prior, tables):
        best = None
        for clip in fusion_fit.EVIDENCE_CLIPS:
            for t in fusion_fit.TEMPERATURES:
                data = fusion_fit.FitData(logits, ev, target)
                w, nll = fusion_fit.fit_weights(data, classes=classes, temperature=t, evidence_clip=clip,
                                                log_prior_train=log_prior, tables=tables, use=self.use)
                if best is None or nll < best[0]:
                    best = (nll, t, clip, w)
        _, self.t, self.clip, self.w = best
        self.ctx = dict(classes=classes, log_prior_train=log_prior, tables=tables)
        return self

    def posterior(self, logits, ev):
        feats = fusion.feature_tensor(logits, ev, temperature=self.t, evidence_clip=self.clip, **self.ctx)
        return _softmax(fusion.scores(feats, self.w))


MODELS = (ConditionalLogit(f"product of experts ({len(fusion.PRODUCT_FEATURES)} weights)", fusion.PRODUCT_FEATURES),
          ConditionalLogit(f"stacked ({len(fusion.FEATURES)} weights)", fusion.FEATURES))


def ece_reference(post: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    """ECE, and the ECE a perfectly calibrated predictor with the same confidences shows on this
    many materials (outcomes drawn as Bernoulli(confidence); mean and 95th percentile)."""
    conf = post.max(axis=1)
    correct = post.argmax(axis=1) + 1 == labels
    ece = fusion_fit.expected_calibration_error(conf, correct)[0]
    ideal = [fusion_fit.expected_calibration_error(conf, rng.random(len(conf)) < conf)[0] for _ in range(DRAWS)]
    return {"ece": ece, "ideal_mean": float(np.mean(ideal)), "ideal_p95": float(np.percentile(ideal, 95))}


def attribution(post, msdn_post, ev, labels, tables) -> tuple[Counter, dict]:
    """Each material's (fused set right?, MSDN set right?, evidence on the truth) and, per true set,
    the counts behind its misses."""
    def best_set(p):
        m = np.zeros((len(p), len(tables.sets)))
        np.add.at(m.T, tables.set_of, p.T)
        return m.argmax(axis=1)

    truth = tables.set_of[labels - 1]
    fused, msdn = best_set(post), best_set(msdn_post)
    evf = np.where(np.isfinite(ev), ev, -np.inf)
    gap = evf.max(axis=1) - evf[np.arange(len(labels)), labels - 1]
    ev_state = np.where(gap <= fusion.EVIDENCE_TOP_NATS, "points to the truth",
                        np.where(gap <= HARD_MISS_NATS, "truth below its best (soft)", "truth ruled out (hard, > 20 nats)"))
    cells = Counter(zip(fused == truth, msdn == truth, ev_state))
    per_set = {}
    for s in np.unique(truth):
        sel = truth == s
        miss = sel & (fused != truth)
        per_set[s] = {"n": int(sel.sum()), "fused": float((fused[sel] == s).mean()), "msdn": float((msdn[sel] == s).mean()),
                      "evidence_points": float((ev_state[sel] == "points to the truth").mean()),
                      "misses": int(miss.sum()),
                      "misses_evidence_hard": int((miss & (ev_state == "truth ruled out (hard, > 20 nats)")).sum()),
                      "misses_msdn_wrong_evidence_ok": int((miss & (msdn != truth) & (ev_state != "truth ruled out (hard, > 20 nats)")).sum()),
                      "taken_for": Counter(int(p) for p in fused[miss]).most_common(2)}
    return cells, per_set


def _row(m: dict) -> str:
    return (f"{m['group_top1']:.1%} | {m['set_top1']:.1%} | {m['crystal_system']:.1%} | {m['bravais_lattice']:.1%} | "
            f"{m['group_top5']:.1%} | {m['nll']:.3f} | {m['ece']:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="data/fusion")
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evidence", default=None, help="evidence folder (default: <features>/evidence)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from xtalsym.bundle import load_bundle

    classes = load_bundle(args.bundle).classes
    feats = fusion_data.load_features(args.features)
    counts, prior_source = fusion_data.prior_counts_of(args.features, feats)
    log_prior = np.log(fusion.training_prior(counts))
    tables = fusion.symmetry_tables(True)
    rows, evidence = fusion_data.load_evidence(Path(args.evidence or Path(args.features) / fusion_data.EVIDENCE_DIR),
                                              feats.material_id)
    ev_all = evidence[(True, True, True)]
    where = {r: i for i, r in enumerate(rows)}
    val = np.array([r for r in rows if feats.split[r] == "val"])
    test = np.array([r for r in rows if feats.split[r] == "test"])
    logits = feats.view_logits.sum(axis=1).astype(np.float64)

    def part(idx):
        return logits[idx], ev_all[[where[i] for i in idx]], feats.space_group[idx]

    ctx = dict(classes=classes, log_prior=log_prior, tables=tables)
    print(f"\nmaterials with evidence: val {len(val)}, test {len(test)}; prior: {prior_source}; 3 views")
    rng = np.random.default_rng(args.seed)
    fold = rng.permutation(len(val)) % args.folds
    models = MODELS
    print(f"\n{args.folds}-fold cross-validation on the validation materials (out-of-fold figures):\n")
    print("| model | group top-1 | set top-1 | crystal system | Bravais | group top-5 | NLL | ECE | CPU-s per fit |")
    print("|---|---|---|---|---|---|---|---|---|")
    cv_nll = {}
    for model in models:
        oof = np.zeros((len(val), fusion.N_GROUPS))
        cpu = time.process_time()
        with threadpool_limits(1):
            for k in range(args.folds):
                lg, ev, y = part(val[fold != k])
                fitted = model.fit(lg, ev, y - 1, **ctx)
                oof[fold == k] = fitted.posterior(*part(val[fold == k])[:2])
        m = fusion_fit.posterior_metrics(oof, feats.space_group[val], tables=tables)
        cv_nll[model.name] = m["nll"]
        print(f"| {model.name} | {_row(m)} | {(time.process_time() - cpu) / args.folds:.1f} |")
    chosen = min(cv_nll, key=cv_nll.get)
    print(f"\nchosen on cross-validated NLL: {chosen}")

    print("\nrefitted on all validation materials, measured on the test split:\n")
    print("| model | test | n | group top-1 | set top-1 | crystal system | Bravais | group top-5 | NLL | ECE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    lg_v, ev_v, y_v = part(val)
    lg_t, ev_t, y_t = part(test)
    inside = np.isin(y_t, classes)
    posts = {}
    with threadpool_limits(1):
        for model in models:
            fitted = model.fit(lg_v, ev_v, y_v - 1, **ctx)
            posts[model.name] = fitted.posterior(lg_t, ev_t)
    posts["MSDN alone"] = fusion_fit.msdn_posterior(lg_t, classes)
    for name, post in posts.items():
        for subset, sel in (("72 groups, natural", inside), ("every group", np.ones(len(y_t), bool))):
            m = fusion_fit.posterior_metrics(post[sel], y_t[sel], tables=tables)
            print(f"| {name} | {subset} | {m['n']} | {_row(m)} |")

    best = posts[chosen]
    print(f"\nECE of the chosen model on the test split, beside what sampling alone gives ({DRAWS} draws):\n")
    print("| test | n | ECE | a perfectly calibrated predictor, same confidences: mean / 95th percentile |")
    print("|---|---|---|---|")
    for subset, sel in (("72 groups, natural", inside), ("every group", np.ones(len(y_t), bool))):
        e = ece_reference(best[sel], y_t[sel], rng)
        print(f"| {subset} | {int(sel.sum())} | {e['ece']:.3f} | {e['ideal_mean']:.3f} / {e['ideal_p95']:.3f} |")

    cells, per_set = attribution(best, posts["MSDN alone"], ev_t, y_t, tables)
    n = len(y_t)
    print(f"\nwhy the set is missed (test, every group, n = {n}; the chosen model; evidence on the true group):\n")
    print("| fused set | MSDN's own set | evidence | materials | share |")
    print("|---|---|---|---|---|")
    for (f_ok, m_ok, ev_state), c in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"| {'right' if f_ok else 'WRONG'} | {'right' if m_ok else 'wrong'} | {ev_state} | {c} | {c / n:.1%} |")
    print("\nper true set (the 15 most frequent; misses split by cause):\n")
    print("| true set | n | fused right | MSDN right | evidence points to truth | misses | evidence ruled truth out | "
          "MSDN wrong, evidence not against | most often taken for |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, r in sorted(per_set.items(), key=lambda kv: -kv[1]["n"])[:15]:
        taken = "; ".join(f"{fusion.set_label(tables.sets[p])} ({c})" for p, c in r["taken_for"]) or "–"
        print(f"| {fusion.set_label(tables.sets[s])} | {r['n']} | {r['fused']:.0%} | {r['msdn']:.0%} | "
              f"{r['evidence_points']:.0%} | {r['misses']} | {r['misses_evidence_hard']} | "
              f"{r['misses_msdn_wrong_evidence_ok']} | {taken} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
