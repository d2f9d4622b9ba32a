"""The ``graph`` architecture: a network imported from a Keras model, an ONNX file or your own
class, as a graph of common layers, channels-first inside (cards before issue 28 call it
``keras``).

The graph is goodnet's own plain description (JSON in the model card's ``spec.graph``), parsed
from a Keras ``model_config`` by :mod:`goodnet.importers.keras` and checked here; nothing from
the file is ever executed. Each node is one Keras layer, under its Keras name, with the settings its
PyTorch twin needs::

    {"name": "conv2d", "op": "conv2d", "inputs": ["input_1"], "in": 3, "out": 64,
     "kernel": [3, 3], "stride": [1, 1], "dilation": [1, 1], "padding": "valid",
     "bias": true, "activation": "relu"}

Ops: ``input``, ``conv2d``, ``dense``, ``batchnorm``, ``maxpool``, ``avgpool``, ``gap`` (global
average pooling), ``gmp`` (global max pooling), ``flatten``, ``activation``, ``dropout``
(identity at inference), ``zeropad``, ``add``, ``concatenate``, and for ONNX graphs
(:mod:`goodnet.importers.onnx`) ``affine`` (a per-channel or scalar ``x * weight + bias``),
``clip`` and ``leakyrelu``. Images travel as ``(N, C, H, W)``; ``flatten`` flattens in Keras's
``(H, W, C)`` order so dense weights load as they are, or in PyTorch's and ONNX's ``(C, H, W)``
order with ``"channels_first": true``; TensorFlow's asymmetric ``"same"`` padding is reproduced
exactly. ONNX graphs also use explicit ``padding`` ``[[top, bottom], [left, right]]`` on
convolutions and pools, ``groups`` on convolutions, ``count_include_pad`` on average pools,
``ceil_mode`` on unpadded max pools and ``keepdims`` on global pools. The last node is the
output; a final softmax is not part of the graph (goodnet models output logits; the argmax is
the same).

Layers are registered as submodules under their Keras names (``.`` and ``/`` replaced by
``_``), so ``--layer conv2d_3`` names the same layer as in Keras.

A graph is untrusted data, whether a Keras file or a model card brought it, and both paths
check it here, in :func:`check_graph`, before any layer is built: its JSON nesting is bounded;
every setting must have its type, sign and rank (kernels, strides, dilations and pools are
pairs of positive integers, sizes positive integers, flags booleans); every weight is counted
(BatchNorm's four vectors included) against :data:`MAX_PARAMETERS`; and the shapes are
propagated from the input through every layer (:func:`layer_shape`), so that a kernel larger
than its input, a layer whose width does not match what it receives, or a layer holding more
than :data:`MAX_VALUES` values per image is refused at import or load, not when the model runs.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.errors import GoodnetError
from goodnet.models.spec import MAX_SIDE, ModelSpec, Normalize, is_int

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "elu": nn.ELU, "selu": nn.SELU, "softplus": nn.Softplus, "swish": nn.SiLU, "silu": nn.SiLU,
    "relu6": nn.ReLU6, "gelu": nn.GELU, "softmax": lambda: nn.Softmax(dim=1),
}
OPS = ("input", "conv2d", "dense", "batchnorm", "maxpool", "avgpool", "gap", "gmp", "flatten",
       "activation", "dropout", "zeropad", "add", "concatenate", "affine", "clip", "leakyrelu")
MAX_PARAMETERS = 200_000_000
MAX_NODES = 10_000
# Values one layer may hold for one image, padding included (128 MiB of float32): ten times what
# a VGG at 224×224 holds in its widest layer, and a bound on what a graph costs to run.
MAX_VALUES = 2**25
# How deeply a Keras config or a card's graph may nest: Keras writes about 12 levels; a bound
# keeps JSON parsing and every walk of the result far from Python's recursion limit.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
SINGLE_INPUT = tuple(op for op in OPS if op not in ("input", "add", "concatenate"))

Shape = tuple[int, ...]  # of one image: (C, H, W), or (F,) once flat


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


def _explicit_pad(node: dict[str, Any], value: float = 0.0) -> nn.Module | None:
    """A fixed ``[[top, bottom], [left, right]]`` padding (ONNX's ``pads``), or None."""
    if not isinstance(node["padding"], list):
        return None
    (top, bottom), (left, right) = node["padding"]
    return nn.ConstantPad2d((left, right, top, bottom), value)


class Conv(nn.Conv2d):
    """Keras ``Conv2D`` without its activation (which runs as a separate step, so a channel mask
    on this layer acts before it, as pruning a Keras kernel does): "same" padding as TensorFlow
    pads."""

    def __init__(self, node: dict[str, Any]) -> None:
        kernel, stride = tuple(node["kernel"]), tuple(node["stride"])
        dilation = tuple(node["dilation"])
        super().__init__(node["in"], node["out"], kernel, stride, dilation=dilation,
                         groups=node.get("groups", 1), bias=node["bias"])
        self.same = SamePad(kernel, stride, dilation) if node["padding"] == "same" else \
            _explicit_pad(node)

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
        self.explicit = _explicit_pad(node, -math.inf if self.kind == "maxpool" else 0.0)
        self.count_pad = bool(node.get("count_include_pad", False))
        self.ceil = bool(node.get("ceil_mode", False))  # ONNX and PyTorch, unpadded max pools

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit is not None:
            pool = F.avg_pool2d if self.kind == "avgpool" else F.max_pool2d
            out = pool(self.explicit(x), self.pool, self.stride)
            if self.kind == "maxpool" or self.count_pad:
                return out
            return out / F.avg_pool2d(self.explicit(torch.ones_like(x[:, :1])), self.pool,
                                      self.stride)
        if self.kind == "maxpool":
            if self.same:
                x = SamePad(self.pool, self.stride, value=-math.inf)(x)
            return F.max_pool2d(x, self.pool, self.stride, ceil_mode=self.ceil)
        if not self.same:
            return F.avg_pool2d(x, self.pool, self.stride)
        pad = SamePad(self.pool, self.stride)
        ones = torch.ones_like(x[:, :1])
        return (F.avg_pool2d(pad(x), self.pool, self.stride)
                / F.avg_pool2d(pad(ones), self.pool, self.stride))


class KerasFlattenNCHW(nn.Module):
    """Flatten in Keras's ``(H, W, C)`` order, or in ``(C, H, W)`` order (PyTorch's, ONNX's)."""

    def __init__(self, channels_first: bool = False) -> None:
        super().__init__()
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and not self.channels_first:
            return x.permute(0, 2, 3, 1).flatten(1)
        return x.flatten(1)


class ZeroPad(nn.Module):
    def __init__(self, node: dict[str, Any]) -> None:
        super().__init__()
        (self.top, self.bottom), (self.left, self.right) = node["padding"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (self.left, self.right, self.top, self.bottom))


class GlobalPool(nn.Module):
    def __init__(self, kind: str, keepdims: bool = False) -> None:
        super().__init__()
        self.kind, self.keepdims = kind, keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gmp":
            return x.amax(dim=(2, 3), keepdim=self.keepdims)
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class Affine(nn.Module):
    """``x * weight + bias`` with one value per channel (dimension 1), or one for all."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class Clip(nn.Module):
    def __init__(self, low: float | None, high: float | None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)


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
        return GlobalPool(op, bool(node.get("keepdims", False)))
    if op == "flatten":
        return KerasFlattenNCHW(bool(node.get("channels_first", False)))
    if op == "affine":
        return Affine(node["features"])
    if op == "clip":
        return Clip(node["min"], node["max"])
    if op == "leakyrelu":
        return nn.LeakyReLU(node["alpha"])
    if op == "activation":
        return ACTIVATIONS[node["activation"]]()
    if op == "zeropad":
        return ZeroPad(node)
    if op in ("add", "concatenate"):
        return Merge(op)
    return nn.Identity()  # input, dropout


def _check_onnx_fields(node: dict[str, Any], name: str) -> None:
    """The fields only ONNX graphs use: explicit padding, groups, clip bounds, slopes, flags."""
    padding = node.get("padding")
    if isinstance(padding, list) and not (
            len(padding) == 2 and all(isinstance(p, list) and len(p) == 2 for p in padding)
            and all(type(v) is int and 0 <= v <= 10_000 for p in padding for v in p)):
        raise GoodnetError(f"layer {name!r}: bad padding {padding!r:.80}")
    groups = node.get("groups", 1)
    if type(groups) is not int or groups < 1 or any(
            type(node.get(k)) is int and node[k] % groups for k in ("in", "out")):
        raise GoodnetError(f"layer {name!r}: bad groups {groups!r}")
    for key in ("count_include_pad", "keepdims", "channels_first", "ceil_mode"):
        if not isinstance(node.get(key, False), bool):
            raise GoodnetError(f"layer {name!r}: {key} must be true or false")
    numbers = {"clip": ("min", "max"), "leakyrelu": ("alpha",)}.get(node["op"], ())
    values = [node.get(key, "missing") for key in numbers]
    if any(v is not None and (type(v) not in (int, float) or not math.isfinite(v))
           for v in values) or (node["op"] == "leakyrelu" and values[0] is None) or \
            (node["op"] == "clip" and None not in values and values[0] > values[1]):
        raise GoodnetError(f"layer {name!r}: bad {' or '.join(numbers)} {values!r:.80}")


def parse_json(text: str, source: str) -> Any:
    """JSON text as Python values, refused with one line if invalid or nested more than
    :data:`MAX_JSON_DEPTH` deep (checked on the brackets before parsing, so that no parser or
    later walk can run out of stack)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = max(itertools.accumulate(1 if b in "[{" else -1 for b in brackets), default=0)
    if depth > MAX_JSON_DEPTH:
        raise GoodnetError(f"{source}: nested more than {MAX_JSON_DEPTH} levels deep; refused")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise GoodnetError(f"{source}: not valid JSON") from None


def _ints(node: dict[str, Any], key: str, name: str, low: int = 1) -> tuple[int, int]:
    """``node[key]``, which must be a pair of integers from ``low`` to ``MAX_SIDE`` (no window,
    stride or padding of an accepted image is longer than its side)."""
    value = node.get(key)
    if not (isinstance(value, list) and len(value) == 2 and all(
            is_int(v) and low <= v <= MAX_SIDE for v in value)):
        kind = "positive" if low == 1 else "non-negative"
        raise GoodnetError(f"layer {name!r}: {key} must be two {kind} integers of at most "
                           f"{MAX_SIDE}, got {value!r:.60}")
    return value[0], value[1]


def _padding(node: dict[str, Any], name: str) -> Any:
    """A convolution's or pool's padding: "valid", "same" or [[top, bottom], [left, right]]."""
    padding = node.get("padding")
    if padding in ("valid", "same"):
        return padding
    if isinstance(padding, list) and len(padding) == 2 and all(
            isinstance(p, list) for p in padding):
        return [_ints({"padding": p}, "padding", name, low=0) for p in padding]
    raise GoodnetError(f"layer {name!r}: padding must be 'valid', 'same' or [[top, bottom], "
                       f"[left, right]], got {padding!r:.60}")


def _check_fields(node: dict[str, Any], name: str) -> int:
    """Refuse a node whose settings have the wrong type, sign or rank; its weight count."""
    op = node["op"]
    _check_onnx_fields(node, name)
    required = {"conv2d": ("in", "out"), "dense": ("in", "out"), "batchnorm": ("features",),
                "affine": ("features",)}.get(op, ())
    for key in ("in", "out", "features"):
        if (key in node or key in required) and not (
                is_int(node.get(key)) and 0 < node[key] <= 10**7):
            raise GoodnetError(f"layer {name!r}: {key} must be a positive integer, got "
                               f"{node.get(key)!r:.40}")
    if op in ("conv2d", "activation", "dense") and not (
            isinstance(node.get("activation"), str) and node["activation"] in ACTIVATIONS):
        raise GoodnetError(f"layer {name!r}: unsupported activation "
                           f"{node.get('activation')!r:.40}")
    if op in ("conv2d", "dense") and not isinstance(node.get("bias"), bool):
        raise GoodnetError(f"layer {name!r}: bias must be true or false")
    if op == "conv2d":
        kernel = _ints(node, "kernel", name)
        _ints(node, "stride", name)
        _ints(node, "dilation", name)
        _padding(node, name)
        weights = node["out"] * node["in"] // node.get("groups", 1) * kernel[0] * kernel[1]
        return weights + node["out"] * node["bias"]
    if op == "dense":
        return (node["in"] + node["bias"]) * node["out"]
    if op == "batchnorm":
        eps = node.get("eps")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                and math.isfinite(eps) and eps > 0):
            raise GoodnetError(f"layer {name!r}: eps must be a positive number, got {eps!r:.40}")
        return 4 * node["features"]  # scale, shift, running mean and variance
    if op == "affine":
        return 2 * node["features"]
    if op in ("maxpool", "avgpool"):
        _ints(node, "pool", name)
        _ints(node, "stride", name)
        _padding(node, name)
    elif op == "zeropad":
        padding = node.get("padding")
        if not (isinstance(padding, list) and len(padding) == 2):
            raise GoodnetError(f"layer {name!r}: padding must be [[top, bottom], [left, right]], "
                               f"got {padding!r:.60}")
        for pair in padding:
            _ints({"padding": pair}, "padding", name, low=0)
    return 0


def _window(size: int, kernel: int, stride: int, dilation: int, padding: Any, axis: int,
            name: str, ceil: bool = False) -> tuple[int, int]:
    """(padded size, output size) of a convolution or pool along one axis, as goodnet runs it:
    padded first ("same" as TensorFlow pads, or explicitly), then unpadded."""
    effective = (kernel - 1) * dilation + 1
    if padding == "same":
        padded = size + sum(_same_padding(size, kernel, stride, dilation))
    elif isinstance(padding, list):
        padded = size + sum(padding[axis])
    else:
        padded = size
    if padded < effective:
        raise GoodnetError(f"layer {name!r}: its {kernel}-wide window (dilated to {effective}) "
                           f"is larger than its input ({padded} after padding); refused")
    steps = -(-(padded - effective) // stride) if ceil else (padded - effective) // stride
    if ceil and steps * stride >= padded:  # PyTorch drops a window that starts past the end
        steps -= 1
    return padded, steps + 1


def _fits(shape: Shape, name: str, what: str = "gives") -> Shape:
    if math.prod(shape) > MAX_VALUES:
        raise GoodnetError(f"layer {name!r} {what} {'×'.join(map(str, shape))} values per image, "
                           f"more than goodnet runs ({MAX_VALUES:,}); refused")
    return shape


def layer_shape(node: dict[str, Any], inputs: list[Shape]) -> Shape:
    """The shape one node of the graph gives an image, from the shapes of its inputs; refuses
    settings of the wrong type or sign and layers that do not fit what they receive."""
    name, op = node["name"], node["op"]
    _check_fields(node, name)
    _check_inputs(node, inputs)
    shape = inputs[0]
    if op in ("conv2d", "maxpool", "avgpool"):
        return _window_shape(node, shape)
    if op == "dense":
        return (node["out"],)
    if op in ("gap", "gmp"):
        return (shape[0], 1, 1) if node.get("keepdims", False) else (shape[0],)
    if op == "flatten":
        return (math.prod(shape),)
    if op == "zeropad":
        (top, bottom), (left, right) = node["padding"]
        return _fits((shape[0], shape[1] + top + bottom, shape[2] + left + right), name)
    if op in ("add", "concatenate"):
        return _merged_shape(name, op, inputs)
    return shape  # activation, dropout, batchnorm, affine, clip, leakyrelu


def _check_inputs(node: dict[str, Any], inputs: list[Shape]) -> None:
    """Refuse a node given the wrong number of inputs, an image where it takes a vector (or
    the reverse), or inputs of another width than its settings say."""
    name, op = node["name"], node["op"]
    if op in SINGLE_INPUT and len(inputs) != 1:
        raise GoodnetError(f"layer {name!r} takes one input, got {len(inputs)}")
    shape = inputs[0]
    image = len(shape) == 3
    if op in ("conv2d", "batchnorm", "maxpool", "avgpool", "gap", "gmp", "zeropad") and \
            not image:
        raise GoodnetError(f"layer {name!r} ({op}) needs an image, got a flat vector of "
                           f"{shape[0]}")
    if op == "dense" and image:
        raise GoodnetError(f"layer {name!r}: a Dense layer on an image is not supported; "
                           "flatten first")
    key = {"conv2d": "in", "dense": "in", "batchnorm": "features"}.get(op)
    if key is not None and node[key] != shape[0]:
        raise GoodnetError(f"layer {name!r}: {key}={node[key]} but its input has {shape[0]} "
                           f"{'channels' if image else 'values'}")
    if op == "affine" and node["features"] not in (1, shape[0]):
        raise GoodnetError(f"layer {name!r}: features={node['features']} but its input has "
                           f"{shape[0]} channels")


def _window_shape(node: dict[str, Any], shape: Shape) -> Shape:
    """The output shape of a convolution or a pooling layer (its padded input fitting too)."""
    name, op = node["name"], node["op"]
    conv = op == "conv2d"
    kernel = node["kernel"] if conv else node["pool"]
    dilation = node["dilation"] if conv else [1, 1]
    padding = node["padding"]
    ceil = op == "maxpool" and not isinstance(padding, list) and \
        bool(node.get("ceil_mode", False))
    (top, height), (left, width) = (
        _window(shape[1 + axis], kernel[axis], node["stride"][axis], dilation[axis],
                padding, axis, name, ceil) for axis in (0, 1))
    _fits((shape[0], top, left), name, "pads its input to")
    return _fits((node["out"] if conv else shape[0], height, width), name)


def _merged_shape(name: str, op: str, inputs: list[Shape]) -> Shape:
    """The output shape of an ``add`` (inputs broadcast) or a ``concatenate`` (on channels)."""
    shape = inputs[0]
    if op == "add":
        if any(len(s) != len(shape) for s in inputs) or any(
                len({d for d in dims if d != 1}) > 1 for dims in zip(*inputs, strict=True)):
            raise GoodnetError(f"layer {name!r} adds tensors of shapes that do not match: "
                               f"{inputs!r:.80}")
        return tuple(max(dims) for dims in zip(*inputs, strict=True))
    if any(len(s) != len(shape) or s[1:] != shape[1:] for s in inputs):
        raise GoodnetError(f"layer {name!r} concatenates tensors whose sizes differ beyond "
                           f"their channels: {inputs!r:.80}")
    return _fits((sum(s[0] for s in inputs), *shape[1:]), name)


def check_graph(graph: list[dict[str, Any]], input_shape: Shape | None = None
                ) -> dict[str, Shape]:
    """Refuse a graph that is malformed, refers to unknown layers, holds settings of the wrong
    type or sign, or would be too large (every weight counted).

    With ``input_shape`` (C, H, W), the shapes are also propagated from the input, so that a
    layer that does not fit what it receives (a kernel larger than its input, a Dense layer of
    the wrong width) or that would hold more than :data:`MAX_VALUES` values per image is refused
    now, not when the model first runs. Returns each layer's output shape (none without
    ``input_shape``).
    """
    if not isinstance(graph, list) or not graph or len(graph) > MAX_NODES:
        raise GoodnetError("the Keras graph is empty or too large")
    seen: set[str] = set()
    shapes: dict[str, Shape] = {}
    parameters = 0
    for node in graph:
        if not isinstance(node, dict) or node.get("op") not in OPS:
            raise GoodnetError(f"unsupported layer in the Keras graph: {node!r:.80}")
        name = node.get("name")
        if not isinstance(name, str) or not name or name in seen:
            raise GoodnetError(f"bad or repeated layer name in the Keras graph: {name!r:.80}")
        inputs = node.get("inputs", [])
        if not isinstance(inputs, list) or (node["op"] == "input") == bool(inputs) or any(
                not isinstance(i, str) or i not in seen for i in inputs):
            raise GoodnetError(f"layer {name!r} reads an input that is not defined before it")
        parameters += _check_fields(node, name)
        if input_shape is not None:
            shapes[name] = tuple(input_shape) if node["op"] == "input" else \
                layer_shape(node, [shapes[i] for i in inputs])
        seen.add(name)
    if parameters > MAX_PARAMETERS:
        raise GoodnetError(f"the Keras graph declares {parameters:,} weights; goodnet refuses "
                           f"more than {MAX_PARAMETERS:,}")
    if sum(node["op"] == "input" for node in graph) != 1:
        raise GoodnetError("the Keras graph must have exactly one input")
    return shapes


class KerasGraph(nn.Module):
    """A Keras model's layers run in their graph order, channels-first."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        graph = parse_json(spec.graph, "the model card's Keras graph")
        shapes = check_graph(graph, spec.input_shape)
        if len(shapes[graph[-1]["name"]]) != 1:
            raise GoodnetError(f"the Keras graph's last layer gives "
                               f"{'×'.join(map(str, shapes[graph[-1]['name']]))} values per "
                               "image, not a vector of class scores")
        if shapes[graph[-1]["name"]][0] != spec.num_classes:
            raise GoodnetError(f"the Keras graph gives {shapes[graph[-1]['name']][0]} class "
                               f"scores but the card says {spec.num_classes} classes")
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
