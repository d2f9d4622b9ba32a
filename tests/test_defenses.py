"""The lab's defenses on a network with a planted backdoor channel, and the contract every
registered defense keeps."""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from goodnet.attacks import make_attack
from goodnet.data.dataset import ImageData
from goodnet.defenses import (
    DEFENSES,
    Defense,
    Evaluation,
    FinePruning,
    FinePruningConfig,
    Prune,
    PruneConfig,
    SparseFinePruning,
    SparseFinePruningConfig,
    make_defense,
)
from goodnet.errors import GoodnetError
from goodnet.metrics import Metrics, evaluate
from goodnet.settings import key_names
from tests.conftest import Planted, PlantedMaps, corner_attack, halves

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
    points = result.curve.points
    assert result.curve.axis == "pruned" and [p.x for p in points] == [0, 1, 2, 3]
    accuracy = [p.clean_data_accuracy for p in points]
    assert accuracy[:2] == [1.0, 1.0] and accuracy[2] == 0.5  # 0, 1, 2 channels pruned
    assert [p.test_asr for p in points[:2]] == [1.0, 0.0]
    # The lab keeps the first model at least X below: one clean channel more.
    assert all(len(m.pruned()["conv"]) == 2 for m in result.variant_masks.values())


def test_a_budget_is_the_most_accuracy_given_up():
    # Pruning all three channels leaves constant logits: class 0 for all, 50 % accuracy, a
    # 50-point loss that fits a 60-point budget but not a 40-point one.
    wide = Prune(PruneConfig(max_drops=(0.6, 0.4), max_drop=0.6)).repair(Planted(), CLEAN)
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
    points = result.curve.points
    assert result.curve.axis == "round" and [p.x for p in points] == [0, 1, 2, 3, 4]
    assert all(p.test_asr is not None for p in points)
    assert points[-1].clean_data_accuracy == 1.0
    assert evaluate(result.model, TEST, corner_attack()).attack_success_rate == 0.0


def test_naming_a_layer_that_does_not_exist():
    with pytest.raises(GoodnetError, match="no layer 'conv9'; maskable layers: conv, fc"):
        Prune(PruneConfig(layer="conv9")).repair(Planted(), CLEAN)


def test_single_class_clean_data_is_refused():
    with pytest.raises(GoodnetError, match="single class"):
        Prune().repair(Planted(), CLEAN.subset(torch.arange(0, 200, 2)))


# --- the contract every registered defense keeps ----------------------------------------------

# Each defense's own quick settings (``quick``, on its class) make it run in seconds here.

# Settings under which every defense prunes on the planted network, fast. Its backdoor channel
# is silent on clean data, so RNP's recovering and ANP's noise get no gradient on its mask: what
# they learn is to drop clean channels (RNP channel 0, ANP channels 0 and 1, masks at exactly 0),
# and a 60-point max_drop lets the clean rule prune them (held-out accuracy falls to 50 %).
# That is enough for a contract about what they choose from, not about how well they repair.
# Every other defense (the repairs that prune nothing; the sequence prunes in its first step)
# runs at its quick settings.
PRUNING = {
    "rnp": {"mask_epochs": 2, "batch_size": 32, "max_drop": 0.6},
    "anp": {"iterations": 100, "batch_size": 32, "max_drop": 0.6},
    "clp": {"u": 1.0},
}


def quick(name: str) -> Defense[Any]:
    """The defense ``name`` at its quick settings."""
    return make_defense(name, DEFENSES[name].quick)


def pruning(name: str) -> Defense[Any]:
    """The defense ``name`` at settings under which it prunes on the planted network."""
    return make_defense(name, PRUNING.get(name, DEFENSES[name].quick))


# The network each defense is checked on: the planted one, or its version with feature maps for
# a defense that reads spatial maps.
NETWORK = {"nad": PlantedMaps}


def network(name: str) -> torch.nn.Module:
    return NETWORK.get(name, Planted)()


def test_every_defense_declares_quick_settings():
    assert set(PRUNING) <= set(DEFENSES)
    for name, cls in DEFENSES.items():
        assert "quick" in vars(cls), name
        assert quick(name).config is not None


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defense_contract(name):
    defense = quick(name)
    model = network(name)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    first = defense.repair(model, CLEAN)
    # The caller's model is untouched, and so is the global random state.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.conv._forward_hooks
    assert torch.equal(torch.get_rng_state(), rng)
    # Same settings, same data: same result.
    second = defense.repair(model, CLEAN)
    x, _ = TEST.get(torch.arange(20))
    assert torch.equal(first.model(x), second.model(x))
    assert first.pruned == second.pruned
    assert first.model(x).shape == (20, 2)
    assert first.defense == name and first.timings.repair > 0 and first.curve


def mirror() -> Evaluation:
    """An evaluation that contradicts the clean data: its labels are swapped and its attack
    targets class 1, so on the planted network test CA is highest, and test ASR lowest, where the
    clean data says the model is broken or still backdoored. A defense that read it would
    choose differently (see the next test)."""
    swapped = ImageData(TEST.images, 1 - TEST.labels, 2, "halves[200], labels swapped")
    attack = make_attack("badnets", {"patch_size": 2, "margin": 0, "target": 1}, (1, 8, 8), 2)
    return Evaluation(swapped, attack)


def test_the_mirror_evaluation_contradicts_the_clean_data():
    result = Prune().repair(Planted(), CLEAN, evaluation=mirror())
    points = result.curve.points  # channels 2, 1, 0 pruned in turn
    assert [p.clean_data_accuracy for p in points] == [1.0, 1.0, 0.5, 0.5]
    assert [p.test_ca for p in points] == [0.0, 0.0, 0.5, 0.5]
    assert [p.test_asr for p in points] == [0.0, 1.0, 0.0, 0.0]
    assert result.pruned == {"conv": [2]}  # the one step the mirror calls worst


def without_test_figures(value):
    """``value`` with the evaluation's figures taken out of any curve records it holds (a
    sequence keeps its earlier steps' curves in its notes)."""
    if isinstance(value, dict):
        return {k: without_test_figures(v) for k, v in value.items()
                if k not in ("test_ca", "test_asr")}
    if isinstance(value, list):
        return [without_test_figures(v) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_an_evaluation_changes_nothing(name):
    """With the mirror evaluation, a defense chooses, prunes and records exactly what it does
    without one; the curve only gains the test figures."""
    defense = pruning(name)
    plain = defense.repair(network(name), CLEAN)
    measured = defense.repair(network(name), CLEAN, evaluation=mirror())
    if plain.masks is not None:  # there is a choice the evaluation could have moved
        assert plain.pruned_count > 0
    assert measured.chosen == plain.chosen and measured.pruned == plain.pruned
    assert without_test_figures(measured.notes) == plain.notes
    assert measured.variant_masks.keys() == plain.variant_masks.keys()
    for variant, masks in plain.variant_masks.items():
        assert measured.variant_masks[variant].pruned() == masks.pruned(), variant
    x, _ = TEST.get(torch.arange(40))
    assert measured.variants.keys() == plain.variants.keys()
    for variant, model in plain.variants.items():
        assert torch.equal(measured.variants[variant](x), model(x)), variant
    assert torch.equal(measured.model(x), plain.model(x))
    assert all(p.test_ca is None and p.test_asr is None for p in plain.curve.points)
    assert all(p.test_ca is not None and p.test_asr is not None for p in measured.curve.points)
    stripped = [dataclasses.replace(p, test_ca=None, test_asr=None) for p in measured.curve.points]
    assert stripped == list(plain.curve.points)
    assert (measured.curve.axis, measured.curve.marks) == (plain.curve.axis, plain.curve.marks)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_the_result_names_what_it_pruned_and_marks_its_choice(name):
    result = pruning(name).repair(network(name), CLEAN)
    if result.masks is None:  # a defense that prunes nothing says so
        assert result.pruned is None and result.pruned_count is None
        assert result.curve.mark(result.chosen) == result.chosen_point is not None
        return
    assert result.pruned == {k: v for k, v in result.masks.pruned().items() if v}
    assert result.pruned_count == sum(len(v) for v in result.masks.pruned().values()) > 0
    assert len(result.curve) >= 1
    chosen = result.curve.mark(result.chosen)
    assert chosen is not None and chosen == result.chosen_point
    assert chosen.pruned == result.pruned_count
    for variant, masks in result.variant_masks.items():
        assert result.pruned_in(variant) == sum(len(v) for v in masks.pruned().values())


DELAY = 0.05


class Delayed(nn.Module):
    """``inner``, ``DELAY`` seconds slower per forward pass (each delay logged in ``slept``)."""

    def __init__(self, inner: nn.Module, slept: list[float]) -> None:
        super().__init__()
        self.inner = inner
        self.slept = slept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(DELAY)
        self.slept.append(DELAY)
        return self.inner(x)


@dataclass(frozen=True)
class SlowEvaluation(Evaluation):
    """An evaluation whose every measurement is slower by ``DELAY`` per batch it classifies."""

    slept: list[float] = field(default_factory=list, compare=False, repr=False)

    def measure(self, model: nn.Module) -> Metrics:
        return super().measure(Delayed(model, self.slept))


def test_the_evaluations_time_is_kept_out_of_the_repair_time():
    evaluation = SlowEvaluation(TEST, corner_attack())
    start = time.perf_counter()
    result = DEFENSES["prune"]().repair(Planted(), CLEAN, evaluation=evaluation)
    wall = time.perf_counter() - start
    slept = sum(evaluation.slept)
    assert slept >= len(result.curve) * DELAY  # a clean and a poisoned batch per point
    assert slept <= result.timings.evaluation <= wall
    assert 0 < result.timings.repair <= wall - slept
    assert result.seconds == result.timings.repair


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_a_defense_that_needs_data_says_so(name):
    cls = DEFENSES[name]
    if cls.needs_clean:
        with pytest.raises(GoodnetError, match=f"{name} needs clean data"):
            cls().repair(Planted())
    else:  # data-free, but the planted network does not say what input it takes
        with pytest.raises(GoodnetError, match="input shape is unknown"):
            cls().repair(Planted())


def test_a_renamed_setting_still_works_with_one_warning():
    with pytest.warns(FutureWarning, match="'select' is now called 'max_drop'") as caught:
        defense = make_defense("prune", {"select": 0.1})
    assert len([w for w in caught if issubclass(w.category, FutureWarning)]) == 1
    assert defense.config.max_drop == 0.1 and 0.1 in defense.config.max_drops
    with pytest.warns(FutureWarning), pytest.raises(GoodnetError, match="not both"):
        make_defense("prune", {"select": 0.1, "max_drop": 0.1})


# Every renamed defense setting (docs/settings.md): defense, old name, new name, a value.
RENAMED = [
    *[(name, old, new, value) for name in ("rnp", "anp")
      for old, new, value in (("tolerance", "max_drop", 0.05), ("holdout", "select_share", 0.3))],
    ("rnp", "unlearning_lr", "unlearn_lr", 0.02), ("rnp", "unlearning_epochs", "unlearn_epochs", 3),
    ("rnp", "recovering_lr", "mask_lr", 0.1), ("rnp", "recovering_epochs", "mask_epochs", 3),
    ("rnp", "alpha", "mask_loss_scale", 0.5),
    ("anp", "alpha", "natural_weight", 0.5), ("anp", "lr", "mask_lr", 0.1),
    ("anp", "eps", "noise_eps", 0.3), ("anp", "steps", "noise_steps", 2),
    ("fst", "alpha", "head_penalty", 0.5),
    ("i-bau", "portion", "unlearn_share", 0.5), ("i-bau", "n_rounds", "rounds", 2),
    ("i-bau", "K", "fixed_point_iterations", 3), ("i-bau", "perturbation_lr", "trigger_lr", 5.0),
    ("nc", "lr", "trigger_lr", 0.05),
]


@pytest.mark.parametrize(("name", "old", "new", "value"), RENAMED)
def test_an_old_setting_name_still_works_with_a_warning_and_keeps_its_key(name, old, new, value):
    with pytest.warns(FutureWarning, match=f"'{old}' is now called '{new}'") as caught:
        defense = make_defense(name, {old: value})
    assert len([w for w in caught if issubclass(w.category, FutureWarning)]) == 1
    assert getattr(defense.config, new) == value
    assert key_names(type(defense.config), {new: value}) == {old: value}
    with pytest.warns(FutureWarning), pytest.raises(GoodnetError, match="not both"):
        make_defense(name, {old: value, new: value})


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_an_unknown_setting_is_refused_naming_the_known_ones(name):
    known = sorted(f.name for f in dataclasses.fields(DEFENSES[name].Config))
    with pytest.raises(GoodnetError, match=re.escape(f"its settings are {known}")):
        make_defense(name, {"no_such_setting": 1})


def test_the_input_that_traces_a_model_is_on_the_models_device():
    """A model on a GPU is traced with an input on the GPU (the meta device stands in for one
    here: it has no values, but it has a device)."""
    from goodnet.defenses.base import clean_or_blank

    model = Planted().to("meta")
    assert clean_or_blank(model, halves(4)).device.type == "meta"
    model.input_shape = (1, 8, 8)
    assert clean_or_blank(model, None).device.type == "meta"
