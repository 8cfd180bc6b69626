"""Data commands: `simulate pattern|dataset`, `shape`, `dataset show`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from xtalsym.cli import options

SYMPREC_HELP = (
    "spglib symmetry tolerance in Å (distance within which atoms count as symmetric images; "
    "default %(default)s, as Materials Project uses)"
)
STRUCTURE_HELP = "structure file (CIF, POSCAR/CONTCAR, XSF, CSSR, or JSON with a CIF or a pymatgen Structure)"
PATTERN_SUFFIXES = (".npy", ".png")


def register(commands: argparse._SubParsersAction) -> None:
    _register_simulate(commands)
    _register_shape(commands)
    _register_dataset(commands)


def _add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    from xtalsym.offline.simulate import Geometry

    default = Geometry()
    group = parser.add_argument_group("detector geometry (flat detector, beam at its centre)")
    group.add_argument(
        "--wavelength-m",
        type=float,
        default=default.wavelength_m,
        help="wavelength in metres (default %(default)s = 3.5 pm, the paper's)",
    )
    group.add_argument(
        "--distance-m",
        type=float,
        default=default.distance_m,
        help="sample-to-detector distance in metres (default %(default)s)",
    )
    group.add_argument(
        "--pixel-size-m", type=float, default=default.pixel_size_m, help="pixel edge in metres (default %(default)s)"
    )
    group.add_argument(
        "--pixels",
        type=int,
        default=default.pixels,
        help="detector side in pixels, N x N (default %(default)s, what the model takes)",
    )


def _geometry(args: argparse.Namespace):
    from xtalsym.offline.simulate import Geometry

    return Geometry(
        wavelength_m=args.wavelength_m,
        distance_m=args.distance_m,
        pixel_size_m=args.pixel_size_m,
        pixels=args.pixels,
    )


# --------------------------------------------------------------------------- simulate


def _register_simulate(commands) -> None:
    sim = commands.add_parser("simulate", help="simulate diffraction patterns or whole datasets")
    sub = sim.add_subparsers(dest="simulate_command", metavar="WHAT", required=True)

    pattern = sub.add_parser("pattern", help="one noise-free zone-axis pattern of a structure (.npy or .png)")
    pattern.add_argument("structure", help=STRUCTURE_HELP)
    pattern.add_argument(
        "--axis",
        choices=("x", "y", "z"),
        required=True,
        help="zone axis of the conventional standard cell along the beam (a along x, b in xy)",
    )
    _add_geometry_arguments(pattern)
    pattern.add_argument(
        "--supercell",
        type=int,
        nargs=3,
        metavar=("A", "B", "C"),
        help="unit cells along a, b, c in the simulated block (default: about 85 Å per edge)",
    )
    pattern.add_argument(
        "--scattering",
        choices=("xray", "electron"),
        default="xray",
        help="atomic form factors: X-ray (Cromer-Mann, as Condor) or electron (default %(default)s)",
    )
    pattern.add_argument("--symprec", type=float, default=0.1, help=SYMPREC_HELP)
    pattern.add_argument(
        "--out",
        required=True,
        help="output: .npy (float64 N x N photons per pixel, beam at the centre) or .png (a figure with axes in Å⁻¹)",
    )
    pattern.set_defaults(handler=_cmd_simulate_pattern)

    data = sub.add_parser("dataset", help="simulate and shape many structures into a sharded, resumable dataset")
    data.add_argument("--structures", nargs="*", default=[], metavar="SRC", help=options.STRUCTURES_HELP)
    data.add_argument(
        "--random-space-groups",
        metavar="LIST",
        help="pyxtal random crystals of these space groups, e.g. '1-230' or '14,62,225'",
    )
    data.add_argument("--random-per-group", type=int, default=0, metavar="N", help="random crystals per space group")
    data.add_argument("--random-seed", type=int, default=0, help="seed of the random crystals (default %(default)s)")
    data.add_argument("--out", required=True, help="dataset directory (resumed if it exists)")
    data.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    data.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask distributed cluster, e.g. tcp://host:8786")
    data.add_argument("--shard-size", type=int, default=64, help="structures per shard file (default %(default)s)")
    data.add_argument(
        "--shaping",
        choices=("fast", "reference"),
        default="fast",
        help="shaped-DP method: fast (same result, convex hulls) or reference (the authors' line by "
        "line drawing) (default %(default)s)",
    )
    data.add_argument(
        "--scattering", choices=("xray", "electron"), default="xray", help="atomic form factors (default %(default)s)"
    )
    data.add_argument("--symprec", type=float, default=0.1, help=SYMPREC_HELP)
    data.add_argument("--limit", type=int, help="only the first N input structures")
    data.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/val/test split by material (default %(default)s)"
    )
    data.add_argument(
        "--misorientation-deg",
        type=float,
        default=0.0,
        help="training data off the zone axes: turn each zone by N(0, σ) degrees about a random axis, "
        "seeded by the material (default %(default)s: on the axes)",
    )
    data.add_argument("--overwrite", action="store_true", help="discard an existing dataset in --out")
    options.no_progress(data)
    _add_geometry_arguments(data)
    data.set_defaults(handler=_cmd_simulate_dataset)


def _cmd_simulate_pattern(args: argparse.Namespace) -> int:
    import numpy as np

    from xtalsym.offline import simulate, structures
    from xtalsym.offline.images import save_pattern_png

    out = Path(args.out)
    if out.suffix.lower() not in PATTERN_SUFFIXES:
        raise ValueError(f"--out {out}: the file name must end in .npy (the float64 array) or .png (a picture)")
    geometry = _geometry(args)
    labelled = structures.load_structure(args.structure, symprec=args.symprec)
    intensity = simulate.simulate_pattern(
        labelled.structure,
        args.axis,
        geometry=geometry,
        supercell=tuple(args.supercell) if args.supercell else None,
        scattering=args.scattering,
    )
    what = f"{labelled.material_id} {labelled.formula} space group {labelled.space_group} ({labelled.symbol})"
    if out.suffix.lower() == ".png":
        save_pattern_png(intensity, out, q_per_pixel=geometry.q_per_pixel, title=f"{what}, axis {args.axis}")
        kind = f"PNG, {geometry.q_per_pixel:.5f} Å⁻¹ per pixel"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, intensity.astype(np.float64))
        kind = "float64"
    print(f"{what}, axis {args.axis}: {intensity.shape[0]}x{intensity.shape[1]} {kind} -> {out}")
    return 0


def _cmd_simulate_dataset(args: argparse.Namespace) -> int:
    from xtalsym import spacegroups
    from xtalsym.offline import dataset as ds

    if not args.structures and not args.random_space_groups:
        raise ValueError("nothing to simulate: give --structures and/or --random-space-groups")
    if not (math.isfinite(args.misorientation_deg) and args.misorientation_deg >= 0):
        raise ValueError(f"--misorientation-deg must be a finite number of degrees >= 0, got {args.misorientation_deg}")
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
        misorientation_deg=args.misorientation_deg,
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
    shape.add_argument(
        "raw", metavar="RAW_IMAGE", help="256x256 raw DP, beam at pixel (127, 127): PNG/TIFF/JPEG (grey) or .npy"
    )
    shape.add_argument(
        "--axis",
        choices=("x", "y", "z"),
        required=True,
        help="zone axis the pattern was taken along: its lines go in the R, G or B channel",
    )
    shape.add_argument(
        "--method",
        choices=("reference", "fast"),
        default="fast",
        help="reference: the authors' algorithm; fast: the same picture, faster (default %(default)s)",
    )
    shape.add_argument(
        "--size",
        type=int,
        choices=(224, 256),
        default=224,
        help="output side in pixels: 224 (the network input) or 256 (default %(default)s)",
    )
    shape.add_argument(
        "--out", required=True, help="output PNG, the model's pixels exactly; its text field gives the Å⁻¹ per pixel"
    )
    shape.add_argument(
        "--overlay",
        metavar="PNG",
        help="also write the raw DP with the indexed lattice and its indices (symmetry evidence)",
    )
    shape.add_argument(
        "--q-per-pixel",
        type=float,
        default=None,
        help="reciprocal-space scale of the raw DP in 1/Å per pixel (default: the training grid's)",
    )
    shape.set_defaults(handler=_cmd_shape)


def _cmd_shape(args: argparse.Namespace) -> int:
    from xtalsym import shaping
    from xtalsym.offline.images import read_raw_image, save_shaped_png
    from xtalsym.offline.simulate import Geometry

    raw = read_raw_image(args.raw)
    shaped = shaping.shape(raw, args.axis, method=args.method, size=args.size)
    # the raw DP's scale is the training geometry's (256 px); resizing to --size stretches it
    q_per_pixel = Geometry().q_per_pixel * shaping.RAW_SIZE / args.size
    out = save_shaped_png(
        shaped,
        args.out,
        q_per_pixel=q_per_pixel,
        note="if the raw DP was recorded at the training geometry (3.5 pm, 0.4 m, 75 µm pixels)",
    )
    print(
        f"{args.raw} -> {out} ({args.method}, axis {args.axis}, {shaped.shape[0]}x{shaped.shape[1]}, "
        f"{q_per_pixel:.5f} Å⁻¹ per pixel at the training geometry)"
    )
    if args.overlay:
        from xtalsym.evidence import analyse_frame, report

        grey = raw if raw.ndim == 2 else raw[..., 0]
        q = args.q_per_pixel if args.q_per_pixel is not None else Geometry().q_per_pixel
        frame = analyse_frame(grey, axis=args.axis, q_per_pixel=q)
        report.draw_overlay(grey, frame, args.overlay)
        state = (
            f"{int(frame.spots_indexed.sum())} indexed spots, 2D symmetry {frame.point_group_2d}"
            if frame.decided
            else f"cannot decide: {frame.reason}"
        )
        print(f"overlay: {args.overlay} ({state})")
    return 0


# --------------------------------------------------------------------------- dataset show


def _register_dataset(commands) -> None:
    data = commands.add_parser("dataset", help="inspect datasets")
    sub = data.add_subparsers(dest="dataset_command", metavar="WHAT", required=True)
    show = sub.add_parser("show", help="counts per space group and crystal system, and a PNG grid of examples")
    show.add_argument("dataset", metavar="DIR", help=options.DATASET_HELP)
    show.add_argument("--out", help="PNG grid with Å⁻¹ scale bars (default DIR/examples.png)")
    show.add_argument("--examples", type=int, default=8, help="rows in the grid (default %(default)s)")
    show.add_argument("--seed", type=int, default=0, help="seed of the choice of examples (default %(default)s)")
    show.add_argument("--json", action="store_true", help="print the counts as JSON")
    show.add_argument(
        "--overlay",
        metavar="DIR",
        help="also write, per example and axis, the raw DP with the indexed lattice (symmetry evidence)",
    )
    show.set_defaults(handler=_cmd_dataset_show)


def _cmd_dataset_show(args: argparse.Namespace) -> int:
    from xtalsym.offline import dataset_view

    summary = dataset_view.summarise(args.dataset)
    print(json.dumps(summary, indent=1) if args.json else dataset_view.format_summary(summary))
    out = Path(args.out) if args.out else Path(args.dataset) / "examples.png"
    dataset_view.save_example_grid(args.dataset, out, rows=args.examples, seed=args.seed)
    print(f"example grid: {out}")
    if args.overlay:
        paths = dataset_view.save_evidence_overlays(args.dataset, args.overlay, rows=args.examples, seed=args.seed)
        print(f"lattice overlays: {len(paths)} PNGs in {args.overlay}")
    return 0
