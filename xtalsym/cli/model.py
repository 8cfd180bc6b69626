"""Model commands: `model info|release` (what a named model is and costs; a release of a
trained one), `export` (ONNX graph) and `bundle build|verify|add-index|add-fusion`."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    _register_model(commands)
    _register_export(commands)


def _register_model(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="inspect the models (MSDN and baselines)")
    sub = model.add_subparsers(dest="model_command", metavar="WHAT", required=True)
    info = sub.add_parser(
        "info",
        help="parameters and multiply-adds of a model",
        description="Print a model's representation, views, parameter count and multiply-adds per sample.",
    )
    info.add_argument("name", help="model name: msdn, densenet-stacked, ziletti-cnn")
    info.add_argument("--classes", type=int, required=True, help="number of space-group classes")
    info.add_argument("--input-size", type=int, default=224, help="side of the network input (default %(default)s)")
    info.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, VALUE parsed as JSON where it can be (e.g. dropout=0.2); repeatable",
    )
    info.set_defaults(handler=_info)

    release = sub.add_parser(
        "release",
        help="weights + model card of a trained model, small enough to commit",
        description="Strip a training checkpoint to what inference needs and write model.pt, card.json and "
        "MODEL_CARD.md (data, split, config, measured accuracy).",
    )
    release.add_argument("--checkpoint", required=True, help="training checkpoint, e.g. RUN/best.pt")
    release.add_argument(
        "--evaluation", required=True, help="output folder of `xtalsym evaluate` on the held-out split"
    )
    release.add_argument("--out", required=True, help="release folder, e.g. models/msdn_paper72")
    release.add_argument("--name", help="release name (default: the --out folder's name)")
    release.set_defaults(handler=_release)


def _release(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xtalsym.offline.release import release_model

    name = args.name or Path(args.out).name
    card = release_model(args.checkpoint, args.evaluation, args.out, name=name)
    top = card["evaluation"].get("top_k") or {}
    print(
        f"released {name}: {card['weights']['file']} ({card['weights']['bytes'] / 1e6:.1f} MB), "
        f"top-1 {top.get('top1')}, top-5 {top.get('top5')} on {card['evaluation'].get('samples')} samples -> {args.out}"
    )
    return 0


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must be KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _info(args: argparse.Namespace) -> int:
    from xtalsym import model as models  # torch is imported only when the command runs

    m = models.build_model(args.name, args.classes, input_size=args.input_size, **_parse_options(args.option))
    print(models.describe(m))
    shape = " × ".join(str(n) for n in m.input_shape)
    print(f"representation: {m.representation} (input {shape} per sample, uint8 or float in [0, 255])")
    print(f"views: {m.views}, classes: {m.num_classes}, embedding: {models.EMBEDDING_DIM}")
    print(f"options: {json.dumps(m.options, sort_keys=True)}")
    return 0


# --------------------------------------------------------------------------- export and bundle


def _register_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch, 1-3 views)",
        description="Export a checkpoint's or bundle's model to ONNX: inputs x uint8 (B, 3, 3, H, W) and present "
        "bool (B, 3); outputs logits, probabilities, embeddings (B, 3, 960). Batch is dynamic.",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model checkpoint (model.pt of a release, or a training checkpoint)")
    source.add_argument("--bundle", help="bundle directory (its model.pt is exported)")
    export.add_argument("--out", required=True, help="output .onnx file")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    export.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="H = W of the shaped DPs the graph takes (default 224; the graph max-pools to the model's input size)",
    )
    export.add_argument(
        "--graph",
        choices=("whole", "view"),
        default="whole",
        help="whole: x (B, 3, 3, H, W) + present (model.onnx); view: one zone-axis view per row, "
        "view uint8 (N, 3, H, W) + axis int64 (N,) -> view_logits, view_embeddings (model_view.onnx; "
        "msdn only)",
    )
    export.add_argument(
        "--check",
        action="store_true",
        help="run onnx.checker and compare ONNX Runtime with torch on a mixed 1/2/3-view batch",
    )
    _int8_arguments(export)
    export.add_argument(
        "--int8-out", help="with --int8-calibration: where the int8 graph goes (default: OUT with _int8 before .onnx)"
    )
    export.set_defaults(handler=_export)

    bundle = commands.add_parser("bundle", help="build and verify model bundles (weights, ONNX, labels, index)")
    sub = bundle.add_subparsers(dest="bundle_command", metavar="WHAT", required=True)
    build = sub.add_parser(
        "build",
        help="bundle a release folder",
        description="Copy a release (`xtalsym model release`), export ONNX, add labels, settings, "
        "an optional reference index and a SHA-256 manifest; written atomically.",
    )
    build.add_argument("--release", required=True, help="release folder with model.pt, card.json, MODEL_CARD.md")
    build.add_argument("--out", required=True, help="bundle directory to create")
    build.add_argument("--index", help="reference index directory (xtalsym index build) made with this model")
    build.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (torch backend only)")
    build.add_argument("--image-size", type=int, default=None, help="shaped-DP size the ONNX graph takes (default 224)")
    build.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    build.add_argument(
        "--no-view-graph",
        action="store_true",
        help="skip the per-view graph model_view.onnx (the daemon then runs the whole graph per request)",
    )
    _int8_arguments(build)
    build.add_argument(
        "--int8-test",
        metavar="DATASET",
        help="dataset whose test split measures int8 against fp32; the result goes into the model card",
    )
    build.add_argument(
        "--int8-test-limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N test samples (default: all of the model's classes)",
    )
    build.set_defaults(handler=_build)

    verify = sub.add_parser(
        "verify",
        help="check a bundle against its manifest",
        description="Verify every file's size and SHA-256, refuse unlisted files and an index "
        "built by another model; prints OK and the model identity.",
    )
    verify.add_argument("path", nargs="?", help="bundle directory (default: the shipped/default bundle)")
    verify.set_defaults(handler=_verify)

    add = sub.add_parser(
        "add-index",
        help="put a reference index into an existing bundle",
        description="Copy INDEX_DIR into BUNDLE/index (replacing any index), after checking that "
        "its index.json model_id is the bundle's, and rewrite the manifest.",
    )
    add.add_argument("bundle", help="bundle directory")
    add.add_argument("index", help="reference index directory")
    add.set_defaults(handler=_add_index)

    fuse = sub.add_parser(
        "add-fusion",
        help="put fusion parameters (fusion.json) into an existing bundle",
        description="Copy PARAMS into BUNDLE/fusion.json (replacing any), after checking that they "
        "parse and were fitted for the bundle's classes; record the fit in the model card; rewrite "
        "the manifest. Fit them with benchmarks/fusion.py --write-params.",
    )
    fuse.add_argument("bundle", help="bundle directory")
    fuse.add_argument("params", help="fusion parameters (JSON, xtalsym-fusion/1)")
    fuse.set_defaults(handler=_add_fusion)


def _int8_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--int8-calibration",
        metavar="DATASET",
        help="dataset (xtalsym simulate dataset) whose train split calibrates an int8 (QDQ) version of "
        "the per-view graph for the CPU (model_view_int8.onnx)",
    )
    parser.add_argument(
        "--int8-samples",
        type=int,
        default=None,
        metavar="N",
        help="training samples (3 views each) to calibrate on (default 128: calibration holds every activation of every view in memory)",
    )
    parser.add_argument(
        "--int8-method",
        choices=("minmax", "percentile", "entropy"),
        default="percentile",
        help="activation ranges from the calibration data (default %(default)s)",
    )
    parser.add_argument(
        "--int8-percentile",
        type=float,
        default=99.999,
        metavar="P",
        help="with --int8-method percentile: the percentile of each activation kept in range (default %(default)s)",
    )
    parser.add_argument(
        "--int8-keep-fp32",
        default="heads",
        metavar="PARTS",
        help="comma-separated parts left fp32: heads, stem, concat, pool, or none (default %(default)s)",
    )


def _int8_options(args: argparse.Namespace) -> dict:
    """quantise_view_graph's keyword arguments from the --int8-* options."""
    from xtalsym.inference.quantise import KEEP_FP32

    parts = tuple(p.strip() for p in args.int8_keep_fp32.split(",") if p.strip() and p.strip() != "none")
    unknown = [p for p in parts if p not in KEEP_FP32]
    if unknown:  # before the export and calibration, not minutes into them
        raise ValueError(f"--int8-keep-fp32: unknown part {unknown[0]!r}; known: {', '.join(KEEP_FP32)}, none")
    if not 0 < args.int8_percentile <= 100:
        raise ValueError(f"--int8-percentile must be in (0, 100], got {args.int8_percentile}")
    return {"percentile": args.int8_percentile, "keep_fp32": parts}


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xtalsym import model as models
    from xtalsym.inference import export as onnx_export

    int8_options = _int8_options(args) if args.int8_calibration else {}
    if args.bundle:
        from xtalsym.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        model = bundle.load_model()
        image_size = args.image_size or bundle.image_size
    else:
        model, _ = models.load_checkpoint(args.checkpoint)
        image_size = args.image_size or onnx_export.DEFAULT_IMAGE_SIZE
    graph = args.graph
    if args.int8_calibration and graph != "view":
        graph = "view"  # int8 is made of the per-view graph only
        print("--int8-calibration: exporting the per-view graph (--graph view)")
    if graph == "view" and not onnx_export.per_view_supported(model):
        raise ValueError(f"--graph view needs a model that sums its views (msdn), not {model.name!r}")
    out = onnx_export.export_onnx(
        model, args.out, image_size=image_size, opset=args.opset or onnx_export.DEFAULT_OPSET, graph=graph
    )
    layout = (
        f"x uint8 (B, 3, 3, {image_size}, {image_size})"
        if graph == "whole"
        else f"view uint8 (N, 3, {image_size}, {image_size}), axis int64 (N,)"
    )
    print(
        f"exported {model.name} (input {model.input_size}, {model.num_classes} classes) -> {out} "
        f"({Path(out).stat().st_size / 1e6:.1f} MB, {layout})"
    )
    if args.int8_calibration:
        from xtalsym.inference import quantise

        int8_out = Path(args.int8_out) if args.int8_out else Path(out).with_name(Path(out).stem + "_int8.onnx")
        info = quantise.quantise_view_graph(
            out,
            int8_out,
            calibration_dataset=args.int8_calibration,
            samples=args.int8_samples or quantise.DEFAULT_CALIBRATION_SAMPLES,
            method=args.int8_method,
            **int8_options,
        )
        print(
            f"int8 (QDQ) -> {int8_out} ({int8_out.stat().st_size / 1e6:.1f} MB), calibrated on "
            f"{info['calibration']['samples']} train samples of {args.int8_calibration} ({args.int8_method})"
        )
    if args.check and graph == "view":
        report = onnx_export.check_view_onnx(model, out, batch=7)
        print(
            "check OK: onnx.checker passed; per-view ONNX Runtime vs torch on 7 samples (1-3 views, summed): "
            f"max |Δp| {report['max_abs_probabilities']:.2e}, max |Δlogits| {report['max_abs_logits']:.2e}, "
            f"max |Δembeddings| {report['max_abs_embeddings']:.2e}, top-1 agreement {report['top1_agreement']:.3f}"
        )
    elif args.check:
        report = onnx_export.check_onnx(model, out, batch=7)
        print(
            "check OK: onnx.checker passed; ONNX Runtime vs torch on 7 samples (1-3 views): "
            f"max |Δp| {report['max_abs_probabilities']:.2e}, max |Δlogits| {report['max_abs_logits']:.2e}, "
            f"max |Δembeddings| {report['max_abs_embeddings']:.2e}, top-1 agreement {report['top1_agreement']:.3f}"
        )
    return 0


def _build(args: argparse.Namespace) -> int:
    from xtalsym.bundle import build_bundle, load_bundle

    out = build_bundle(
        args.release,
        args.out,
        index_dir=args.index,
        onnx=not args.no_onnx,
        image_size=args.image_size,
        opset=args.opset,
        overwrite=args.overwrite,
        view_graph=not args.no_view_graph,
        int8_calibration=args.int8_calibration,
        int8_samples=args.int8_samples,
        int8_method=args.int8_method,
        int8_options=_int8_options(args),
        int8_test=args.int8_test,
        int8_test_limit=args.int8_test_limit,
    )
    bundle = load_bundle(out)
    print(
        f"bundle {out}: model_id {bundle.model_id}, {len(bundle.manifest['files'])} files"
        + (", per-view graph" if bundle.view_onnx_path else "")
        + (", int8" if bundle.int8_onnx_path else "")
        + (", with index" if bundle.index_dir else "")
    )
    accuracy = ((bundle.manifest.get("onnx") or {}).get("int8") or {}).get("accuracy")
    if accuracy:
        lo, hi = accuracy["delta_top1_ci95"]
        print(
            f"int8 vs fp32 on {accuracy['samples']} test samples: top-1 {accuracy['top1_int8'] * 100:.2f} % vs "
            f"{accuracy['top1_fp32'] * 100:.2f} % ({accuracy['delta_top1'] * 100:+.2f} points, 95 % CI "
            f"{lo * 100:+.2f} to {hi * 100:+.2f})"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from xtalsym.bundle import default_bundle_path, load_bundle

    path = args.path or default_bundle_path()
    bundle = load_bundle(path)
    spec = bundle.model_spec
    total = sum(entry["bytes"] for entry in bundle.manifest["files"].values())
    print(f"OK {bundle.path}: model_id {bundle.model_id}")
    print(
        f"  model {spec['name']} (input {spec['input_size']}, {spec['num_classes']} classes), "
        f"{len(bundle.manifest['files'])} files, {total / 1e6:.1f} MB, xtalsym {bundle.manifest.get('xtalsym_version')}, "
        f"onnx {'yes' if bundle.onnx_path else 'no'}, per-view graph {'yes' if bundle.view_onnx_path else 'no'}, "
        f"int8 {'yes' if bundle.int8_onnx_path else 'no'}, index {'yes' if bundle.index_dir else 'no'}, "
        f"fusion {'yes' if bundle.fusion_path else 'no'}"
    )
    return 0


def _add_index(args: argparse.Namespace) -> int:
    from xtalsym.bundle import add_index, load_bundle

    add_index(args.bundle, args.index)
    bundle = load_bundle(args.bundle)
    print(f"bundle {bundle.path}: index added, model_id {bundle.model_id}, {len(bundle.manifest['files'])} files")
    return 0


def _add_fusion(args: argparse.Namespace) -> int:
    from xtalsym.bundle import add_fusion, load_bundle

    add_fusion(args.bundle, args.params)
    bundle = load_bundle(args.bundle)
    print(f"bundle {bundle.path}: fusion added, model_id {bundle.model_id}, {len(bundle.manifest['files'])} files")
    return 0
