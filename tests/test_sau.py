"""SAU on a small backdoored CNN: the shared-adversarial unlearning removes the backdoor; the
selection of shared adversarial examples and the shared risk, checked by hand; the frozen
reference stays frozen; any network works; settings are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.defenses import sau as sau_module
from goodnet.defenses.sau import SAU, SAUConfig, project, shared_examples, shared_pgd, shared_risk
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from tests.conftest import Planted, halves, stripes, tiny_keras_graph

FAST = SAUConfig(epochs=3)


@pytest.fixture(scope="module")
def repaired(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    return SAU(FAST).repair(model, clean), before


def test_sau_removes_the_backdoor_and_keeps_the_task(backdoored, repaired):
    model, _, test, attack = backdoored
    result, before = repaired
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.1
    assert metrics.clean_accuracy >= 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.x for p in result.curve.points] == list(range(FAST.epochs + 1))
    assert result.chosen == "unlearned" and result.chosen_point is result.curve.points[-1]
    assert result.pruned is None
    for key in ("loss", "clean_loss", "adversarial_loss", "shared_loss", "shared"):
        assert len(result.notes[key]) == FAST.epochs
        assert all(type(v) is float for v in result.notes[key])
    # PGD finds shared adversarial examples on the backdoored model, none once unlearned.
    assert result.notes["shared"][0] > 0.1 and result.notes["shared"][-1] == 0


def test_without_the_shared_risk_the_backdoor_stays(backdoored):
    """The same steps with the shared term off are plain fine-tuning: the backdoor stays."""
    model, clean, test, attack = backdoored
    plain = SAU(SAUConfig(epochs=FAST.epochs, lambda_shared=0.0)).repair(model, clean)
    assert evaluate(plain.model, test, attack).attack_success_rate >= 0.8


def test_only_the_same_wrong_class_is_shared():
    clean_pred = torch.tensor([0, 0, 0, 0, 0])
    clean_pred_ref = torch.tensor([0, 0, 0, 0, 1])
    pred = torch.tensor([2, 2, 0, 2, 1])
    pred_ref = torch.tensor([2, 3, 2, 0, 2])
    # 0: both to 2, shared; 1: different wrong classes; 2: the model not fooled; 3: the
    # reference not fooled; 4: the reference fooled to 2 but the model to 1.
    assert shared_examples(pred, pred_ref, clean_pred, clean_pred_ref).tolist() == [
        True, False, False, False, False]
    assert shared_examples(pred_ref, pred_ref, clean_pred_ref, clean_pred_ref).tolist() == [
        True, True, True, False, True]


def test_the_shared_risk_counts_what_fools_the_reference_and_what_the_model_shares():
    pred_ref = torch.tensor([1, 1])
    agrees = torch.tensor([[0.0, 9.0], [0.0, 9.0]])  # the model also says 1
    differs = torch.tensor([[9.0, 0.0], [9.0, 0.0]])  # the model says 0
    both, none = torch.tensor([True, True]), torch.tensor([False, False])
    assert shared_risk(agrees, pred_ref, none) == 0
    assert shared_risk(agrees, pred_ref, both) > 5  # -log(1 - 0.999), clamped
    assert shared_risk(differs, pred_ref, both) < 1e-3
    assert shared_risk(agrees, pred_ref, torch.tensor([True, False])) == pytest.approx(
        shared_risk(agrees, pred_ref, both).item() / 2)


def test_the_perturbation_stays_in_its_ball():
    delta = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert project(delta, 0.2, "linf").abs().max() <= 0.2
    assert (project(delta, 0.5, "l2").flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()
    assert (project(delta, 2.0, "l1").flatten(1).norm(p=1, dim=1) <= 2.0 + 1e-5).all()
    small = delta * 1e-3
    assert torch.equal(project(small, 0.5, "l2"), small)


def test_pgd_finds_the_planted_trigger_direction_both_models_share():
    """On the planted network a perturbation of +0.9 lights the corner channel: both copies of
    the backdoored network then say class 0 for every class-1 image, a shared example."""
    x = halves(16).images.float()
    model = Planted()
    y = halves(16).labels
    cfg = SAUConfig(eps=0.9, pgd_step_size=0.9, pgd_steps=1)
    delta = shared_pgd(model, sau_module.frozen_copy(model), x, y, cfg, torch.Generator())
    assert delta.abs().max() <= 0.9
    after, before = model(x + delta).argmax(1), model(x).argmax(1)
    assert (after[y == 1] == 0).all() and (before[y == 1] == 1).all()


def test_the_same_seed_gives_the_same_weights(backdoored):
    model, clean, _, _ = backdoored
    config = SAUConfig(epochs=1, pgd_init="random")
    first, second = SAU(config).repair(model, clean), SAU(config).repair(model, clean)
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = SAU(SAUConfig(epochs=1, pgd_init="random", seed=1)).repair(model, clean)
    assert not torch.equal(other.model.get_submodule("fc2").weight,
                           first.model.get_submodule("fc2").weight)


def test_the_frozen_reference_is_not_trained(backdoored, monkeypatch):
    model, clean, _, _ = backdoored
    made = []

    def capture(network):
        made.append(sau_module.frozen_copy.__wrapped__(network))
        return made[-1]

    capture.__wrapped__ = sau_module.frozen_copy  # type: ignore[attr-defined]
    monkeypatch.setattr(sau_module, "frozen_copy", capture)
    result = SAU(SAUConfig(epochs=1)).repair(model, clean)
    (reference,) = made
    assert reference is not model and not reference.training
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    assert not torch.equal(result.model.get_submodule("fc2").weight,
                           model.get_submodule("fc2").weight)


def test_networks_without_batchnorm_and_imported_graphs():
    planted = Planted()
    before = copy.deepcopy(planted.state_dict())
    result = SAU(SAUConfig(epochs=1, batch_size=16)).repair(planted, halves(32))
    assert len(result.curve.points) == 2
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items())
    assert not torch.equal(result.model.fc.weight, planted.fc.weight)
    spec = ModelSpec("graph", 4, 1, 16, 16, (0.0,), (1.0,), graph=tiny_keras_graph(4, 1))
    keras = build_model(spec)
    result = SAU(SAUConfig(epochs=1, train_mode=True)).repair(keras, stripes(64))
    assert all(torch.isfinite(torch.tensor(v)) for v in result.notes["loss"])


@pytest.mark.parametrize("settings", [
    {"epochs": 0}, {"lr": 0.0}, {"eps": -0.1}, {"norm": "l3"}, {"pgd_init": "far"},
    {"pgd_steps": 0}, {"lambda_shared": -1.0}, {"beta_adv": float("nan")}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match="sau"):
        SAUConfig(**settings)
