"""Channel masks: both semantics, exact baking, mask points, and saving beside the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from goodnet.artifacts import ModelCard, load_model, save_model
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet, applied, bake, mask_points, masked
from goodnet.models import MODELS, ModelSpec, build_model, is_graph
from tests.conftest import tiny_keras_graph


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.copy_(torch.tensor([0.5, 0.25]))
            self.bn.weight.copy_(torch.tensor([2.0, 3.0]))
            self.bn.bias.copy_(torch.tensor([0.7, -0.4]))
        self.eval()  # running mean 0, var 1: bn(y) = γ·y/√(1+ε) + β

    def forward(self, x):
        return self.bn(self.conv(x))


X = torch.full((1, 1, 2, 2), 1.0)  # conv output: 1.5 and 1.25
MASK = torch.tensor([0.0, 1.0])


def test_channel_semantics_removes_the_whole_channel():
    model = ConvBN()
    with applied(model, MaskSet({"bn": MASK})):
        out = model(X)
    assert (out[0, 0] == 0).all()  # no β survives
    assert torch.allclose(out[0, 1], model(X)[0, 1])


def test_keep_bias_semantics_keeps_the_shift():
    model = ConvBN()
    with applied(model, MaskSet({"bn": MASK}, "keep-bias")):
        assert torch.allclose(model(X)[0, 0], torch.full((2, 2), 0.7))  # β of channel 0
    with applied(model, MaskSet({"conv": MASK}, "keep-bias")):  # the lab: kernel off, bias on
        assert torch.allclose(model.conv(X)[0, 0], torch.full((2, 2), 0.5))


def test_hooks_are_removed_and_the_model_untouched():
    model = ConvBN()
    before = model(X).clone()
    with applied(model, MaskSet({"bn": MASK})):
        pass
    assert not model.bn._forward_hooks
    copy = masked(model, MaskSet({"bn": MASK}))
    assert not model.bn._forward_hooks and torch.equal(model(X), before)
    assert not torch.equal(copy(X), before)


@pytest.mark.parametrize("semantics", ["channel", "keep-bias"])
@pytest.mark.parametrize("layer", ["conv", "bn"])
def test_bake_is_exact(semantics, layer):
    model = ConvBN()
    masks = MaskSet({layer: torch.tensor([0.3, 1.0])}, semantics)
    assert torch.allclose(bake(model, masks)(X), masked(model, masks)(X), atol=1e-6)
    assert not torch.equal(bake(model, masks)(X), model(X))


def test_mask_points_find_the_batchnorm_after_each_convolution():
    spec = ModelSpec("small_cnn", 10, 1, 28, 28, (0.5,), (0.25,))
    assert mask_points(build_model(spec), torch.rand(1, 1, 28, 28)) == {
        "conv1": "bn1", "conv2": "bn2"}
    deepid = build_model(ModelSpec("deepid", 10, 3, 55, 47, (0, 0, 0), (1, 1, 1)))
    assert list(mask_points(deepid, torch.rand(1, 3, 55, 47)).values()) == [
        "conv_1", "conv_2", "conv_3", "conv_4"]  # no BatchNorm: the convolutions themselves
    resnet = build_model(ModelSpec("resnet20", 10, 1, 28, 28, (0.5,), (0.25,)))
    points = mask_points(resnet, torch.rand(1, 1, 28, 28))
    assert points["layer3.2.conv2"] == "layer3.2.bn2"
    assert points["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"


def test_every_architecture_has_mask_points():
    shapes = {"preact_resnet18": (3, 32, 32), "deepid": (3, 55, 47)}
    graph = tiny_keras_graph()
    for arch in MODELS:
        c, h, w = shapes.get(arch, (1, 28, 28))
        model = build_model(ModelSpec(arch, 10, c, h, w, (0.5,) * c, (0.25,) * c,
                                      graph=graph if is_graph(arch) else ""))
        assert mask_points(model, torch.rand(1, c, h, w))


def test_copying_a_masked_model_copies_its_masks_once():
    """A fractional mask shows double masking: the copy must scale by m, not m²."""
    model = ConvBN()
    work = masked(model, MaskSet({"bn": torch.tensor([0.5, 1.0])}))
    twin = copy.deepcopy(work)
    assert torch.allclose(twin(X), work(X))
    assert not any(m._forward_hooks for m in [*model.modules()])
    with pytest.raises(GoodnetError, match="hooks"):
        bake(work.model, work.masks)


def test_bad_masks_are_refused():
    with pytest.raises(GoodnetError, match=r"\[0, 1\]"):
        MaskSet({"bn": torch.tensor([1.5, 0.0])})
    with pytest.raises(GoodnetError, match="has 3 entries"), applied(
            ConvBN(), MaskSet({"bn": torch.ones(3)})):
        pass
    with pytest.raises(GoodnetError, match="semantics"):
        MaskSet({}, "scissors")


def test_masks_are_saved_beside_the_weights(tmp_path):
    spec = ModelSpec("small_cnn", 10, 1, 28, 28, (0.5,), (0.25,))
    model = build_model(spec)
    mask = torch.ones(64)
    mask[[3, 7]] = 0
    repaired = masked(model, MaskSet({"bn2": mask}, "keep-bias"))
    path = save_model(tmp_path / "r.safetensors", repaired, ModelCard(spec=spec))
    loaded = load_model(path)
    assert loaded.model.masks.pruned() == {"bn2": [3, 7]}
    assert loaded.model.masks.semantics == "keep-bias"
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(loaded.model(x), repaired.eval()(x), atol=1e-6)
