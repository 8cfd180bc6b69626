"""The fusion's off-axis rule (issue 15): above which Friedel asymmetry of the zones a fused answer
is not decided, chosen on validation; and what it does on the test split.

The fusion was fitted on zone-axis patterns. Off the axis its decisions go wrong (σ 2°: 77 % of the
materials decided, 13.5 % of those right; docs/RESULTS.md, session 5). The evidence measures how far
a sample's zones are from zone-axis patterns (xtalsym.evidence.axis). This picks the largest
threshold τ at which the wrong decisions stay at most ``--max-wrong`` of the materials in every
tilted cache, on the validation split; ``--record`` writes it into a fusion.json.

    python benchmarks/fusion_off_axis.py --exact data/fusion --tilted data/fusion_mis05 \\
        --tilted data/fusion_mis2 --params reference_index/fusion.json --split val --record runs/x/fusion.json
    python benchmarks/fusion_off_axis.py ... --split test         # the recorded threshold, on test

Each cache needs the evidence of the three zones with the off-axis score (``fusion_data --evidence``
of this version); the tilted ones come from ``fusion_data --misorientation-deg``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym import fusion  # noqa: E402
from xtalsym.offline import fusion_data  # noqa: E402

ALL = (True, True, True)
GRID = np.round(np.arange(0.02, 1.001, 0.01), 2)


def condition(features: str, split: str, engine: fusion.Fusion) -> dict:
    """Per material of ``split`` with 3-zone evidence: set mass of the best set, whether that set
    is right, and the off-axis score (NaN: not measured, never gated)."""
    feats = fusion_data.load_features(features)
    folder = Path(features) / fusion_data.EVIDENCE_DIR
    rows, evidence = fusion_data.load_evidence(folder, feats.material_id)
    off_axis = fusion_data.load_off_axis(folder, feats.material_id)
    if ALL not in evidence or ALL not in off_axis:
        raise SystemExit(f"{folder}: no 3-zone evidence with the off-axis score (run fusion_data --evidence again)")
    keep = feats.split[rows] == split
    idx, ev = rows[keep], evidence[ALL][keep]
    post = engine.posterior(feats.view_logits[idx], None, ev, off_axis[ALL][idx])
    tables = engine.tables
    set_mass = np.zeros((len(idx), len(tables.sets)))
    np.add.at(set_mass.T, tables.set_of, post.T)
    best = set_mass.argmax(axis=1)
    plan = Path(features) / "plan.json"
    sigma = float(json.loads(plan.read_text()).get("misorientation_deg", 0.0)) if plan.is_file() else 0.0
    return {"name": features, "sigma": sigma, "n": len(idx), "confident": set_mass.max(axis=1) >= engine.params.decide_at,
            "right": best == tables.set_of[feats.space_group[idx] - 1], "score": off_axis[ALL][idx]}


def at(cond: dict, tau: float | None) -> dict:
    gated = np.zeros(cond["n"], bool) if tau is None else np.nan_to_num(cond["score"], nan=-1.0) > tau
    decided = cond["confident"] & ~gated
    return {"decided": decided.mean(), "right": cond["right"][decided].mean() if decided.any() else float("nan"),
            "wrong": (decided & ~cond["right"]).mean(), "gated": gated.mean(),
            "wrong_n": int((decided & ~cond["right"]).sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact", required=True, help="cache on the zone axes")
    parser.add_argument("--tilted", action="append", default=[], required=True, help="cache off the axes (repeatable)")
    parser.add_argument("--params", default="reference_index/fusion.json")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--max-wrong", type=float, default=0.01, help="wrong decisions allowed per tilted cache")
    parser.add_argument("--record", default=None, metavar="FUSION_JSON", help="write the chosen threshold here (val only)")
    args = parser.parse_args(argv)
    if args.record and args.split != "val":
        parser.error("--record takes a threshold chosen on --split val only")
    try:
        params = fusion.FusionParams.load(args.params)
    except fusion.FusionError as exc:
        parser.error(str(exc))
    params.off_axis_above = None  # every figure below applies its own threshold
    engine = fusion.Fusion(params)
    conds = [condition(c, args.split, engine) for c in [args.exact] + args.tilted]
    names = [f"{Path(c['name']).name} (σ {c['sigma']:g}°, n = {c['n']})" for c in conds]
    print(f"\n{args.split} split; fusion {args.params} (decide_at {params.decide_at:.2f}); per cache: decided share / "
          f"right when decided / wrong decisions (share of all materials) / not decided by the rule\n")
    print("| τ | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(conds))
    recorded = fusion.FusionParams.load(args.params).off_axis_above
    chosen = None
    for tau in [None] + list(GRID):
        stats = [at(c, tau) for c in conds]
        if tau is not None and all(s["wrong"] <= args.max_wrong for s in stats[1:]):
            chosen = tau
        show = tau is None or tau in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75) or tau == recorded
        if show:
            cells = [f"{s['decided']:.1%} / {s['right']:.1%} / {s['wrong']:.2%} ({s['wrong_n']}) / {s['gated']:.1%}" for s in stats]
            print(f"| {'none' if tau is None else f'{tau:.2f}'} | " + " | ".join(cells) + " |")
    print(f"\nlargest τ with wrong decisions ≤ {args.max_wrong:.1%} in every tilted cache: "
          f"{'none' if chosen is None else f'{chosen:.2f}'}" + (f"; recorded in {args.params}: {recorded}" if recorded else ""))
    if chosen is not None:
        for c, s in zip(conds, [at(c, chosen) for c in conds]):
            print(f"  τ {chosen:.2f}: {Path(c['name']).name}: decided {s['decided']:.1%}, right {s['right']:.1%}, "
                  f"wrong {s['wrong']:.2%}, not decided by the rule {s['gated']:.1%}")
    if args.record:
        if chosen is None:
            raise SystemExit("no threshold meets the rule: nothing recorded")
        target = fusion.FusionParams.load(args.record)
        target.off_axis_above = float(chosen)
        target.fitted["off_axis"] = {"threshold": float(chosen), "split": "val", "max_wrong": args.max_wrong,
                                     "caches": [{"features": c["name"], "misorientation_deg": c["sigma"], "materials": c["n"],
                                                 "decided": round(float(s["decided"]), 4),
                                                 "wrong_decisions": round(float(s["wrong"]), 4),
                                                 "wrong_decisions_without": round(float(at(c, None)["wrong"]), 4)}
                                                for c, s in zip(conds, [at(c, chosen) for c in conds])]}
        target.save(args.record)
        print(f"recorded off_axis_above = {chosen:.2f} in {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
