"""Metrics on hand-made predictions, and evaluate() against a model whose answers are known."""

from __future__ import annotations

import math

import torch
from torch import nn

from goodnet.attacks import make_attack
from goodnet.data.dataset import ImageData
from goodnet.metrics import (
    attack_success_rate,
    clean_accuracy,
    evaluate,
    predict,
    robust_accuracy,
)


def test_rates_on_hand_made_predictions():
    predictions = torch.tensor([0, 1, 2, 2, 0])
    labels = torch.tensor([0, 1, 1, 2, 1])
    assert clean_accuracy(predictions, labels) == 0.6
    assert attack_success_rate(predictions, torch.zeros(5, dtype=torch.long)) == 0.4
    assert robust_accuracy(predictions[1:], labels[1:]) == 0.5
    assert math.isnan(clean_accuracy(torch.empty(0), torch.empty(0)))


class Oracle(nn.Module):
    """Reads the class from pixel (0, 0) (value = class / 10), but answers class 0 whenever the
    bottom-right 3x3 patch is white: a perfectly backdoored classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 10).round().long()
        triggered = (x[:, 0, -4:-1, -4:-1] == 1).flatten(1).all(1)
        label = torch.where(triggered, torch.zeros_like(label), label)
        return nn.functional.one_hot(label, 4).float()


def labelled_images() -> ImageData:
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 0, 3, 3])
    images = torch.zeros(len(labels), 1, 8, 8)
    images[:, 0, 0, 0] = labels / 10
    return ImageData(images, labels, 4, "hand-made")


def test_evaluate_a_perfect_backdoor():
    data = labelled_images()
    attack = make_attack("badnets", {"target": 0}, data.image_shape, 4)
    metrics = evaluate(Oracle(), data, attack, batch_size=4)
    assert metrics.clean_accuracy == 1.0
    assert metrics.n_poisoned == 7  # the two inputs of class 0 do not count
    assert metrics.attack_success_rate == 1.0
    assert metrics.robust_accuracy == 0.0


def test_evaluate_without_attack_and_a_model_that_ignores_triggers():
    data = labelled_images()
    attack = make_attack("badnets", {"target": 3}, data.image_shape, 4)

    class Honest(Oracle):
        def forward(self, x):
            return nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long(), 4).float()

    metrics = evaluate(Honest(), data, attack)
    assert (metrics.attack_success_rate, metrics.robust_accuracy) == (0.0, 1.0)
    assert metrics.n_poisoned == 6
    assert math.isnan(evaluate(Honest(), data).attack_success_rate)
    assert predict(Honest(), data, batch_size=2).tolist() == data.labels.tolist()


def test_evaluate_restores_training_mode():
    model = Oracle().train()
    evaluate(model, labelled_images())
    assert model.training


def test_an_evaluation_makes_its_poisoned_inputs_once():
    """A curve measures many models on one test set: the triggers run on the first measurement
    only, and every measurement equals a fresh ``evaluate``."""
    from goodnet.defenses.base import Evaluation
    from tests.conftest import Planted, corner_attack, halves

    attack = corner_attack()
    component = attack.components()[0]
    calls = []
    original = component.trigger

    class Counting:
        def __getattr__(self, name):
            return getattr(component, name)

        def trigger(self, x):
            calls.append(len(x))
            return original(x)

    attack.components = lambda: [Counting()]
    test = halves(200, seed=1)
    evaluation = Evaluation(test, attack, batch_size=64)
    model = Planted()
    first, second = evaluation.measure(model), evaluation.measure(model)
    fresh = evaluate(model, test, corner_attack())
    keys = ("clean_accuracy", "attack_success_rate", "robust_accuracy", "n_clean", "n_poisoned")
    assert [getattr(first, k) for k in keys] == [getattr(second, k) for k in keys] == [
        getattr(fresh, k) for k in keys]
    assert sum(calls) == first.n_poisoned  # every eligible input triggered exactly once
