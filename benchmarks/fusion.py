"""Fusion (issue 15): fit on the validation split, measure on the test split, print the targets table.

Inputs are the per-material features cached by ``python -m xtalsym.offline.fusion_data``
(MSDN per-view logits, labels, float patterns) and, when present, the evidence
log-likelihoods cached by ``--evidence`` (computed from those patterns). Every figure is
on MP materials of the test split (by material), beside the symmetry ceiling of the same
labels and the paper's figure.

    python benchmarks/fusion.py --features data/fusion --out runs/fusion \
        [--write-params reference_index/fusion.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym import fusion  # noqa: E402
from xtalsym.offline import fusion_data, fusion_fit  # noqa: E402

log = logging.getLogger("benchmarks.fusion")
PER_GROUP_CAP = 8
VARIANTS = {
    "msdn": None,  # the shipped model alone (softmax over its 72 classes)
    "msdn+T+prior": ("msdn", "msdn_system", "msdn_bravais", "outside", "outside_entropy", "prior"),
    "fusion": fusion.FEATURES,
}


def load_evidence(path: Path, material_ids: list[str]) -> dict[tuple, np.ndarray] | None:
    """{present mask: (n, 230) evidence log-likelihoods} aligned with ``material_ids``, or None."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        ids = [str(m) for m in data["material_id"]]
        where = {m: i for i, m in enumerate(ids)}
        missing = [m for m in material_ids if m not in where]
        if missing:
            log.warning("evidence missing for %d of %d materials: not used", len(missing), len(material_ids))
            return None
        rows = np.array([where[m] for m in material_ids])
        out = {}
        for key in data.files:
            if key.startswith("loglik_"):
                mask = tuple(c == "1" for c in key.split("_")[1])
                out[mask] = data[key][rows].astype(np.float64)
    return out


def capped(groups: np.ndarray, cap: int) -> np.ndarray:
    """Indices keeping at most ``cap`` materials per group (first ones in the fixed order)."""
    seen: dict[int, int] = {}
    keep = []
    for i, g in enumerate(groups):
        if seen.get(int(g), 0) < cap:
            keep.append(i)
            seen[int(g)] = seen.get(int(g), 0) + 1
    return np.array(keep, dtype=np.int64)


def posterior_of(variant: str, params: fusion.FusionParams | None, view_logits, present, evidence, classes) -> np.ndarray:
    if params is None:
        summed = (view_logits * present[None, :, None]).sum(axis=1)
        return fusion_fit.msdn_posterior(summed, classes)
    engine = fusion.Fusion(params)
    ev = None if evidence is None else evidence[tuple(bool(v) for v in present)]
    return engine.posterior(view_logits, np.broadcast_to(present, (len(view_logits), 3)), ev)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="data/fusion")
    parser.add_argument("--evidence", default=None, help="evidence cache (default: <features>/evidence.npz)")
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--out", default="runs/fusion")
    parser.add_argument("--write-params", default=None, help="write the fitted fusion parameters here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from xtalsym.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    classes = bundle.classes
    feats = fusion_data.load_features(args.features)
    labels = json.loads((Path(args.features) / "mp_labels.json").read_text())
    counts = fusion_fit.prior_counts(labels, "train")
    evidence = load_evidence(Path(args.evidence or Path(args.features) / "evidence.npz"), feats.material_id)
    val = np.flatnonzero(feats.split == "val")
    test = np.flatnonzero(feats.split == "test")
    inside = np.isin(feats.space_group, classes)
    sel = lambda idx: None if evidence is None else {k: v[idx] for k, v in evidence.items()}  # noqa: E731
    log.info("materials: val %d, test %d (%d in the model's %d groups); train prior from %d materials; evidence: %s",
             len(val), len(test), int(inside[test].sum()), len(classes), int(counts.sum()),
             "yes" if evidence is not None else "no")

    fitted = {}
    for name, use in VARIANTS.items():
        if use is None:
            fitted[name] = None
            continue
        if "evidence" in use and evidence is None and name != "fusion":
            continue
        start = time.process_time()
        fitted[name] = fusion_fit.fit(
            feats.view_logits[val], feats.space_group[val], classes=classes, counts=counts, evidence=sel(val), use=use,
            fitted={"split": "val", "materials": int(len(val)), "evidence": evidence is not None,
                    "features": list(use)},
        )
        log.info("fitted %s in %.1f CPU-s", name, time.process_time() - start)

    tables = fusion.symmetry_tables(True)
    test_a = test[inside[test]]
    test_b = test_a[capped(feats.space_group[test_a], PER_GROUP_CAP)]
    subsets = {"72 groups, natural": test_a, f"72 groups, <= {PER_GROUP_CAP} per group": test_b, "every group (natural)": test}
    all3 = np.ones(3, dtype=bool)
    results: dict = {}
    for variant, params in fitted.items():
        for subset, idx in subsets.items():
            post = posterior_of(variant, params, feats.view_logits[idx], all3, sel(idx), classes)
            m = fusion_fit.posterior_metrics(post, feats.space_group[idx], tables=tables)
            results[(variant, subset, "xyz")] = m
        for k, masks in ((1, fusion_fit.SUBSETS[1]), (2, fusion_fit.SUBSETS[2])):
            ms = []
            for mask in masks:
                post = posterior_of(variant, params, feats.view_logits[test_a], mask, sel(test_a), classes)
                ms.append(fusion_fit.posterior_metrics(post, feats.space_group[test_a], tables=tables))
            results[(variant, "72 groups, natural", f"{k} view(s)")] = {
                key: float(np.mean([x[key] for x in ms])) for key in ("group_top1", "group_top5", "set_top1",
                                                                    "crystal_system", "bravais_lattice", "nll", "ece")
            } | {"n": ms[0]["n"] * len(ms)}
    ceilings = {}
    for subset, idx in subsets.items():
        labels_here = feats.space_group[idx]
        space = classes if subset.startswith("72") else None
        ceilings[subset] = (fusion_fit.symmetry_ceiling(labels_here, space, True),
                            fusion_fit.symmetry_ceiling(labels_here, space, False))

    paper = {"72 groups, natural": {"group_top1": "80.2 %", "group_top5": "> 95 %"}}
    print(f"\nFusion on the MP test split (by material); fitted on {len(val)} val materials; evidence "
          f"{'used' if evidence is not None else 'NOT available (MSDN + prior only)'}\n")
    print("| test | views | method | n | group top-1 | set top-1 | crystal system | Bravais | group top-5 | NLL | ECE | ceiling (cell known / unknown) | paper |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (variant, subset, views), m in results.items():
        ceiling = ceilings[subset]
        pp = paper.get(subset, {}) if views == "xyz" else {}
        print(f"| {subset} | {views} | {variant} | {m['n']} | {m['group_top1']:.1%} | {m['set_top1']:.1%} | "
              f"{m['crystal_system']:.1%} | {m['bravais_lattice']:.1%} | {m['group_top5']:.1%} | {m['nll']:.3f} | "
              f"{m['ece']:.3f} | {ceiling[0]:.1%} / {ceiling[1]:.1%} | "
              f"{', '.join(f'{k} {v}' for k, v in pp.items()) or '–'} |")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    best = "fusion"
    curves = {name: results[(name, "72 groups, natural", "xyz")]["reliability"] for name in fitted}
    fusion_fit.save_reliability_png(curves, out / "reliability_72_natural.png",
                                    title=f"MP test, 72 groups, 3 views (n={len(test_a)})")
    curves = {name: results[(name, "every group (natural)", "xyz")]["reliability"] for name in fitted}
    fusion_fit.save_reliability_png(curves, out / "reliability_all_groups.png",
                                    title=f"MP test, every group, 3 views (n={len(test)})")
    serial = {" | ".join(k): v for k, v in results.items()}
    (out / "metrics.json").write_text(json.dumps({"results": serial, "ceilings": ceilings}, indent=1))
    print(f"\nset confusion (fusion, every group, most frequent true sets):")
    for label, row in results[(best, "every group (natural)", "xyz")]["set_confusion"].items():
        print(f"  {label:40s} n={row['count']:4d} right {row['right']:.0%}  taken for {row['taken_for']}")
    if args.write_params:
        params = fitted[best]
        params.fitted.update(test={k: round(results[(best, k, "xyz")][m], 4) for k in subsets for m in ("group_top1",)})
        params.save(args.write_params)
        print(f"\nwrote {args.write_params}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
