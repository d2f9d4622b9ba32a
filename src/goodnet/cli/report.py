"""``goodnet report``: tables, CSV, plots and an HTML page from bench results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.bench import write_report
from goodnet.cli.options import Commands


def cmd_report(args: argparse.Namespace) -> int:
    results = Path(args.results)
    out = args.out or (results if results.is_dir() else results.parent) / "report"
    for path in write_report(results, out, tolerance=args.tolerance / 100, title=args.title):
        print(path)
    return 0


def add_report(sub: Commands) -> None:
    rep = sub.add_parser("report", help="tables, CSV, plots and an HTML page from bench results")
    rep.add_argument("results", type=Path, help="results.jsonl, or the folder holding it")
    rep.add_argument("--out", type=Path, default=None, help="default: report/ beside results")
    rep.add_argument("--tolerance", type=float, default=1.0,
                     help="CA points a defense may lose and still count as a repair (default "
                          "1; its ASR must also be at most 2 %%)")
    rep.add_argument("--title", default=None)
    rep.set_defaults(func=cmd_report)

