"""The fused answer with the int8 graph's per-view logits against fp32 (issue 12: "set top-1 unchanged").

Both feature caches come from the same cached float patterns
(``python -m xtalsym.offline.fusion_data --from-cache SRC --out data/fusion_fp32 --precision fp32``
and the same with ``int8``), so the only difference between them is the graph. The shipped
fusion parameters are applied to both, not refitted; the evidence is the source cache's.
Paired differences (int8 − fp32, 95 % CI, McNemar's exact p) on the same materials.

``--int8-params`` applies other parameters to the int8 logits (e.g. a fusion fitted on int8
validation logits by ``benchmarks/fusion.py --features data/fusion_int8 --write-params ...``),
so that each graph is measured with its own fit.

``--resimulate K`` first checks the recomputation itself: it simulates the first K cached
materials again and compares the logits of their exact float patterns with the cached ones.

    python benchmarks/fusion_int8.py --fp32 data/fusion_fp32 --int8 data/fusion_int8 \
        --evidence ../i16soft/data/fusion/evidence --params reference_index/fusion.json [--cached SRC]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtalsym import fusion  # noqa: E402
from xtalsym.inference.quantise import paired_difference  # noqa: E402
from xtalsym.offline import fusion_data, fusion_fit  # noqa: E402

KEYS = ("group_top1", "set_top1", "crystal_system", "bravais_lattice", "group_top5", "nll", "ece")


def right_of(post: np.ndarray, labels: np.ndarray, tables: fusion.SymmetryTables) -> dict[str, np.ndarray]:
    """Per material: group top-1 and set top-1 right (for the paired tests)."""
    set_mass = np.zeros((len(labels), len(tables.sets)))
    np.add.at(set_mass.T, tables.set_of, post.T)
    return {"group_top1": post.argmax(axis=1) + 1 == labels,
            "set_top1": set_mass.argmax(axis=1) == tables.set_of[labels - 1], "set": set_mass.argmax(axis=1)}


def resimulate_check(source: Path, bundle_path: str, k: int) -> dict:
    """Largest |logit of the exactly re-simulated patterns - cached logit| over the first k materials."""
    from xtalsym import shaping
    from xtalsym.bundle import load_bundle
    from xtalsym.offline import simulate, structures
    from xtalsym.offline.evaluate import build_config_from

    feats = fusion_data.load_features(source)
    wanted = {feats.material_id[i]: i for i in range(min(k, len(feats)))}
    bundle = load_bundle(bundle_path)
    config = build_config_from({"dataset_config": bundle.settings["dataset_config"]})
    model = fusion_data._model(bundle_path, "fp32")
    gaps = []
    for record in structures.iter_records(fusion_data.DEFAULT_SOURCE):
        if isinstance(record, structures.StructureError) or record.material_id not in wanted:
            continue
        labelled = structures.label(record, symprec=config.symprec)
        patterns = simulate.simulate_axes(labelled.structure, geometry=config.geometry, scattering=config.scattering,
                                          **simulate.DATASET_OPTIONS)
        shaped = np.stack([shaping.shape(simulate.to_raw_uint8(patterns[a]), a, method=config.shaping_method)
                           for a in simulate.AXES])
        logits = model.view_logits(np.ascontiguousarray(shaped.transpose(0, 3, 1, 2))[None])[0]
        gaps.append(float(np.abs(logits - feats.view_logits[wanted[record.material_id]]).max()))
    return {"materials": len(gaps), "max_gap": max(gaps) if gaps else None,
            "within_1e-4": int(sum(g <= fusion_data.RELOGIT_TOL for g in gaps))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", required=True, help="feature cache with fp32 logits (recomputed from the patterns)")
    parser.add_argument("--int8", required=True, help="the same cache with int8 logits")
    parser.add_argument("--cached", default=None, help="the source cache (its own fp32 logits: a third row)")
    parser.add_argument("--evidence", required=True, help="evidence folder of the source cache")
    parser.add_argument("--params", default="reference_index/fusion.json")
    parser.add_argument("--int8-params", default=None, help="parameters for the int8 logits (default: --params)")
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--resimulate", type=int, default=0, help="re-simulate this many cached materials first")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)

    try:
        params = fusion.FusionParams.load(args.params)
        params_int8 = fusion.FusionParams.load(args.int8_params) if args.int8_params else params
        caches = {"fp32": fusion_data.load_features(args.fp32), "int8": fusion_data.load_features(args.int8)}
        if args.cached:
            caches["fp32 as cached"] = fusion_data.load_features(args.cached)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    base = caches["fp32"]
    for name, feats in caches.items():
        if feats.material_id != base.material_id:
            parser.error(f"{name} cache holds other materials than --fp32 (not copies of one cache)")
    if list(params_int8.classes) != list(params.classes):
        parser.error("--int8-params has other classes than --params")
    report: dict = {"params": args.params, "int8_params": args.int8_params or args.params, "features": {k: str(v) for k, v in
                                                        (("fp32", args.fp32), ("int8", args.int8), ("cached", args.cached))}}
    if args.resimulate:
        report["resimulate"] = resimulate_check(Path(args.cached or args.fp32), args.bundle, args.resimulate)
        print(f"re-simulated {report['resimulate']}")
    ev_rows, evidence = fusion_data.load_evidence(args.evidence, base.material_id)
    pos = {r: i for i, r in enumerate(ev_rows)}
    test = np.array([i for i in np.flatnonzero(base.split == "test") if i in pos], dtype=np.int64)
    ev = evidence[(True, True, True)][[pos[i] for i in test]]
    labels = base.space_group[test]
    inside = np.isin(labels, params.classes)
    tables = fusion.symmetry_tables(True)
    fuses = {name: fusion.Fusion(params_int8 if name == "int8" else params) for name in caches}
    subsets = {"72 groups, natural": inside, "every group (natural)": np.ones(len(test), dtype=bool)}
    methods = {"fusion": True, "fusion, no evidence": False, "msdn": None}
    rows, rights = [], {}
    for method, with_ev in methods.items():
        for name, feats in caches.items():
            logits = feats.view_logits[test]
            if with_ev is None:
                post = fusion_fit.msdn_posterior(logits.sum(axis=1), params.classes)
            else:
                post = fuses[name].posterior(logits, None, ev if with_ev else None)
            rights[(method, name)] = right_of(post, labels, tables)
            for subset, sel in subsets.items():
                decide_at = (params_int8 if name == "int8" else params).decide_at
                m = fusion_fit.posterior_metrics(post[sel], labels[sel], tables=tables, decide_at=decide_at)
                rows.append({"method": method, "precision": name, "subset": subset, "n": m["n"],
                             **{k: m[k] for k in KEYS}, "decided_share": m["decided_share"],
                             "set_top1_when_decided": m["set_top1_when_decided"]})
    report["rows"] = rows
    print(f"\nFusion {args.params} (int8 logits: {args.int8_params or args.params}; not refitted here) on {len(test)} "
          "test materials with evidence, 3 views\n")
    print("| method | logits | test | n | group top-1 | set top-1 | crystal system | Bravais | group top-5 | NLL | ECE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['precision']} | {r['subset']} | {r['n']} | {r['group_top1']:.2%} | {r['set_top1']:.2%} | "
              f"{r['crystal_system']:.2%} | {r['bravais_lattice']:.2%} | {r['group_top5']:.2%} | {r['nll']:.4f} | {r['ece']:.4f} |")
    print("\nPaired, int8 − fp32 (same materials; 95 % CI; McNemar exact p):\n")
    print("| method | other logits | test | measure | n | fp32 | other | difference, points (95 % CI) | right only fp32 / only other | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    paired = []
    for method in methods:
        for other in [n for n in caches if n != "fp32"]:
            for subset, sel in subsets.items():
                for measure in ("set_top1", "group_top1"):
                    d = paired_difference(rights[(method, "fp32")][measure][sel], rights[(method, other)][measure][sel])
                    paired.append({"method": method, "other": other, "subset": subset, "measure": measure, **d})
                    print(f"| {method} | {other} | {subset} | {measure} | {d['n']} | {d['top1_a']:.2%} | {d['top1_b']:.2%} | "
                          f"{100 * d['delta']:+.2f} ({100 * d['ci95'][0]:+.2f} to {100 * d['ci95'][1]:+.2f}) | "
                          f"{d['only_a_right']} / {d['only_b_right']} | {d['mcnemar_p']:.2g} |")
    report["paired"] = paired
    # which sets the fused answer moves between (every group): true set -> fp32's / int8's set
    a, b = rights[("fusion", "fp32")], rights[("fusion", "int8")]
    moved = np.flatnonzero(a["set_top1"] != b["set_top1"])
    label = lambda s: fusion.set_label(tables.sets[s])  # noqa: E731
    changes = [{"material_id": base.material_id[test[i]], "true": label(tables.set_of[labels[i] - 1]),
                "fp32": label(a["set"][i]), "int8": label(b["set"][i])} for i in moved]
    report["set_changes"] = changes
    print(f"\nfused set right in one precision only ({len(changes)}; every group): true set: fp32's -> int8's\n")
    for c in sorted(changes, key=lambda c: (c["true"], c["fp32"])):
        print(f"  {c['material_id']:12s} {c['true']:28s} fp32 {c['fp32']:28s} int8 {c['int8']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
