"""Training and evaluation commands: `train`, `evaluate`, `predict`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set epochs=3 --set model.input_size=112")
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


def _register_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="top-k accuracy, per space group/crystal system, confusion matrix")
    evaluate.add_argument("--checkpoint", required=True, help="model checkpoint written by training")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="DIR", help="dataset directory (xtalsym simulate dataset)")
    source.add_argument("--structures", nargs="+", metavar="SRC", help="CIF files/folders or JSON-lines files")
    evaluate.add_argument("--split", default="test", help="dataset split (default %(default)s)")
    evaluate.add_argument("--out", help="output folder (default: evaluation-<split|structures> beside the checkpoint)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    evaluate.add_argument("--axes", help="classify with these zone axes only, e.g. x,z (multi-view models)")
    evaluate.set_defaults(handler=_cmd_evaluate)

    pr = commands.add_parser("predict", help="top-5 space groups of one structure, simulated and shaped on the fly")
    pr.add_argument("structure", help="CIF file, or a JSON file holding a CIF or a pymatgen Structure")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--axes", help="zone axes to use, e.g. x,y (default all three)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--json", action="store_true", help="print the predictions as JSON")
    pr.set_defaults(handler=_cmd_predict)


def _axes(text: str | None) -> list[str] | None:
    return [a.strip() for a in text.split(",") if a.strip()] if text else None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from xtalsym.offline import evaluate as ev

    if args.batch_size < 1:
        raise ev.EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = ev.resolve_device(args.device)
    model, classes, extra = ev.load_model(args.checkpoint, device=device)
    present = ev.present_mask(_axes(args.axes), model)
    if args.dataset:
        metrics = ev.evaluate_dataset(model, classes, args.dataset, args.split, batch_size=args.batch_size, device=device, present=present)
        what = args.split
    else:
        metrics = ev.evaluate_structures(
            model, classes, args.structures, config=ev.build_config_from(extra), batch_size=args.batch_size,
            device=device, present=present,
        )
        what = "structures"
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["model"] = getattr(model, "name", type(model).__name__)
    metrics["axes"] = _axes(args.axes) or list(ev.shaping.AXES)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"evaluation-{what}"
    paths = ev.write_outputs(metrics, out, title=f"{metrics['model']} on {what} ({metrics['samples']} samples)")
    print(ev.format_summary(metrics))
    print(f"\nmetrics: {paths['metrics']}\npredictions: {paths['predictions']}\nconfusion matrix: {paths['confusion']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from xtalsym.offline import evaluate as ev

    device = ev.resolve_device(args.device)
    model, classes, extra = ev.load_model(args.checkpoint, device=device)
    config = ev.build_config_from(extra)
    labelled = ev.structures.load_structure(args.structure, symprec=config.symprec)
    top = ev.predict_structure(model, classes, labelled, axes=_axes(args.axes), config=config, device=device)
    if args.json:
        print(json.dumps({"material_id": labelled.material_id, "true_space_group": labelled.space_group, "top": top}, indent=1))
        return 0
    known = "" if labelled.space_group in classes else " - not one of the model's classes"
    print(f"{labelled.material_id} {labelled.formula}: spglib space group {labelled.space_group} ({labelled.symbol}){known}")
    print(f"{'rank':>4}  {'SG':>3}  {'symbol':<10} {'crystal system':<14} {'probability':>11}")
    for row in top:
        print(f"{row['rank']:>4}  {row['space_group']:>3}  {row['symbol']:<10} {row['crystal_system']:<14} {row['probability']:>11.4f}")
    return 0
