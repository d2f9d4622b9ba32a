"""A network imported from a Keras model: a graph of common layers, channels-first inside.

The graph is goodnet's own plain description (JSON in the model card's ``spec.graph``), parsed
from a Keras ``model_config`` by :mod:`goodnet.keras_h5` and checked here; nothing from the file
is ever executed. Each node is one Keras layer, under its Keras name, with the settings its
PyTorch twin needs::

    {"name": "conv2d", "op": "conv2d", "inputs": ["input_1"], "in": 3, "out": 64,
     "kernel": [3, 3], "stride": [1, 1], "dilation": [1, 1], "padding": "valid",
     "bias": true, "activation": "relu"}

Ops: ``input``, ``conv2d``, ``dense``, ``batchnorm``, ``maxpool``, ``avgpool``, ``gap`` (global
average pooling), ``gmp`` (global max pooling), ``flatten``, ``activation``, ``dropout``
(identity at inference), ``zeropad``, ``add``, ``concatenate``. Images travel as
``(N, C, H, W)``; ``flatten`` flattens in Keras's ``(H, W, C)`` order so dense weights load as
they are; TensorFlow's asymmetric ``"same"`` padding is reproduced exactly. The last node is the
output; a final softmax is not part of the graph (goodnet models output logits; the argmax is
the same).

Layers are registered as submodules under their Keras names (``.`` and ``/`` replaced by
``_``), so ``--layer conv2d_3`` names the same layer as in Keras.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.errors import GoodnetError
from goodnet.models.spec import ModelSpec, Normalize

ACTIVATIONS = {
    "linear": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "elu": nn.ELU, "selu": nn.SELU, "softplus": nn.Softplus, "swish": nn.SiLU, "silu": nn.SiLU,
    "relu6": nn.ReLU6, "gelu": nn.GELU, "softmax": lambda: nn.Softmax(dim=1),
}
OPS = ("input", "conv2d", "dense", "batchnorm", "maxpool", "avgpool", "gap", "gmp", "flatten",
       "activation", "dropout", "zeropad", "add", "concatenate")
MAX_PARAMETERS = 200_000_000
MAX_NODES = 10_000


def module_name(name: str) -> str:
    """A Keras layer name as a PyTorch submodule name."""
    return name.replace(".", "_").replace("/", "_")


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding along one axis: (before, after), the extra pixel after."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class SamePad(nn.Module):
    """Pad ``(N, C, H, W)`` as TensorFlow's "same" does for a kernel, stride and dilation."""

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int] = (1, 1), value: float = 0.0) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation, self.value = kernel, stride, dilation, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _same_padding(x.shape[2], self.kernel[0], self.stride[0], self.dilation[0])
        left, right = _same_padding(x.shape[3], self.kernel[1], self.stride[1], self.dilation[1])
        return F.pad(x, (left, right, top, bottom), value=self.value)


class Conv(nn.Conv2d):
    """Keras ``Conv2D`` without its activation (which runs as a separate step, so a channel mask
    on this layer acts before it, as pruning a Keras kernel does): "same" padding as TensorFlow
    pads."""

    def __init__(self, node: dict[str, Any]) -> None:
        kernel, stride = tuple(node["kernel"]), tuple(node["stride"])
        dilation = tuple(node["dilation"])
        super().__init__(node["in"], node["out"], kernel, stride, dilation=dilation,
                         bias=node["bias"])
        self.same = SamePad(kernel, stride, dilation) if node["padding"] == "same" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.same(x) if self.same is not None else x)


class Dense(nn.Linear):
    """Keras ``Dense`` on a ``(N, features)`` input, without its activation."""

    def __init__(self, node: dict[str, Any]) -> None:
        super().__init__(node["in"], node["out"], bias=node["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise GoodnetError("a Dense layer on an image tensor is not supported; flatten first")
        return super().forward(x)


class Pool(nn.Module):
    """Keras ``MaxPooling2D`` / ``AveragePooling2D`` with "valid" or "same" padding (averages
    over the real pixels only, as TensorFlow does)."""

    def __init__(self, node: dict[str, Any]) -> None:
        super().__init__()
        self.kind = node["op"]
        self.pool, self.stride = tuple(node["pool"]), tuple(node["stride"])
        self.same = node["padding"] == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "maxpool":
            if self.same:
                x = SamePad(self.pool, self.stride, value=-math.inf)(x)
            return F.max_pool2d(x, self.pool, self.stride)
        if not self.same:
            return F.avg_pool2d(x, self.pool, self.stride)
        pad = SamePad(self.pool, self.stride)
        ones = torch.ones_like(x[:, :1])
        return (F.avg_pool2d(pad(x), self.pool, self.stride)
                / F.avg_pool2d(pad(ones), self.pool, self.stride))


class KerasFlattenNCHW(nn.Module):
    """Flatten in Keras's ``(H, W, C)`` order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1) if x.ndim == 4 else x.flatten(1)


class ZeroPad(nn.Module):
    def __init__(self, node: dict[str, Any]) -> None:
        super().__init__()
        (self.top, self.bottom), (self.left, self.right) = node["padding"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (self.left, self.right, self.top, self.bottom))


class GlobalPool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3)) if self.kind == "gmp" else x.mean(dim=(2, 3))


class Merge(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.kind == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        return torch.cat(xs, dim=1)


def _layer(node: dict[str, Any]) -> nn.Module:
    op = node["op"]
    if op == "conv2d":
        return Conv(node)
    if op == "dense":
        return Dense(node)
    if op == "batchnorm":
        norm = nn.BatchNorm2d(node["features"], eps=node["eps"], affine=True)
        return norm
    if op in ("maxpool", "avgpool"):
        return Pool(node)
    if op in ("gap", "gmp"):
        return GlobalPool(op)
    if op == "flatten":
        return KerasFlattenNCHW()
    if op == "activation":
        return ACTIVATIONS[node["activation"]]()
    if op == "zeropad":
        return ZeroPad(node)
    if op in ("add", "concatenate"):
        return Merge(op)
    return nn.Identity()  # input, dropout


def check_graph(graph: list[dict[str, Any]]) -> None:
    """Refuse a graph that is malformed, refers to unknown layers or would be too large."""
    if not isinstance(graph, list) or not graph or len(graph) > MAX_NODES:
        raise GoodnetError("the Keras graph is empty or too large")
    seen: set[str] = set()
    parameters = 0
    for node in graph:
        if not isinstance(node, dict) or node.get("op") not in OPS:
            raise GoodnetError(f"unsupported layer in the Keras graph: {node!r:.80}")
        name = node.get("name")
        if not isinstance(name, str) or not name or name in seen:
            raise GoodnetError(f"bad or repeated layer name in the Keras graph: {name!r}")
        inputs = node.get("inputs", [])
        if node["op"] != "input" and (not inputs or any(i not in seen for i in inputs)):
            raise GoodnetError(f"layer {name!r} reads an input that is not defined before it")
        if node["op"] in ("conv2d", "activation", "dense") and \
                node.get("activation") not in ACTIVATIONS:
            raise GoodnetError(f"layer {name!r}: unsupported activation "
                               f"{node.get('activation')!r}")
        for key in ("in", "out", "features"):
            if key in node and (not isinstance(node[key], int) or not 0 < node[key] <= 10**7):
                raise GoodnetError(f"layer {name!r}: bad size {key}={node[key]!r}")
        if node["op"] == "conv2d":
            parameters += node["in"] * node["out"] * node["kernel"][0] * node["kernel"][1]
        elif node["op"] == "dense":
            parameters += node["in"] * node["out"]
        seen.add(name)
    if parameters > MAX_PARAMETERS:
        raise GoodnetError(f"the Keras graph declares {parameters:,} weights; goodnet refuses "
                           f"more than {MAX_PARAMETERS:,}")
    if sum(node["op"] == "input" for node in graph) != 1:
        raise GoodnetError("the Keras graph must have exactly one input")


class KerasGraph(nn.Module):
    """A Keras model's layers run in their graph order, channels-first."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        try:
            graph = json.loads(spec.graph)
        except (TypeError, ValueError):
            raise GoodnetError("the model card's Keras graph is not valid JSON") from None
        check_graph(graph)
        self.normalize = Normalize(spec)
        self.graph = graph
        self.names = {node["name"]: module_name(node["name"]) for node in graph}
        taken = set(self.names.values())
        if len(taken) != len(self.names) or taken & {"activations", "normalize"}:
            raise GoodnetError("Keras layer names collide once '.' and '/' become '_' (or one is "
                               "named 'normalize' or 'activations')")
        self.activations = nn.ModuleDict()
        for node in graph:
            if node["op"] != "input":
                self.add_module(self.names[node["name"]], _layer(node))
            if node["op"] in ("conv2d", "dense") and node["activation"] != "linear":
                self.activations[self.names[node["name"]]] = ACTIVATIONS[node["activation"]]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for node in self.graph:
            if node["op"] == "input":
                values[node["name"]] = self.normalize(x)
                continue
            inputs = [values[name] for name in node["inputs"]]
            name = self.names[node["name"]]
            out = getattr(self, name)(*inputs)
            if name in self.activations:
                out = self.activations[name](out)
            values[node["name"]] = out
        return values[self.graph[-1]["name"]]
