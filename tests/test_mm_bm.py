"""MM-BM (activation upper bounds) on the planted network, where the answer can be worked out on
paper: the backdoor channel never fires on clean data, so its bound is 0 and the trigger does
nothing, while the clean channels keep bounds that leave every clean answer unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.artifacts import ModelCard, load_model, save_model
from goodnet.defenses import MMBM, MMBMConfig
from goodnet.errors import GoodnetError
from goodnet.masking import Masked, MaskSet, bake, masked
from goodnet.metrics import evaluate
from goodnet.models import build_model, spec_for_data
from tests.conftest import Planted, corner_attack, halves, stripes

CLEAN = halves(200, seed=0)
TEST = halves(200, seed=1)
QUICK = MMBMConfig(**MMBM.quick)


def bounds_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    assert isinstance(model, Masked) and not model.masks.masks
    return dict(model.masks.bounds)


def test_the_planted_channel_is_bounded_at_zero_and_the_backdoor_stops():
    before = evaluate(Planted(), TEST, corner_attack())
    assert before.attack_success_rate == 1.0
    result = MMBM(QUICK).repair(Planted(), CLEAN)
    bounds = bounds_of(result.model)
    assert list(bounds) == ["conv"] and result.notes["layers"] == ["conv"]
    assert bounds["conv"][2] == 0  # silent on clean data: nothing to keep
    assert (bounds["conv"][:2] > 0.3).all()  # the clean channels' means are about 0.5
    after = evaluate(result.model, TEST, corner_attack())
    assert after.attack_success_rate == 0.0
    assert after.clean_accuracy >= 0.95
    assert result.masks is None and result.pruned is None  # bounds, not pruning


def test_the_callers_model_is_untouched():
    model = Planted()
    before = copy.deepcopy(model.state_dict())
    MMBM(QUICK).repair(model, CLEAN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_same_bounds():
    first = bounds_of(MMBM(QUICK).repair(Planted(), CLEAN).model)
    second = bounds_of(MMBM(QUICK).repair(Planted(), CLEAN).model)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_learning_lowers_the_bounds_and_keeps_clean_answers(backdoored):
    model, clean, _, _ = backdoored
    result = MMBM(MMBMConfig(epochs=20, measure_every=5, bound_weight=2.0)).repair(model, clean)
    points = result.curve.points
    assert result.curve.axis == "epoch" and [p.x for p in points] == [0, 5, 10, 15, 20]
    norms = [dict(p.extra)["bound_norm"] for p in points]
    assert norms[-1] < 0.8 * norms[0]
    assert points[0].clean_data_accuracy == 1.0 and points[-1].clean_data_accuracy >= 0.95
    assert result.curve.mark("bounded") == points[-1]


def test_the_reference_start_and_named_layers():
    config = MMBMConfig(epochs=1, initial_bound=8.0, layers=("relu",))
    result = MMBM(config).repair(Planted(), CLEAN)
    assert result.notes["initial_mean_bound"] == {"relu": 8.0}
    assert list(bounds_of(result.model)) == ["relu"]
    with pytest.raises(GoodnetError, match="no layer 'conv9'"):
        MMBM(MMBMConfig(epochs=1, layers=("conv9",))).repair(Planted(), CLEAN)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet20"])
def test_a_saved_repaired_model_loads_back_with_its_bounds(arch, tmp_path):
    data = stripes(64, seed=0)
    spec = spec_for_data(arch, data)
    model = build_model(spec, seed=0).eval()
    result = MMBM(MMBMConfig(epochs=2, batch_size=32, correct_only=False)).repair(model, data)
    bounds = bounds_of(result.model)
    assert all(layer.startswith(("bn", "layer", "conv")) for layer in bounds)
    path = save_model(tmp_path / "m.safetensors", result.model, ModelCard(spec=spec))
    file = load_model(path)
    assert set(file.extras) == {f"bound/{k}" for k in bounds}  # saved beside the weights
    loaded = file.model
    assert all(torch.equal(bounds_of(loaded)[k], v) for k, v in bounds.items())
    x, _ = data.get(torch.arange(16))
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_a_masked_model_keeps_its_masks_and_gains_bounds():
    pruned = masked(Planted(), MaskSet({"conv": torch.tensor([1.0, 1.0, 0.0])}))
    result = MMBM(QUICK).repair(pruned, CLEAN)
    assert isinstance(result.model, Masked) and isinstance(result.model.model, Planted)
    assert torch.equal(result.model.masks.masks["conv"], torch.tensor([1.0, 1.0, 0.0]))
    assert list(result.model.masks.bounds) == ["conv"]


def test_bounds_round_trip_as_tensors_and_cannot_be_baked():
    masks = MaskSet({"conv": torch.ones(3)}, "keep-bias", {"conv": torch.tensor([1.0, 2.0, 0.0])})
    tensors = masks.to_tensors()
    assert set(tensors) == {"mask/conv", "bound/conv"}
    again = MaskSet.from_tensors(tensors, "keep-bias")
    assert torch.equal(again.bounds["conv"], masks.bounds["conv"])
    assert MaskSet.from_tensors({"mask/conv": torch.ones(3)}, "channel").bounds == {}
    with pytest.raises(GoodnetError, match="cannot be folded"):
        bake(Planted(), masks)
    x, _ = TEST.get(torch.arange(8))
    out = masked(Planted(), masks).model.conv(x)
    assert out.amax(dim=(0, 2, 3)).le(torch.tensor([1.0, 2.0, 0.0])).all()
