"""``goodnet bench``: run a benchmark grid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.bench import load_grid, make_executor, run_grid, write_report
from goodnet.cli.options import Commands


def cmd_bench(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    out = args.out or Path("runs") / grid.name
    executor = make_executor(args.executor, args.workers, args.address, grid.threads)
    summary = run_grid(grid, out, executor, progress=args.progress)
    print(f"{grid.name}: {summary.cells} cells: {summary.done} run, {summary.skipped} already "
          f"done, {summary.failed} failed; {summary.models_built} models built; "
          f"{summary.seconds / 60:.1f} min")
    for failure in summary.failures:
        print(f"  failed: {failure}")
    print(f"results: {out / 'results.jsonl'}")
    if not args.no_report:
        written = write_report(out / "results.jsonl", out / "report", title=grid.name,
                               keys={cell.key for cell in grid.cells()})
        print(f"report: {written[-1]}")
    return 1 if summary.failed else 0


def add_bench(sub: Commands) -> None:
    bench = sub.add_parser("bench", help="run a benchmark grid (attacks × defenses × data × "
                                         "architectures × seeds), resumably, and report it")
    bench.add_argument("grid", type=Path, help="grid file (YAML), e.g. benchmarks/smoke.yaml")
    bench.add_argument("--out", type=Path, default=None,
                       help="results folder (default: runs/<grid name>)")
    bench.add_argument("--executor", default="local", choices=["local", "ray"])
    bench.add_argument("--workers", type=int, default=0,
                       help="local: processes (0: run in this process); ray: CPUs of the local "
                            "instance started when no --address is given")
    bench.add_argument("--address", default=None, help="ray: address of a running cluster")
    bench.add_argument("--no-report", action="store_true", help="skip writing the report")
    bench.set_defaults(func=cmd_bench)

