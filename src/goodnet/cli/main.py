"""The ``goodnet`` command: thin wrappers that parse arguments into settings and call the library.

The ``goodnet`` parser and :func:`main`: every error a user can cause ends in one line on
stderr (``goodnet: error: ...``) and a non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from goodnet.cli import (
    attack,
    bench,
    demo,
    evaluate,
    export,
    finetune,
    imports,
    info,
    listing,
    predict,
    repair,
    report,
    scan,
    zoo,
)
from goodnet.cli.options import EXIT_ERROR, EXIT_INTERRUPTED, ArgumentParser
from goodnet.errors import GoodnetError
from goodnet.version import __version__


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="goodnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"goodnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--progress", dest="progress", action="store_true",
                        default=sys.stderr.isatty(),
                        help="progress bars (default: on when stderr is a terminal)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add in (demo.add_demo, attack.add_attack, attack.add_train, evaluate.add_eval, zoo.add_zoo,
                bench.add_bench, report.add_report, scan.add_scan, repair.add_repair,
                finetune.add_finetune, predict.add_predict, info.add_info, imports.add_import,
                export.add_export, listing.add_list):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.showwarning = _one_line_warning
        return _run(args)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """A warning (a renamed setting, say) as one line on stderr."""
    print(f"goodnet: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except GoodnetError as error:
        if args.debug:
            raise
        print(f"goodnet: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("goodnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (goodnet predict ... | head): stop quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so exit's flush cannot fail
        return EXIT_ERROR
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print("goodnet: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug in goodnet: say so in one line; --debug shows it
        if args.debug:
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        print(f"goodnet: internal error: {type(error).__name__}: {first} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1

