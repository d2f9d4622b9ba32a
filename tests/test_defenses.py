"""The lab's defenses on a network with a planted backdoor channel, and the contract every
registered defense keeps."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.defenses import (
    DEFENSES,
    ANPConfig,
    Evaluation,
    FinePruning,
    FinePruningConfig,
    Prune,
    PruneConfig,
    RNPConfig,
    SparseFinePruning,
    SparseFinePruningConfig,
)
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from tests.conftest import Planted, corner_attack, halves

CLEAN = halves(200, seed=0)
TEST = halves(200, seed=1)


def test_the_planted_network_is_backdoored():
    metrics = evaluate(Planted(), TEST, corner_attack())
    assert metrics.clean_accuracy == 1.0
    assert metrics.attack_success_rate == 1.0


@pytest.mark.parametrize("semantics", ["channel", "keep-bias"])
def test_prune_removes_exactly_the_planted_channel(semantics):
    result = Prune(PruneConfig(semantics=semantics)).repair(Planted(), CLEAN)
    assert result.notes["layer"] == "conv"
    assert result.notes["order"][0] == 2  # lowest mean clean activation
    for name, masks in result.variant_masks.items():
        assert masks.pruned() == {"conv": [2]}, name  # every budget below 50 points
    metrics = evaluate(result.model, TEST, corner_attack())
    assert metrics.clean_accuracy == 1.0
    assert metrics.attack_success_rate == 0.0


def test_prune_curve_and_the_lab_rule():
    result = Prune(PruneConfig(rule="lab")).repair(Planted(), CLEAN,
                                                   evaluation=Evaluation(TEST, corner_attack()))
    accuracy = [r["clean_data_accuracy"] for r in result.curve]
    assert accuracy[:2] == [1.0, 1.0] and accuracy[2] == 0.5  # 0, 1, 2 channels pruned
    assert [r["test_asr"] for r in result.curve[:2]] == [1.0, 0.0]
    # The lab keeps the first model at least X below: one clean channel more.
    assert all(len(m.pruned()["conv"]) == 2 for m in result.variant_masks.values())


def test_a_budget_is_the_most_accuracy_given_up():
    # Pruning all three channels leaves constant logits: class 0 for all, 50 % accuracy, a
    # 50-point loss that fits a 60-point budget but not a 40-point one.
    wide = Prune(PruneConfig(max_drops=(0.6, 0.4), select=0.6)).repair(Planted(), CLEAN)
    assert len(wide.variant_masks["0.6"].pruned()["conv"]) == 3
    assert wide.variant_masks["0.4"].pruned() == {"conv": [2]}


def test_fine_pruning_keeps_the_backdoor_out():
    result = FinePruning(FinePruningConfig(epochs=3)).repair(Planted(), CLEAN)
    assert result.masks.pruned() == {"conv": [2]}
    metrics = evaluate(result.model, TEST, corner_attack())
    assert metrics.clean_accuracy >= 0.95
    assert metrics.attack_success_rate == 0.0


def test_sparse_fine_pruning_ends_with_the_planted_channel_pruned():
    # A gentle rate: the hand-set logits (×10, ×100) make lr 0.01 kill the clean channels.
    config = SparseFinePruningConfig(fraction=0.34, rounds=4, seed=1, lr=1e-3)
    result = SparseFinePruning(config).repair(Planted(), CLEAN,
                                              evaluation=Evaluation(TEST, corner_attack()))
    assert result.masks.pruned() == {"conv": [2]}
    assert [r["round"] for r in result.curve] == [0, 1, 2, 3, 4]
    assert all("test_asr" in r for r in result.curve)
    assert result.curve[-1]["clean_data_accuracy"] == 1.0
    assert evaluate(result.model, TEST, corner_attack()).attack_success_rate == 0.0


def test_naming_a_layer_that_does_not_exist():
    with pytest.raises(GoodnetError, match="no layer 'conv9'; maskable layers: conv, fc"):
        Prune(PruneConfig(layer="conv9")).repair(Planted(), CLEAN)


def test_single_class_clean_data_is_refused():
    with pytest.raises(GoodnetError, match="single class"):
        Prune().repair(Planted(), CLEAN.subset(torch.arange(0, 200, 2)))


FAST = {
    "prune": None,
    "fine-pruning": FinePruningConfig(epochs=1),
    "sparse-fine-pruning": SparseFinePruningConfig(rounds=2, lr=1e-3),
    "rnp": RNPConfig(unlearning_epochs=2, recovering_epochs=2, batch_size=64),
    "anp": ANPConfig(iterations=20, batch_size=32),
    "clp": None,
}


def test_every_defense_has_fast_settings():
    assert set(FAST) == set(DEFENSES)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defense_contract(name):
    defense = DEFENSES[name](FAST[name])
    model = Planted()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    first = defense.repair(model, CLEAN)
    # The caller's model is untouched, and so is the global random state.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.conv._forward_hooks
    assert torch.equal(torch.get_rng_state(), rng)
    # Same settings, same data: same result; an evaluation is only reported, never used.
    second = defense.repair(model, CLEAN, evaluation=Evaluation(TEST, corner_attack()))
    x, _ = TEST.get(torch.arange(20))
    assert torch.equal(first.model(x), second.model(x))
    assert first.masks.pruned() == second.masks.pruned()
    assert first.model(x).shape == (20, 2)
    assert first.defense == name and first.seconds > 0 and first.curve
