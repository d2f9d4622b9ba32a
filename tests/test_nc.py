"""Neural Cleanse on a small backdoored CNN: the target class is flagged and its reversed trigger
sits on the true patch, unlearning removes the backdoor; the outlier rule, the unlearning data,
networks without BatchNorm and the settings are checked."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from goodnet.attacks import make_attack
from goodnet.data import split_clean
from goodnet.defenses.base import Trigger
from goodnet.defenses.nc import NCConfig, NeuralCleanse, unlearning_data
from goodnet.defenses.proxy import proxy_asr
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from goodnet.scans.nc import anomaly_indices
from goodnet.train import TrainConfig, train
from tests.conftest import halves, stripes

FAST = NCConfig(epochs=6, unlearn_epochs=10, unlearn_batch_size=32)


@pytest.fixture(scope="module")
def repaired(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    result = NeuralCleanse(FAST).repair(model, clean)
    return result, before


def test_the_target_is_flagged_and_its_trigger_is_the_patch(backdoored, repaired):
    _, clean, _, attack = backdoored
    result, _ = repaired
    scan = result.scan
    assert scan is not None and scan.backdoored and scan.targets == (1,)
    assert scan.score == max(scan.scores) == scan.scores[1] > FAST.anomaly_threshold
    assert sorted(scan.scores)[-2] <= FAST.anomaly_threshold
    assert [t.target for t in scan.triggers] == list(range(clean.num_classes))
    trigger = scan.triggers[1]
    assert trigger.mask.shape == (1, 16, 16) and trigger.pattern.shape == (1, 16, 16)
    assert trigger.mask.device.type == "cpu" and 0 <= trigger.mask.min() <= trigger.mask.max() <= 1
    assert trigger.success >= 0.95 and trigger.norm == pytest.approx(float(trigger.mask.sum()))
    assert trigger.norm == min(t.norm for t in scan.triggers)
    rows, cols = attack.trigger.region(16, 16)
    patch = torch.zeros(16, 16, dtype=torch.bool)
    patch[rows, cols] = True
    mask = trigger.mask[0]
    assert (mask[patch] >= 0.5).sum() >= 2  # the reversed mask covers part of the true patch,
    assert mask[patch].mean() >= 5 * mask[~patch].mean()  # far more densely than elsewhere,
    assert trigger.pattern[0][patch & (mask >= 0.5)].min() >= 0.8  # and paints it white


def test_unlearning_removes_the_backdoor_and_keeps_the_task(backdoored, repaired):
    model, _, test, attack = backdoored
    result, before = repaired
    metrics = evaluate(result.model, test, attack)
    assert evaluate(model, test, attack).attack_success_rate >= 0.95
    assert metrics.attack_success_rate <= 0.1
    assert metrics.clean_accuracy >= 0.95
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.model is not model and result.message == ""
    assert [p.x for p in result.curve.points] == list(range(FAST.unlearn_epochs + 1))
    extras = [dict(p.extra) for p in result.curve.points]
    assert extras[0] == {} and extras[-1]["trigger_success"] <= 0.1
    assert result.notes["flagged"] == [1] and result.notes["unlearning_images"] == 40
    json.dumps(result.notes)  # plain values only


def test_the_curve_follows_the_flagged_classs_own_trigger(backdoored):
    """Each epoch's ``trigger_success`` is the share of other classes' clean images that the
    flagged class's reversed trigger sends to that class (not to its row among the flagged).
    With a learning rate too small to unlearn anything, it stays that of the backdoored model."""
    model, clean, _, _ = backdoored
    still = dataclasses.replace(FAST, unlearn_epochs=1, unlearn_lr=1e-9)
    result = NeuralCleanse(still).repair(model, clean)
    assert result.scan.targets == (1,)
    expected = proxy_asr(model, clean, result.scan.triggers[1])
    assert expected >= 0.9
    assert dict(result.curve.points[-1].extra)["trigger_success"] == pytest.approx(expected,
                                                                                    abs=0.02)


def test_the_same_seed_gives_the_same_weights(backdoored, repaired):
    model, clean, _, _ = backdoored
    first, _ = repaired
    second = NeuralCleanse(FAST).repair(model, clean)
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert first.notes == second.notes


def test_nothing_flagged_returns_the_model_unchanged(backdoored):
    model, clean, _, _ = backdoored
    config = NCConfig(epochs=2, anomaly_threshold=1e6)
    result = NeuralCleanse(config).repair(model, clean)
    assert result.scan is not None and not result.scan.backdoored and result.scan.targets == ()
    assert "no class is flagged" in result.message and "unchanged" in result.message
    assert result.model is not model
    for (name, a), (_, b) in zip(result.model.state_dict().items(),
                                 model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert len(result.curve) == 1 and "unlearning_images" not in result.notes


NO_BATCHNORM = json.dumps([
    {"name": "in", "op": "input", "inputs": []},
    {"name": "conv", "op": "conv2d", "inputs": ["in"], "in": 1, "out": 8, "kernel": [3, 3],
     "stride": [1, 1], "dilation": [1, 1], "padding": "same", "bias": True, "activation": "relu"},
    {"name": "pool", "op": "maxpool", "inputs": ["conv"], "pool": [2, 2], "stride": [2, 2],
     "padding": "valid"},
    {"name": "flat", "op": "flatten", "inputs": ["pool"]},
    {"name": "dense", "op": "dense", "inputs": ["flat"], "in": 512, "out": 4, "bias": True,
     "activation": "linear"}])


def test_an_imported_graph_without_batchnorm():
    """A Keras-style graph (convolution, pooling, dense; no BatchNorm, no layer names NC needs)
    with the same BadNets backdoor: flagged and repaired alike."""
    train_data, test = stripes(800, seed=0), stripes(200, seed=1)
    attack = make_attack("badnets", {"target": 1, "poison_rate": 0.1}, train_data.image_shape,
                         train_data.num_classes)
    model = build_model(ModelSpec("graph", 4, 1, 16, 16, (0.0,), (1.0,), graph=NO_BATCHNORM))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    train(model, attack.poison(train_data, seed=0), TrainConfig(epochs=3, batch_size=32))
    assert evaluate(model, test, attack).attack_success_rate >= 0.95
    clean, _ = split_clean(train_data, 0.25, seed=0)
    result = NeuralCleanse(FAST).repair(model, clean)
    assert result.scan is not None and result.scan.targets == (1,)
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.1 and metrics.clean_accuracy >= 0.95


def test_the_anomaly_index_by_hand():
    norms = torch.tensor([1.0, 10.0, 10.0, 12.0, 8.0], dtype=torch.float64)
    # median 10; deviations 9, 0, 0, 2, 2 → median 2; MAD = 1.4826 · 2.
    assert anomaly_indices(norms).tolist() == pytest.approx(
        [9 / 2.9652, 0.0, 0.0, -2 / 2.9652, 2 / 2.9652])
    # An even count takes the mean of the middle two, as numpy's median (the reference's).
    assert anomaly_indices(torch.tensor([1.0, 3.0])).tolist() == pytest.approx(
        [1 / 1.4826, -1 / 1.4826])


def test_the_unlearning_data_stamps_a_share_and_keeps_labels():
    clean = halves(50)
    triggers = [Trigger(k, torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), 0.0, 1.0)
                for k in (0, 1)]
    triggers[0].mask[:, 0, 0] = 1.0  # trigger 0 blacks out pixel (0, 0), trigger 1 nothing
    data = unlearning_data(clean, triggers, 0.2, 0)
    assert [len(g.indices) for g in data.groups] == [5, 5]
    x, y = data.get(torch.arange(50))
    assert torch.equal(y, clean.labels)
    changed = torch.nonzero(x[:, 0, 0, 0] == 0).flatten()
    assert torch.equal(changed, data.groups[0].indices)
    again = unlearning_data(clean, triggers, 0.2, 0)
    assert torch.equal(again.groups[1].indices, data.groups[1].indices)


@pytest.mark.parametrize("settings", [
    {"epochs": 0}, {"trigger_lr": 0.0}, {"init_cost": -1.0}, {"cost_multiplier": 1.0},
    {"success_threshold": 1.5}, {"anomaly_threshold": float("nan")}, {"unlearn_share": 0.0},
    {"unlearn_epochs": 0}, {"patience": 0}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match="nc:"):
        NCConfig(**settings)
