"""The `xtalsym` command: one argparse parser, one module per command group.

- :mod:`xtalsym.cli.data`: ``simulate pattern|dataset``, ``shape``, ``dataset show``
- :mod:`xtalsym.cli.model`: ``model info|release``, ``export``, ``bundle build|verify|add-index``
- :mod:`xtalsym.cli.train`: ``train``, ``evaluate``, ``predict``
- :mod:`xtalsym.cli.index`: ``index build|query|evaluate``
- :mod:`xtalsym.cli.daemon`: ``serve``, ``detector-sim``, ``listen``, ``demo``

Each handler parses its arguments and calls one library function. Only the core
dependencies are imported while the parser is built; a command whose optional
dependency is missing exits 2 with one line naming the extra to install.
"""

from __future__ import annotations

import argparse
import os
import sys

from xtalsym import __version__, logsetup
from xtalsym.inference.base import BackendUnavailable

# Optional modules -> what installs them (pyproject.toml's extras).
EXTRAS = {
    "torch": "pip install torch==2.13.0 (CPU; or a CUDA build), then pip install 'xtalsym[ml]'",
    "onnx": "pip install 'xtalsym[ml]'",
    "onnxscript": "pip install 'xtalsym[ml]'",
    "onnxruntime": "pip install 'xtalsym[daemon]' (or 'xtalsym[ml]')",
    "faiss": "pip install 'xtalsym[daemon]' (or 'xtalsym[ml]')",
    "zmq": "pip install 'xtalsym[daemon]'",
    "cbor2": "pip install 'xtalsym[daemon]'",
    "lz4": "pip install 'xtalsym[daemon]'",
    "dectris_compression": "pip install 'xtalsym[daemon]'",
    "prometheus_client": "pip install 'xtalsym[daemon]'",
    "dask": "pip install 'xtalsym[distributed]'",
    "distributed": "pip install 'xtalsym[distributed]'",
    "tensorrt": "pip install 'xtalsym[gpu]'",
}


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from xtalsym.cli import classify, daemon, data, index, model, train

    parser = argparse.ArgumentParser(
        prog="xtalsym",
        description="Crystal-symmetry classification from diffraction patterns.",
    )
    parser.add_argument("--version", action="version", version=f"xtalsym {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: xtalsym's debug messages; -vv: also those of the libraries it uses (FAISS, "
        "spglib, ONNX Runtime, ...). Default: xtalsym's progress and warnings",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data.register(commands)
    model.register(commands)
    train.register(commands)
    index.register(commands)
    daemon.register(commands)
    classify.register(commands)
    return parser


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line hint for a missing optional module, None for any other module."""
    top = (exc.name or "").split(".")[0]
    hint = EXTRAS.get(top)
    return f"this command needs the '{top}' module: {hint}" if hint else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.configure_cli(args.verbose)  # no timestamps of our own when stderr is the journal
    if args.verbose >= 2:
        os.environ.setdefault("SPGLIB_WARNING", "ON")  # the C library's own messages too
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return status
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as exc:
        # Our error types subclass ValueError and carry a message that names the
        # problem and the value; the user gets that line, not a traceback.
        print(f"xtalsym: error: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:  # no inference backend can run here: the reasons name what to install
        print(f"xtalsym: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        # a missing optional module, or a module of ours saying which extra it needs
        # (``raise ImportError("... pip install ...") from ModuleNotFoundError``)
        cause = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
        hint = missing_extra(cause) if isinstance(cause, ModuleNotFoundError) else None
        if hint is None:
            raise
        message = hint if exc is cause else f"{exc}"
        print(f"xtalsym: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `xtalsym ... | head`: the reader left. Point stdout at /dev/null so the flush
        # at exit cannot raise again, and say so once.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("xtalsym: error: output closed by the reader (broken pipe); the rest was not written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xtalsym: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
