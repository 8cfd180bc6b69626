"""`xtalsym classify` (recorded data): frames from files through the daemon's calibration, shaping and
inference (:mod:`xtalsym.daemon.classify`); predictions as JSON lines and CSV."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _classify(args) -> int:
    from xtalsym.daemon.classify import classify_recorded
    from xtalsym.daemon.config import load_config
    from xtalsym.daemon.service import load_components

    overrides: dict = {}
    if args.bundle:
        overrides.setdefault("bundle", {})["path"] = args.bundle
    if args.workers is not None:
        overrides.setdefault("pipeline", {})["workers"] = args.workers
    config = load_config(args.config, overrides=overrides)
    jsonl = Path(f"{args.output}.jsonl")
    csv_path = None if args.no_csv else Path(f"{args.output}.csv")
    for path in (jsonl, csv_path):
        if path is not None and path.exists() and not args.force:
            raise FileExistsError(f"{path} exists; choose another --output or pass --force")
    components = load_components(config)
    summary = classify_recorded(args.inputs, config=config, components=components, jsonl_path=jsonl,
                                csv_path=csv_path, partial=args.partial)
    print(summary.line(), file=sys.stderr)
    print(f"predictions: {jsonl}" + (f", {csv_path}" if csv_path else ""), file=sys.stderr)
    return 0 if summary.frames else 2


def register(commands) -> None:
    p = commands.add_parser(
        "classify", help="classify recorded frames (EIGER/NeXus HDF5, TIFF, CBF, PNG, .npy) offline",
        description="Classify recorded frames through the daemon's own calibration, shaping and inference: "
                    "geometry from the NeXus fields of an HDF5 master file (overridden by the TOML's [geometry]), "
                    "or from the TOML alone for TIFF / CBF / PNG / .npy images. Axes in image-id order "
                    "(assembly.axis_order). Writes OUTPUT.jsonl (schema xtalsym.prediction/2, docs/DAEMON.md) "
                    "and OUTPUT.csv.")
    p.add_argument("inputs", nargs="+", help="HDF5 master files (…_master.h5) and/or image files; images given "
                                             "together form one series in the order given")
    p.add_argument("--config", help="the daemon's TOML configuration ([geometry], [calibration], [assembly], "
                                    "[pipeline], [index], [bundle])")
    p.add_argument("--bundle", help="bundle directory (overrides bundle.path)")
    p.add_argument("-o", "--output", default="xtalsym-predictions", help="output prefix (default %(default)s)")
    p.add_argument("--partial", action="store_true", help="also write the partial predictions (1 and 2 axes)")
    p.add_argument("--no-csv", action="store_true", help="JSON lines only")
    p.add_argument("--workers", type=int, help="shaping processes (overrides pipeline.workers)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(handler=_classify)
