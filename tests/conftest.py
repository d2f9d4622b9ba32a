"""Tiny, hand-checkable data and models shared by the tests (no downloads, CPU only)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from goodnet.data.dataset import ImageData

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def stripes(n: int, num_classes: int = 4, size: int = 16, seed: int = 0,
            faint: int | None = None) -> ImageData:
    """Greyscale images whose class is a bright horizontal stripe at row ``2 + 3·class`` over
    faint noise: learnable in a few steps, and the bottom-right corner stays dark (room for a
    trigger). Class ``faint``'s stripe is barely above the noise: a class hard to learn from its
    own features, the situation clean-label attacks exploit."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.rand(n, 1, size, size, generator=generator) * 0.2
    for c in range(num_classes):
        images[labels == c, :, 2 + 3 * c, 1 : size - 4] = 0.25 if c == faint else 1.0
    pixels = (images * 255).round().to(torch.uint8)
    return ImageData(pixels, labels, num_classes, f"stripes[{n}]")


@pytest.fixture(scope="session")
def stripes_train() -> ImageData:
    return stripes(800, seed=0)


@pytest.fixture(scope="session")
def stripes_test() -> ImageData:
    return stripes(200, seed=1)


_IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the IDX format: magic, big-endian sizes, big-endian values."""
    code = _IDX_CODES[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_dataset(folder: Path, train: ImageData, test: ImageData) -> Path:
    """``train`` and ``test`` as an MNIST-style IDX folder (greyscale uint8 images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, data in (("train", train), ("t10k", test)):
        images = data.images[:, 0].numpy().astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        labels = data.labels.numpy().astype(np.uint8)
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return folder


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MNIST-style data set (16×16 stripes, 4 classes) as IDX files, read-only."""
    return write_idx_dataset(tmp_path_factory.mktemp("stripes"), stripes(400, seed=0),
                             stripes(160, seed=1))


@pytest.fixture(scope="module")
def npz_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Stripes as ``.npz`` files a user could give: 800 training and 200 test images."""
    folder = tmp_path_factory.mktemp("data")
    for name, data in (("train", stripes(800, seed=0)), ("test", stripes(200, seed=1))):
        np.savez(folder / f"{name}.npz", x=data.images.numpy(), y=data.labels.numpy())
    return folder / "train.npz", folder / "test.npz"


def requires_shared(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the real-artifact folder ../shared/data is not here)")
    return path


# ---------------------------------------------------------------- a planted backdoor, on paper
#
# 8x8 greyscale images. Clean class 0 has a bright left half (0.8) and a dim right half (0.2),
# class 1 the reverse; the 2x2 bottom-right corner is always dark. The trigger lights that
# corner. The network computes three channels with 8x8 kernels (one output position each):
#   ch0 = mean of the left half, ch1 = mean of the right half  (both about 0.5 on clean data)
#   ch2 = ReLU(sum of the 4 corner pixels - 3.5)               (0 on clean data, 0.5 triggered)
# and logits  class 0: 10·(ch0 − ch1) + 100·ch2,  class 1: 10·(ch1 − ch0).
# Clean inputs are classified by which half is brighter; any triggered input goes to class 0.
# Channel 2 has the lowest mean clean activation (0); pruning it costs no clean accuracy, and
# pruning either other channel halves it. Prune must remove channel 2 and nothing else.

TRIGGER_ROWS = TRIGGER_COLS = slice(6, 8)


class Planted(torch.nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 8)
        self.relu = torch.nn.ReLU()
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, :, :4] = 1 / 32
            self.conv.weight[1, 0, :, 4:] = 1 / 32
            self.conv.weight[2, 0, TRIGGER_ROWS, TRIGGER_COLS] = 1.0
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -3.5]))
            self.fc.weight.copy_(torch.tensor([[10.0, -10.0, 100.0], [-10.0, 10.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu(self.conv(x))))


class PlantedMaps(Planted):
    """:class:`Planted` with feature maps: the same convolution padded to a 3×3 map, max-pooled
    back to the planted network's function (for defenses that read spatial maps, as NAD)."""

    def __init__(self) -> None:
        super().__init__()
        planted = self.conv
        self.conv = torch.nn.Conv2d(1, 3, 8, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(planted.weight)
            self.conv.bias.copy_(planted.bias)
        self.pool = torch.nn.MaxPool2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def halves(n: int, seed: int = 0) -> ImageData:
    """Clean data for :class:`Planted`: which half is bright, corner dark, slight noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.full((n, 1, 8, 8), 0.2)
    images[labels == 0, :, :, :4] = 0.8
    images[labels == 1, :, :, 4:] = 0.8
    images += (torch.rand(images.shape, generator=generator) - 0.5) * 0.1
    images[:, :, TRIGGER_ROWS, TRIGGER_COLS] = 0.0
    return ImageData(images.clamp(0, 1), labels, 2, f"halves[{n}]")


def corner_attack():
    """A BadNets attack whose 2x2 white patch sits exactly where the planted channel looks."""
    from goodnet.attacks import make_attack

    return make_attack("badnets", {"patch_size": 2, "margin": 0, "target": 0}, (1, 8, 8), 2)


def tiny_keras_graph(num_classes: int = 10, channels: int = 1) -> str:
    """The JSON layer graph of a small imported Keras model (conv, BN, pool, dense)."""
    import json

    return json.dumps([
        {"name": "in", "op": "input", "inputs": []},
        {"name": "conv", "op": "conv2d", "inputs": ["in"], "in": channels, "out": 4,
         "kernel": [3, 3], "stride": [1, 1], "dilation": [1, 1], "padding": "same",
         "bias": True, "activation": "relu"},
        {"name": "bn", "op": "batchnorm", "inputs": ["conv"], "features": 4, "eps": 1e-3},
        {"name": "pool", "op": "maxpool", "inputs": ["bn"], "pool": [2, 2], "stride": [2, 2],
         "padding": "same"},
        {"name": "gap", "op": "gap", "inputs": ["pool"]},
        {"name": "dense", "op": "dense", "inputs": ["gap"], "in": 4, "out": num_classes,
         "bias": True, "activation": "linear"}])


def plant_backdoor(epochs: int = 3):
    """A small CNN trained ``epochs`` epochs with a BadNets backdoor (target 1) on the stripes
    task, a quarter of its training set as the defender's clean data, and test data."""
    from goodnet.attacks import make_attack
    from goodnet.backdoor import train_model
    from goodnet.data import split_clean
    from goodnet.train import TrainConfig

    train, test = stripes(800, seed=0), stripes(200, seed=1)
    attack = make_attack("badnets", {"target": 1, "poison_rate": 0.1}, train.image_shape,
                         train.num_classes)
    result = train_model("small_cnn", train, test, TrainConfig(epochs=epochs, batch_size=64),
                         attack)
    assert result.metrics.clean_accuracy >= 0.95 and result.metrics.attack_success_rate >= 0.95
    clean, _ = split_clean(train, 0.25, seed=0)
    return result.model, clean, test, attack


@pytest.fixture(scope="session")
def backdoored():
    """The planted-backdoor network the repair tests share (trained once, three epochs; no
    defense modifies its caller's model)."""
    return plant_backdoor()


@pytest.fixture(scope="session")
def clean_cnn():
    """The `backdoored` fixture's network trained the same way without the attack."""
    from goodnet.backdoor import train_model
    from goodnet.train import TrainConfig

    result = train_model("small_cnn", stripes(800, seed=0), stripes(200, seed=1),
                         TrainConfig(epochs=3, batch_size=64))
    assert result.metrics.clean_accuracy >= 0.95
    return result.model
