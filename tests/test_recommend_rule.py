"""The rules that chose the recommended repair (``benchmarks/recommend.py``; BENCHMARKS.md):
issue 16's (a bound on the mean CA drop first) and issue 29's second rule (rows repaired under
the per-row bound, then the lower mean CA drop)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recommend():
    spec = importlib.util.spec_from_file_location("recommend", ROOT / "benchmarks" /
                                                  "recommend.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(drop: float, asr: float, data: str = "mnist") -> dict:
    return {"before": {"clean_accuracy": 0.9}, "after": {"clean_accuracy": 0.9 - drop,
                                                         "attack_success_rate": asr},
            "repair_seconds": 10.0, "data": data}


def table(recommend, rows: dict[str, list[tuple[float, float]]]) -> dict:
    return {name: recommend.summarise({("mnist", f"a{i}"): cell(*row)
                                       for i, row in enumerate(cells)})
            for name, cells in rows.items()}


def test_a_row_counts_only_within_its_own_ca_bound(recommend):
    summary = table(recommend, {"d": [(0.005, 0.01), (0.015, 0.0), (0.0, 0.03)]})["d"]
    assert summary["repaired"] == 1 and summary["low_asr"] == 2


def test_the_second_rule_counts_rows_where_the_first_bounds_the_mean(recommend):
    """``many`` repairs 3 rows at a mean CA drop over 1 point (its fourth row costs 4);
    ``few`` repairs 1 within the bound. The first rule keeps ``few``, the second ``many``."""
    rows = {"many": [(0.005, 0.0)] * 3 + [(0.04, 0.5)],
            "few": [(0.005, 0.0)] + [(0.0, 0.9)] * 3}
    scores = table(recommend, rows)
    assert recommend.choose(scores, 4, 0.01)[0] == "few"
    assert recommend.choose_by_rows(scores, 4) == "many"


def test_the_second_rule_breaks_ties_by_the_lower_mean_ca_drop(recommend):
    rows = {"costly": [(0.009, 0.0), (0.02, 0.0)], "cheap": [(0.009, 0.0), (0.015, 0.5)]}
    assert recommend.choose_by_rows(table(recommend, rows), 2) == "cheap"


def test_a_defense_missing_rows_is_not_ranked(recommend):
    rows = {"partial": [(0.0, 0.0)], "full": [(0.0, 0.5), (0.0, 0.5)]}
    assert recommend.choose_by_rows(table(recommend, rows), 2) == "full"
