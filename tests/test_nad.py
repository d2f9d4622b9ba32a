"""NAD: the attention map by hand, the distillation term against plain fine-tuning, the repair
on a small backdoored CNN, determinism, hooks, networks without BatchNorm, settings."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from goodnet.defenses.nad import NAD, NADConfig, attention
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate, predict
from goodnet.models import ModelSpec, build_model
from goodnet.train import Hooks, train
from tests.conftest import Planted, halves, tiny_keras_graph

SHORT = NADConfig(teacher_epochs=1, epochs=2, batch_size=32)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_the_attention_map_by_hand():
    # two channels on a 2x2 map; positions in row order
    feature = torch.tensor([[[[1.0, -2.0], [0.0, 1.0]],
                             [[0.0, 1.0], [2.0, 0.0]]]])
    squares = torch.tensor([[1.0, 5.0, 4.0, 1.0]])  # 1+0, 4+1, 0+4, 1+0
    assert torch.allclose(attention(feature, 2.0), squares / (math.sqrt(43) + 1e-6))
    absolutes = torch.tensor([[1.0, 3.0, 2.0, 1.0]])
    assert torch.allclose(attention(feature, 1.0), absolutes / (math.sqrt(15) + 1e-6))


def test_without_the_term_nad_is_plain_fine_tuning(backdoored):
    """Betas all zero: the same weights as the training loop alone; with the term: others."""
    model, clean, _, _ = backdoored
    plain = NADConfig(betas=(0.0, 0.0, 0.0), teacher_epochs=1, epochs=2, batch_size=32)
    result = NAD(plain).repair(model, clean)
    tuned = copy.deepcopy(model)
    # NAD measures the student after each epoch, and measuring puts the weights back in the
    # contiguous layout (float sums in another order), so the plain loop measures too.
    train(tuned, clean, plain.training(plain.epochs),
          hooks=Hooks(after_epoch=lambda _epoch: predict(tuned, clean)))
    assert same_weights(result.model, tuned)
    assert not same_weights(NAD(SHORT).repair(model, clean).model, tuned)


# The reference's β = 5000 on the deepest layer (bboylyg/NAD config.py before f17b713): at this
# scale the default β = 1000 on it leaves the backdoor after a few epochs; 5000 removes it.
TEACHER, STUDENT = 1, 3
STRONG = NADConfig(betas=(5000.0,), teacher_epochs=TEACHER, epochs=STUDENT, batch_size=32)


def test_nad_removes_the_backdoor_and_keeps_the_task(backdoored):
    model, clean, test, attack = backdoored
    before = copy.deepcopy(model.state_dict())
    hooks_before = forward_hooks(model)
    result = NAD(STRONG).repair(model, clean)
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.05
    assert metrics.clean_accuracy >= 0.95
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert forward_hooks(model) == hooks_before == 0 and forward_hooks(result.model) == 0
    assert result.notes["layers"] == ["bn2"] and result.notes["betas"] == [5000.0]
    assert result.chosen == "distilled" and result.pruned is None
    json.dumps(result.notes)  # plain values
    curve = result.curve
    assert [p.x for p in curve.sweep()] == list(range(STUDENT + 1))
    assert [p.x for p in curve.points if p.label == "teacher"] == list(range(1, TEACHER + 1))
    assert curve.mark("distilled") is curve.points[-1]


def test_the_same_fine_tuning_without_the_term_keeps_the_backdoor(backdoored):
    model, clean, test, attack = backdoored
    plain = dataclasses.replace(STRONG, betas=(0.0,))
    assert evaluate(NAD(plain).repair(model, clean).model, test, attack).attack_success_rate >= 0.9


def test_the_same_seed_gives_the_same_weights(backdoored):
    model, clean, _, _ = backdoored
    first, second = NAD(SHORT).repair(model, clean), NAD(SHORT).repair(model, clean)
    assert same_weights(first.model, second.model)
    # the default: the last three convolutions' mask points, betas from the deepest
    assert first.notes["layers"] == ["bn1", "bn2"] and first.notes["betas"] == [1000.0, 1000.0]
    other = NAD(NADConfig(teacher_epochs=1, epochs=2, batch_size=32, seed=1)).repair(model, clean)
    assert not same_weights(other.model, first.model)


def keras(batchnorm: bool) -> torch.nn.Module:
    graph = json.loads(tiny_keras_graph(2, 1))
    if not batchnorm:
        graph = [layer for layer in graph if layer["op"] != "batchnorm"]
        next(layer for layer in graph if layer["name"] == "pool")["inputs"] = ["conv"]
    return build_model(ModelSpec("graph", 2, 1, 8, 8, (0.0,), (1.0,), graph=json.dumps(graph)))


@pytest.mark.parametrize(("batchnorm", "layer"), [(True, "bn"), (False, "conv")])
def test_imported_keras_graphs_with_and_without_batchnorm(batchnorm, layer):
    model = keras(batchnorm)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == batchnorm
    result = NAD(SHORT).repair(model, halves(64))
    assert result.notes["layers"] == [layer] and result.notes["betas"] == [1000.0]
    assert forward_hooks(result.model) == forward_hooks(model)
    assert not same_weights(result.model, model)


def test_a_network_with_one_by_one_maps_is_refused_with_the_reason():
    """Planted's convolution sees the whole 8x8 image: a 1x1 map, whose attention is the
    constant 1, so there is nothing to distil."""
    with pytest.raises(GoodnetError, match="several positions"):
        NAD(SHORT).repair(Planted(), halves(64))


def test_named_layers_must_exist_and_give_feature_maps(backdoored):
    model, clean, _, _ = backdoored
    with pytest.raises(GoodnetError, match="no layer 'nope'"):
        NAD(NADConfig(layers=("nope",), betas=(1.0,))).repair(model, clean)
    with pytest.raises(GoodnetError, match="'fc2' gives no feature map"):
        NAD(NADConfig(layers=("bn1", "fc2"), betas=(1.0, 1.0))).repair(model, clean)
    assert forward_hooks(model) == 0
    result = NAD(NADConfig(layers=("relu1",), betas=(10.0,), teacher_epochs=0, epochs=1,
                           batch_size=64)).repair(model, clean)
    assert result.notes["layers"] == ["relu1"] and result.notes["teacher_loss"] == []


@pytest.mark.parametrize("settings", [
    {"betas": (-1.0, 1.0)}, {"betas": ()}, {"betas": (float("nan"),)},
    {"layers": ("bn1",), "betas": (1.0, 1.0)}, {"p": 0.0}, {"epochs": 0},
    {"teacher_epochs": -1}, {"batch_size": 0}, {"lr": 0.0}, {"augment": "rotate"}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match="nad"):
        NADConfig(**settings)
