"""The definition of done for "a new defense is one new module plus one registry line".

A throwaway defense, written below in a few lines (a :class:`Defense` subclass with its own
frozen settings dataclass and a ``run`` that fine-tunes a copy of the model), is registered
with one line (``DEFENSES["finetune-only"] = FinetuneOnly``, through ``monkeypatch``) and then
runs through ``goodnet repair``, ``goodnet bench`` and ``goodnet report`` with nothing else
written for it: its curve, timings and ``pruned`` (null: it prunes nothing) are filled in, its
settings come from ``-p key=value`` and grid files, and an unknown setting is refused. One of
its settings nests (``optimiser``, a settings dataclass of its own): it too is set from the
command line and from grids, checked name by name, and recorded, with nothing written for it
outside this file. The same
grid checks that a masking defense's ``pruned`` is its chosen model's masked channel count, and
an evaluation made slow checks that ``repair.json``'s and the bench's repair seconds leave the
evaluation's time out.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from goodnet.artifacts import load_model
from goodnet.bench import parse_grid, read_records
from goodnet.bench.report import Report, curve_lines
from goodnet.cli import main
from goodnet.data import load_dataset, split_clean
from goodnet.data.dataset import ImageData
from goodnet.defenses import DEFENSES, Curve, Defense, Repaired, Steps, make_defense
from goodnet.defenses.base import Evaluation
from goodnet.errors import GoodnetError
from goodnet.masking import Masked
from goodnet.train import TrainConfig, train
from tests.conftest import stripes

# ---------------------------------------------------------------- the new defense: one module


@dataclass(frozen=True)
class Optimiser:
    """The throwaway defense's nested settings.

    Attributes:
        lr: fine-tuning learning rate.
        batch_size: images per step.
    """

    lr: float = 0.01
    batch_size: int = 32


@dataclass(frozen=True)
class FinetuneOnlyConfig:
    """Settings of the throwaway defense.

    Attributes:
        epochs: fine-tuning epochs over the clean data.
        optimiser: how each epoch trains (nested settings).
        seed: fixes the training order.
    """

    epochs: int = 1
    optimiser: Optimiser = Optimiser()
    seed: int = 0


class FinetuneOnly(Defense[FinetuneOnlyConfig]):
    """Fine-tune a copy of the model on the clean data, pruning nothing (a test's defense)."""

    name = "finetune-only"
    paper = "none: a test's throwaway defense"
    Config = FinetuneOnlyConfig
    quick: ClassVar[Mapping[str, Any]] = {"epochs": 1}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        tuned = copy.deepcopy(model).eval()
        points = [steps.measure(tuned, clean, 0, None)]
        for epoch in range(1, cfg.epochs + 1):
            train(tuned, clean, TrainConfig(epochs=1, batch_size=cfg.optimiser.batch_size,
                                            lr=cfg.optimiser.lr, seed=cfg.seed + epoch),
                  progress=progress)
            tuned.eval()
            points.append(steps.measure(tuned, clean, epoch, None))
        curve = Curve("epoch", tuple(points), (("tuned", len(points) - 1),))
        return Repaired(model=tuned, curve=curve, chosen="tuned")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registry line."""
    monkeypatch.setitem(DEFENSES, "finetune-only", FinetuneOnly)


def test_the_contract_tests_take_it_as_it_is(registered):
    """The defense contract of tests/test_defenses.py runs on it at the quick settings its
    class declares: no test lists settings per defense."""
    from tests import test_defenses

    test_defenses.test_defense_contract("finetune-only")
    test_defenses.test_an_evaluation_changes_nothing("finetune-only")
    test_defenses.test_the_result_names_what_it_pruned_and_marks_its_choice("finetune-only")


# ---------------------------------------------------------------- data and a backdoored model


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Training, test and (smaller) defender's clean data as .npz files."""
    folder = tmp_path_factory.mktemp("data")
    files = {}
    for name, data in (("train", stripes(800, seed=0)), ("test", stripes(200, seed=1)),
                       ("clean", stripes(120, seed=3))):
        files[name] = folder / f"{name}.npz"
        np.savez(files[name], x=data.images.numpy(), y=data.labels.numpy())
    return files


@pytest.fixture(scope="module")
def backdoored(npz_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "bd.safetensors"
    assert main(["--no-progress", "attack", "--data", str(npz_files["train"]),
                 "--test", str(npz_files["test"]), "-p", "target=1", "--epochs", "2",
                 "--batch-size", "64", "--out", str(out)]) == 0
    return out


DEFAULTS = {"epochs": 1, "optimiser": {"lr": 0.01, "batch_size": 32}, "seed": 0}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def repair(backdoored: Path, npz_files: dict[str, Path], out: Path, *settings: str) -> int:
    return main(["--no-progress", "repair", str(backdoored), "--defense", "finetune-only",
                 *settings, "--clean", str(npz_files["clean"]), "--test",
                 str(npz_files["test"]), "--curve-limit", "100", "--out", str(out)])


# ---------------------------------------------------------------- goodnet repair


def test_a_registered_defense_repairs_through_the_command_line(registered, backdoored,
                                                               npz_files, tmp_path, capsys):
    out = tmp_path / "repair"
    assert repair(backdoored, npz_files, out) == 0
    assert "finetune-only on" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "curve.csv", "curve.png", "goodnet-tuned.safetensors", "repair.json",
        "repaired-tuned.safetensors"]
    summary = json.loads((out / "repair.json").read_text())
    assert summary["defense"] == "finetune-only" and summary["chosen"] == "tuned"
    assert summary["settings"] == DEFAULTS
    assert summary["pruned"] is None and summary["pruned_count"] is None
    assert summary["curve_axis"] == "epoch" and summary["curve_marks"] == {"tuned": 1}
    assert summary["repair_seconds"] > 0 and summary["evaluation_seconds"] > 0
    assert summary["seconds"] >= summary["repair_seconds"] + summary["evaluation_seconds"]
    assert set(summary["variants"]) == set(summary["goodnets"]) == {"tuned"}
    rows = read_csv(out / "curve.csv")
    assert list(rows[0]) == sorted(  # the columns in alphabetical order, as before
        ["epoch", "pruned", "clean_data_accuracy", "test_ca", "test_asr"])
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(r["pruned"] == "" for r in rows)
    assert all(0 <= float(r["test_ca"]) <= 1 for r in rows)  # measured: --test was given
    # A plain fine-tuned copy: no masks, other weights than the model it was given.
    repaired = load_model(out / "repaired-tuned.safetensors").model
    original = load_model(backdoored).model
    assert not isinstance(repaired, Masked)
    assert any(not torch.equal(a, b) for a, b in zip(
        repaired.state_dict().values(), original.state_dict().values(), strict=True))


def test_command_line_settings_reach_the_config_and_unknown_ones_are_refused(
        registered, backdoored, npz_files, tmp_path, capsys):
    out = tmp_path / "two"
    assert repair(backdoored, npz_files, out, "-p", "epochs=2") == 0
    summary = json.loads((out / "repair.json").read_text())
    assert summary["settings"]["epochs"] == 2 and summary["curve_marks"] == {"tuned": 2}
    assert [r["epoch"] for r in read_csv(out / "curve.csv")] == ["0", "1", "2"]
    nested = tmp_path / "nested"
    assert repair(backdoored, npz_files, nested, "-p", "optimiser={lr: 0.05}") == 0
    settings = json.loads((nested / "repair.json").read_text())["settings"]
    assert settings == {**DEFAULTS, "optimiser": {"lr": 0.05, "batch_size": 32}}
    capsys.readouterr()
    for setting, message in (("epoch=2", "finetune-only has no setting 'epoch'"),
                             ("epochs=two", "'two' is not an integer"),
                             ("optimiser={lrr: 1}", "setting optimiser has no setting 'lrr'"),
                             ("optimiser={lr: fast}", "setting lr must be a finite number"),
                             ("optimiser={lr: [1", "cannot be read"),
                             ("optimiser=0.05", "must be a mapping of Optimiser settings")):
        refused = tmp_path / setting
        assert repair(backdoored, npz_files, refused, "-p", setting) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not refused.exists()


# ---------------------------------------------------------------- the evaluation's time, apart

EVALUATION_SLEEP = 0.1  # seconds each evaluation of a curve step is made to take


@dataclass
class TimedRepair:
    """One ``Defense.repair`` call: its wall time and how many evaluations it made."""

    wall: float = 0.0
    evaluations: int = 0


@pytest.fixture
def slow_evaluation(monkeypatch: pytest.MonkeyPatch) -> list[TimedRepair]:
    """Every evaluation (test CA and ASR of a curve step) sleeps EVALUATION_SLEEP first; each
    repair's wall time and evaluation count are recorded, in order."""
    calls: list[TimedRepair] = []
    measure, repair_ = Evaluation.measure, Defense.repair

    def slow_measure(self, model):
        calls[-1].evaluations += 1
        time.sleep(EVALUATION_SLEEP)
        return measure(self, model)

    def timed_repair(self, *args, **kwargs):
        calls.append(TimedRepair())
        start = time.perf_counter()
        result = repair_(self, *args, **kwargs)
        calls[-1].wall = time.perf_counter() - start
        return result

    monkeypatch.setattr(Evaluation, "measure", slow_measure)
    monkeypatch.setattr(Defense, "repair", timed_repair)
    return calls


def check_timings(seconds: float, evaluation_seconds: float, call: TimedRepair) -> None:
    """The recorded repair time leaves out the evaluation time, which holds all the sleeping."""
    slept = EVALUATION_SLEEP * call.evaluations
    assert call.evaluations >= 2
    assert evaluation_seconds >= slept
    assert 0 < seconds <= call.wall - slept
    assert seconds + evaluation_seconds <= call.wall


def test_repair_json_seconds_leave_the_evaluation_out(registered, slow_evaluation, backdoored,
                                                      npz_files, tmp_path):
    out = tmp_path / "timed"
    assert repair(backdoored, npz_files, out) == 0
    summary = json.loads((out / "repair.json").read_text())
    (call,) = slow_evaluation
    check_timings(summary["repair_seconds"], summary["evaluation_seconds"], call)


# ---------------------------------------------------------------- goodnet bench and report


def grid(data_folder: Path, zoo: Path, defenses: list) -> dict:
    """One small backdoored model and ``defenses``, run in this process."""
    return {"name": "new-defense", "zoo": str(zoo), "data": str(data_folder),
            "archs": "small_cnn", "attacks": ["badnets"], "defenses": defenses, "seeds": [0],
            "clean": 40, "hold_out": 40, "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            "curve_limit": 40, "threads": 1}


def test_grid_settings_reach_the_config_and_unknown_ones_are_refused(registered, data_folder,
                                                                     tmp_path, capsys):
    parsed = parse_grid(grid(data_folder, tmp_path, [
        "finetune-only", {"label": "ft-2", "defense": "finetune-only",
                          "settings": {"epochs": 2}},
        {"label": "ft-fast", "defense": "finetune-only",
         "settings": {"optimiser": {"lr": 0.05}}},
        {"label": "ft-default", "defense": "finetune-only",
         "settings": {"optimiser": {"lr": 0.01, "batch_size": 32}}}]))
    settings = [c.configuration()["defense_settings"] for c in parsed.cells()]
    assert [s["epochs"] for s in settings] == [1, 2, 1, 1]
    assert [s["optimiser"]["lr"] for s in settings] == [0.01, 0.01, 0.05, 0.01]
    keys = [c.key for c in parsed.cells()]
    assert len(set(keys[:3])) == 3
    # Spelling out a nested default changes nothing but the label (which the key holds).
    assert settings[3] == settings[0] and parsed.cells()[3].defense.config(
        DEFENSES, "defense") == parsed.cells()[0].defense.config(DEFENSES, "defense")
    with pytest.raises(GoodnetError, match="setting optimiser has no setting 'lrr'"):
        parse_grid(grid(data_folder, tmp_path, [{"finetune-only": {"optimiser": {"lrr": 1}}}]))
    with pytest.raises(GoodnetError, match="defense finetune-only has no setting 'epoch'"):
        parse_grid(grid(data_folder, tmp_path, [{"finetune-only": {"epoch": 2}}]), "grid.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(grid(data_folder, tmp_path,
                                        [{"finetune-only": {"epochs": "two"}}])))
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "finetune-only: setting epochs must be an integer" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_registered_defense_runs_through_bench_and_report(registered, data_folder, tmp_path,
                                                            capsys):
    raw = grid(data_folder, tmp_path / "zoo", [
        "finetune-only", {"label": "ft-2", "defense": "finetune-only",
                          "settings": {"epochs": 2}},
        "prune", {"fine-pruning": {"epochs": 1}}, {"sparse-fine-pruning": {"rounds": 2}}])
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["--no-progress", "bench", str(path), "--out", str(out), "--workers", "0",
                 "--no-report"]) == 0
    records = {r["defense"]: r for r in read_records(out / "results.jsonl")}
    assert set(records) == {"finetune-only", "ft-2", "prune", "fine-pruning",
                            "sparse-fine-pruning"}
    assert all(r["status"] == "ok" for r in records.values()), records

    for label, epochs in (("finetune-only", 1), ("ft-2", 2)):
        record = records[label]
        assert record["config"]["defense_settings"] == {**DEFAULTS, "epochs": epochs}
        assert record["chosen"] == "tuned" and record["after"] and record["goodnet"]
        assert record["pruned"] is None and record["pruned_count"] is None
        assert record["curve_axis"] == "epoch" and record["curve_marks"] == {"tuned": epochs}
        assert [p["epoch"] for p in record["curve"]] == list(range(epochs + 1))
        assert all(p["pruned"] is None and 0 <= p["test_ca"] <= 1 for p in record["curve"])
        assert record["repair_seconds"] > 0 and record["evaluation_seconds"] > 0

    # A masking defense's pruned is its chosen model's masked channel count: the marked point
    # of its curve, and (prune) the zeros of the masks the same repair makes again here.
    for label in ("prune", "fine-pruning", "sparse-fine-pruning"):
        record = records[label]
        marked = record["curve"][record["curve_marks"][record["chosen"]]]
        assert isinstance(record["pruned_count"], int) and record["pruned_count"] > 0, label
        assert record["pruned_count"] == marked["pruned"], label
        assert record["pruned_count"] == sum(len(v) for v in record["pruned"].values()), label
    assert records["fine-pruning"]["curve"][-1]["step"] == "fine-tuned"
    job = parse_grid(raw).models()[0]
    clean, _ = split_clean(load_dataset(job.data, "train"), 40, seed=0)
    masks = make_defense("prune").repair(load_model(job.path()).model, clean).masks
    assert masks is not None
    zeros = sum(int((mask == 0).sum()) for mask in masks.masks.values())
    assert records["prune"]["pruned_count"] == zeros

    assert main(["report", str(out / "results.jsonl"), "--out", str(out / "report")]) == 0
    report = Report(read_records(out / "results.jsonl"))
    (line,) = curve_lines(report, "finetune-only")
    assert line.xs == [0.0, 1.0]
    assert (out / "report" / "curves-finetune-only.png").read_bytes()[:4] == b"\x89PNG"
    assert "| backdoored | finetune-only | ft-2 | prune |" in (out / "report" /
                                                              "report.md").read_text()
    cells = {r["defense"]: r for r in read_csv(out / "report" / "cells.csv")}
    assert cells["finetune-only"]["pruned"] == ""
    assert cells["prune"]["pruned"] == str(zeros)
    assert float(cells["finetune-only"]["repair_seconds"]) > 0


def test_bench_repair_seconds_leave_the_evaluation_out(registered, slow_evaluation, data_folder,
                                                       tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid(data_folder, tmp_path / "zoo", ["finetune-only"])))
    out = tmp_path / "out"
    assert main(["--no-progress", "bench", str(path), "--out", str(out), "--workers", "0",
                 "--no-report"]) == 0  # in this process: the slow evaluation applies
    (record,) = read_records(out / "results.jsonl")
    assert record["status"] == "ok", record
    (call,) = slow_evaluation
    check_timings(record["repair_seconds"], record["evaluation_seconds"], call)
