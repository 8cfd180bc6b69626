"""The `xtalsym` command: one argparse parser, one module per command group.

- :mod:`xtalsym.cli.data`: ``simulate pattern|dataset``, ``shape``, ``dataset show``
- :mod:`xtalsym.cli.train`: ``train``, ``evaluate``, ``predict``
- :mod:`xtalsym.cli.model`: ``model info|release``, ``export``, ``bundle build|verify|add-index``
- :mod:`xtalsym.cli.index`: ``index build|query|evaluate``
- :mod:`xtalsym.cli.daemon`: ``serve``, ``detector-sim``, ``listen``, ``demo``

Each handler parses its arguments and calls one library function; heavy packages
(torch, FAISS, ZeroMQ, ...) are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from xtalsym import __version__, logsetup


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from xtalsym.cli import daemon, data, index, model, train

    parser = argparse.ArgumentParser(
        prog="xtalsym",
        description="Crystal-symmetry classification from diffraction patterns.",
    )
    parser.add_argument("--version", action="version", version=f"xtalsym {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data.register(commands)
    model.register(commands)
    train.register(commands)
    index.register(commands)
    daemon.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logsetup.configure(level)  # no timestamps of our own when stderr is the journal
    try:
        return int(args.handler(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as exc:
        # Our error types subclass ValueError and carry a message that names the
        # problem and the value; the user gets that line, not a traceback.
        print(f"xtalsym: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print(
            "xtalsym: error: this command needs PyTorch: pip install torch==2.13.0 (CPU) "
            "or a CUDA build, then pip install 'xtalsym[ml]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("xtalsym: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
