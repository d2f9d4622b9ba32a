"""A sequence of repairs: each step repairs the previous one's result, on the same clean data;
the result is the last step's, the earlier steps are in its notes."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from goodnet.bench.grid import Entry, digest
from goodnet.defenses import DEFENSES, FSTConfig, Sequence, SequenceConfig, make_defense
from goodnet.errors import GoodnetError
from goodnet.masking import Masked
from goodnet.metrics import evaluate
from tests.conftest import Planted, corner_attack, halves

CLEAN = halves(200, seed=0)
TEST = halves(200, seed=1)


def test_prune_then_fine_tune_keeps_the_masks_and_tunes_the_head():
    model = Planted()
    before = copy.deepcopy(model.state_dict())
    result = Sequence(SequenceConfig(steps=("prune", "fst"))).repair(model, CLEAN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(result.model, Masked)
    assert result.pruned == {"conv": [2]} and result.pruned_count == 1
    assert [s["defense"] for s in result.notes["steps"]] == ["prune", "fst"]
    assert result.notes["steps"][0]["chosen"] == "0.04" and result.chosen == "tuned"
    assert result.curve.axis == "epoch" and result.chosen_point is not None
    assert all(p.pruned == 1 for p in result.curve.points)
    head = result.model.model.get_submodule("fc").weight
    assert not torch.equal(head, model.fc.weight)  # FST re-initialised and turned the head
    metrics = evaluate(result.model, TEST, corner_attack())
    assert metrics.attack_success_rate == 0.0  # the pruned backdoor channel stays off


def test_the_same_as_running_the_steps_by_hand():
    by_hand = make_defense("fst").repair(make_defense("prune").repair(Planted(), CLEAN).model,
                                         CLEAN)
    sequence = Sequence(SequenceConfig(steps=("prune", "fst"))).repair(Planted(), CLEAN)
    x, _ = TEST.get(torch.arange(50))
    assert torch.equal(sequence.model(x), by_hand.model(x))


def test_a_step_runs_with_the_settings_the_sequence_gives_it():
    """A step's own settings reach it (the same model as that step run by hand with them), and
    the step's record says which settings it ran with."""
    fst = {"epochs": 2, "lr": 0.02}
    by_hand = make_defense("fst", fst).repair(make_defense("prune").repair(Planted(),
                                                                           CLEAN).model, CLEAN)
    sequence = make_defense("sequence", {"steps": ["prune", {"fst": fst}]}).repair(Planted(),
                                                                                    CLEAN)
    x, _ = TEST.get(torch.arange(50))
    assert torch.equal(sequence.model(x), by_hand.model(x))
    ran = sequence.notes["steps"][1]["settings"]
    assert {key: ran[key] for key in fst} == fst
    default = Sequence(SequenceConfig(steps=("prune", "fst"))).repair(Planted(), CLEAN)
    assert not torch.equal(default.model(x), by_hand.model(x))


def test_a_scanning_steps_verdict_is_the_results():
    result = make_defense("sequence", {"steps": ["nc", "prune"]}).repair(Planted(), CLEAN)
    assert result.scan is not None and len(result.scan.triggers) == 2
    assert "nc: no class is flagged" in result.message  # nc's message is kept


@pytest.mark.parametrize(("steps", "message"), [
    (("fst",), "at least two"), (("fst", "nope"), "unknown defense 'nope'"),
    (("fst", "sequence"), "cannot be another sequence"),
    (("fst", {"nc": {"unlearn_epoch": 2}}), "sequence step nc has no setting 'unlearn_epoch'"),
    (("fst", {"nc": {}, "prune": {}}), "one defense's name and its settings"),
    (("fst", {"nc": 2}), "one defense's name and its settings")])
def test_bad_sequences_are_refused(steps, message):
    with pytest.raises(GoodnetError, match=message):
        SequenceConfig(steps=steps)


def test_a_sequence_from_the_command_line_text():
    defense = make_defense("sequence", {"steps": "fst,nc"}, text=True)
    assert defense.config.steps == ("fst", "nc")
    nested = make_defense("sequence", {"steps": "[fst, {nc: {unlearn_epochs: 3}}]"}, text=True)
    assert nested.config.steps == ("fst", {"nc": {"unlearn_epochs": 3}})
    assert nested.config.parts()[1][1].unlearn_epochs == 3


def test_a_changed_step_default_is_a_new_sequence_cell(monkeypatch):
    """A sequence runs its steps at their defaults, so the grid's cache key must hash them: a
    cached sequence cell must not be reused after a step's default changed."""
    entry = Entry("fst-then-prune", "sequence", (("steps", ["fst", "prune"]),))
    before = entry.resolved(DEFENSES, "defense")
    assert [name for name, _ in before["parts"]] == ["fst", "prune"]

    @dataclass(frozen=True)
    class Changed(FSTConfig):
        head_penalty: float = 0.3

    monkeypatch.setattr(DEFENSES["fst"], "Config", Changed)
    after = entry.resolved(DEFENSES, "defense")
    assert after["steps"] == before["steps"] and digest(after) != digest(before)
