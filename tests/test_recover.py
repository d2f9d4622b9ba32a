"""The recovery step of RNP, ANP and prune: fine-tuning the chosen pruning with its masks held.
Pruned channels stay pruned while the rest learn; ``recover_epochs=0`` changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import goodnet.defenses.channel_masks as channel_masks
from goodnet.data.dataset import ImageData
from goodnet.defenses.anp import ANP, ANPConfig
from goodnet.defenses.base import Evaluation
from goodnet.defenses.channel_masks import Recovery, recover_pruned
from goodnet.defenses.prune import Prune, PruneConfig
from goodnet.defenses.rnp import RNP, RNPConfig
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet, masked
from goodnet.models import ModelSpec, build_model
from tests.conftest import Planted, corner_attack, halves, stripes

CLEAN = halves(200, seed=0)
TEST = halves(200, seed=1)
X, _ = TEST.get(torch.arange(40))

# The planted network under tests/test_defenses.py's PRUNING settings: RNP prunes clean
# channel 0 (held-out accuracy falls to 50 %), ANP channels 0 and 1, prune the backdoor channel.
RNP_SETTINGS = {"mask_epochs": 2, "batch_size": 32, "max_drop": 0.6}
ANP_SETTINGS = {"iterations": 100, "batch_size": 32, "max_drop": 0.6}
# The planted network's logits are steep (weights of 10): a learning rate above about 0.002
# kills the one clean channel left (ReLU), so the recovery here steps gently.
RECOVER = {"recover_epochs": 5, "recover_lr": 0.001, "recover_batch_size": 32}
DEFENSES = {
    "rnp": lambda **extra: RNP(RNPConfig(**RNP_SETTINGS, **extra)),
    "anp": lambda **extra: ANP(ANPConfig(**ANP_SETTINGS, **extra)),
    "prune": lambda **extra: Prune(PruneConfig(**extra)),
}


@pytest.fixture(scope="module")
def results():
    """Each defense on the planted network, without and with recovery."""
    return {name: (make().repair(Planted(), CLEAN), make(**RECOVER).repair(Planted(), CLEAN))
            for name, make in DEFENSES.items()}


def small_cnn() -> tuple[torch.nn.Module, ImageData]:
    spec = ModelSpec("small_cnn", 4, 1, 16, 16, (0.5,), (0.25,))
    torch.manual_seed(0)  # the test's own weights; the library never seeds globally
    return build_model(spec), stripes(128, seed=0)


@pytest.mark.parametrize("semantics", ["channel", "keep-bias"])
def test_pruned_channels_stay_pruned_while_the_rest_learn(semantics, monkeypatch):
    """On a BatchNorm network, with masks after BN: a pruned channel's output is 0 ("channel")
    or its unchanged BN shift ("keep-bias") at every training step and after; the unpruned
    weights move."""
    model, data = small_cnn()
    masks = MaskSet({"bn2": (torch.arange(64) % 4 != 0).float(),
                     "fc1": (torch.arange(128) >= 16).float()}, semantics)
    shift = model.bn2.bias.detach()[::4].clone()
    expected = torch.zeros(16) if semantics == "channel" else shift
    seen: list[torch.Tensor] = []

    def watched_train(work, *args, **kwargs):  # record bn2's masked output during training
        layer = work.model.get_submodule("bn2")
        handle = layer.register_forward_hook(
            lambda _m, _i, out: seen.append(out.detach()[:, ::4].amax((0, 2, 3))))
        try:
            return train(work, *args, **kwargs)
        finally:
            handle.remove()

    train = channel_masks.train
    monkeypatch.setattr(channel_masks, "train", watched_train)
    recovered, loss = recover_pruned(model, masks, data, Recovery(epochs=2, lr=0.05,
                                                                  batch_size=32))
    assert len(loss) == 2 and len(seen) == 8
    assert all(torch.equal(out, expected) for out in seen)
    after: list[torch.Tensor] = []
    recovered.model.bn2.register_forward_hook(lambda _m, _i, out: after.append(out.detach()))
    recovered(data.get(torch.arange(16))[0])
    assert torch.equal(after[0][:, ::4].amax((0, 2, 3)), expected)
    assert torch.equal(after[0][:, ::4].amin((0, 2, 3)), expected)
    for name in ("conv1.weight", "bn1.weight", "conv2.weight", "fc2.weight"):
        assert not torch.equal(recovered.model.get_parameter(name), model.get_parameter(name))
    assert not torch.equal(recovered.model.bn2.weight[1::4], model.bn2.weight[1::4])
    assert torch.equal(recovered.model.bn2.weight[::4], model.bn2.weight[::4])
    assert torch.equal(recovered.model.bn2.bias[::4], model.bn2.bias[::4])
    assert recovered.masks is masks and not recovered.training


def test_recovery_wins_back_what_pruning_cost(results):
    """RNP's pruning of clean channel 0 leaves the planted network at chance; recovery, with
    the channel held at zero, retrains the rest to at least that accuracy, and above it."""
    for name, (plain, recovered) in results.items():
        assert recovered.chosen == plain.chosen and recovered.pruned == plain.pruned, name
        before, after = plain.chosen_point, recovered.chosen_point
        assert after is not None and before is not None
        assert after.label == "recovered" and after.pruned == before.pruned, name
        assert after.clean_data_accuracy >= before.clean_data_accuracy, name
        assert recovered.curve.points[:len(plain.curve)] == plain.curve.points, name
        assert len(recovered.curve) == len(plain.curve) + len(plain.variants), name
    plain, recovered = results["rnp"]
    assert plain.pruned == {"conv": [0]} and plain.chosen_point.clean_data_accuracy == 0.5
    assert recovered.chosen_point.clean_data_accuracy >= 0.9
    assert (TEST.labels[:40] == recovered.model(X).argmax(1)).float().mean() >= 0.9


def test_every_variant_of_prune_is_recovered(results):
    plain, recovered = results["prune"]
    assert recovered.variants.keys() == plain.variants.keys() and recovered.chosen == "0.04"
    labelled = [p for p in recovered.curve.points if p.label == "recovered"]
    assert len(labelled) == len(plain.variants)
    for variant, model in recovered.variants.items():
        point = recovered.curve.mark(variant)
        assert point is not None and point.label == "recovered"
        assert point.x == point.pruned == plain.notes["pruned"][variant]
        assert not torch.equal(model.model.fc.weight, plain.variants[variant].model.fc.weight)
        assert recovered.variant_masks[variant].pruned() == model.masks.pruned()
    assert recovered.model is recovered.variants["0.04"]


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_no_recovery_is_exactly_the_defense_without_it(name, results, monkeypatch):
    """recover_epochs=0 never fine-tunes: every variant is the caller's weights under the
    chosen masks, the curve has no recovered point and the notes no recovery."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("recovered with recover_epochs=0")

    monkeypatch.setattr(channel_masks, "recover_pruned", refuse)
    result = DEFENSES[name]().repair(Planted(), CLEAN)
    original = Planted()
    for variant, model in result.variants.items():
        masks = result.variant_masks[variant]
        assert torch.equal(model(X), masked(original, masks)(X)), variant
        assert all(torch.equal(a, b) for a, b in zip(
            model.model.state_dict().values(), original.state_dict().values(), strict=True))
    assert not any(p.label for p in result.curve.points)
    assert "recovery_loss" not in result.notes
    assert result.settings["recover_epochs"] == 0
    plain = results[name][0]
    assert result.curve == plain.curve and result.notes == plain.notes
    assert torch.equal(result.model(X), plain.model(X))


@pytest.mark.parametrize("name", ["rnp", "prune"])
def test_same_seed_same_weights_and_the_caller_untouched(name, results):
    model = Planted()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    again = DEFENSES[name](**RECOVER).repair(model, CLEAN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.conv._forward_hooks and torch.equal(torch.get_rng_state(), rng)
    first = results[name][1]
    for (key, a), (_, b) in zip(first.model.state_dict().items(),
                                again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert first.curve == again.curve


def test_another_seed_gives_other_batches():
    model, data = small_cnn()
    masks = MaskSet({"bn2": (torch.arange(64) % 4 != 0).float()})
    first, _ = recover_pruned(model, masks, data, Recovery(1, 0.05, 32, seed=0))
    other, _ = recover_pruned(model, masks, data, Recovery(1, 0.05, 32, seed=1))
    assert not torch.equal(first.model.fc2.weight, other.model.fc2.weight)


def test_an_evaluation_changes_nothing_in_the_recovery():
    evaluation = Evaluation(TEST, corner_attack())
    plain = Prune(PruneConfig(**RECOVER)).repair(Planted(), CLEAN)
    measured = Prune(PruneConfig(**RECOVER)).repair(Planted(), CLEAN, evaluation=evaluation)
    assert measured.chosen == plain.chosen and measured.notes == plain.notes
    for variant, model in plain.variants.items():
        assert torch.equal(measured.variants[variant](X), model(X)), variant
    assert all(p.test_asr is not None for p in measured.curve.points)


@pytest.mark.parametrize("settings", [
    {"recover_epochs": -1}, {"recover_lr": 0.0}, {"recover_lr": float("nan")},
    {"recover_batch_size": 0}])
@pytest.mark.parametrize("config", [RNPConfig, ANPConfig, PruneConfig])
def test_bad_recovery_settings_are_refused(config, settings):
    with pytest.raises(GoodnetError, match="recovery: recover_epochs >= 0"):
        config(**settings)
