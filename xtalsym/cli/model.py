"""Model commands: `model info|release` (what a named model is and costs; a release of a
trained one), `export` (ONNX graph) and `bundle build|verify|add-index`."""

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
        "--check",
        action="store_true",
        help="run onnx.checker and compare ONNX Runtime with torch on a mixed 1/2/3-view batch",
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


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xtalsym import model as models
    from xtalsym.inference import export as onnx_export

    if args.bundle:
        from xtalsym.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        model = bundle.load_model()
        image_size = args.image_size or bundle.image_size
    else:
        model, _ = models.load_checkpoint(args.checkpoint)
        image_size = args.image_size or onnx_export.DEFAULT_IMAGE_SIZE
    out = onnx_export.export_onnx(model, args.out, image_size=image_size, opset=args.opset or onnx_export.DEFAULT_OPSET)
    print(
        f"exported {model.name} (input {model.input_size}, {model.num_classes} classes) -> {out} "
        f"({Path(out).stat().st_size / 1e6:.1f} MB, x uint8 (B, 3, 3, {image_size}, {image_size}))"
    )
    if args.check:
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
    )
    bundle = load_bundle(out)
    print(
        f"bundle {out}: model_id {bundle.model_id}, {len(bundle.manifest['files'])} files"
        + (", with index" if bundle.index_dir else "")
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
        f"onnx {'yes' if bundle.onnx_path else 'no'}, index {'yes' if bundle.index_dir else 'no'}"
    )
    return 0


def _add_index(args: argparse.Namespace) -> int:
    from xtalsym.bundle import add_index, load_bundle

    add_index(args.bundle, args.index)
    bundle = load_bundle(args.bundle)
    print(f"bundle {bundle.path}: index added, model_id {bundle.model_id}, {len(bundle.manifest['files'])} files")
    return 0
