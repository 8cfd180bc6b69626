"""The validation split's in-sample NLL of the stacked fusion for several evidence caches: how an
evidence change is chosen on validation alone (16 weights on 1,500 materials: little to overfit).

    python benchmarks/fusion_val_nll.py data/fusion/evidence data/fusion/evidence_pz ...

Each folder holds evidence files in fusion_data's format (``--evidence``, or
benchmarks/evidence_cache.py combine); the features and the prior come from ``--features``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fusion_compare  # noqa: E402

from xtalsym import fusion  # noqa: E402
from xtalsym.bundle import load_bundle  # noqa: E402
from xtalsym.offline import fusion_data, fusion_fit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evidence", nargs="+", help="evidence folders")
    ap.add_argument("--features", default="data/fusion")
    ap.add_argument("--bundle", default="reference_index")
    args = ap.parse_args(argv)
    classes = load_bundle(args.bundle).classes
    feats = fusion_data.load_features(args.features)
    counts, prior_source = fusion_data.prior_counts_of(args.features, feats)
    log_prior = np.log(fusion.training_prior(counts))
    tables = fusion.symmetry_tables(True)
    logits = feats.view_logits.sum(axis=1).astype(np.float64)
    print(f"prior: {prior_source}")
    for folder in args.evidence:
        rows, ev = fusion_data.load_evidence(Path(folder), feats.material_id)
        ev = ev[(True, True, True)]
        val = np.array([i for i, r in enumerate(rows) if feats.split[r] == "val"])
        r = rows[val]
        cpu = time.process_time()
        with threadpool_limits(1):
            model = fusion_compare.ConditionalLogit("stacked", fusion.FEATURES).fit(
                logits[r], ev[val], feats.space_group[r] - 1, classes=classes, log_prior=log_prior, tables=tables)
            post = model.posterior(logits[r], ev[val])
        m = fusion_fit.posterior_metrics(post, feats.space_group[r], tables=tables)
        print(f"{folder}: val n {len(r)}, in-sample NLL {m['nll']:.4f}, group top-1 {m['group_top1']:.3f}, "
              f"set top-1 {m['set_top1']:.3f} (T {model.t}, clip {model.clip}; {time.process_time() - cpu:.0f} CPU-s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
