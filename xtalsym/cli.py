"""The `xtalsym` command: one parser, sub-commands registered explicitly per area."""

from __future__ import annotations

import argparse
import logging
import sys

from xtalsym import __version__, logsetup


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from xtalsym import export_cli, index_cli, model_cli
    from xtalsym.daemon import classify_cli
    from xtalsym.daemon import cli as daemon_cli
    from xtalsym.offline import cli as offline_cli
    from xtalsym.offline import evaluate as evaluate_cli
    from xtalsym.offline import train_config

    parser = argparse.ArgumentParser(
        prog="xtalsym",
        description="Crystal-symmetry classification from diffraction patterns.",
    )
    parser.add_argument("--version", action="version", version=f"xtalsym {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    offline_cli.register(commands)
    # These import torch only when their command runs, so the offline commands work
    # without the `ml` extra.
    model_cli.register(commands)
    train_config.register(commands)
    evaluate_cli.register(commands)
    export_cli.register(commands)
    index_cli.register(commands)
    daemon_cli.register(commands)
    classify_cli.register(commands)
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
