"""Fusion (issue 15): fit on the validation split, measure on the test split, print the targets table.

Inputs are the per-material features cached by ``python -m xtalsym.offline.fusion_data``
(MSDN per-view logits, labels, float patterns) and, when present, the evidence
log-likelihoods cached by ``--evidence`` (computed from those patterns). Every figure is
on MP materials of the test split (by material), beside the symmetry ceiling of the same
labels and the paper's figure.

    python benchmarks/fusion.py --features data/fusion --out runs/fusion \
        [--write-params reference_index/fusion.json]

``--against reference_index/fusion.json`` also prints, per test subset and number of views, the
paired differences (this fit minus those parameters, same materials, both with the evidence of
the zones present) with their standard errors over materials.

``--params reference_index/fusion.json`` measures given parameters instead of fitting (its
no-evidence weights serve the "no evidence" rows; ``decide_at`` as stored), e.g. the shipped
fusion on features of another graph (``fusion_data --from-cache ... --precision int8``).

``--fit-also data/fusion_mis05`` (repeatable) adds the validation materials of another cache —
e.g. one simulated off the zone axes, ``fusion_data --misorientation-deg 0.5`` — to the fit (the
test figures stay those of ``--features``; measure the fit on the other cache's test split with
``--params`` and that cache as ``--features``).
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
MODELS = {"stacked": fusion.FEATURES, "product": fusion.PRODUCT_FEATURES}


def capped(groups: np.ndarray, cap: int) -> np.ndarray:
    """Indices keeping at most ``cap`` materials per group (first ones in the fixed order)."""
    seen: dict[int, int] = {}
    keep = []
    for i, g in enumerate(groups):
        if seen.get(int(g), 0) < cap:
            keep.append(i)
            seen[int(g)] = seen.get(int(g), 0) + 1
    return np.array(keep, dtype=np.int64)


def evaluate(name, params, idx, feats, classes, tables, evidence_rows=None, evidence=None, masks=None,
             off_axis=None) -> dict:
    """{(views): metrics} of one method on materials ``idx`` (3 views, and 1/2-view averages);
    ``off_axis``: {mask: (n features,) off-axis scores} for the tilt features."""
    out = {}
    for views, mask_list in (masks or {"xyz": [np.ones(3, dtype=bool)]}).items():
        ms = []
        for mask in mask_list:
            ev = None
            if evidence is not None and tuple(bool(v) for v in mask) in evidence:
                pos = {r: i for i, r in enumerate(evidence_rows)}
                ev = evidence[tuple(bool(v) for v in mask)][[pos[i] for i in idx]]
            if params is None:
                summed = (feats.view_logits[idx] * mask[None, :, None]).sum(axis=1)
                post = fusion_fit.msdn_posterior(summed, classes)
            else:
                tilt = (off_axis or {}).get(tuple(bool(v) for v in mask)) if ev is not None else None
                post = fusion.Fusion(params).posterior(feats.view_logits[idx], np.broadcast_to(mask, (len(idx), 3)), ev,
                                                       None if tilt is None else tilt[idx])
            m = fusion_fit.posterior_metrics(post, feats.space_group[idx], tables=tables,
                                             decide_at=params.decide_at if params is not None else 0.5)
            # the same posterior over the coarser sets of zones whose cell scale is not known (an F cell
            # at a passes for a P cell at a/2): what the cell-unknown ceiling counts as one answer
            m["set_top1_cell_unknown"] = fusion_fit.posterior_metrics(
                post, feats.space_group[idx], tables=fusion.symmetry_tables(False))["set_top1"]
            ms.append(m)
        if len(ms) == 1:
            out[views] = ms[0]
        else:
            keys = ("group_top1", "group_top5", "set_top1", "set_top1_cell_unknown", "crystal_system", "bravais_lattice",
                    "nll", "ece")
            out[views] = {k: float(np.mean([m[k] for m in ms])) for k in keys} | {"n": ms[0]["n"] * len(ms)}
    return out


def validation_rows(features: str | Path, evidence_dir: str | Path | None = None) -> dict:
    """The validation materials of one cache, as the fit takes them: all of them (the no-evidence
    fit) and those with evidence, with their evidence per view subset."""
    feats = fusion_data.load_features(features)
    folder = Path(evidence_dir or Path(features) / "evidence")
    ev_rows, evidence = fusion_data.load_evidence(folder, feats.material_id)
    off_axis = fusion_data.load_off_axis(folder, feats.material_id)
    val = np.flatnonzero(feats.split == "val")
    pos = {r: i for i, r in enumerate(ev_rows)}
    val_ev = np.array([i for i in val if i in pos], dtype=np.int64)
    plan = Path(features) / "plan.json"
    return {"logits": feats.view_logits[val], "groups": feats.space_group[val],
            "logits_ev": feats.view_logits[val_ev], "groups_ev": feats.space_group[val_ev],
            "evidence": {k: v[[pos[i] for i in val_ev]] for k, v in evidence.items()},
            "off_axis": {k: v[val_ev] for k, v in off_axis.items()},
            "misorientation_deg": float(json.loads(plan.read_text()).get("misorientation_deg", 0.0)) if plan.is_file() else 0.0}


def concatenate_rows(parts: list[dict]) -> dict:
    """Validation rows of several caches as one fit set (the view subsets all of them have evidence for)."""
    masks = set.intersection(*(set(p["evidence"]) for p in parts))
    return {"logits": np.concatenate([p["logits"] for p in parts]), "groups": np.concatenate([p["groups"] for p in parts]),
            "logits_ev": np.concatenate([p["logits_ev"] for p in parts]),
            "groups_ev": np.concatenate([p["groups_ev"] for p in parts]),
            "evidence": {m: np.concatenate([p["evidence"][m] for p in parts]) for m in masks},
            "off_axis": {m: np.concatenate([p["off_axis"].get(m, np.full(len(p["groups_ev"]), np.nan)) for p in parts])
                         for m in masks}}


def _decided(m: dict) -> str:
    if "decided_share" not in m or m.get("set_top1_when_decided") is None:
        return "–"
    return f"{m['decided_share']:.0%} / {m['set_top1_when_decided']:.1%} (truth in the answer {m['truth_in_answer']:.1%})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="data/fusion")
    parser.add_argument("--evidence", default=None, help="evidence folder (default: <features>/evidence)")
    parser.add_argument("--bundle", default="reference_index")
    parser.add_argument("--out", default="runs/fusion")
    parser.add_argument("--write-params", default=None, help="write the fitted fusion parameters here")
    parser.add_argument("--record", default=None, metavar="FUSION_JSON",
                        help="with --params: write this cache's 72-group, 3-view test figures into that file's "
                        "'fitted' record under its misorientation (for the model card via `xtalsym bundle add-fusion`)")
    parser.add_argument("--model", choices=sorted(MODELS), default="stacked",
                        help="features of the conditional logit: stacked (the default, chosen by cross-validation in "
                        "benchmarks/fusion_compare.py) or product (the product of experts alone)")
    parser.add_argument("--params", default=None, help="measure these fusion parameters (fusion.json) instead of fitting")
    parser.add_argument("--against", default=None, help="paired differences against these parameters (fusion.json)")
    parser.add_argument("--prior-from", default=None, metavar="FUSION_JSON",
                        help="the prior counts of this fusion.json (e.g. the shipped one: the training-split "
                        "frequencies) instead of <features>/mp_labels.json")
    parser.add_argument("--fit-also", action="append", default=[], metavar="FEATURES",
                        help="also fit on this cache's validation materials (its own evidence/ folder); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.params and args.write_params:
        parser.error("--params measures given parameters; --write-params writes fitted ones: use one of them")
    if args.record and not args.params:
        parser.error("--record stores the figures of given parameters (--params) measured on --features")
    if args.params and args.fit_also:
        parser.error("--fit-also adds materials to a fit; --params measures given parameters: use one of them")
    for extra in args.fit_also:
        if not any(Path(extra).glob("chunk-*.npz")):
            parser.error(f"--fit-also: no feature chunks under {extra}")

    from xtalsym.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    classes = bundle.classes
    feats = fusion_data.load_features(args.features)
    counts, prior_source = fusion_data.prior_counts_of(args.features, feats)
    if args.prior_from:
        try:
            source = fusion.FusionParams.load(args.prior_from)
        except fusion.FusionError as exc:
            parser.error(f"--prior-from: {exc}")
        counts = source.prior_counts.astype(np.int64)
        prior_source = source.fitted.get("prior", f"prior of {args.prior_from}")  # the messages' "prior" text
        log.info("prior counts from %s (%d materials: %s)", args.prior_from, int(counts.sum()), prior_source)
    ev_folder = Path(args.evidence or Path(args.features) / "evidence")
    ev_rows, evidence = fusion_data.load_evidence(ev_folder, feats.material_id)
    off_axis = fusion_data.load_off_axis(ev_folder, feats.material_id)  # {mask: (n features,)}, NaN: not measured
    has_ev = np.zeros(len(feats), dtype=bool)
    has_ev[ev_rows] = True
    val = np.flatnonzero(feats.split == "val")
    test = np.flatnonzero(feats.split == "test")
    val_ev, test_ev = val[has_ev[val]], test[has_ev[test]]
    inside = np.isin(feats.space_group, classes)
    log.info("materials: val %d (%d with evidence), test %d (%d with evidence, %d in the model's %d groups); "
             "prior from %d materials of the %s", len(val), len(val_ev), len(test), len(test_ev),
             int(inside[test].sum()), len(classes), int(counts.sum()), prior_source)

    def ev_of(idx):
        pos = {r: i for i, r in enumerate(ev_rows)}
        return {k: v[[pos[i] for i in idx]] for k, v in evidence.items()}

    if args.params:
        try:
            given = fusion.FusionParams.load(args.params)
        except (OSError, ValueError, KeyError, fusion.FusionError) as exc:
            parser.error(f"--params {args.params}: {exc}")
        if list(given.classes) != list(classes):
            parser.error(f"--params {args.params}: its classes are not the bundle's ({len(given.classes)} vs {len(classes)})")
        log.info("measuring %s (not fitted here; decide_at %.2f as stored)", args.params, given.decide_at)
        return _report(args, feats, classes, counts, prior_source, val, val_ev, test, test_ev, inside, ev_rows, evidence,
                       off_axis, {"msdn": None, "fusion, no evidence": given, "fusion": given})

    parts = [{"logits": feats.view_logits[val], "groups": feats.space_group[val], "logits_ev": feats.view_logits[val_ev],
              "groups_ev": feats.space_group[val_ev], "evidence": ev_of(val_ev),
              "off_axis": {k: v[val_ev] for k, v in off_axis.items()}}]
    conditions = [{"features": args.features, "misorientation_deg": 0.0, "materials": int(len(val))}]
    for extra in args.fit_also:
        rows = validation_rows(extra)
        parts.append(rows)
        conditions.append({"features": extra, "misorientation_deg": rows["misorientation_deg"],
                           "materials": int(len(rows["groups"]))})
        log.info("fit also on %s: %d validation materials (%d with evidence), misorientation %.2f°", extra,
                 len(rows["groups"]), len(rows["groups_ev"]), rows["misorientation_deg"])
    fit_rows = concatenate_rows(parts)
    n_fit, n_fit_ev = len(fit_rows["groups"]), len(fit_rows["groups_ev"])
    extra_record = {"conditions": conditions} if args.fit_also else {}
    cpu = time.process_time()
    no_ev = fusion_fit.fit(fit_rows["logits"], fit_rows["groups"], classes=classes, counts=counts,
                           use=[f for f in MODELS[args.model] if f not in fusion.EVIDENCE_FEATURES],
                           fitted={"split": "val", "materials": int(n_fit), "evidence": False, "prior": prior_source,
                                   "model": args.model} | extra_record)
    log.info("fitted the no-evidence fusion in %.1f CPU-s", time.process_time() - cpu)
    fitted = {"msdn": None, "fusion, no evidence": no_ev}
    if n_fit_ev:
        cpu = time.process_time()
        # a number of views is fitted on every cache with evidence of all its view subsets (tilted
        # caches may hold the 3-zone evidence only); the others on --features alone
        def covered(masks):
            return [k for k in (1, 2, 3) if all(tuple(bool(v) for v in m) in masks for m in fusion_fit.SUBSETS[k])]

        ks_all = covered(fit_rows["evidence"])
        ks_main = [k for k in covered(parts[0]["evidence"]) if k not in ks_all]
        with_ev = fusion_fit.fit(fit_rows["logits_ev"], fit_rows["groups_ev"], classes=classes, counts=counts,
                                 use=MODELS[args.model], evidence=fit_rows["evidence"], off_axis=fit_rows["off_axis"],
                                 fit_no_evidence=False, views=ks_all or (1, 2, 3),
                                 fitted={"split": "val", "materials": int(n_fit_ev), "evidence": True, "prior": prior_source,
                                         "model": args.model} | extra_record)
        if ks_main:
            own = parts[0]
            log.info("%s view(s): evidence of every subset in %s only; fitted on it alone", ks_main, args.features)
            main_ev = fusion_fit.fit(own["logits_ev"], own["groups_ev"], classes=classes, counts=counts,
                                     use=MODELS[args.model], evidence=own["evidence"], off_axis=own["off_axis"],
                                     evidence_clip=with_ev.evidence_clip, fit_no_evidence=False, views=ks_main)
            main_ne = fusion_fit.fit(own["logits"], own["groups"], classes=classes, counts=counts, views=ks_main,
                                     use=[f for f in MODELS[args.model] if f not in fusion.EVIDENCE_FEATURES])
            for k in ks_main:
                with_ev.weights[k], with_ev.temperature[k] = main_ev.weights[k], main_ev.temperature[k]
                with_ev.fitted["per_views"][str(k)] = main_ev.fitted["per_views"][str(k)] | {"features": args.features}
                # without evidence too (the fallback, and where the evidence does not pay): those views'
                # answers are calibrated on the one cache they were fitted on
                no_ev.weights[k], no_ev.temperature[k] = main_ne.weights[k], main_ne.temperature[k]
                no_ev.fitted["per_views"][str(k)] = main_ne.fitted["per_views"][str(k)] | {"features": args.features}
        log.info("fitted the fusion with evidence in %.1f CPU-s", time.process_time() - cpu)
        # the views without evidence, and the no-evidence fallback, from the larger validation set;
        # and where a number of views' evidence does not pay on validation (AIC), no evidence there:
        # the daemon then does not combine those zones for its partial predictions
        n_extra = sum(f in fusion.EVIDENCE_FEATURES for f in MODELS[args.model])
        for k in (1, 2):
            report, without = with_ev.fitted["per_views"][str(k)], no_ev.fitted["per_views"][str(k)]
            if not report["evidence"]:
                pays = False
            elif n_fit_ev < n_fit:
                pays = True  # the fits saw other materials, not comparable: kept, as before this rule
            else:
                pays = fusion_fit.evidence_pays(report, without, n_extra)
            log.info("%d view(s): evidence %s (validation NLL %.4f with, %.4f without, AIC penalty %.4f)", k,
                     "kept" if pays else "not used", report["nll"], without["nll"],
                     n_extra / report["samples"])
            report["evidence_kept"] = bool(pays)
            if not pays:
                with_ev.weights[k], with_ev.temperature[k] = no_ev.weights[k], no_ev.temperature[k]
        with_ev.weights_no_evidence = dict(no_ev.weights)
        with_ev.temperature_no_evidence = dict(no_ev.temperature)
        with_ev.fitted["no_evidence_materials"] = int(n_fit)
        fitted["fusion"] = with_ev

    tables = fusion.symmetry_tables(True)
    for name, params in fitted.items():  # "cannot decide" below the set probability where val sets are 97 % right
        if params is None:
            continue
        with_evidence = name == "fusion"
        post = fusion.Fusion(params).posterior(fit_rows["logits_ev" if with_evidence else "logits"], None,
                                               fit_rows["evidence"][(True, True, True)] if with_evidence else None,
                                               fit_rows["off_axis"].get((True, True, True)) if with_evidence else None)
        params.decide_at = fusion_fit.choose_decide_at(post, fit_rows["groups_ev" if with_evidence else "groups"], tables)
        log.info("%s: decide_at %.2f (validation)", name, params.decide_at)
    return _report(args, feats, classes, counts, prior_source, val, val_ev, test, test_ev, inside, ev_rows, evidence,
                   off_axis, fitted)


def _report(args, feats, classes, counts, prior_source, val, val_ev, test, test_ev, inside, ev_rows, evidence,
            off_axis, fitted) -> int:
    """Measure every method of ``fitted`` on the test split; print the table, write metrics.json."""
    tables = fusion.symmetry_tables(True)
    masks = {"xyz": [np.ones(3, dtype=bool)], "1 view": fusion_fit.SUBSETS[1], "2 views": fusion_fit.SUBSETS[2]}

    def subsets_of(idx):
        a = idx[inside[idx]]
        return {"72 groups, natural": a, f"72 groups, <= {PER_GROUP_CAP} per group": a[capped(feats.space_group[a], PER_GROUP_CAP)],
                "every group (natural)": idx}

    rows = []
    results = {}
    for tier, idx, methods in (("all cached test materials", test, ("msdn", "fusion, no evidence")),
                               ("test materials with evidence", test_ev, tuple(fitted))):
        if not len(idx):
            continue
        for subset, sub in subsets_of(idx).items():
            space = classes if subset.startswith("72") else None
            ceiling = (fusion_fit.symmetry_ceiling(feats.space_group[sub], space, True),
                       fusion_fit.symmetry_ceiling(feats.space_group[sub], space, False))
            for name in methods:
                params = fitted[name]
                res = evaluate(name, params, sub, feats, classes, tables,
                               ev_rows if name == "fusion" else None, evidence if name == "fusion" else None, masks,
                               off_axis)
                for views, m in res.items():
                    results[(tier, subset, name, views)] = m
                    rows.append((tier, subset, views, name, m, ceiling))

    if args.params:
        print(f"\nFusion on the MP test split (by material). Parameters of {args.params} (not refitted; "
              f"fitted on {fitted['fusion'].fitted.get('materials', '?')} val materials, prior: "
              f"{fitted['fusion'].fitted.get('prior', '?')}). Features: {args.features}.\n")
    else:
        print(f"\nFusion on the MP test split (by material). Fitted on val: {len(val)} materials "
              f"({len(val_ev)} with evidence). Prior: frequencies of {int(counts.sum())} materials of the {prior_source}.\n")
    print("| materials | test | views | method | n | group top-1 | set top-1 | set top-1, cell scale unknown | crystal system | Bravais | group top-5 | NLL | ECE | decided / set right when decided | ceiling (cell known / unknown) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tier, subset, views, name, m, ceiling in rows:
        print(f"| {tier} | {subset} | {views} | {name} | {m['n']} | {m['group_top1']:.1%} | {m['set_top1']:.1%} | "
              f"{m['set_top1_cell_unknown']:.1%} | {m['crystal_system']:.1%} | {m['bravais_lattice']:.1%} | {m['group_top5']:.1%} | {m['nll']:.3f} | "
              f"{m['ece']:.3f} | {_decided(m)} | {ceiling[0]:.1%} / {ceiling[1]:.1%} |")
    print("\npaper (Tiong et al. 2020, 72 groups): group top-1 80.2 %, top-5 > 95 %")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for tier, key in (("all cached test materials", "all"), ("test materials with evidence", "evidence")):
        curves = {name: results[(tier, "every group (natural)", name, "xyz")]["reliability"]
                  for name in fitted if (tier, "every group (natural)", name, "xyz") in results}
        if curves:
            n = results[(tier, "every group (natural)", next(iter(curves)), "xyz")]["n"]
            fusion_fit.save_reliability_png(curves, out / f"reliability_{key}.png",
                                            title=f"MP test, every group, 3 views ({tier}, n={n})")
    if args.against:
        _paired(args.against, fitted["fusion" if "fusion" in fitted else "fusion, no evidence"], subsets_of(test_ev), masks,
                feats, ev_rows, evidence, tables, off_axis)
    serial = {" | ".join(k): {kk: vv for kk, vv in v.items()} for k, v in results.items()}
    (out / "metrics.json").write_text(json.dumps(serial, indent=1))
    best = "fusion" if "fusion" in fitted else "fusion, no evidence"
    tier = "test materials with evidence" if best == "fusion" else "all cached test materials"
    print(f"\nset confusion ({best}, {tier}, every group, most frequent true sets):")
    for label, row in results[(tier, "every group (natural)", best, "xyz")]["set_confusion"].items():
        print(f"  {label:40s} n={row['count']:4d} right {row['right']:.0%}  taken for {row['taken_for']}")
    if args.write_params:
        params = fitted[best]
        params.fitted["test"] = {
            f"{t} | {sub}" + ("" if views == "xyz" else f" | {views}"):
            {k: round(results[(t, sub, best, views)][k], 4) for k in ("group_top1", "set_top1", "ece")}
            | {"n": results[(t, sub, best, views)]["n"]}
            for (t, sub, name, views) in results if name == best}
        params.save(args.write_params)
        print(f"\nwrote {args.write_params}")
    if args.record:
        _record_condition(args.record, args.features, results[("test materials with evidence", "72 groups, natural", "fusion", "xyz")])
    return 0


def _record_condition(path: str, features: str, m: dict) -> None:
    """Store one cache's test figures (72 groups, 3 views) in ``path``'s fitted["misorientation_test"]."""
    plan = Path(features) / "plan.json"
    sigma = float(json.loads(plan.read_text()).get("misorientation_deg", 0.0)) if plan.is_file() else 0.0
    params = fusion.FusionParams.load(path)
    params.fitted.setdefault("misorientation_test", {})[f"{sigma:g}"] = {
        "features": str(features), "n": int(m["n"]),
        **{k: round(float(m[k]), 4) for k in ("group_top1", "set_top1", "crystal_system", "group_top5", "ece")},
        "decided": round(float(m["decided_share"]), 4)}
    params.save(path)
    print(f"\nrecorded the σ {sigma:g}° test figures in {path}")


def _per_material(params, idx, mask_list, feats, ev_rows, evidence, tables, off_axis) -> dict[str, np.ndarray]:
    """Per material of ``idx``: group top-1 right, set right, -log p(truth) averaged over the view
    subsets, and per subset (columns) the top-1 probability and whether it is right (for the ECE)."""
    pos = {r: i for i, r in enumerate(ev_rows)}
    truth = feats.space_group[idx]
    out = {"group": 0.0, "set": 0.0, "nll": 0.0}
    conf, right = [], []
    for mask in mask_list:
        key = tuple(bool(v) for v in mask)
        ev = evidence[key][[pos[i] for i in idx]]
        tilt = off_axis.get(key)
        post = fusion.Fusion(params).posterior(feats.view_logits[idx], np.broadcast_to(mask, (len(idx), 3)), ev,
                                               None if tilt is None else tilt[idx])
        set_mass = np.zeros((len(idx), len(tables.sets)))
        np.add.at(set_mass.T, tables.set_of, post.T)
        out["group"] = out["group"] + (post.argmax(axis=1) + 1 == truth)
        out["set"] = out["set"] + (set_mass.argmax(axis=1) == tables.set_of[truth - 1])
        out["nll"] = out["nll"] - np.log(np.maximum(post[np.arange(len(idx)), truth - 1], 1e-12))
        conf.append(post.max(axis=1))
        right.append(post.argmax(axis=1) + 1 == truth)
    return {k: np.asarray(v, dtype=np.float64) / len(mask_list) for k, v in out.items()} | {
        "conf": np.stack(conf, axis=1), "right": np.stack(right, axis=1)}


ECE_DRAWS = 300


def _ece_rows(m: dict, rows: np.ndarray) -> float:
    return fusion_fit.expected_calibration_error(m["conf"][rows].ravel(), m["right"][rows].ravel())[0]


def _paired(against: str, params, subsets: dict, masks: dict, feats, ev_rows, evidence, tables, off_axis) -> None:
    """This fit minus ``against`` on the same test materials: mean difference ± its standard error
    over materials (the view subsets of one material averaged first: they are not independent),
    and the ECE difference with a 95 % interval from a paired bootstrap over materials."""
    other = fusion.FusionParams.load(against)
    rng = np.random.default_rng(0)
    print(f"\npaired differences on the same test materials (this fit minus {against}; ± one standard error; "
          f"ECE: 95 % interval of {ECE_DRAWS} paired bootstrap draws over materials):\n")
    print("| test | views | n | group top-1 | set top-1 | NLL | ECE (theirs → this) | ECE difference [95 %] |")
    print("|---|---|---|---|---|---|---|---|")
    for subset, idx in subsets.items():
        for views, mask_list in masks.items():
            a = _per_material(params, idx, mask_list, feats, ev_rows, evidence, tables, off_axis)
            b = _per_material(other, idx, mask_list, feats, ev_rows, evidence, tables, off_axis)
            cells = []
            for key, scale, fmt in (("group", 100, "{:+.1f} ± {:.1f} points"), ("set", 100, "{:+.1f} ± {:.1f} points"),
                                    ("nll", 1, "{:+.3f} ± {:.3f}")):
                d = (a[key] - b[key]) * scale
                cells.append(fmt.format(d.mean(), d.std(ddof=1) / np.sqrt(len(d))))
            every = np.arange(len(idx))
            boot = []
            for _ in range(ECE_DRAWS):
                rows = rng.integers(0, len(idx), len(idx))
                boot.append(_ece_rows(a, rows) - _ece_rows(b, rows))
            lo, hi = np.percentile(boot, [2.5, 97.5])
            cells.append(f"{_ece_rows(b, every):.3f} → {_ece_rows(a, every):.3f}")
            cells.append(f"{_ece_rows(a, every) - _ece_rows(b, every):+.3f} [{lo:+.3f}, {hi:+.3f}]")
            print(f"| {subset} | {views} | {len(idx)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
