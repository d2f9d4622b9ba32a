"""Classifier architectures, built from a :class:`ModelSpec` through the ``MODELS`` registry.

Adding an architecture is one module and one line here. Every model takes pixels in [0, 1]
(normalisation is its first layer, ``normalize``) and names every layer a defense may act on.

One architecture is unlike the others: ``graph`` (:mod:`goodnet.models.keras_graph`) is built
from the layer graph its spec carries, which is how Keras, ONNX and your own class's imports are
stored. Model cards written before it was renamed call it ``keras``; :func:`build_model` reads
that name too (:data:`ALIASES`). Code that asks whether a model is a layer graph goes through
:func:`is_graph`, and the architectures a weights-only file loads onto are :func:`fixed_archs`.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from goodnet.data.dataset import ImageData, to_float
from goodnet.errors import GoodnetError
from goodnet.models.deepid import DeepID
from goodnet.models.keras_graph import KerasGraph
from goodnet.models.preact_resnet import PreActResNet18
from goodnet.models.resnet import ResNet20
from goodnet.models.small_cnn import SmallCNN
from goodnet.models.spec import ModelSpec, Normalize
from goodnet.models.vgg import VGG11BN

MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": ResNet20,
    "preact_resnet18": PreActResNet18,
    "vgg11_bn": VGG11BN,
    "deepid": DeepID,
    "graph": KerasGraph,
}
GRAPH = "graph"
# Old names of registered architectures, still read from model cards: "keras" until issue 28.
ALIASES = {"keras": GRAPH}

__all__ = ["ALIASES", "GRAPH", "MODELS", "ModelSpec", "Normalize", "build_model",
           "channels_last", "check_input", "fixed_archs", "is_graph", "load_class",
           "model_device", "spec_for_data"]

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"


def is_graph(arch: str) -> bool:
    """Whether ``arch`` names the layer-graph architecture (``graph``, or its old name)."""
    return ALIASES.get(arch, arch) == GRAPH


def fixed_archs() -> list[str]:
    """Every registered architecture but the layer graph, in registry order: those whose layers
    their code fixes, onto which a weights-only file (a checkpoint, Keras weights) loads."""
    return [arch for arch in MODELS if not is_graph(arch)]


def build_model(spec: ModelSpec, seed: int = 0,
                device: str | torch.device | None = None) -> nn.Module:
    """A freshly initialised model for ``spec``, its initial weights fixed by ``seed``.

    The global random state is left as it was (the seed applies inside a forked RNG).
    ``device="meta"`` builds the model's structure and shapes without allocating its weights
    (how a file's shapes are checked before anything is allocated). The model's
    ``input_shape`` attribute is the spec's (C, H, W): what a data-free defense traces it with.
    """
    arch = ALIASES.get(spec.arch, spec.arch)
    if arch not in MODELS:
        raise GoodnetError(f"unknown architecture {spec.arch!r}; choose from {sorted(MODELS)}")
    place = contextlib.nullcontext() if device is None else torch.device(device)
    with torch.random.fork_rng(devices=[]), place:
        torch.manual_seed(seed)
        model = MODELS[arch](spec)
    # torch types Module attributes as Tensor | Module; any value may be set.
    model.input_shape = spec.input_shape  # type: ignore[assignment]
    return model


def load_class(arch: str) -> type[nn.Module]:
    """The network class ``package.module:Class`` from the user's own installed code.

    Importing the module runs it: call this only with a name the user gave on the command line,
    never with one read from a file.
    """
    module_path, _, qualname = arch.partition(":")
    if not re.fullmatch(_DOTTED, module_path) or not re.fullmatch(_DOTTED, qualname):
        raise GoodnetError(f"architecture {arch!r}: expected a built-in name ({sorted(MODELS)}) "
                           "or package.module:Class")
    try:
        found: object = importlib.import_module(module_path)
    except Exception as error:  # the user's own module failing to import: one line
        raise GoodnetError(f"cannot import {module_path} for {arch}: "
                           f"{type(error).__name__}: {error}"[:300]) from None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise GoodnetError(f"{arch}: no torch.nn.Module class of that name in {module_path}")
    return found


def spec_for_data(arch: str, data: ImageData, batch_size: int = 4096) -> ModelSpec:
    """A spec for ``arch`` that fits ``data``: its shape, classes and per-channel statistics.

    The mean and standard deviation are streamed over the data in batches.
    """
    c, h, w = data.image_shape
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(data), batch_size):
        x = to_float(data.images[start:start + batch_size]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
    count = len(data) * h * w
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return ModelSpec(arch=arch, num_classes=data.num_classes, in_channels=c, height=h, width=w,
                     mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def check_input(spec: ModelSpec, data: ImageData) -> None:
    """Raise a clear error if ``data`` cannot be fed to a model built from ``spec``."""
    if data.image_shape != spec.input_shape:
        raise GoodnetError(
            f"{data.name}: images are {'×'.join(map(str, data.image_shape))} (C×H×W) but the "
            f"model ({spec.arch}) takes {'×'.join(map(str, spec.input_shape))}"
        )
    if data.num_classes != spec.num_classes:
        raise GoodnetError(
            f"{data.name}: {data.num_classes} classes but the model ({spec.arch}) has "
            f"{spec.num_classes} outputs"
        )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with channels-last convolution weights, restoring the usual layout after.

    Convolutions on a CPU run about 1.2-1.8× faster this way (oneDNN's preferred layout); the
    values of the weights are unchanged, and parameters stay the same objects, so optimisers and
    hooks are unaffected. Nested (a model measured inside its own training loop), the inner
    call leaves the outer call's layout as it found it.
    """
    # Already channels-last (measuring inside a training loop): leave the layout to the caller.
    if any(p.dim() == 4 and not p.is_contiguous()
           and p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()):
        yield model
        return
    # Module.to accepts memory_format, which torch's stubs leave out.
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
