"""SEAM on the planted-backdoor CNN: forgetting with random labels, then recovery, each phase
stopped by the reference code's rule read on the held-out clean data."""

from __future__ import annotations

import copy

import torch

from goodnet.defenses import SEAM, SEAMConfig, make_defense
from goodnet.defenses.seam import RecoveryStop, wrong_labels
from goodnet.metrics import evaluate

# On the tiny network the reference's forgetting rate (Adam 3e-5, sized for ResNet-18 on
# CIFAR-10) forgets the task before the backdoor: held-out accuracy falls below 2/K while the
# trigger still works. One epoch at 1e-2 forgets both.
TOY = {"lr": 1e-2, "epochs": 5, "recover_epochs": 20}


def phase(result, name):
    return [p for p in result.curve.points if dict(p.extra).get("phase") == name]


def test_seam_removes_the_backdoor_and_keeps_the_task(backdoored):
    model, clean, test, attack = backdoored
    before = copy.deepcopy(model.state_dict())
    original = evaluate(model, test, attack)
    result = make_defense("seam", TOY).repair(model, clean)
    repaired = evaluate(result.model, test, attack)
    assert original.attack_success_rate >= 0.95
    assert repaired.attack_success_rate <= 0.1
    assert repaired.clean_accuracy >= original.clean_accuracy - 0.05
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.chosen == "recovered" and set(result.variants) == {"forgotten", "recovered"}
    assert result.curve.axis == "epoch"
    assert result.curve.mark("recovered") is result.curve.points[-1]


def test_forgetting_stops_at_the_first_epoch_below_the_threshold(backdoored):
    model, clean, _, _ = backdoored
    result = SEAM(SEAMConfig(lr=1e-4, epochs=30, recover_epochs=1)).repair(model, clean)
    forget = [p.clean_data_accuracy for p in phase(result, "forget")]
    threshold = 2 / clean.num_classes  # the reference's rule: twice chance
    assert result.notes["forget_accuracy"] == threshold
    assert 1 < len(forget) < 30 and len(forget) == result.notes["forget_epochs"]
    assert forget[-1] < threshold <= min(forget[:-1])
    assert result.curve.mark("forgotten") is phase(result, "forget")[-1]


def test_recovery_stops_once_its_patience_is_spent(backdoored):
    model, clean, _, _ = backdoored
    settings = {**TOY, "recover_accuracy": 0.9, "recover_patience": 3}
    result = make_defense("seam", settings).repair(model, clean)
    recover = [p.clean_data_accuracy for p in phase(result, "recover")]
    above = [i for i, a in enumerate(recover) if a > 0.9]
    assert len(above) == 3 and above[-1] == len(recover) - 1
    capped = make_defense("seam", {**TOY, "recover_patience": 100, "recover_epochs": 4})
    assert len(phase(capped.repair(model, clean), "recover")) == 4


def test_the_recovery_rule_by_hand():
    stop = RecoveryStop(threshold=0.9, patience=2)
    assert not stop(1, 0.95)  # above the threshold: patience 1 left
    assert not stop(2, 0.5)  # neither above nor after the plateau epoch
    assert stop(3, 0.91)  # above again: spent
    late = RecoveryStop(threshold=0.99, patience=1)
    assert not late(1, 0.8) and not late(51, 0.7)  # a fall counts only after epoch 51
    assert late(52, 0.7)


def test_random_labels_are_always_wrong_and_cover_the_other_classes():
    labels = torch.arange(4).repeat(500)
    drawn = wrong_labels(labels, 4, torch.Generator().manual_seed(0))
    assert not (drawn == labels).any()
    for c in range(4):
        assert set(drawn[labels == c].tolist()) == set(range(4)) - {c}


def test_same_seed_same_weights(backdoored):
    model, clean, _, _ = backdoored
    first = make_defense("seam", TOY).repair(model, clean).model.state_dict()
    second = make_defense("seam", TOY).repair(model, clean).model.state_dict()
    other = make_defense("seam", {**TOY, "seed": 1}).repair(model, clean).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
