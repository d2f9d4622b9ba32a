"""PAM (Path-Aware Minimization): the shift points at the backdoored weights and has length
rho, the update is the base optimiser's step from ``w`` with the gradient at ``w + e``, rho 0 is
the plain step; FST's recovery with it runs, is deterministic and leaves the caller's model
alone; its settings stay out of stored keys at their defaults."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from goodnet.defenses import FST, FSTConfig, make_defense
from goodnet.defenses.pam import PathAware
from goodnet.errors import GoodnetError
from goodnet.settings import key_names


def pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A small network and a 'backdoored' reference of the same shape, other weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        return model, copy.deepcopy(model).apply(
            lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_shift_points_at_the_backdoored_weights_and_has_length_rho():
    model, backdoored = pair()
    w, w_b = flat(model), flat(backdoored)
    pam = PathAware(model, backdoored, rho=0.3)
    with pam.perturbed():
        shifted = flat(model)
    assert torch.allclose(shifted - w, 0.3 * (w_b - w) / (w_b - w).norm(), atol=1e-6)
    assert torch.equal(flat(model), w)  # put back exactly


def test_a_step_takes_the_gradient_at_the_shifted_weights():
    model, backdoored = pair()
    x, y = batch()
    shifted = copy.deepcopy(model)
    w, w_b = flat(model), flat(backdoored)
    torch.nn.utils.vector_to_parameters(w + 0.5 * (w_b - w) / (w_b - w).norm(),
                                        shifted.parameters())
    F.cross_entropy(shifted(x), y).backward()
    expected = w - 0.1 * torch.cat([p.grad.flatten() for p in shifted.parameters()])
    PathAware(model, backdoored, rho=0.5).step(
        lambda: F.cross_entropy(model(x), y), torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.allclose(flat(model), expected, atol=1e-6)
    assert not torch.allclose(flat(model), w)


def test_rho_zero_is_the_plain_step():
    model, backdoored = pair()
    plain = copy.deepcopy(model)
    x, y = batch()
    pam = PathAware(model, backdoored, rho=0.0)
    pam_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        pam.step(lambda: F.cross_entropy(model(x), y), pam_opt)
        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    assert torch.equal(flat(model), flat(plain))


def test_the_reference_is_a_frozen_copy_and_must_match():
    model, backdoored = pair()
    pam = PathAware(model, backdoored, rho=1.0)
    before = [e.clone() for e in pam.shift()]
    with torch.no_grad():
        for p in backdoored.parameters():
            p.zero_()
    assert all(torch.equal(a, b) for a, b in zip(before, pam.shift(), strict=True))
    with pytest.raises(GoodnetError, match="pam: the reference model has no parameter"):
        PathAware(model, nn.Linear(4, 3), rho=1.0)
    with pytest.raises(GoodnetError, match="rho"):
        PathAware(model, backdoored, rho=-1.0)


RECOVER = FSTConfig(epochs=2, batch_size=32, distill=4.0, recover_epochs=2,
                    recover_optimizer="pam")


def test_fst_recovers_with_pam_deterministically_and_leaves_the_caller_alone(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    first, second = FST(RECOVER).repair(model, clean), FST(RECOVER).repair(model, clean)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    sgd = FST(FSTConfig(**{**RECOVER.__dict__, "recover_optimizer": "sgd"})).repair(model, clean)
    assert first.chosen == "recovered"
    assert torch.equal(first.variants["tuned"].get_submodule("fc2").weight,
                       sgd.variants["tuned"].get_submodule("fc2").weight)  # same first phase
    assert not torch.equal(first.model.get_submodule("fc2").weight,
                           sgd.model.get_submodule("fc2").weight)


def test_pam_settings_stay_out_of_keys_at_their_defaults():
    defaults = FSTConfig().__dict__
    assert "recover_optimizer" not in key_names(FSTConfig, defaults)
    assert "pam_rho" not in key_names(FSTConfig, defaults)
    assert key_names(FSTConfig, {**defaults, "recover_optimizer": "pam"})["recover_optimizer"] \
        == "pam"


@pytest.mark.parametrize("settings", [{"recover_optimizer": "adam"}, {"pam_rho": -0.1},
                                      {"pam_rho": float("inf")}])
def test_bad_pam_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match=r"fst: .*(recover_optimizer|pam_rho)"):
        make_defense("fst", settings)
