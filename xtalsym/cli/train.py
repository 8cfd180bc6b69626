"""Training and evaluation commands: `train`, `evaluate`, `predict`."""

from __future__ import annotations

import argparse
import json
import logging
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
    evp = commands.add_parser("evaluate", help="top-k accuracy, per space group/crystal system, confusion matrix; "
                             "with a bundle's fusion also set top-1, crystal system, Bravais lattice, per-set confusion")
    ev_model = evp.add_mutually_exclusive_group(required=True)
    ev_model.add_argument("--checkpoint", help="model checkpoint written by training (the model alone)")
    ev_model.add_argument("--bundle", help="model bundle: its model, and its fusion over 230 groups if it has one")
    evp.add_argument("--prior", default=None, help="fusion prior: training (default), flat, or a JSON file {group: weight}")
    source = evp.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="DIR", help="dataset directory (xtalsym simulate dataset)")
    source.add_argument("--structures", nargs="+", metavar="SRC", help="CIF files/folders or JSON-lines files")
    evp.add_argument("--split", default="test", help="dataset split (default %(default)s)")
    evp.add_argument("--out", help="output folder (default: evaluation-<split|structures> beside the checkpoint)")
    evp.add_argument("--batch-size", type=int, default=32)
    evp.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    evp.add_argument("--axes", help="classify with these zone axes only, e.g. x,z (multi-view models)")
    evp.set_defaults(handler=_cmd_evaluate)

    pr = commands.add_parser("predict", help="space group of one structure, simulated and shaped on the fly: the "
                             "indistinguishable set, top groups, crystal system and Bravais lattice")
    pr.add_argument("structure", help="CIF file, or a JSON file holding a CIF or a pymatgen Structure")
    model_source = pr.add_mutually_exclusive_group()
    model_source.add_argument("--bundle", help="model bundle (default: the shipped one); its fusion gives the answer")
    model_source.add_argument("--checkpoint", help="a training checkpoint instead of a bundle: the model alone")
    pr.add_argument("--prior", default=None, help="fusion prior: training (default), flat, or a JSON file {group: weight}")
    pr.add_argument("--no-evidence", action="store_true", help="do not measure the symmetry evidence")
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
    engine = None
    if args.bundle:
        from xtalsym import fusion
        from xtalsym.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        model, classes = bundle.load_model(map_location=device), bundle.classes
        extra = {"dataset_config": bundle.settings["dataset_config"]}
        engine = fusion.load_fusion(bundle, prior=args.prior)
    else:
        model, classes, extra = ev.load_model(args.checkpoint, device=device)
    present = ev.present_mask(_axes(args.axes), model)
    if args.dataset:
        metrics = ev.evaluate_dataset(model, classes, args.dataset, args.split, batch_size=args.batch_size, device=device,
                                   present=present, engine=engine)
        what = args.split
    else:
        metrics = ev.evaluate_structures(
            model, classes, args.structures, config=ev.build_config_from(extra), batch_size=args.batch_size,
            device=device, present=present, engine=engine,
        )
        what = "structures"
    metrics["checkpoint"] = str(args.checkpoint or Path(args.bundle) / "model.pt")
    metrics["model"] = getattr(model, "name", type(model).__name__)
    metrics["axes"] = _axes(args.axes) or list(ev.shaping.AXES)
    # never write into a bundle (it holds only what its manifest lists): beside the checkpoint, or here
    default_out = Path(f"evaluation-{what}") if args.bundle else Path(args.checkpoint).resolve().parent / f"evaluation-{what}"
    out = Path(args.out) if args.out else default_out
    paths = ev.write_outputs(metrics, out, title=f"{metrics['model']} on {what} ({metrics['samples']} samples)")
    print(ev.format_summary(metrics))
    print(f"\nmetrics: {paths['metrics']}\npredictions: {paths['predictions']}\nconfusion matrix: {paths['confusion']}"
          + (f"\nreliability diagram: {paths['reliability']}" if "reliability" in paths else ""))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from xtalsym.offline import evaluate as ev

    device = ev.resolve_device(args.device)
    if args.checkpoint:
        model, classes, extra = ev.load_model(args.checkpoint, device=device)
        return _predict_model_only(args, model, classes, ev.build_config_from(extra), device)
    from xtalsym import fusion
    from xtalsym.bundle import load_bundle
    from xtalsym.offline import fused

    bundle = load_bundle(args.bundle)
    model = bundle.load_model(map_location=device)
    classes = bundle.classes
    config = ev.build_config_from({"dataset_config": bundle.settings["dataset_config"]})
    engine = fusion.load_fusion(bundle, prior=args.prior)
    if engine is None:
        logging.getLogger(__name__).info("bundle %s has no fusion parameters: the model's own softmax over its %d classes", bundle.path, len(classes))
        return _predict_model_only(args, model, classes, config, device)
    labelled = ev.structures.load_structure(args.structure, symprec=config.symprec)
    axes = _axes(args.axes)
    ev.present_mask(axes, model)  # refuses unknown axes with one line
    result = fused.predict_structure(model.to("cpu"), engine, labelled, config=config, axes=axes,
                                     use_evidence=not args.no_evidence)
    print_fused(labelled, result, classes, as_json=args.json)
    return 0


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
        print(json.dumps(payload, indent=1))
        return
    known = "" if labelled.space_group in classes else " - not one of the model's classes"
    print(f"{labelled.material_id} {labelled.formula}: spglib space group {labelled.space_group} ({labelled.symbol}){known}")
    print(f"prediction: {prediction.headline()}")
    print(f"truth {labelled.symbol}: {_VERDICT_TEXT[verdict]}")
    print(f"crystal system: {prediction.crystal_system[0]} (p = {prediction.crystal_system[1]:.3f})   "
          f"Bravais lattice: {prediction.bravais_lattice[0]} (p = {prediction.bravais_lattice[1]:.3f})")
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
        print(f"{rank:>4}  {g.space_group:>3}  {g.symbol:<10} {spacegroups.crystal_system(g.space_group):<14} "
              f"{g.probability:>11.4f}  {'yes' if g.in_model_classes else 'no'}")
    print(f"prior: {prediction.prior}; views: {','.join(prediction.views)}; evidence "
          f"{'used' if prediction.evidence_used else 'not used'}")


_VERDICT_TEXT = {
    "top-1": "the most probable group",
    "in set": "in the predicted set (the data cannot separate it from the top group)",
    "candidate": "among the candidates of an undecided prediction",
    "wrong": "NOT in the predicted set",
}


def _predict_model_only(args: argparse.Namespace, model, classes, config, device: str) -> int:
    """The model's own top-5 (a checkpoint, or a bundle without fusion), with the evidence."""
    from xtalsym.offline import evaluate as ev

    labelled = ev.structures.load_structure(args.structure, symprec=config.symprec)
    top = ev.predict_structure(model, classes, labelled, axes=_axes(args.axes), config=config, device=device)
    found = None if args.no_evidence else ev.structure_evidence(labelled, config=config, axes=_axes(args.axes))
    if args.json:
        out = {"material_id": labelled.material_id, "true_space_group": labelled.space_group, "top": top}
        if found is not None:
            out["evidence"] = found.to_json()
        print(json.dumps(out, indent=1))
        return 0
    known = "" if labelled.space_group in classes else " - not one of the model's classes"
    print(f"{labelled.material_id} {labelled.formula}: spglib space group {labelled.space_group} ({labelled.symbol}){known}")
    print(f"{'rank':>4}  {'SG':>3}  {'symbol':<10} {'crystal system':<14} {'probability':>11}")
    for row in top:
        print(f"{row['rank']:>4}  {row['space_group']:>3}  {row['symbol']:<10} {row['crystal_system']:<14} {row['probability']:>11.4f}")
    if found is not None:
        from xtalsym.evidence import report

        print()
        print(report.format_text(found))
    return 0
