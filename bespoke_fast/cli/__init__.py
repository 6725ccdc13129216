"""The ``bespoke-fast`` command line: ``demo``, ``fit``, ``gt``, ``train``, ``eval``, ``sample``,
``doctor``.

Each sub-command has ``--help``; long work shows progress bars on stderr; ``--json`` prints a
machine-readable summary on stdout. Errors that are the user's to fix (the library's
``BespokeFastError`` types, bad options, and permission / disk-full / missing-file / is-a-directory
``OSError``) are one line on stderr and exit code 2; ``--debug`` shows their traceback instead.
Anything else is a bug and keeps its traceback.

Layout: one module per command (``demo``, ``fit``, ``gt``, ``train``, ``eval``, ``sample``,
``doctor``), each with ``register(sub)`` (its parser) and ``run(args)``; ``common`` holds the
options, loaders and error mapping they share. ``python -m bespoke_fast.cli`` runs :func:`main`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .. import __version__
from . import demo, doctor, eval, fit, gt, sample, train
from .common import CLIError, fill_defaults, user_error

__all__ = ["main", "build_parser"]

_COMMANDS = (demo, fit, gt, train, eval, sample, doctor)   # in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bespoke-fast",
        description="Fit Bespoke solvers to flow models and sample fast. "
                    "Data flow: model -> gt -> train -> solver file -> eval / sample.")
    parser.add_argument("--version", action="version", version=f"bespoke_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        fill_defaults(args)
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"bespoke-fast {args.command}: interrupted (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- only the user's errors are mapped; bugs re-raise
        message = user_error(e, getattr(args, "model_object", None))
        if message is None or args.debug:
            raise
        print(f"bespoke-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    return rc or 0

