"""BTI-DBF(U) on the planted-backdoor CNN: a feature mask, a generator of trigger-like images
and unlearning them remove the backdoor within seconds; the generator takes any image shape;
the feature layer is found or named; the settings are checked."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from goodnet.defenses import BTIDBF, BTIDBFConfig, Evaluation, make_defense
from goodnet.defenses.btidbf import Generator
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from tests.conftest import Planted, corner_attack, halves


@pytest.fixture(scope="module")
def repaired(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    return BTIDBF().repair(model, clean), before


def test_the_planted_backdoor_is_unlearned_and_the_task_kept(backdoored, repaired):
    model, _, test, attack = backdoored
    result, before = repaired
    original, after = evaluate(model, test, attack), evaluate(result.model, test, attack)
    assert original.attack_success_rate >= 0.95
    assert after.attack_success_rate <= 0.1
    assert after.clean_accuracy >= original.clean_accuracy - 0.05
    assert result.notes["targets"] == [1]  # the attack's target, read off the generator
    assert result.notes["layer"] == "fc2"  # the classifier layer's input: the features
    assert result.timings.repair < 30
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_curve_has_a_point_per_round_and_no_hook_is_left(repaired):
    result, _ = repaired
    rounds = BTIDBFConfig().rounds
    assert result.curve.axis == "round" and len(result.curve) == rounds + 1
    assert [p.x for p in result.curve.points] == list(range(rounds + 1))
    assert result.chosen == "unlearned" and result.curve.mark("unlearned") is \
        result.curve.points[-1]
    assert len(result.notes["generator_mse"]) == len(result.notes["unlearn_loss"]) == rounds
    assert not any(m._forward_pre_hooks for m in result.model.modules())
    assert all(p.requires_grad for p in result.model.parameters())
    assert not result.model.training


def test_the_same_seed_gives_the_same_weights(backdoored, repaired):
    model, clean, _, _ = backdoored
    result, _ = repaired
    with torch.random.fork_rng():
        torch.manual_seed(12345)  # the global random state is not the defense's seed
        again = BTIDBF().repair(model, clean).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in result.model.state_dict().items())
    other = BTIDBF(BTIDBFConfig(seed=1)).repair(model, clean).model.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in result.model.state_dict().items())


def test_an_evaluation_changes_nothing_it_decides(backdoored):
    model, clean, test, attack = backdoored
    settings = {"rounds": 2, "generator_epochs": 2, "unlearn_epochs": 1}
    plain = make_defense("btidbf", settings).repair(model, clean)
    measured = make_defense("btidbf", settings).repair(
        model, clean, evaluation=Evaluation(test, attack))
    assert all(torch.equal(v, measured.model.state_dict()[k])
               for k, v in plain.model.state_dict().items())
    assert measured.notes == plain.notes
    assert all(p.test_asr is not None for p in measured.curve.points)
    stripped = [dataclasses.replace(p, test_ca=None, test_asr=None)
                for p in measured.curve.points]
    assert stripped == list(plain.curve.points)


def test_a_network_without_batchnorm_is_unlearned():
    planted, clean = Planted(), halves(64)
    before = copy.deepcopy(planted.state_dict())
    quick = BTIDBFConfig(rounds=2, mask_epochs=1, generator_epochs=1, unlearn_epochs=1)
    result = BTIDBF(quick).repair(planted, clean)
    assert not torch.equal(result.model.conv.weight, planted.conv.weight)
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items())
    assert result.notes["layer"] == "fc" and len(result.curve) == 3
    assert evaluate(result.model, halves(64, seed=1), corner_attack()).clean_accuracy >= 0.9


def test_the_feature_layer_can_be_named(backdoored):
    model, clean, _, _ = backdoored
    quick = {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "unlearn_epochs": 1}
    named = make_defense("btidbf", {**quick, "layer": "fc1"}).repair(model, clean)
    assert named.notes["layer"] == "fc1"
    default = make_defense("btidbf", quick).repair(model, clean)
    assert not torch.equal(named.model.fc1.weight, default.model.fc1.weight)
    with pytest.raises(GoodnetError, match="btidbf: the model has no module 'fc9'"):
        make_defense("btidbf", {**quick, "layer": "fc9"}).repair(model, clean)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 55, 47), (1, 8, 8), (3, 5, 7)])
def test_the_generator_starts_near_the_identity_for_any_image_shape(shape):
    torch.manual_seed(0)
    generator = Generator(shape[0], 8)
    x = torch.rand(4, *shape)
    made = generator(x)
    assert made.shape == x.shape
    assert 0 < (made - x).abs().max() < 0.05  # near the identity, not at it (flat there)
    assert sum(p.numel() for p in generator.parameters()) < 10_000


@pytest.mark.parametrize("settings", [
    {"rounds": 0}, {"mask_epochs": 0}, {"generator_epochs": -1}, {"unlearn_epochs": 0},
    {"generator_width": 0}, {"batch_size": 0}, {"mask_lr": 0.0}, {"generator_lr": -1.0},
    {"unlearn_lr": float("nan")}, {"norm_bound": 0.0}, {"feature_bound": float("inf")},
    {"unlearn_share": -0.1}, {"unlearn_share": 1.5}])
def test_bad_settings_are_refused_in_one_line(settings):
    with pytest.raises(GoodnetError, match="btidbf: ") as caught:
        BTIDBFConfig(**settings)
    assert str(caught.value).startswith("btidbf: ") and "\n" not in str(caught.value)
