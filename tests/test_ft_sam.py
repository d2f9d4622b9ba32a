"""FT-SAM: the sharpness-aware step checked on a quadratic, rho 0 is plain fine-tuning, the
repair lowers a planted backdoor's success, works with and without BatchNorm; settings checked."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from goodnet.data.dataset import ImageData, batches
from goodnet.defenses.ft_sam import (
    FTSAM,
    FTSAMConfig,
    perturbation,
    sam_step,
    smooth_cross_entropy,
)
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from tests.conftest import Planted, halves, tiny_keras_graph


class Quadratic(nn.Module):
    """``L(w) = ½ Σ a_i w_i²``, whose gradient ``a · w`` is known at every point."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
        self.a = torch.tensor([1.0, 0.5, 4.0, 2.0], dtype=torch.float64)

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.a * self.w**2).sum()


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_sam_step_climbs_rho_and_steps_from_the_original_weights(adaptive):
    model, rho, lr = Quadratic(), 0.3, 0.1
    w0 = model.w.detach().clone()
    seen: list[torch.Tensor] = []

    def loss_of() -> torch.Tensor:
        seen.append(model.w.detach().clone())
        return model.loss()

    sam_step(model, loss_of, torch.optim.SGD(model.parameters(), lr=lr), rho, adaptive)
    assert len(seen) == 2 and torch.equal(seen[0], w0)
    e = seen[1] - w0
    scale = w0.abs() if adaptive else torch.ones_like(w0)
    assert float((e / scale).norm()) == pytest.approx(rho, rel=1e-9)
    g = model.a * w0  # ascent along T² g, T = |w| or 1
    direction = scale**2 * g
    assert torch.allclose(e, rho * direction / (scale * g).norm())
    # The base step starts from w0 (restored), with the gradient taken at w0 + e.
    assert torch.allclose(model.w.detach(), w0 - lr * model.a * (w0 + e))


def test_the_perturbation_follows_the_gradient_and_skips_unused_parameters():
    used, unused = nn.Parameter(torch.tensor([2.0, -1.0])), nn.Parameter(torch.ones(3))
    used.grad = torch.tensor([0.5, 0.5])
    e_used, e_unused = perturbation([used, unused], 2.0, adaptive=True)
    assert torch.equal(e_unused, torch.zeros(3))
    assert float((e_used / used.detach().abs()).norm()) == pytest.approx(2.0)
    assert float(e_used[0] / e_used[1]) == pytest.approx(4.0)  # |w|²: the big weight moves
    used.grad = torch.zeros(2)
    assert torch.equal(perturbation([used], 2.0, adaptive=True)[0], torch.zeros(2))


def test_ft_sam_removes_the_backdoor_and_keeps_the_task(backdoored):
    """rho 8 (the reference's GTSRB and Tiny-ImageNet setting) removes the planted backdoor;
    the default rho 2 only weakens it at this scale (about 2/3 of the triggered inputs still
    go to the target after 10 epochs)."""
    model, clean, test, attack = backdoored
    before = copy.deepcopy(model.state_dict())
    config = FTSAMConfig(rho=8.0, epochs=10, batch_size=32)
    result = FTSAM(config).repair(model, clean)
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.05
    # rho 8 sits near the edge at this scale: CA ends at 0.85-1.0 depending on the thread
    # count's rounding (measured at 1 and 2 threads), so the bound only says the task is kept.
    assert metrics.clean_accuracy >= 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.x for p in result.curve.points] == list(range(config.epochs + 1))
    assert result.chosen == "tuned" and result.pruned is None and not result.model.training
    losses = result.notes["loss"]
    assert len(losses) == config.epochs and all(type(v) is float for v in losses)


def test_plain_fine_tuning_keeps_the_backdoor(backdoored):
    """The same fine-tuning with rho 0 leaves the backdoor in place: the sharpness-aware
    perturbation, not the fine-tuning, removes it."""
    model, clean, test, attack = backdoored
    plain = FTSAM(FTSAMConfig(rho=0.0, epochs=10, batch_size=32)).repair(model, clean).model
    assert evaluate(plain, test, attack).attack_success_rate >= 0.9


def test_rho_zero_is_plain_fine_tuning(backdoored):
    """With rho 0 the perturbed pass sees the same weights, leaves BatchNorm's statistics alone,
    and the result is a plain SGD loop's with the same batches, loss and schedule."""
    model, clean, _, _ = backdoored
    config = FTSAMConfig(rho=0.0, epochs=2, batch_size=64, seed=3)
    repaired = FTSAM(config).repair(model, clean).model

    plain = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(plain.parameters(), lr=config.lr, momentum=0.9,
                                weight_decay=config.weight_decay)
    total = config.epochs * math.ceil(len(clean) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    order = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for x, y in batches(clean, config.batch_size, shuffle=True, generator=order):
            optimizer.zero_grad()
            smooth_cross_entropy(plain(x), y, config.label_smoothing).backward()
            optimizer.step()
            schedule.step()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(repaired.state_dict()[name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)
    sharp = FTSAM(FTSAMConfig(epochs=2, batch_size=64, seed=3)).repair(model, clean).model
    assert not torch.allclose(sharp.fc2.weight, repaired.fc2.weight, atol=1e-3)


def test_the_same_seed_gives_the_same_weights(backdoored):
    model, clean, _, _ = backdoored
    config = FTSAMConfig(epochs=2, batch_size=64)
    first, second = FTSAM(config).repair(model, clean), FTSAM(config).repair(model, clean)
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = FTSAM(FTSAMConfig(epochs=2, batch_size=64, seed=1)).repair(model, clean)
    assert not torch.equal(other.model.fc2.weight, first.model.fc2.weight)


def test_networks_without_batchnorm_and_imported_graphs():
    planted = Planted()
    weights = planted.conv.weight.detach().clone()
    result = FTSAM(FTSAMConfig(epochs=2, batch_size=32)).repair(planted, halves(64))
    assert torch.equal(planted.conv.weight, weights)
    assert not torch.equal(result.model.conv.weight, weights)
    assert len(result.curve.points) == 3

    spec = ModelSpec("graph", 10, 1, 12, 12, (0.0,), (1.0,), graph=tiny_keras_graph(10, 1))
    keras = build_model(spec)
    generator = torch.Generator().manual_seed(0)
    data = ImageData(torch.rand(40, 1, 12, 12, generator=generator), torch.arange(40) % 10, 10)
    out = FTSAM(FTSAMConfig(epochs=2, batch_size=16)).repair(keras, data)
    assert len(out.notes["loss"]) == 2 and all(math.isfinite(v) for v in out.notes["loss"])


@pytest.mark.parametrize("settings", [
    {"rho": -1.0}, {"rho": float("nan")}, {"epochs": 0}, {"lr": 0.0}, {"batch_size": 0},
    {"weight_decay": -1.0}, {"label_smoothing": 1.0}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match="ft-sam"):
        FTSAMConfig(**settings)
