"""Scanners in benchmark grids: clean models beside backdoored ones, scan cells with their own
keys, and the report's AUROC and ROC."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from goodnet.artifacts import load_model
from goodnet.bench import parse_grid, run_grid
from goodnet.bench.grid import Cell, ScanCell
from goodnet.bench.report import write_report
from goodnet.bench.results import read_records
from goodnet.bench.scan_report import scan_rows
from goodnet.errors import GoodnetError
from goodnet.metrics import auroc, roc_points
from tests.test_bench import tiny

QUICK_MMBD = {"label": "mm-bd", "scanner": "mm-bd", "settings": {"starts": 4, "max_steps": 30}}


def test_a_grid_scans_clean_and_backdoored_models(data_folder, tmp_path):
    grid = parse_grid(tiny(data_folder, tmp_path, attacks=["clean", "badnets"],
                           defenses=["prune"], scanners=["mm-bd", "nc"], seeds=[0]))
    cells = grid.cells()
    repairs = [c for c in cells if isinstance(c, Cell)]
    scans = [c for c in cells if isinstance(c, ScanCell)]
    # a defense has nothing to remove from a clean model; every model is scanned
    assert [c.model.attack.name for c in repairs] == ["badnets"]
    assert sorted((c.model.attack.name, c.scanner.name) for c in scans) == [
        ("badnets", "mm-bd"), ("badnets", "nc"), ("clean", "mm-bd"), ("clean", "nc")]
    assert len({c.key for c in cells}) == len(cells)
    assert all(c.configuration()["kind"] == "scan" for c in scans)


def test_a_grid_with_scanners_and_no_defenses_only_scans(data_folder, tmp_path):
    raw = tiny(data_folder, tmp_path, attacks=["clean", "badnets"], scanners=["mm-bd"])
    del raw["defenses"]
    grid = parse_grid(raw)
    assert grid.defenses == () and all(isinstance(c, ScanCell) for c in grid.cells())
    assert len(grid.cells()) == 2 * len(grid.seeds)


def test_scan_cell_keys_hash_what_the_scan_depends_on(data_folder, tmp_path):
    def key(scanner, clean=40):
        grid = parse_grid(tiny(data_folder, tmp_path, attacks=["badnets"], defenses=[],
                               scanners=[scanner], seeds=[0], clean=clean, hold_out=80))
        (cell,) = grid.cells()
        return cell.key

    # a data-free scanner does not read the clean data: its share is not part of the cell
    assert key("mm-bd", 40) == key("mm-bd", 80)
    assert key("nc", 40) != key("nc", 80)
    assert key("mm-bd") != key({"mm-bd": {"starts": 4}}) != key("nc")


@pytest.mark.parametrize("change, message", [
    ({"scanners": ["nope"]}, "unknown scanner 'nope'"),
    ({"scanners": [{"mm-bd": {"starts": 0}}]}, "mm-bd"),
    ({"attacks": ["clean", "nope"]}, "unknown attack 'nope'"),
])
def test_bad_scanner_entries_are_refused(data_folder, tmp_path, change, message):
    with pytest.raises(GoodnetError, match=message):
        parse_grid(tiny(data_folder, tmp_path, **change), "grid.yaml")


def test_auroc_and_roc():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0], [1.0]) == 0.5
    assert auroc([2.0, 0.0], [1.0]) == 0.5
    assert math.isnan(auroc([], [1.0]))
    points = roc_points([3.0, 1.0], [2.0, 0.0])
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert (0.0, 0.5) in points and (0.5, 0.5) in points  # thresholds 3, then 2
    assert all(a <= b for a, b in itertools.pairwise(points))


def test_a_scan_grid_runs_and_its_report_gives_the_roc(data_folder, tmp_path):
    raw = tiny(data_folder, tmp_path / "zoo", attacks=["clean", "badnets"],
               scanners=[QUICK_MMBD], seeds=[0])
    del raw["defenses"]
    summary = run_grid(parse_grid(raw), tmp_path, progress=False)
    assert (summary.done, summary.failed, summary.models_built) == (2, 0, 2)
    records = read_records(tmp_path / "results.jsonl")
    by_attack = {r["attack"]: r for r in records}
    assert by_attack["clean"]["backdoored_model"] is False
    assert by_attack["badnets"]["backdoored_model"] is True
    assert by_attack["badnets"]["true_targets"] == [0] and by_attack["badnets"]["all_to_one"]
    classes = load_model(parse_grid(raw).models()[0].path()).card.spec.num_classes
    for r in records:
        assert r["kind"] == "scan" and r["status"] == "ok" and r["clean_images"] == 0
        assert len(r["scores"]) == classes and isinstance(r["flagged"], bool)
        float(r["score"])  # a number, or "inf" / "nan" as a string
    (row,) = scan_rows(records)
    assert (row.scanner, row.backdoored, row.clean) == ("mm-bd", 1, 1)
    write_report(tmp_path, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Scanners" in report and "| mm-bd |" in report
    assert (tmp_path / "report" / "roc.png").stat().st_size > 0
    json.dumps(records)  # the records stay plain JSON
    again = run_grid(parse_grid(raw), tmp_path, progress=False)
    assert (again.done, again.skipped) == (0, 2)


def test_clean_models_may_have_seeds_of_their_own(data_folder, tmp_path):
    grid = parse_grid(tiny(data_folder, tmp_path, attacks=["clean", "badnets"],
                           defenses=["prune"], scanners=["mm-bd"], seeds=[0],
                           clean_seeds=[0, 1, 2]))
    models = [(m.attack.name, m.seed) for m in grid.models()]
    assert models == [("clean", 0), ("clean", 1), ("clean", 2), ("badnets", 0)]
    with pytest.raises(GoodnetError, match="clean_seeds lists the same seed twice"):
        parse_grid(tiny(data_folder, tmp_path, clean_seeds=[1, 1]))
