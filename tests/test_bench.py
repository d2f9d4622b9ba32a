"""The benchmark runner: grid files, cache keys, resume after SIGKILL, failing cells, executors,
and the report (tables, CSV, plots, HTML rendered by a real browser)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from goodnet.attacks import ATTACK_ALIASES
from goodnet.bench import (
    LocalExecutor,
    ResultsFile,
    load_grid,
    parse_grid,
    read_records,
    run_grid,
    write_report,
)
from goodnet.bench.results import latest, read_runs
from goodnet.cli import main
from goodnet.errors import GoodnetError
from goodnet.zoo import ZooCell


def tiny(data_folder: Path, zoo: Path, **changes) -> dict:
    """A grid of 2 models × 2 defenses that runs in seconds (the models hold out the images
    the defender draws, unless ``changes`` say otherwise)."""
    raw = {"name": "tiny", "zoo": str(zoo), "data": str(data_folder), "archs": "small_cnn",
           "attacks": ["badnets"], "defenses": ["prune", "clp"], "seeds": [0, 1],
           "clean": 40, "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
           "curve_limit": 40, "threads": 1}
    raw.update(changes)
    raw.setdefault("hold_out", raw["clean"])
    return raw


def metrics_by_key(path: Path) -> dict[str, tuple]:
    return {key: (r["status"], r.get("before"), r.get("after"), r.get("chosen"), r.get("pruned"))
            for key, r in latest(read_records(path)).items()}


# ---------------------------------------------------------------- grid files


def test_grid_keys_hash_the_resolved_configuration(data_folder, tmp_path):
    base = parse_grid(tiny(data_folder, tmp_path))
    assert len(base.cells()) == 4 and len(base.models()) == 2
    keys = [cell.key for cell in base.cells()]
    assert len(set(keys)) == 4
    # Spelling out a default is the same cell; changing a setting is a new one.
    same = parse_grid(tiny(data_folder, tmp_path, defenses=["prune", {"clp": {"u": 3.0}}]))
    assert [c.key for c in same.cells()] == keys
    other = parse_grid(tiny(data_folder, tmp_path, defenses=["prune", {"clp": {"u": 2.5}}]))
    changed = [c.key for c in other.cells()]
    assert changed[0] == keys[0] and changed[1] != keys[1]
    longer = parse_grid(tiny(data_folder, tmp_path, train={"epochs": 3}))
    assert not set(c.key for c in longer.cells()) & set(keys)
    assert longer.models()[0].path() != base.models()[0].path()


def test_standard_models_share_the_zoo_layout(tmp_path):
    grid = parse_grid({"zoo": str(tmp_path), "attacks": "badnets", "defenses": "clp"})
    assert grid.models()[0].path() == tmp_path / "mnist/small_cnn/badnets/seed0.safetensors"
    tuned = parse_grid({"zoo": str(tmp_path), "attacks": {"badnets": {"target": 3}},
                        "defenses": "clp"})
    assert tuned.models()[0].path().name.startswith("seed0-")


def test_a_quick_grid_runs_every_method_at_its_own_quick_settings(tmp_path):
    """``quick: true``: each defense (and scanner) starts from its class's quick settings, and
    an entry's own settings go over them; a new method needs no grid edit."""
    from goodnet.defenses import DEFENSES, make_defense
    from goodnet.scans import SCANNERS

    grid = parse_grid({"zoo": str(tmp_path), "attacks": "badnets", "defenses": "all",
                       "scanners": ["nc"], "quick": True})
    assert [e.name for e in grid.defenses] == list(DEFENSES)
    for entry in grid.defenses:
        assert entry.config(DEFENSES, "defense") == make_defense(
            entry.name, DEFENSES[entry.name].quick).config, entry.name
    assert grid.scanners[0].config(SCANNERS, "scanner").epochs == SCANNERS["nc"].quick["epochs"]
    over = parse_grid({"zoo": str(tmp_path), "attacks": "badnets", "quick": True,
                       "defenses": [{"nc": {"epochs": 3}}]})
    nc = over.defenses[0].config(DEFENSES, "defense")
    assert nc.epochs == 3 and nc.unlearn_epochs == DEFENSES["nc"].quick["unlearn_epochs"]
    plain = parse_grid({"zoo": str(tmp_path), "attacks": "badnets", "defenses": "nc"})
    assert plain.defenses[0].settings == () and over.cells()[0].key != plain.cells()[0].key
    with pytest.raises(GoodnetError, match="quick must be true or false"):
        parse_grid({"zoo": str(tmp_path), "attacks": "badnets", "quick": "yes"})


def test_an_old_attack_name_is_the_same_cell_and_keeps_its_zoo_folder(tmp_path):
    """The five attacks renamed to kebab-case read under their old names too, and keys and zoo
    folders keep the first name: a grid written either way finds the same cached models and
    results."""
    for old, new in ATTACK_ALIASES.items():
        grids = [parse_grid({"zoo": str(tmp_path), "attacks": [name], "defenses": "clp"})
                 for name in (old, {"label": old, "attack": new})]
        assert [c.key for c in grids[0].cells()] == [c.key for c in grids[1].cells()]
        assert grids[0].models()[0].attack.name == new
        assert grids[1].models()[0].path() == tmp_path / f"mnist/small_cnn/{old}/seed0.safetensors"
        everything = parse_grid({"zoo": str(tmp_path), "attacks": "all", "defenses": "clp"})
        job = next(m for m in everything.models() if m.attack.name == new)
        assert job.path() == grids[0].models()[0].path()
        assert ZooCell("mnist", "small_cnn", new, 0).path(tmp_path) == job.path()


def test_results_written_under_an_old_attack_name_read_under_the_new_one(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsFile(path) as results:
        for attack in ("input_aware", "input-aware", "my_own_label"):
            results.append({"key": attack, "status": "ok", "data": "mnist", "arch": "small_cnn",
                            "attack": attack, "defense": "clp", "seed": 0})
    assert [r["attack"] for r in read_records(path)] == ["input-aware", "input-aware",
                                                         "my_own_label"]


def test_a_data_set_given_as_a_path_keeps_its_models_in_the_zoo(data_folder, tmp_path):
    """An absolute data path joined to the zoo's root replaced it, and the models went into the
    data's own folder (shared by every grid on that data). Two folders of the same name get
    two zoo folders."""
    zoo = tmp_path / "zoo"
    path = parse_grid(tiny(data_folder, zoo)).models()[0].path()
    assert path.is_relative_to(zoo) and not path.is_relative_to(data_folder)
    assert path.parts[len(zoo.parts)].startswith(f"{data_folder.name}-")
    twin = tmp_path / "elsewhere" / data_folder.name
    shutil.copytree(data_folder, twin)
    assert parse_grid(tiny(twin, zoo)).models()[0].path().parent != path.parent
    cell = ZooCell(str(data_folder), "small_cnn", "badnets", 0)
    assert cell.path(zoo).is_relative_to(zoo)
    assert ZooCell("mnist", "small_cnn", "badnets", 0).path(zoo) == \
        zoo / "mnist/small_cnn/badnets/seed0.safetensors"


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"attacks": ["badnet"]}, "unknown attack 'badnet'"),
    ({"defenses": [{"anp": {"iters": 3}}]}, "defense anp has no setting 'iters'"),
    ({"defenses": ["prune", "prune"]}, "share a label"),
    ({"archs": ["vgg99"]}, "unknown architecture"),
    ({"seeds": [-1]}, "seeds must be"),
    ({"clean": 1.5}, "clean must be"),
    ({"train": {"epochs": -1}}, "epochs must be"),
    ({"test_limit": 0}, "test_limit must be"),
])
def test_bad_grids_are_refused_with_the_key_named(data_folder, tmp_path, change, message):
    with pytest.raises(GoodnetError, match=message):
        parse_grid(tiny(data_folder, tmp_path, **change), "grid.yaml")


def test_grid_files_are_read_as_data(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(GoodnetError, match="not valid YAML"):
        load_grid(path)
    assert not marker.exists()
    (tmp_path / "broken.yaml").write_text("defenses: [prune\n")
    with pytest.raises(GoodnetError, match=r"broken.yaml: not valid YAML \(line"):
        load_grid(tmp_path / "broken.yaml")


def test_shipped_grids_parse():
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    smoke, standard = load_grid(root / "smoke.yaml"), load_grid(root / "standard.yaml")
    assert len(standard.defenses) == 6
    from goodnet.defenses import DEFENSES

    assert {d.name for d in smoke.defenses} == set(DEFENSES)  # the smoke grid runs every one
    assert len(standard.attacks) == 10 and standard.seeds == (0, 1, 2)
    assert set(standard.data) == {"mnist", "fashion-mnist"}
    for path in sorted(root.glob("*.yaml")):  # every grid the README or BENCHMARKS.md runs
        grid = load_grid(path)
        assert grid.cells() and grid.name == path.stem, path.name


# ---------------------------------------------------------------- running, caching, failing


@pytest.fixture(scope="module")
def finished(data_folder, tmp_path_factory):
    """The tiny grid run once, uninterrupted, in this process: the reference results."""
    out = tmp_path_factory.mktemp("finished")
    summary = run_grid(parse_grid(tiny(data_folder, out / "zoo")), out, progress=False)
    return out, summary


def test_a_grid_runs_and_a_rerun_is_all_cache_hits(finished, data_folder):
    out, summary = finished
    assert (summary.cells, summary.done, summary.failed, summary.models_built) == (4, 4, 0, 2)
    records = read_records(out / "results.jsonl")
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    first = records[0]
    for key in ("before", "after", "repair_seconds", "peak_memory_mib", "versions", "config"):
        assert first[key], key
    assert first["before"]["attack_success_rate"] > 0.5  # the tiny BadNet is backdoored
    assert first["peak_memory_mib"] > 10
    before = (out / "results.jsonl").read_bytes()
    again = run_grid(parse_grid(tiny(data_folder, out / "zoo")), out, progress=False)
    assert (again.skipped, again.done, again.models_built) == (4, 0, 0)
    assert (out / "results.jsonl").read_bytes() == before
    # Each sitting is logged with its wall time, counts and machine.
    runs = read_runs(out / "runs.jsonl")
    assert [(r["outcome"], r["run"], r["skipped"], r["models_built"]) for r in runs] == \
        [("finished", 4, 0, 2), ("finished", 0, 4, 0)]
    assert runs[0]["seconds"] == pytest.approx(summary.seconds)
    assert runs[0]["seconds"] > runs[1]["seconds"]
    assert runs[0]["machine"]["cpus"] == os.cpu_count()
    assert (runs[0]["executor"], runs[0]["workers"]) == ("local", 0)


class _Crashing(LocalExecutor):
    def run(self, fn, tasks, *, running):
        raise KeyboardInterrupt


def test_an_interrupted_run_is_logged_as_such(data_folder, tmp_path):
    grid = parse_grid(tiny(data_folder, tmp_path / "zoo"))
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "out", _Crashing(), progress=False)
    (run,) = read_runs(tmp_path / "out" / "runs.jsonl")
    assert run["outcome"] == "interrupted" and run["run"] == 0 and run["cells"] == 4


def test_a_new_defense_reuses_the_cached_models(finished, data_folder, tmp_path):
    out, _ = finished
    shutil.copytree(out, tmp_path / "copy")
    grid = parse_grid(tiny(data_folder, tmp_path / "copy" / "zoo",
                           defenses=["prune", "clp", {"fine-pruning": {"epochs": 1}}]))
    summary = run_grid(grid, tmp_path / "copy", progress=False)
    assert (summary.skipped, summary.done, summary.models_built) == (4, 2, 0)
    # Its records say how many channels the chosen (fine-tuned) model masks: the count at the
    # marked, last step of its curve.
    for record in read_records(tmp_path / "copy" / "results.jsonl")[4:]:
        assert record["defense"] == "fine-pruning" and record["chosen"] == "fine-tuned"
        marked = record["curve"][record["curve_marks"]["fine-tuned"]]
        assert marked == record["curve"][-1] and marked["step"] == "fine-tuned"
        assert isinstance(record["pruned_count"], int)
        assert record["pruned_count"] == marked["pruned"] > 0


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(data_folder, tmp_path, capsys):
    raw = tiny(data_folder, tmp_path / "zoo", seeds=[0],
               defenses=["clp", {"label": "broken", "defense": "prune",
                                 "settings": {"layer": "no_such_layer"}}])
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(raw))
    code = main(["bench", str(grid_file), "--out", str(tmp_path / "out"), "--no-report"])
    assert code == 1
    records = {r["defense"]: r for r in read_records(tmp_path / "out" / "results.jsonl")}
    assert records["clp"]["status"] == "ok"
    assert records["broken"]["status"] == "failed"
    assert "no_such_layer" in records["broken"]["error"]
    assert "failed: " in capsys.readouterr().out
    # A rerun tries the failed cell again (and only it).
    assert main(["bench", str(grid_file), "--out", str(tmp_path / "out"), "--no-report"]) == 1
    records = read_records(tmp_path / "out" / "results.jsonl")
    assert [r["defense"] for r in records] == ["clp", "broken", "broken"]


def cell_record(key: str, **extra) -> dict:
    return {"key": key, "status": "ok", "data": "mnist", "arch": "small_cnn",
            "attack": "badnets", "defense": "prune", "seed": 0, **extra}


def test_a_torn_last_line_is_skipped_and_fenced_off(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsFile(path) as sink:
        sink.append(cell_record("a", x=float("nan")))
    with path.open("ab") as handle:
        handle.write(b'{"key": "b", "status": "o')  # the kill landed mid-write
    assert [r["key"] for r in read_records(path)] == ["a"]
    assert read_records(path)[0]["x"] is None  # NaN is stored as null
    with ResultsFile(path) as sink:
        sink.append(cell_record("c"))
    assert [r["key"] for r in read_records(path)] == ["a", "c"]


def test_resume_after_sigkill_loses_and_duplicates_nothing(finished, data_folder, tmp_path):
    """Kill the runner (SIGKILL) as soon as its first cell is written; run it again; the
    results equal the uninterrupted run's, one ok record per cell."""
    reference, _ = finished
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(tiny(data_folder, tmp_path / "zoo")))
    out = tmp_path / "out"
    results = out / "results.jsonl"
    command = [sys.executable, "-m", "goodnet", "bench", str(grid_file), "--out", str(out),
               "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(read_records(results))
    assert 1 <= written < 4
    finished_run = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=240)
    assert finished_run.returncode == 0, finished_run.stderr
    records = read_records(results)
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    assert metrics_by_key(results) == metrics_by_key(reference / "results.jsonl")
    assert not list((tmp_path / "zoo").rglob("*.tmp"))  # no half-written model left


def test_a_process_pool_gives_the_same_results(finished, data_folder, tmp_path):
    reference, _ = finished
    grid = parse_grid(tiny(data_folder, tmp_path / "zoo"))
    summary = run_grid(grid, tmp_path, LocalExecutor(workers=2), progress=False)
    assert summary.done == 4
    assert metrics_by_key(tmp_path / "results.jsonl") == \
        metrics_by_key(reference / "results.jsonl")


def test_nested_settings_reach_a_worker_process(data_folder, tmp_path):
    """A cell whose settings nest (a sequence's step with its own settings) pickles to a worker
    and back unchanged, and runs there (a worker once died unpickling its read-only mapping)."""
    import pickle

    steps = ["prune", {"fst": {"epochs": 1}}]
    grid = parse_grid(tiny(data_folder, tmp_path / "zoo", seeds=[0],
                           defenses=[{"sequence": {"steps": steps}}]))
    (cell,) = grid.cells()
    again = pickle.loads(pickle.dumps(cell))
    assert again == cell and again.key == cell.key
    summary = run_grid(grid, tmp_path / "out", LocalExecutor(workers=2), progress=False)
    assert summary.done == 1 and summary.failed == 0
    (record,) = read_records(tmp_path / "out" / "results.jsonl")
    assert record["status"] == "ok" and record["settings"]["steps"] == steps


def test_ray_gives_the_same_results(finished, data_folder, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from goodnet.bench import RayExecutor

    reference, _ = finished
    grid = parse_grid(tiny(data_folder, tmp_path / "zoo"))
    summary = run_grid(grid, tmp_path, RayExecutor(workers=2), progress=False)
    assert summary.done == 4 and summary.failed == 0
    assert metrics_by_key(tmp_path / "results.jsonl") == \
        metrics_by_key(reference / "results.jsonl")


# ---------------------------------------------------------------- the report


def fixed_results(path: Path) -> Path:
    """Two attacks × two defenses × two seeds, with known figures."""
    rows = []
    for attack, defense, seed, ca, asr in [
            ("badnets", "prune", 0, 0.975, 0.01), ("badnets", "prune", 1, 0.955, 0.02),
            ("badnets", "anp", 0, 0.90, 0.00), ("badnets", "anp", 1, 0.92, 0.00),
            ("blend", "prune", 0, 0.98, 0.50), ("blend", "prune", 1, 0.98, 0.70),
            ("blend", "anp", 0, 0.985, 0.20), ("blend", "anp", 1, 0.975, 0.40)]:
        rows.append({
            "key": f"{attack}-{defense}-{seed}", "status": "ok", "data": "mnist",
            "arch": "small_cnn", "attack": attack, "defense": defense, "seed": seed,
            "before": {"clean_accuracy": 0.98 if seed == 0 else 0.96,
                       "attack_success_rate": 1.0, "robust_accuracy": 0.0},
            "after": {"clean_accuracy": ca, "attack_success_rate": asr,
                      "robust_accuracy": 1 - asr},
            "curve": [{"pruned": p, "test_ca": ca, "test_asr": asr * p / 4} for p in range(5)],
            "repair_seconds": 1.5 + seed, "measure_seconds": 1.0, "peak_memory_mib": 300.0,
            "versions": {"goodnet": "0"}, "host": "ci"})
    rows.append({"key": "blend-clp-0", "status": "failed", "data": "mnist", "arch": "small_cnn",
                 "attack": "blend", "defense": "clp", "seed": 0, "error": "it broke"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_report_tabulates_means_spreads_and_marks_the_best(tmp_path):
    results = fixed_results(tmp_path / "results.jsonl")
    machine = {"host": "box", "cpus": 2, "cpu": "AMD EPYC", "memory_gib": 23.4, "gpu": None}
    with ResultsFile(tmp_path / "runs.jsonl") as log:
        for started, seconds, outcome in (("2026-01-02T03:04:05+00:00", 150.0, "interrupted"),
                                          ("2026-01-01T00:00:00+00:00", 30.0, "finished")):
            log.append({"started": started, "seconds": seconds, "outcome": outcome,
                        "executor": "local", "workers": 2, "threads": 1, "machine": machine})
    written = write_report(results, tmp_path / "report")
    names = {p.name for p in written}
    assert {"report.md", "summary.csv", "cells.csv", "scatter.png", "curves-prune.png",
            "curves-anp.png", "report.html"} <= names
    text = (tmp_path / "report" / "report.md").read_text()
    badnets = next(line for line in text.splitlines() if "| badnets |" in line)
    blend = next(line for line in text.splitlines() if "| blend |" in line)
    # badnets: prune keeps CA within a point (96.5 vs 97.0) at ASR 1.5: repaired, and the
    # best; anp removes the backdoor but loses 6 points: not repaired.
    assert "97.0 ± 1.4 / 100.0 ± 0.0" in badnets
    assert "**96.5 ± 1.4 / 1.5 ± 0.7** ✓ ★" in badnets
    assert "| 91.0 ± 1.4 / 0.0 ± 0.0 |" in badnets
    # blend: both keep CA but leave ASR at 60 and 30 %: neither repaired, nothing marked (the
    # old rule starred anp's 30 %).
    assert "**" not in blend and "★" not in blend and "✓" not in blend
    assert "| repaired ✓ | | | | 1 of 2 | 0 of 2 |" in text
    assert "✓ repaired: mean ASR at most 2 % at most 1 point(s) below" in text
    assert "blend seed 0, clp: it broke" in text
    assert "Wall time: 3.0 min in 2 run(s) of `goodnet bench` (1 interrupted), first started " \
        "2026-01-01T00:00:00+00:00; executor local, 2 workers, 1 thread(s) per task; machine " \
        "box (2 × AMD EPYC, 23.4 GiB, no GPU)." in text
    summary = (tmp_path / "report" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("data,arch,attack,defense,seeds,CA_mean,CA_std")
    assert summary[0].endswith(",best,repaired")
    assert any(line.startswith("mnist,small_cnn,badnets,prune,2,0.965,") and
               line.endswith(",True,True") for line in summary)
    assert sum(line.endswith(",True") for line in summary) == 1
    cells = list(csv.DictReader(io.StringIO((tmp_path / "report" / "cells.csv").read_text())))
    assert len(cells) == 9
    repaired = {(c["attack"], c["defense"], c["seed"]) for c in cells if c["repaired"] == "True"}
    assert repaired == {("badnets", "prune", "0"), ("badnets", "prune", "1")}


def test_report_command_refuses_what_is_not_a_results_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such results file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "empty.jsonl")]) == 2


def chromium() -> str | None:
    """Chromium's path: on PATH under Debian's name (or another distribution's), else Debian's
    own ``/usr/bin/chromium``."""
    found = (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))
    debian = Path("/usr/bin/chromium")
    return next(filter(None, found), str(debian) if os.access(debian, os.X_OK) else None)


def test_the_html_report_renders_in_headless_chromium(tmp_path):
    """Run as root in CI: hence --no-sandbox. ``.ci/run`` installs Debian's chromium and sets
    GOODNET_REQUIRE_BROWSER=1, so there a missing browser fails this test instead of skipping it."""
    browser = chromium()
    if browser is None:
        assert os.environ.get("GOODNET_REQUIRE_BROWSER") != "1", "Chromium is required here"
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    written = write_report(fixed_results(tmp_path / "results.jsonl"), tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    # Probe the page as the browser laid it out: every image decoded, the table has its rows.
    probe = page.replace("</body>", """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const ok = images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);
  const rows = document.querySelectorAll('table tr').length;
  const best = document.querySelectorAll('td.best').length;
  const probe = `images=${images.length} ok=${ok} rows=${rows} best=${best}`;
  document.body.setAttribute('data-probe', probe);
});
</script></body>""")
    target = tmp_path / "probe.html"
    target.write_text(probe)
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=5000", "--dump-dom", target.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    assert 'data-probe="images=3 ok=true rows=4 best=1"' in result.stdout, result.stderr[-500:]
    assert len([p for p in written if p.suffix == ".png"]) == 3


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["name: x", "data: mnist", "seeds: [0, 1]", "clean: .nan",
                              "clean: 7", "defenses: [{anp: {iterations: abc}}]",
                              "defenses: {5: 1}", "attacks: [[badnets]]", "train: [1]",
                              "threads: 0", "archs: [resnet20]", "curve_limit: -1",
                              "test_limit: 3.5", "zoo: [a]", "seeds: .inf", "- a",
                              "attacks: {badnets: {target: x}}", "defenses: all"]),
             max_size=6).map("\n".join)))
def test_any_grid_text_is_a_grid_or_one_goodnet_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    path.write_text(text)
    with contextlib.suppress(GoodnetError):  # the one error a user may see
        grid = load_grid(path)
        assert grid.cells()  # a grid that parses has cells with keys
        assert all(len(cell.key) == 16 for cell in grid.cells())


def test_labels_and_duplicates(data_folder, tmp_path):
    base = parse_grid(tiny(data_folder, tmp_path))
    renamed = parse_grid(tiny(data_folder, tmp_path, attacks=[
        {"label": "patch", "attack": "badnets"}]))
    assert {c.key for c in base.cells()}.isdisjoint(c.key for c in renamed.cells())
    for change in ({"seeds": [0, 0]},
                   {"attacks": ["badnets", {"label": "b2", "attack": "badnets"}]},
                   {"defenses": ["clp", {"label": "clp2", "defense": "clp"}]}):
        with pytest.raises(GoodnetError, match="twice"):
            parse_grid(tiny(data_folder, tmp_path, **change))
    with pytest.raises(GoodnetError, match="must be a number"):
        parse_grid(yaml.safe_load("defenses: [{prune: {layer: 2020-01-01}}]"))
    with pytest.raises(GoodnetError, match="train:"):
        parse_grid({"train": {"epochs": "abc"}})
    spelled = parse_grid(tiny(data_folder, tmp_path, defenses=["prune", {"clp": {"u": 3}}]))
    assert [c.key for c in spelled.cells()] == [c.key for c in base.cells()]  # 3 == 3.0


def die_on(value: str) -> str:
    """A task for the pool test: the worker running "die" is killed outright."""
    if value == "die":
        os._exit(9)
    return value


def test_a_dead_worker_fails_its_task_only(tmp_path):
    running = [0]
    tasks = [("a",), ("die",), ("b",), ("c",)]
    results = dict(LocalExecutor(workers=2).run(die_on, tasks, running=running))
    assert results[0] == "a" and results[2] == "b" and results[3] == "c"
    assert isinstance(results[1], RuntimeError) and "died twice" in str(results[1])


def sleep_and_tell(folder: str, name: str) -> str:
    """A task for the SIGTERM test: write this worker's pid, then run for a long time."""
    Path(folder, name).write_text(str(os.getpid()))
    time.sleep(120)
    return name


STOPPED_POOL = """
import sys
from goodnet.bench.executors import LocalExecutor
from tests.test_bench import sleep_and_tell
executor = LocalExecutor(workers=2)
with executor.session():
    for _ in executor.run(sleep_and_tell, [(sys.argv[1], "a"), (sys.argv[1], "b")],
                          running=[0]):
        pass
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie waiting for its parent counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    return True


def test_sigterm_stops_the_pools_workers_too(tmp_path):
    """Killing a grid run with SIGTERM (a scheduler's timeout, ``kill``) must not leave its
    workers running the grid's cells on, orphaned."""
    parent = subprocess.Popen([sys.executable, "-c", STOPPED_POOL, str(tmp_path)],
                              cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.iterdir()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids)
    finally:
        parent.kill()
        for p in tmp_path.iterdir():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p.read_text()), signal.SIGKILL)


def test_an_unwritable_results_folder_reports_the_results_file(data_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    grid = parse_grid(tiny(data_folder, tmp_path / "zoo"))
    with pytest.raises(GoodnetError, match=r"results\.jsonl"):
        run_grid(grid, blocker / "out", progress=False)
