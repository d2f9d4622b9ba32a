"""FST on a small backdoored CNN: the penalty, not the re-initialisation alone, removes the
backdoor; the head is found on any network; settings are checked."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from goodnet.data.dataset import batches
from goodnet.defenses import FST, FSTConfig, make_defense
from goodnet.defenses import fst as fst_module
from goodnet.defenses.fst import Distiller, Stamps, find_head
from goodnet.errors import GoodnetError
from goodnet.methods import ReversedTrigger, ScanVerdict
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from goodnet.scans.nc import NCScanConfig
from goodnet.settings import key_names, stored
from tests.conftest import Planted, halves, tiny_keras_graph

FAST = FSTConfig(epochs=20, batch_size=32)


def test_fst_removes_the_backdoor_and_keeps_the_task(backdoored):
    model, clean, test, attack = backdoored
    before = copy.deepcopy(model.state_dict())
    result = FST(FAST).repair(model, clean)
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.05
    assert metrics.clean_accuracy >= 0.95
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.notes["head"] == "fc2" and result.pruned is None
    assert [p.x for p in result.curve.points] == list(range(FAST.epochs + 1))


def test_without_the_penalty_the_backdoor_stays(backdoored):
    """The same re-initialisation and fine-tuning with head_penalty 0 keeps the backdoor: the
    penalty turning the head away from the old one is what removes it."""
    model, clean, test, attack = backdoored
    plain = FST(FSTConfig(epochs=FAST.epochs, batch_size=FAST.batch_size, head_penalty=0.0))
    assert evaluate(plain.repair(model, clean).model, test, attack).attack_success_rate >= 0.9


def test_the_head_keeps_its_norm(backdoored):
    model, clean, _, _ = backdoored
    result = FST(FSTConfig(epochs=2, batch_size=32, head_penalty=5.0)).repair(model, clean)
    old = model.get_submodule("fc2").weight.detach()
    new = result.model.get_submodule("fc2").weight
    assert torch.allclose(new.norm(), old.norm(), rtol=1e-4)
    assert (new * old).sum() < 0  # turned away from the backdoored head
    assert result.notes["head_norm"] == pytest.approx(float(old.norm()))


def test_the_same_seed_gives_the_same_weights(backdoored):
    model, clean, _, _ = backdoored
    config = FSTConfig(epochs=2, batch_size=32)
    first, second = FST(config).repair(model, clean), FST(config).repair(model, clean)
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = FST(FSTConfig(epochs=2, batch_size=32, seed=1)).repair(model, clean)
    assert not torch.equal(other.model.get_submodule("fc2").weight,
                           first.model.get_submodule("fc2").weight)


def test_the_head_is_found_on_networks_without_batchnorm():
    example = halves(1).images
    assert find_head(Planted(), example) == "fc"
    spec = ModelSpec("graph", 10, 1, 12, 12, (0.0,), (1.0,), graph=tiny_keras_graph(10, 1))
    keras = build_model(spec)
    head = find_head(keras, torch.zeros(1, 1, 12, 12))
    assert keras.get_submodule(head).out_features == 10
    result = FST(FSTConfig(epochs=1, batch_size=32)).repair(Planted(), halves(64))
    assert result.notes["head"] == "fc"


def test_a_named_head_must_be_fully_connected(backdoored):
    model, clean, _, _ = backdoored
    with pytest.raises(GoodnetError, match="'conv1' is not a fully connected layer"):
        FST(FSTConfig(head="conv1", epochs=1)).repair(model, clean)
    with pytest.raises(GoodnetError, match="no layer 'nope'"):
        FST(FSTConfig(head="nope", epochs=1)).repair(model, clean)


def test_distillation_and_recovery_keep_the_backdoor_out(backdoored):
    """goodnet's additions: the distilled, recovered model is the result, the model after the
    penalised epochs a variant; the backdoor stays out and the caller's model is untouched."""
    model, clean, test, attack = backdoored
    model.train()
    before = copy.deepcopy(model.state_dict())
    config = FSTConfig(epochs=FAST.epochs, batch_size=32, head_penalty=1.0, distill=4.0,
                       recover_epochs=5)
    result = FST(config).repair(model, clean)
    assert result.chosen == "recovered" and set(result.variants) == {"tuned", "recovered"}
    assert result.variants["recovered"] is result.model
    assert [p.x for p in result.curve.points] == list(range(FAST.epochs + 5 + 1))
    assert dict(result.curve.marks) == {"tuned": FAST.epochs, "recovered": FAST.epochs + 5}
    tuned = result.variants["tuned"].get_submodule("fc2").weight
    assert not torch.equal(tuned, result.model.get_submodule("fc2").weight)
    for candidate in (result.model, result.variants["tuned"]):
        metrics = evaluate(candidate, test, attack)
        assert metrics.attack_success_rate <= 0.05 and metrics.clean_accuracy >= 0.95
    assert model.training  # the teacher is a copy: the caller's mode is kept too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not result.model._forward_hooks  # the distiller's hook is gone


def test_the_distillation_term_is_used(backdoored):
    model, clean, _, _ = backdoored
    plain = FST(FSTConfig(epochs=2, batch_size=32)).repair(model, clean)
    distilled = FST(FSTConfig(epochs=2, batch_size=32, distill=4.0)).repair(model, clean)
    assert plain.notes["loss"][0] != distilled.notes["loss"][0]
    assert not torch.equal(plain.model.get_submodule("fc2").weight,
                           distilled.model.get_submodule("fc2").weight)
    assert plain.chosen == distilled.chosen == "tuned" and set(plain.variants) == {"tuned"}


@pytest.mark.parametrize("settings", [
    {"head_penalty": -1.0}, {"epochs": 0}, {"lr": 0.0}, {"distill": -1.0}, {"temperature": 0.0},
    {"recover_epochs": -1}, {"recover_lr": 0.0}, {"distill": float("nan")},
    {"augment": "rotate"}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match="fst"):
        make_defense("fst", settings)


STAMPED = FSTConfig(epochs=FAST.epochs, batch_size=32, head_penalty=0.0, distill=4.0,
                    trigger_share=0.3, scan=NCScanConfig(epochs=2))


def _true_trigger(attack, shape) -> ReversedTrigger:
    """The attack's own patch as a ``ReversedTrigger`` (mask and pattern read off its stamp)."""
    trigger = attack.build_trigger()
    low, high = trigger(torch.zeros(1, *shape)), trigger(torch.ones(1, *shape))
    mask = (1 - (high - low)).amax(1)  # (1, H, W)
    pattern = low[0] / mask.clamp_min(1e-6)
    return ReversedTrigger(attack.target(torch.zeros(1, dtype=torch.long)).item(), mask,
                           pattern, float(mask.sum()), 1.0)


def test_the_stamped_term_pulls_stamped_outputs_to_the_clean_ones(backdoored):
    """On the backdoored model as its own student the clean term is zero; the stamped term is
    the divergence between its outputs on triggered and on clean images, large for the true
    trigger. Stamps land on the first share of the batch, reproducibly."""
    model, clean, _, attack = backdoored
    x, _ = next(iter(batches(clean, 32)))
    stamps_of = [_true_trigger(attack, clean.image_shape)]
    stamps = Stamps(stamps_of, 0.25, seed=0)
    assert stamps.count(32) == 8 and Stamps(stamps_of, 0.01, seed=0).count(32) == 1
    assert torch.equal(stamps(x), Stamps(
        [_true_trigger(attack, clean.image_shape)], 0.25, seed=0)(x))
    student = copy.deepcopy(model).eval()
    losses = []
    for with_stamps in (None, stamps):
        distiller = Distiller(student, model, 1.0, 2.0, with_stamps)
        student(x)
        losses.append(distiller(x).item())
        distiller.close()
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[1] > 0.5


def test_fst_with_stamped_triggers_scans_once_and_repeats_itself(backdoored):
    model, clean, test, attack = backdoored
    before = copy.deepcopy(model.state_dict())
    result = FST(STAMPED).repair(model, clean)
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.1 and metrics.clean_accuracy >= 0.95
    assert result.scan is not None and len(result.scan.triggers) == clean.num_classes
    assert result.notes["flagged"] == list(result.scan.targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = FST(STAMPED).repair(model, clean)
    assert torch.equal(again.model.get_submodule("fc2").weight,
                       result.model.get_submodule("fc2").weight)
    unstamped = FST(dataclasses.replace(STAMPED, trigger_share=0.0, scan=NCScanConfig())
                    ).repair(model, clean)  # the same seed and distillation, nothing stamped
    assert not torch.equal(unstamped.model.get_submodule("fc2").weight,
                           result.model.get_submodule("fc2").weight)


def test_trigger_settings_stay_out_of_keys_at_their_defaults():
    defaults = stored(FSTConfig())
    assert {"trigger_share", "scan"}.isdisjoint(key_names(FSTConfig, defaults))
    stamped = key_names(FSTConfig, stored(STAMPED))
    assert stamped["trigger_share"] == 0.3 and stamped["scan"]["epochs"] == 2


@pytest.mark.parametrize("settings", [{"trigger_share": 0.2}, {"trigger_share": 1.5,
                                                                "distill": 1.0},
                                      {"scan": {"epochs": 2}}])
def test_bad_trigger_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match=r"fst: (trigger_share|scan)"):
        make_defense("fst", settings)


def test_augmented_batches_change_the_result_and_stay_out_of_keys(backdoored):
    """``augment`` reaches the training loop (the same seed, other weights), and its default
    leaves stored keys as they were."""
    model, clean, _, _ = backdoored
    config = FSTConfig(epochs=2, batch_size=32, distill=4.0)
    plain = FST(config).repair(model, clean)
    shifted = FST(dataclasses.replace(config, augment="crop")).repair(model, clean)
    assert not torch.equal(plain.model.get_submodule("fc2").weight,
                           shifted.model.get_submodule("fc2").weight)
    assert "augment" not in key_names(FSTConfig, stored(config))


def test_only_fully_reversed_triggers_are_stamped_when_the_scan_preselected(backdoored,
                                                                            monkeypatch):
    """Above 100 classes the scan reverses some classes in full and leaves the others'
    warm-up triggers; only the former are stamped."""
    _, clean, _, _ = backdoored
    shape = clean.image_shape
    triggers = tuple(ReversedTrigger(k, torch.full((1, *shape[1:]), 0.1 * (k + 1)),
                                     torch.ones(shape), 1.0, 1.0) for k in range(3))
    for full, expected in (((1,), [0.2]), ((), [0.1, 0.2, 0.3])):
        verdict = ScanVerdict(False, triggers=triggers, fully_reversed=full)
        monkeypatch.setattr(fst_module, "frozen_detect", lambda *_, v=verdict: v)
        _, stamps = fst_module._reversed(torch.nn.Identity(), clean, STAMPED, False)
        assert [round(float(m.max()), 3) for m in stamps.mask] == expected
