"""Data commands: `simulate pattern|dataset`, `shape`, `dataset show`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from xtalsym import shaping, spacegroups
from xtalsym.offline import simulate


def register(commands: argparse._SubParsersAction) -> None:
    _register_simulate(commands)
    _register_shape(commands)
    _register_dataset(commands)


def _add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    default = simulate.Geometry()
    group = parser.add_argument_group("detector geometry")
    group.add_argument("--wavelength-m", type=float, default=default.wavelength_m, help="default %(default)s")
    group.add_argument("--distance-m", type=float, default=default.distance_m, help="default %(default)s")
    group.add_argument("--pixel-size-m", type=float, default=default.pixel_size_m, help="default %(default)s")
    group.add_argument("--pixels", type=int, default=default.pixels, help="default %(default)s")


def _geometry(args: argparse.Namespace) -> simulate.Geometry:
    return simulate.Geometry(
        wavelength_m=args.wavelength_m,
        distance_m=args.distance_m,
        pixel_size_m=args.pixel_size_m,
        pixels=args.pixels,
    )


# --------------------------------------------------------------------------- simulate


def _register_simulate(commands) -> None:
    sim = commands.add_parser("simulate", help="simulate diffraction patterns or whole datasets")
    sub = sim.add_subparsers(dest="simulate_command", metavar="WHAT", required=True)

    pattern = sub.add_parser("pattern", help="one noise-free zone-axis pattern of a structure, as float64 .npy")
    pattern.add_argument("structure", help="CIF file, or a JSON file holding a CIF or a pymatgen Structure")
    pattern.add_argument("--axis", choices=simulate.AXES, required=True)
    _add_geometry_arguments(pattern)
    pattern.add_argument("--supercell", type=int, nargs=3, metavar=("A", "B", "C"), help="cells in the block")
    pattern.add_argument("--scattering", choices=("xray", "electron"), default="xray")
    pattern.add_argument("--symprec", type=float, default=0.1)
    pattern.add_argument("--out", required=True, help="output .npy (float64, N x N, beam at the centre)")
    pattern.set_defaults(handler=_cmd_simulate_pattern)

    data = sub.add_parser("dataset", help="simulate and shape many structures into a sharded, resumable dataset")
    data.add_argument("--structures", nargs="*", default=[], metavar="SRC", help="CIF files/folders or JSONL files")
    data.add_argument("--random-space-groups", metavar="LIST", help="pyxtal random crystals for e.g. '1-230' or '14,62,225'")
    data.add_argument("--random-per-group", type=int, default=0, metavar="N")
    data.add_argument("--random-seed", type=int, default=0)
    data.add_argument("--out", required=True, help="dataset directory (resumed if it exists)")
    data.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    data.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask distributed cluster, e.g. tcp://host:8786")
    data.add_argument("--shard-size", type=int, default=64)
    data.add_argument("--shaping", choices=("fast", "reference"), default="fast")
    data.add_argument("--scattering", choices=("xray", "electron"), default="xray")
    data.add_argument("--symprec", type=float, default=0.1)
    data.add_argument("--limit", type=int, help="only the first N input structures")
    data.add_argument("--split-seed", type=int, default=0)
    data.add_argument("--overwrite", action="store_true", help="discard an existing dataset in --out")
    data.add_argument("--no-progress", action="store_true")
    _add_geometry_arguments(data)
    data.set_defaults(handler=_cmd_simulate_dataset)


def _cmd_simulate_pattern(args: argparse.Namespace) -> int:
    from xtalsym.offline import structures

    labelled = structures.load_structure(args.structure, symprec=args.symprec)
    intensity = simulate.simulate_pattern(
        labelled.structure,
        args.axis,
        geometry=_geometry(args),
        supercell=tuple(args.supercell) if args.supercell else None,
        scattering=args.scattering,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, intensity.astype(np.float64))
    print(
        f"{labelled.material_id} {labelled.formula} space group {labelled.space_group} ({labelled.symbol}), "
        f"axis {args.axis}: {intensity.shape[0]}x{intensity.shape[1]} float64 -> {out}"
    )
    return 0


def _cmd_simulate_dataset(args: argparse.Namespace) -> int:
    from xtalsym.offline import dataset as ds

    if not args.structures and not args.random_space_groups:
        raise ValueError("nothing to simulate: give --structures and/or --random-space-groups")
    if args.random_space_groups and args.random_per_group < 1:
        raise ValueError(f"--random-per-group must be >= 1 with --random-space-groups, got {args.random_per_group}")
    groups = spacegroups.parse_list(args.random_space_groups) if args.random_space_groups else []
    records, read_errors = ds.collect_records(
        args.structures,
        random_space_groups=groups,
        random_per_group=args.random_per_group,
        random_seed=args.random_seed,
        limit=args.limit,
    )
    if not records:
        raise ValueError(f"no structures found in {args.structures}")
    config = ds.BuildConfig(
        geometry=_geometry(args),
        shaping_method=args.shaping,
        symprec=args.symprec,
        scattering=args.scattering,
        shard_size=args.shard_size,
        split_seed=args.split_seed,
    )
    inputs = {
        "structures": [str(Path(s).resolve()) for s in args.structures],
        "random_space_groups": groups,
        "random_per_group": args.random_per_group,
        "random_seed": args.random_seed,
        "limit": args.limit,
        "records": len(records),
    }
    summary = ds.build_dataset(
        records,
        args.out,
        config=config,
        inputs=inputs,
        workers=args.workers,
        scheduler=args.scheduler,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        read_errors=read_errors,
    )
    print(summary.describe())
    return 0


# --------------------------------------------------------------------------- shape


def _register_shape(commands) -> None:
    shape = commands.add_parser("shape", help="shape one raw DP (image or .npy) into what the model sees")
    shape.add_argument("raw", metavar="RAW_IMAGE", help="256x256 raw DP: PNG/TIFF/JPEG (grey) or .npy")
    shape.add_argument("--axis", choices=shaping.AXES, required=True)
    shape.add_argument("--method", choices=("reference", "fast"), default="fast")
    shape.add_argument("--size", type=int, choices=(shaping.MODEL_SIZE, shaping.RAW_SIZE), default=shaping.MODEL_SIZE)
    shape.add_argument("--out", required=True, help="output PNG")
    shape.set_defaults(handler=_cmd_shape)


def read_raw_image(path: str | Path) -> np.ndarray:
    """A raw DP from .npy (any numeric dtype) or an image file (converted to grey)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"raw image not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"cannot read {path} as a numeric .npy array: {exc}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L") if image.mode not in ("L", "I;16", "I", "F") else image)
    except UnidentifiedImageError:
        raise ValueError(f"not an image or .npy file: {path}") from None


def _cmd_shape(args: argparse.Namespace) -> int:
    from PIL import Image

    raw = read_raw_image(args.raw)
    shaped = shaping.shape(raw, args.axis, method=args.method, size=args.size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shaped).save(out)
    print(f"{args.raw} -> {out} ({args.method}, axis {args.axis}, {shaped.shape[0]}x{shaped.shape[1]})")
    return 0


# --------------------------------------------------------------------------- dataset show


def _register_dataset(commands) -> None:
    data = commands.add_parser("dataset", help="inspect datasets")
    sub = data.add_subparsers(dest="dataset_command", metavar="WHAT", required=True)
    show = sub.add_parser("show", help="counts per space group and crystal system, and a PNG grid of examples")
    show.add_argument("dataset", metavar="DIR")
    show.add_argument("--out", help="PNG grid (default DIR/examples.png)")
    show.add_argument("--examples", type=int, default=8, help="rows in the grid (default %(default)s)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--json", action="store_true", help="print the counts as JSON")
    show.set_defaults(handler=_cmd_dataset_show)


def _cmd_dataset_show(args: argparse.Namespace) -> int:
    from xtalsym.offline import dataset_view

    summary = dataset_view.summarise(args.dataset)
    print(json.dumps(summary, indent=1) if args.json else dataset_view.format_summary(summary))
    out = Path(args.out) if args.out else Path(args.dataset) / "examples.png"
    dataset_view.save_example_grid(args.dataset, out, rows=args.examples, seed=args.seed)
    print(f"example grid: {out}")
    return 0
