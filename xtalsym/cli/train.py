"""Training and evaluation commands: `train`, `evaluate`, `predict`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xtalsym.cli import options


def register(commands: argparse._SubParsersAction) -> None:
    _register_train(commands)
    _register_evaluate(commands)


def _register_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a model on a dataset directory (resumable; CPU, GPU or torchrun multi-GPU)",
        description="Train per a TOML config (keys: see xtalsym.offline.train_config or configs/*.toml).",
    )
    parser.add_argument("--config", metavar="FILE.toml", help="training config (optional with --resume)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set epochs=3 --set model.input_size=112",
    )
    parser.add_argument("--out", metavar="DIR", help="run directory (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the config's device")
    parser.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from xtalsym.offline import train_config as tc

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f'device="{args.device}"')
    if args.config is None:
        if not (args.resume and args.out):
            raise tc.ConfigError(["--config is required (it may be left out only with --resume --out DIR)"])
        saved = Path(args.out) / "config.resolved.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume without --config: no config.resolved.json in {args.out}")
        config = tc.load(None, overrides, base=json.loads(saved.read_text()))
    else:
        config = tc.load(args.config, overrides)
    out = args.out or config.out_dir
    if not out:
        raise tc.ConfigError(["no run directory: pass --out DIR or set out_dir in the config"])
    from xtalsym.offline.train import train  # torch only when the command runs

    metrics = train(config, Path(out), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": str(out), **metrics}, indent=1))
    return 0


def _model_source(parser: argparse.ArgumentParser) -> None:
    options.model_source(parser, required=False)
    options.prior(parser)
    parser.add_argument(
        "--axes", help="zone axes to classify with, comma-separated, e.g. x,z (multi-view models; default all three)"
    )


def _register_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="top-k accuracy, per space group/crystal system, confusion matrix",
        description="Score a model on a dataset split (its stored DPs) or on structures simulated and shaped on "
        "the fly; writes metrics.json, predictions.csv and the crystal-system confusion PNG.",
    )
    _model_source(evaluate)
    options.dataset_or_structures(evaluate)
    evaluate.add_argument("--split", default="test", help="dataset split (default %(default)s)")
    evaluate.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: evaluation-<split|structures> in the working directory; never inside a bundle)",
    )
    evaluate.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default %(default)s)")
    options.no_progress(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    pr = commands.add_parser(
        "predict",
        help="top-5 space groups of structures, simulated and shaped on the fly",
        description="Classify every structure of a file (a JSON-lines file: every line), or of a folder.",
    )
    pr.add_argument(
        "structure", help="structure file (CIF, POSCAR, XSF, CSSR, JSON), a folder of them, or a JSON-lines file"
    )
    _model_source(pr)
    pr.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines: one object per structure, one line each",
    )
    options.no_evidence(pr)
    pr.set_defaults(handler=_cmd_predict)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from xtalsym.offline import evaluate as ev

    loaded = ev.load_for_inference(checkpoint=args.checkpoint, bundle=args.bundle, device=args.device, prior=args.prior)
    metrics, paths = ev.run_evaluation(
        loaded,
        dataset=args.dataset,
        split=args.split,
        sources=args.structures,
        out=args.out,
        axes=ev.axes_list(args.axes),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(ev.format_summary(metrics))
    print(
        f"\nmetrics: {paths['metrics']}\npredictions: {paths['predictions']}\nconfusion matrix: {paths['confusion']}"
        + (f"\nreliability diagram: {paths['reliability']}" if "reliability" in paths else "")
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from xtalsym.offline import evaluate as ev

    loaded = ev.load_for_inference(checkpoint=args.checkpoint, bundle=args.bundle, device=args.device, prior=args.prior)
    results = list(ev.predict_sources(loaded, args.structure, axes=ev.axes_list(args.axes)))
    if not results:
        raise ValueError(f"no structures found in {args.structure}")
    failed = 0
    for n, (labelled, top) in enumerate(results):
        if top is None:
            if len(results) == 1:
                raise labelled  # the one structure: its error is the command's error
            failed += 1
            print(f"failed: {labelled.source}: {labelled.reason}", file=sys.stderr)
            continue
        if loaded.fusion is not None:  # the bundle's fused answer over 230 groups, with the evidence
            from xtalsym.offline import fused

            result = fused.predict_structure(
                loaded.model,
                loaded.fusion,
                labelled,
                config=loaded.config,
                axes=ev.axes_list(args.axes),
                use_evidence=not args.no_evidence,
            )
            if n and not args.json:  # JSON lines: no blank line between objects
                print()
            print_fused(labelled, result, loaded.classes, as_json=args.json)
            continue
        found = (
            None
            if args.no_evidence
            else ev.structure_evidence(labelled, config=loaded.config, axes=ev.axes_list(args.axes))
        )
        if args.json:
            row = {"material_id": labelled.material_id, "true_space_group": labelled.space_group, "top": top}
            if found is not None:
                row["evidence"] = found.to_json()
            print(json.dumps(row))  # JSON lines: one object per structure
            continue
        print(("\n" if n else "") + _structure_line(labelled, loaded.classes))
        print(f"{'rank':>4}  {'SG':>3}  {'symbol':<10} {'crystal system':<14} {'probability':>11}")
        for row in top:
            print(
                f"{row['rank']:>4}  {row['space_group']:>3}  {row['symbol']:<10} {row['crystal_system']:<14} "
                f"{row['probability']:>11.4f}"
            )
        if found is not None:
            from xtalsym.evidence import report

            print()
            print(report.format_text(found))
    if failed == len(results):
        raise ValueError(f"no structure of {args.structure} could be classified ({failed} failed)")
    return 0


def _structure_line(labelled, classes) -> str:
    """The heading of one structure's prediction: what it is and whether the model knows its group."""
    known = "" if labelled.space_group in classes else " - not one of the model's classes"
    return f"{labelled.material_id} {labelled.formula}: spglib space group {labelled.space_group} ({labelled.symbol}){known}"


def print_fused(labelled, result, classes, *, as_json: bool) -> None:
    """What `xtalsym predict` prints for a fused prediction (text or JSON)."""
    from xtalsym import spacegroups

    prediction = result.prediction
    verdict = prediction.truth_verdict(labelled.space_group)
    evidence = result.evidence
    if as_json:
        payload = {
            "material_id": labelled.material_id,
            "true_space_group": labelled.space_group,
            "truth": verdict,
            "prediction": prediction.to_json(),
            "evidence": evidence.to_json() if evidence is not None else None,
        }
        print(json.dumps(payload))  # JSON lines: one object per structure
        return
    print(_structure_line(labelled, classes))
    print(f"prediction: {prediction.headline()}")
    print(f"truth {labelled.symbol}: {_VERDICT_TEXT[verdict]}")
    print(
        f"crystal system: {prediction.crystal_system[0]} (p = {prediction.crystal_system[1]:.3f})   "
        f"Bravais lattice: {prediction.bravais_lattice[0]} (p = {prediction.bravais_lattice[1]:.3f})"
    )
    if evidence is not None:
        from xtalsym.evidence import report

        print()
        print(report.format_text(evidence))
        print()
    print("top sets:")
    for s in prediction.top_sets:
        inside = ", ".join(f"{g.symbol} {g.probability:.3f}" for g in s.groups[:6])
        print(f"  p = {s.probability:.3f}  {s.label}  [{inside}]")
    print(f"{'rank':>4}  {'SG':>3}  {'symbol':<10} {'crystal system':<14} {'probability':>11}  model class")
    for rank, g in enumerate(prediction.top_groups, 1):
        print(
            f"{rank:>4}  {g.space_group:>3}  {g.symbol:<10} {spacegroups.crystal_system(g.space_group):<14} "
            f"{g.probability:>11.4f}  {'yes' if g.in_model_classes else 'no'}"
        )
    print(
        f"prior: {prediction.prior}; views: {','.join(prediction.views)}; evidence "
        f"{'used' if prediction.evidence_used else 'not used'}"
    )


_VERDICT_TEXT = {
    "top-1": "the most probable group",
    "in set": "in the predicted set (the data cannot separate it from the top group)",
    "candidate": "among the candidates of an undecided prediction",
    "wrong": "NOT in the predicted set",
}
