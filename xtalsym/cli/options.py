"""Options that several commands take, written once so that their names, defaults and help
stay the same everywhere (the model to use, the inputs, the fusion's prior, ...)."""

from __future__ import annotations

import argparse

STRUCTURES_HELP = "structure files (CIF, POSCAR, XSF, ...), folders of them, or JSON-lines files (.jsonl[.xz])"
DATASET_HELP = "dataset directory (xtalsym simulate dataset)"


def model_source(parser: argparse.ArgumentParser, *, required: bool, device_for: str = "") -> None:
    """``--checkpoint FILE`` or ``--bundle DIR`` (without ``required``: the shipped bundle when
    neither is given) and ``--device``; ``device_for`` names what the device is used for."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--bundle",
        metavar="DIR",
        help="model bundle, verified against its manifest.json"
        + ("" if required else " (default: the shipped bundle, or $XTALSYM_BUNDLE)"),
    )
    group.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="training checkpoint, e.g. RUN/best.pt (a model.pt inside a bundle is verified as that bundle)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help=f"torch device{' for ' + device_for if device_for else ''}: auto (CUDA when available), cpu, cuda, "
        "cuda:N (default %(default)s)",
    )


def dataset_or_structures(parser: argparse.ArgumentParser) -> None:
    """The inputs: ``--dataset DIR`` (stored DPs) or ``--structures SRC ...`` (simulated on the fly)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="DIR", help=DATASET_HELP)
    source.add_argument("--structures", nargs="+", metavar="SRC", help=STRUCTURES_HELP)


def prior(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prior",
        default=None,
        help="prior of the bundle's fusion: training (default), flat, or a JSON file {space group: weight}",
    )


def no_evidence(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-evidence",
        action="store_true",
        help="skip the symmetry evidence (cell, Bravais lattice, absences) measured in the patterns",
    )


def no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (on a terminal) or progress log lines (otherwise)"
    )
