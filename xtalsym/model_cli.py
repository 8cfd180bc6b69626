"""`xtalsym model info`: what a named model is and what it costs."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
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
    release.add_argument("--evaluation", required=True, help="output folder of `xtalsym evaluate` on the held-out split")
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
