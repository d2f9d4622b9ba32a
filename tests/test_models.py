"""Contract tests over every registered architecture, plus hand-checked facts about each."""

from __future__ import annotations

import pytest
import torch

from goodnet.errors import GoodnetError
from goodnet.models import (
    MODELS,
    ModelSpec,
    build_model,
    check_input,
    is_graph,
    spec_for_data,
)
from tests.conftest import tiny_keras_graph

SHAPES = {  # a small input each architecture takes
    "small_cnn": (1, 28, 28),
    "resnet20": (1, 28, 28),
    "preact_resnet18": (3, 32, 32),
    "vgg11_bn": (1, 28, 28),
    "deepid": (3, 55, 47),
    "graph": (1, 28, 28),
}


def spec_of(arch: str, num_classes: int = 10) -> ModelSpec:
    c, h, w = SHAPES[arch]
    return ModelSpec(arch=arch, num_classes=num_classes, in_channels=c, height=h, width=w,
                     mean=(0.5,) * c, std=(0.25,) * c,
                     graph=tiny_keras_graph(num_classes, c) if is_graph(arch) else "")


def test_every_registered_model_has_a_test_shape():
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_output_shape_and_pixel_range(arch):
    model = build_model(spec_of(arch, num_classes=7)).eval()
    x = torch.rand(3, *SHAPES[arch])
    out = model(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_same_seed_same_weights_and_global_rng_untouched(arch):
    state = torch.get_rng_state()
    a = build_model(spec_of(arch), seed=3).state_dict()
    b = build_model(spec_of(arch), seed=3).state_dict()
    c = build_model(spec_of(arch), seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_normalisation_is_part_of_the_model(arch):
    model = build_model(spec_of(arch))
    x = torch.full((2, *SHAPES[arch]), 0.75)
    assert torch.allclose(model.normalize(x), torch.ones_like(x))  # (0.75 - 0.5) / 0.25


def _kind(name: str) -> type[torch.nn.Module]:
    """The layer type a name promises: conv → Conv2d, bn → BatchNorm2d, pool → MaxPool2d,
    relu → ReLU, anything else (fc, linear, classifier, output) → Linear."""
    leaf = name.rsplit(".", 1)[-1]
    for prefix, kind in (("conv", torch.nn.Conv2d), ("bn", torch.nn.BatchNorm2d),
                         ("pool", torch.nn.MaxPool2d), ("relu", torch.nn.ReLU)):
        if leaf.startswith(prefix):
            return kind
    return torch.nn.Linear


@pytest.mark.parametrize(
    ("arch", "layers"),
    [
        ("small_cnn", ["conv1", "bn1", "conv2", "bn2", "relu2", "fc1", "fc2"]),
        ("resnet20", ["conv1", "layer3.2.conv2", "layer3.2.bn2", "layer3.2.relu2", "fc"]),
        ("preact_resnet18", ["conv1", "layer4.1.conv2", "layer4.1.bn2", "linear"]),
        ("vgg11_bn", ["features.conv1", "features.conv8", "features.bn8", "classifier"]),
        ("deepid", ["conv_1", "conv_3", "pool_3", "conv_4", "fc_1", "fc_2", "output"]),
    ],
)
def test_layers_are_named(arch, layers):
    modules = dict(build_model(spec_of(arch)).named_modules())
    for name in layers:
        assert name in modules, f"{arch} has no layer {name}"
        assert isinstance(modules[name], _kind(name)), (name, type(modules[name]).__name__)
    assert "no_such_layer" not in modules


def test_deepid_matches_the_keras_lab_network():
    # Layer shapes worked out from ../shared/data/README.md: 55x47 -> conv4 52x44 -> pool 26x22
    # -> conv3 24x20 -> pool 12x10 -> conv3 10x8 -> pool 5x4 (x60) -> conv2 4x3 (x80).
    model = build_model(ModelSpec("deepid", 1283, 3, 55, 47, (0, 0, 0), (1, 1, 1)))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["conv_1.weight"] == (20, 3, 4, 4)
    assert shapes["fc_1.weight"] == (160, 5 * 4 * 60)
    assert shapes["fc_2.weight"] == (160, 4 * 3 * 80)
    assert shapes["output.weight"] == (1283, 160)
    assert sum(p.numel() for p in model.parameters()) == 601_643


def test_deepid_flattens_in_keras_order():
    # Keras flattens (H, W, C): the first features are all channels of pixel (0, 0).
    from goodnet.models.deepid import KerasFlatten

    x = torch.arange(3 * 2 * 2).view(1, 3, 2, 2)  # (N, C, H, W)
    flat = KerasFlatten()(x)
    assert flat[0, :3].tolist() == [x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 0, 0]]


def test_spec_for_data_measures_channel_statistics(stripes_train):
    spec = spec_for_data("small_cnn", stripes_train)
    pixels = stripes_train.images.double() / 255
    assert spec.input_shape == (1, 16, 16)
    assert spec.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-6)
    assert spec.std[0] == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-5)


def test_check_input_refuses_wrong_shape_and_classes(stripes_train):
    with pytest.raises(GoodnetError, match="takes 1×28×28"):
        check_input(spec_of("small_cnn"), stripes_train)
    spec = spec_for_data("small_cnn", stripes_train)
    with pytest.raises(GoodnetError, match="4 classes but the model"):
        check_input(ModelSpec("small_cnn", 10, 1, 16, 16, spec.mean, spec.std), stripes_train)


def test_bad_specs_are_refused():
    with pytest.raises(GoodnetError, match="unknown architecture"):
        build_model(ModelSpec("nonexistent"))
    with pytest.raises(GoodnetError, match="one value per input channel"):
        ModelSpec("small_cnn", in_channels=3, mean=(0.5,), std=(0.2,))
    with pytest.raises(GoodnetError, match="at least 31"):
        build_model(ModelSpec("deepid", 10, 3, 20, 20, (0, 0, 0), (1, 1, 1)))


def test_channels_last_nested_keeps_the_outer_layout():
    """Measuring a model inside its own training loop (a defense's per-epoch point) must not
    put the weights back to the contiguous layout under the training loop's feet."""
    from goodnet.models import channels_last

    model = build_model(ModelSpec("small_cnn", 10, 1, 28, 28, (0.0,), (1.0,)))
    weight = model.get_submodule("conv2").weight  # conv1's single input channel is ambiguous

    def is_channels_last() -> bool:
        return not weight.is_contiguous() and weight.is_contiguous(
            memory_format=torch.channels_last)

    with channels_last(model):
        with channels_last(model):
            assert is_channels_last()
        assert is_channels_last()
    assert weight.is_contiguous()
