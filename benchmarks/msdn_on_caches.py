"""The MSDN alone (no evidence, no fusion) on fusion feature caches: top-1 / top-5 over the
model's classes, per cache and split, for two or more caches side by side.

Used to choose between models on the validation split of every condition at once (exact zone
axes, σ 0.5°, σ 2° of `fusion_data --misorientation-deg`) before the test split is looked at:

    python benchmarks/msdn_on_caches.py --split val data/fusion data/fusion_mis05 data/fusion_mis2 \
        runs/ft/fusion runs/ft/fusion_mis05 runs/ft/fusion_mis2

Each cache's logits are those of the bundle it was built (or re-logited) with; the bundle's
classes (in the model's output order) come from --bundle (all caches must share them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym.offline import fusion_data  # noqa: E402


def scores(cache: str, split: str, classes: list[int]) -> dict:
    feats = fusion_data.load_features(cache)
    rows = (feats.split == split) & np.isin(feats.space_group, classes)
    logits = feats.view_logits[rows].sum(axis=1)  # the heads are linear: the 3-view logits
    index_of = {group: i for i, group in enumerate(classes)}
    truth = np.array([index_of[int(group)] for group in feats.space_group[rows]])
    order = np.argsort(-logits, axis=1)
    plan_file = Path(cache) / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    return {"cache": cache, "n": int(rows.sum()), "misorientation_deg": plan.get("misorientation_deg", 0.0),
            "bundle": str(plan.get("bundle", "?"))[:12],
            "top1": float(np.mean(order[:, 0] == truth)), "top5": float(np.mean((order[:, :5] == truth[:, None]).any(1)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", nargs="+")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--bundle", default="reference_index")
    args = parser.parse_args(argv)
    labels = json.loads((Path(args.bundle) / "labels.json").read_text())
    classes = [int(entry["space_group"]) for entry in sorted(labels, key=lambda e: e["index"])]
    print("| cache | bundle | σ | split | n | MSDN top-1 | MSDN top-5 |\n|---|---|---|---|---|---|---|")
    for cache in args.caches:
        s = scores(cache, args.split, classes)
        print(f"| {s['cache']} | {s['bundle']} | {s['misorientation_deg']:g}° | {args.split} | {s['n']} | "
              f"{100 * s['top1']:.1f} % | {100 * s['top5']:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
