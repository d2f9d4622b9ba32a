"""I-BAU: the hypergradient is the implicit gradient of an explicit quadratic problem; on a small
backdoored CNN unlearning removes the backdoor; the same seed gives the same weights; networks
without BatchNorm and imported Keras graphs work; settings are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.defenses.ibau import IBAU, IBAUConfig, hypergradient
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from tests.conftest import Planted, halves, plant_backdoor, stripes, tiny_keras_graph


def quadratic(seed: int = 0):
    """inner(δ) = ½ δᵀAδ − δᵀBθ, solved by δ*(θ) = A⁻¹Bθ; outer(δ) = ½‖δ − c‖² + θ·d."""
    g = torch.Generator().manual_seed(seed)
    n, m = 4, 3
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 2.0, 3.5, 5.0], dtype=torch.float64)) @ q.T
    b, c = torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
                                                                            dtype=torch.float64)
    d = torch.randn(m, generator=g, dtype=torch.float64)
    theta = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)

    def inner(delta):
        return 0.5 * delta @ a @ delta - delta @ (b @ theta)

    def outer(delta):
        return 0.5 * (delta - c).pow(2).sum() + theta @ d

    solution = torch.linalg.solve(a, b @ theta.detach())
    return a, b, c, d, theta, inner, outer, solution


def test_the_hypergradient_is_the_implicit_gradient():
    a, b, c, d, theta, inner, outer, solution = quadratic()
    # The true gradient of θ ↦ outer(δ*(θ)), by autograd through the closed-form solution.
    (exact,) = torch.autograd.grad(outer(torch.linalg.solve(a, b @ theta)), theta)
    (converged,) = hypergradient(solution, [theta], inner, outer, step=0.1, K=300)
    assert torch.allclose(converged, exact, atol=1e-10)
    # K terms: d + α Bᵀ Σ_{k<K} (I − αA)^k ∂_δ outer, the reference's truncated series.
    g_delta, jacobian = solution - c, torch.eye(4, dtype=torch.float64) - 0.1 * a
    series = sum(torch.linalg.matrix_power(jacobian, k) @ g_delta for k in range(3))
    (truncated,) = hypergradient(solution, [theta], inner, outer, step=0.1, K=3)
    assert torch.allclose(truncated, d + 0.1 * b.T @ series, atol=1e-12)
    (direct,) = hypergradient(solution, [theta], inner, outer, step=0.1, K=0)
    assert torch.allclose(direct, d)
    assert not torch.allclose(truncated, direct, atol=1e-3)


@pytest.fixture(scope="module")
def backdoored():
    """The planted-backdoor network trained one epoch only: confident enough to be backdoored,
    not so saturated that the cross-entropy's gradient in δ vanishes."""
    return plant_backdoor(epochs=1)


def test_unlearning_removes_the_backdoor_and_keeps_the_task(backdoored):
    """The end result only: on this one-epoch model the outer steps' clean fine-tuning alone
    also removes the backdoor (a δ of the wrong sign passes too); the hypergradient itself is
    checked above."""
    model, clean, test, attack = backdoored
    before = copy.deepcopy(model.state_dict())
    config = IBAUConfig(rounds=2, fixed_point_iterations=2)
    result = IBAU(config).repair(model, clean)
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.2
    assert metrics.clean_accuracy >= 0.95
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.chosen == "unlearned" and result.curve.axis == "round"
    assert [p.x for p in result.curve.points] == [0, 1, 2]
    norms = result.notes["perturbation_norms"]
    assert len(norms) == 2 and all(isinstance(n, float) and 0 < n <= 10.0 for n in norms)
    assert not result.model.training


def test_the_same_seed_gives_the_same_weights():
    config = IBAUConfig(rounds=1, fixed_point_iterations=2, batch_size=16, unlearn_share=0.25)
    model, clean = Planted(), halves(48)
    first, second = IBAU(config).repair(model, clean), IBAU(config).repair(model, clean)
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = IBAU(IBAUConfig(rounds=1, fixed_point_iterations=2, batch_size=16,
                           unlearn_share=0.25, seed=1))
    assert not torch.equal(other.repair(model, clean).model.fc.weight, first.model.fc.weight)


def test_networks_without_batchnorm_and_keras_graphs_are_unlearned():
    planted = Planted()
    before = copy.deepcopy(planted.state_dict())
    quick = IBAUConfig(rounds=1, fixed_point_iterations=1, batch_size=16)
    result = IBAU(quick).repair(planted, halves(32))
    assert not torch.equal(result.model.conv.weight, planted.conv.weight)
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items())
    spec = ModelSpec("graph", 4, 1, 16, 16, (0.0,), (1.0,), graph=tiny_keras_graph(4, 1))
    keras = build_model(spec).eval()
    stats = {k: v.clone() for k, v in keras.state_dict().items() if "running" in k}
    repaired = IBAU(quick).repair(keras, stripes(32))
    # eval mode throughout, as the reference: BatchNorm's running statistics are not updated.
    for name, value in stats.items():
        assert torch.equal(repaired.model.state_dict()[name], value), name
    assert len(repaired.curve) == 2


@pytest.mark.parametrize("settings", [
    {"rounds": 0}, {"fixed_point_iterations": -1}, {"lr": 0.0}, {"optimizer": "rmsprop"},
    {"unlearn_share": 0.0}, {"unlearn_share": 1.5}, {"trigger_lr": 0.0}, {"norm_bound": -1.0},
    {"ridge": float("nan")}, {"perturbation_steps": 0}, {"fixed_point_step": 0.0}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match="i-bau"):
        IBAUConfig(**settings)
