"""Input-level detectors in benchmark grids (issue 18): detector cells on the backdoored models,
their records (figures at each requested false-alarm rate, and the scores that let the report
combine detectors), the GoodNet rule the report applies to combinations, and the default's
ranking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from goodnet.bench import parse_grid, run_grid
from goodnet.bench.detect_report import (
    candidates,
    choose_default,
    detect_rows,
    screen_figures,
)
from goodnet.bench.grid import Cell, DetectCell, Entry
from goodnet.bench.report import write_report
from goodnet.bench.results import read_records
from goodnet.detectors import DETECTORS
from goodnet.errors import GoodnetError
from tests.test_bench import tiny


def detect_grid(data_folder: Path, zoo: Path, **changes) -> dict:
    raw = tiny(data_folder, zoo, attacks=["clean", "badnets"], seeds=[0], clean=200, hold_out=0,
               detectors=["mahalanobis", "strip"], calibration=60, false_alarms=[0.05, 0.2])
    del raw["defenses"]
    raw.update(changes)
    return raw


def test_detector_cells_run_on_the_backdoored_models_only(data_folder, tmp_path):
    grid = parse_grid(detect_grid(data_folder, tmp_path, defenses=["prune"]))
    cells = grid.cells()
    detects = [c for c in cells if isinstance(c, DetectCell)]
    assert sorted((c.model.attack.name, c.detector.label) for c in detects) == [
        ("badnets", "mahalanobis"), ("badnets", "strip")]
    assert [c.model.attack.name for c in cells if isinstance(c, Cell)] == ["badnets"]
    assert all(c.configuration()["kind"] == "detect" for c in detects)
    # no defenses key: detectors only
    assert all(isinstance(c, DetectCell) for c in parse_grid(
        detect_grid(data_folder, tmp_path)).cells())


def test_detector_cell_keys_hash_what_the_measure_depends_on(data_folder, tmp_path):
    def key(**changes):
        grid = parse_grid(detect_grid(data_folder, tmp_path,
                                      **{"detectors": ["mahalanobis"], **changes}))
        (cell,) = grid.cells()
        return cell.key

    base = key()
    assert key(calibration=80) != base
    assert key(false_alarms=[0.05]) != base
    assert key(clean=300) != base
    assert key(detectors=[{"mahalanobis": {"layer": "fc2"}}]) != base
    assert key(detectors=[{"mahalanobis": {"layer": None}}]) == base  # a default spelt out


@pytest.mark.parametrize(("change", "message"), [
    ({"detectors": ["frost"]}, "unknown detector 'frost'"),
    ({"detectors": [{"strip": {"overlays": 0}}]}, "overlays must be positive"),
    ({"false_alarms": [0.0]}, "false_alarms must be a rate in"),
    ({"false_alarms": [0.05, 0.05]}, "the same rate twice"),
    ({"false_alarms": "often"}, "false_alarms must be a rate in"),
    ({"calibration": 10}, "calibration 10 cannot calibrate a false-alarm rate of 0.05"),
    ({"calibration": 0}, "calibration must be a positive whole number"),
])
def test_bad_detector_entries_are_refused(data_folder, tmp_path, change, message):
    with pytest.raises(GoodnetError, match=message):
        parse_grid(detect_grid(data_folder, tmp_path, **change), "grid.yaml")


def _threshold(scores: list[float], rate: float) -> float:
    """The conformal threshold, computed here by hand: the ⌈(n+1)(1−rate)⌉-th smallest."""
    ranked = sorted(scores)
    return ranked[math.ceil((len(scores) + 1) * (1 - rate) - 1e-9) - 1]


def test_a_score_equal_to_its_threshold_is_not_flagged():
    """Tied scores (SCALE-UP's and TeCo's are a handful of values) at the threshold pass it
    not, in float64 as the GoodNet compares them: nothing is flagged here."""
    tied = [0.7] * 10  # 0.7 in float32 is below 0.7: a float32 threshold would flag them all
    figures = screen_figures([(tied, tied, tied)], [0.1])
    assert figures["detection"]["0.1"] == 0.0 and figures["false_alarm"]["0.1"] == 0.0


def test_a_combination_calibrates_each_member_at_its_share_and_fires_on_any():
    generator = torch.Generator().manual_seed(3)
    members = [tuple(torch.randn(n, generator=generator).tolist() for n in (200, 500, 300))
               for _ in range(2)]
    figures = screen_figures(members, [0.02, 0.1])
    for rate in (0.02, 0.1):
        thresholds = [_threshold(m[0], rate / 2) for m in members]
        for part, name in ((1, "false_alarm"), (2, "detection")):
            flagged = [any(m[part][i] > t for m, t in zip(members, thresholds, strict=True))
                       for i in range(len(members[0][part]))]
            assert figures[name][f"{rate:g}"] == pytest.approx(sum(flagged) / len(flagged))
    # at 1 %, 200 calibration scores calibrate two members at 0.5 % each (that takes 199), not
    # four at 0.25 % (399)
    assert screen_figures(members, [0.01])["detection"]["0.01"] is not None
    assert screen_figures(members * 2, [0.01])["detection"]["0.01"] is None
    fired = [i % 3 == 0 for i in range(300)]
    figures = screen_figures(members, [0.1], [int(f) for f in fired])
    thresholds = [_threshold(m[0], 0.05) for m in members]
    caught = [any(m[2][i] > t for m, t in zip(members, thresholds, strict=True))
              for i in range(300) if fired[i]]
    assert figures["working"]["0.1"] == pytest.approx(sum(caught) / len(caught))
    assert screen_figures(members, [0.1])["working"]["0.1"] is None  # no answers, no figure
    with pytest.raises(GoodnetError, match="different test images"):
        screen_figures([members[0], (members[1][0], members[1][1][:10], members[1][2])], [0.1])


def test_a_detector_grid_runs_and_its_report_combines_the_detectors(data_folder, tmp_path):
    raw = detect_grid(data_folder, tmp_path / "zoo")
    summary = run_grid(parse_grid(raw), tmp_path, progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    records = read_records(tmp_path / "results.jsonl")
    for r in records:
        assert r["kind"] == "detect" and r["status"] == "ok" and r["attack"] == "badnets"
        assert (r["calibration_images"], r["fit_images"], r["test_images"]) == (60, 140, 160)
        assert r["triggered_images"] == len(r["scores"]["triggered"]) > 50
        assert len(r["scores"]["clean"]) == 160 and len(r["scores"]["calibration"]) == 60
        assert set(r["detection"]) == set(r["false_alarm"]) == {"0.05", "0.2"}
        for rate in (0.05, 0.2):
            threshold = _threshold(r["scores"]["calibration"], rate)
            for part, name in (("clean", "false_alarm"), ("triggered", "detection")):
                above = sum(v > threshold for v in r["scores"][part]) / len(r["scores"][part])
                assert r[name][f"{rate:g}"] == pytest.approx(above)
        assert 0 <= r["auroc"] <= 1 and r["ms_per_input"] > 0
        assert len(r["fired"]) == r["triggered_images"] and set(r["fired"]) <= {0, 1}
    by_label = {r["detector"]: r for r in records}
    assert by_label["mahalanobis"]["auroc"] >= 0.8  # the planted patch is far from clean features
    rows = {row.label: row for row in detect_rows(records)}
    assert set(rows) == {"mahalanobis", "strip", "mahalanobis+strip"}
    (both,) = [c for c in candidates(records) if c.label == "mahalanobis+strip"]
    for rate in (0.05, 0.2):
        limits = {d: _threshold(by_label[d]["scores"]["calibration"], rate / 2)
                  for d in ("mahalanobis", "strip")}
        caught = [any(by_label[d]["scores"]["triggered"][i] > limits[d] for d in limits)
                  for i in range(by_label["strip"]["triggered_images"])]
        assert both.detection[f"{rate:g}"] == pytest.approx(sum(caught) / len(caught))
        fired = by_label["strip"]["fired"]
        working = [c for c, f in zip(caught, fired, strict=True) if f]
        assert both.working[f"{rate:g}"] == pytest.approx(sum(working) / len(working))
    write_report(tmp_path, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Input detectors" in report and "| mahalanobis |" in report
    assert (tmp_path / "report" / "detection.png").stat().st_size > 0
    json.dumps(records)
    again = run_grid(parse_grid(raw), tmp_path, progress=False)
    assert (again.done, again.skipped) == (0, 2)


def _record(detector: str, attack: str, calibration: list[float], clean: list[float],
            triggered: list[float], settings: dict | None = None) -> dict:
    """A detector record as a cell writes it, from its scores."""
    scores = (calibration, clean, triggered)
    figures = screen_figures([scores], [0.01, 0.05])
    config = {"detector": detector, "detector_settings": settings if settings is not None
              else Entry(detector, detector).resolved(DETECTORS, "detector")}
    return {"key": f"{detector}-{attack}", "kind": "detect", "status": "ok", "data": "d",
            "arch": "a", "attack": attack, "detector": detector, "seed": 0, "config": config,
            "auroc": 0.5, "ms_per_input": {"strip": 9.0}.get(detector, 1.0), **figures,
            "scores": dict(zip(("calibration", "clean", "triggered"), scores, strict=True))}


def test_the_default_is_the_candidate_on_target_on_most_models():
    calibration = [i / 300 for i in range(300)]  # the 1 % threshold: 0.9933...
    clean = [i / 1000 for i in range(1000)]  # 0.6 % of clean scores pass it
    caught, missed = [2.0] * 100, [0.0] * 100
    half = [2.0] * 50 + [0.0] * 50
    records = [
        _record("strip", "badnets", calibration, clean, caught),
        _record("strip", "blend", calibration, clean, half),
        _record("teco", "badnets", calibration, clean, missed),
        _record("teco", "blend", calibration, clean, caught),
        _record("scale-up", "badnets", calibration, clean, caught, {"soft": True}),
        _record("scale-up", "blend", calibration, clean, caught, {"soft": True}),
    ]
    ranking = choose_default(records)
    # soft SCALE-UP is not at its defaults: no candidate, alone or combined
    assert [r[0] for r in ranking] == ["strip+teco", "strip", "teco"]
    assert ranking[0][1] == 2 and ranking[1][1] == 1 and ranking[2][1] == 1
    assert ranking[1][2] == pytest.approx(0.75) and ranking[2][2] == pytest.approx(0.5)
    labels = {c.label for c in candidates(records)}
    assert "scale-up" in labels and "scale-up+strip" not in labels
    # a model with a strip figure only: every other candidate counts it off target, at 0 %
    more = [*records, _record("strip", "wanet", calibration, clean, caught)]
    ranking = dict((r[0], r[1:]) for r in choose_default(more))
    assert ranking["strip"][0] == ranking["strip+teco"][0] == 2
    assert ranking["teco"][1] == pytest.approx(1 / 3)
    assert ranking["strip+teco"][1] == pytest.approx(2 / 3)  # not 2 / 2 over its own models
    assert choose_default(more)[0][0] == "strip"  # the tie goes to the higher mean detection
