"""Benchmarks: a grid of attack × defense × data set × architecture × seed, run resumably on
this machine or a Ray cluster, and reported as tables, plots and one HTML page.

    goodnet bench benchmarks/smoke.yaml --out runs/smoke
    goodnet report runs/smoke
"""

from goodnet.bench.executors import EXECUTORS, LocalExecutor, RayExecutor, make_executor
from goodnet.bench.grid import Cell, Grid, ModelJob, load_grid, parse_grid
from goodnet.bench.report import Report, write_report
from goodnet.bench.results import ResultsFile, read_records
from goodnet.bench.runner import RunSummary, run_grid

__all__ = ["EXECUTORS", "Cell", "Grid", "LocalExecutor", "ModelJob", "RayExecutor", "Report",
           "ResultsFile", "RunSummary", "load_grid", "make_executor", "parse_grid",
           "read_records", "run_grid", "write_report"]
