"""ONNX image classifiers, read as data.

``goodnet import model.onnx``: the file is parsed with the ``onnx`` package's protobuf classes
(parsing runs nothing) and its graph is mapped, op by op, onto goodnet's own layer graph
(architecture ``graph``, :mod:`goodnet.models.keras_graph`), which the model card stores, so the
saved model reloads without anything from the file. Ops mapped: Conv (2-D, any padding,
groups), Gemm, MatMul, Add/Sub/Mul/Div by a per-channel or scalar constant, Add and Sum of two
tensors, Concat (channels), Relu, Sigmoid, Tanh, Elu, Selu, Softplus, LeakyRelu, Clip, Softmax,
BatchNormalization, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Flatten, Reshape to
``[N, -1]`` (also through the Shape-Gather-Unsqueeze-Concat chain of a dynamic batch), Transpose
to NHWC right before a flatten (Keras's order), Pad (zeros), Dropout, Identity and Constant. A
final Softmax or LogSoftmax is dropped (logits out; same answer). Anything else is refused with
the op's name.

Bounds, before anything is allocated: the file's size; the node count; every initializer's
declared element count against the bytes it actually holds in the file; initializers or
constants that keep their data in another file (``data_location: EXTERNAL``) are refused,
because they name local files that would be read into the model (the same hole as HDF5 external
storage); only the batch dimension of the input may be dynamic (``--input-shape`` fixes the
others). Every layer is then checked against the shape it receives (by the layer graph's own
check) and the network must give ``(N, classes)``.

Your own network class goes through the same conversion, traced by PyTorch's ONNX exporter
(:mod:`goodnet.importers.own_class`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from goodnet.artifacts import LoadedModel, ModelCard
from goodnet.bounds import check_input_size
from goodnet.errors import GoodnetError
from goodnet.importers.base import ImportOptions
from goodnet.models import GRAPH, ModelSpec, build_model
from goodnet.models.keras_graph import MAX_NODES, check_graph, module_name
from goodnet.paths import require_regular_file

MAX_FILE_BYTES = 1 << 30
MAX_ELEMENTS = 1 << 28
OPSET = 17
PIXEL_SCALE = 1.0  # ONNX graphs usually take [0, 1] pixels
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Selu": "selu",
                "Softplus": "softplus"}
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


def is_onnx(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named as an ONNX file."""
    return Path(path).suffix.lower() == ".onnx"


def read_onnx(path: str | os.PathLike[str]) -> Any:
    """The ``ModelProto`` in ``path``, parsed as data (external data never followed)."""
    path = require_regular_file(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise GoodnetError(f"{path}: larger than {MAX_FILE_BYTES >> 30} GiB; refused")
    return parse_onnx(path.read_bytes(), str(path))


def parse_onnx(data: bytes, source: str) -> Any:
    """A ``ModelProto`` from the bytes of an ONNX file."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise GoodnetError(f"{source}: not a readable ONNX file ({error})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise GoodnetError(f"{source}: not an ONNX model (no graph)")
    if len(model.graph.node) > MAX_NODES:
        raise GoodnetError(f"{source}: {len(model.graph.node):,} nodes; goodnet converts at most "
                           f"{MAX_NODES:,}")
    return model


def _array(tensor: Any, source: str) -> np.ndarray:
    """A TensorProto's values, after checking that the file holds every value it declares."""
    from onnx import TensorProto, numpy_helper

    name = tensor.name or "(constant)"
    if tensor.data_location == _EXTERNAL or len(tensor.external_data):
        raise GoodnetError(f"{source}: tensor {name!r} keeps its data in another file (ONNX "
                           "external data); goodnet reads only what is inside the model file")
    if tensor.HasField("segment"):
        raise GoodnetError(f"{source}: tensor {name!r} is segmented; not supported")
    sizes = {TensorProto.FLOAT: (4, "float_data"), TensorProto.DOUBLE: (8, "double_data"),
             TensorProto.FLOAT16: (2, "int32_data"), TensorProto.INT64: (8, "int64_data"),
             TensorProto.INT32: (4, "int32_data")}
    if tensor.data_type not in sizes:
        raise GoodnetError(f"{source}: tensor {name!r} has an unsupported element type "
                           f"({tensor.data_type})")
    if any(d < 0 for d in tensor.dims):
        raise GoodnetError(f"{source}: tensor {name!r} has a negative dimension")
    count = math.prod(tensor.dims)
    itemsize, field = sizes[tensor.data_type]
    held = len(tensor.raw_data) // itemsize if tensor.raw_data else len(getattr(tensor, field))
    if count > MAX_ELEMENTS or held != count or (
            tensor.raw_data and len(tensor.raw_data) != count * itemsize):
        raise GoodnetError(f"{source}: tensor {name!r} declares {count:,} values but the file "
                           f"holds {held:,}; refused before allocating")
    array = numpy_helper.to_array(tensor)
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise GoodnetError(f"{source}: tensor {name!r} holds NaN or infinite values")
    return array


class _Converter:
    """Walks an ONNX graph in order and builds goodnet's layer graph and its weights."""

    def __init__(self, model: Any, source: str,
                 input_shape: tuple[int, int, int] | None) -> None:
        self.source = source
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          OPSET)
        self.graph: list[dict[str, Any]] = []
        self.state: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []
        self.checks: list[tuple[str, int]] = []  # (node, features its output must have)
        self.constants: dict[str, np.ndarray] = {}
        self.values: dict[str, str] = {}  # ONNX tensor -> graph node computing it
        self.ranks: dict[str, int] = {}
        self.nhwc: dict[str, str] = {}  # ONNX tensor -> graph node, transposed to NHWC
        self.shapes: dict[str, list[Any]] = {}  # symbolic shape vectors: ints and "N"
        self.shape_of: set[str] = set()  # outputs of Shape (whole shapes, not to reshape with)
        graph = model.graph
        if len(graph.sparse_initializer):
            raise GoodnetError(f"{source}: sparse initializers are not supported")
        for tensor in graph.initializer:
            self.constants[tensor.name] = _array(tensor, source)
        self.output = self._output(graph)
        self.input_shape = self._input(graph, input_shape)

    # ------------------------------------------------------------------ graph ends

    def _output(self, graph: Any) -> str:
        if len(graph.output) != 1:
            raise GoodnetError(f"{self.source}: goodnet imports models with one output, this one "
                               f"has {len(graph.output)}")
        return graph.output[0].name

    def _input(self, graph: Any, given: tuple[int, int, int] | None) -> tuple[int, int, int]:
        from onnx import TensorProto

        inputs = [i for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise GoodnetError(f"{self.source}: goodnet imports models with one image input, this "
                               f"one has {len(inputs)}")
        value = inputs[0]
        kind = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
        if kind.elem_type != TensorProto.FLOAT or len(dims) != 4:
            raise GoodnetError(f"{self.source}: goodnet imports image classifiers (a float "
                               f"N×C×H×W input); input {value.name!r} is not one")
        shape: list[int] = []
        for i, (dim, what) in enumerate(zip(dims[1:], "CHW", strict=True)):
            if given is not None and dim not in (None, 0, given[i]):
                raise GoodnetError(f"{self.source}: --input-shape {given[i]} for {what}, but the "
                                   f"file says {dim}")
            size = dim or (given[i] if given is not None else None)
            if not size:
                raise GoodnetError(f"{self.source}: input dimension {what} is dynamic; give the "
                                   "input size with --input-shape C,H,W")
            shape.append(size)
        channels, height, width = shape
        check_input_size(channels, height, width, source=self.source)
        self.batch = dims[0]
        self._node(value.name, {"op": "input", "inputs": []}, 4, name="input")
        return channels, height, width

    # ------------------------------------------------------------------ bookkeeping

    def _node(self, tensor: str, node: dict[str, Any], rank: int, name: str) -> dict[str, Any]:
        if isinstance(name, bytes):  # protobuf hands over names that are not UTF-8 as bytes
            name = name.decode("utf-8", "replace")
        base = module_name(name.strip("/")) or "node"
        taken = {n["name"] for n in self.graph} | {"normalize", "activations"}
        unique, k = base, 1
        while unique in taken:
            k += 1
            unique = f"{base}_{k}"
        node = {"name": unique, **node}
        self.graph.append(node)
        self.values[tensor], self.ranks[tensor] = unique, rank
        return node

    def _value(self, tensor: str, op: str) -> str:
        if tensor not in self.values:
            what = "a constant" if tensor in self.constants else \
                "transposed (supported only right before a flatten)" if tensor in self.nhwc \
                else "not computed before it"
            raise GoodnetError(f"{self.source}: {op} reads {tensor!r}, which is {what}; "
                               "not supported")
        return self.values[tensor]

    def _constant(self, tensor: str, op: str) -> np.ndarray:
        if tensor not in self.constants:
            raise GoodnetError(f"{self.source}: {op} needs {tensor!r} to be a constant")
        return self.constants[tensor]

    def _weights(self, node: dict[str, Any], **tensors: np.ndarray) -> None:
        for key, array in tensors.items():
            if not np.isfinite(array).all():
                raise GoodnetError(f"{self.source}: layer {node['name']!r}: its {key} holds NaN "
                                   "or infinite values")
            self.state[f"{module_name(node['name'])}.{key}"] = torch.tensor(
                np.asarray(array, dtype=np.float32))

    def _attrs(self, node: Any) -> dict[str, Any]:
        from onnx import AttributeProto, helper

        attrs: dict[str, Any] = {}
        for attribute in node.attribute:
            if attribute.type in (AttributeProto.TENSOR,):
                attrs[attribute.name] = _array(attribute.t, self.source)
            elif attribute.type in (AttributeProto.FLOAT, AttributeProto.INT,
                                    AttributeProto.STRING, AttributeProto.FLOATS,
                                    AttributeProto.INTS):
                value = helper.get_attribute_value(attribute)
                attrs[attribute.name] = value.decode("utf-8", "replace") \
                    if isinstance(value, bytes) else value
            else:
                raise GoodnetError(f"{self.source}: node {node.name!r} ({node.op_type}) has an "
                                   f"attribute of an unsupported kind ({attribute.name})")
        return attrs

    # ------------------------------------------------------------------ conversion

    def convert(self, model: Any) -> None:
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise GoodnetError(f"{self.source}: unsupported ONNX op "
                                   f"{node.domain}::{node.op_type} (node {node.name!r})")
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None and node.op_type in _ACTIVATIONS:
                handler = self._activation
            if handler is None and node.op_type in _ELEMENTWISE:
                handler = self._elementwise
            if handler is None:
                raise GoodnetError(f"{self.source}: unsupported ONNX op {node.op_type!r} (node "
                                   f"{node.name!r}); goodnet converts only common image-"
                                   "classifier ops and never runs custom ones")
            if not node.output or (not node.input and node.op_type != "Constant"):
                raise GoodnetError(f"{self.source}: node {node.name!r} has no input or output")
            handler(node, self._attrs(node))
        if self.output in self.nhwc or self.output not in self.values:
            raise GoodnetError(f"{self.source}: the output {self.output!r} is not computed by "
                               "the layers goodnet converts")
        if self.values[self.output] != self.graph[-1]["name"]:
            raise GoodnetError(f"{self.source}: layers after the output are not supported")
        if self.ranks[self.output] == 4:  # (N, classes, 1, 1), as SqueezeNet ends
            last = self.graph[-1]["name"]
            self.checks.append((last, -1))
            self._node(self.output, {"op": "flatten", "inputs": [last], "channels_first": True},
                       2, f"{last}_flatten")

    def _name(self, node: Any) -> str:
        return node.name or node.output[0]

    def _unary(self, node: Any, fields: dict[str, Any], rank: int | None = None) -> None:
        source = self._value(node.input[0], node.op_type)
        self._node(node.output[0], {"inputs": [source], **fields},
                   rank or self.ranks[node.input[0]], self._name(node))

    def _alias(self, node: Any) -> None:
        tensor = node.input[0]
        if tensor in self.constants:
            self.constants[node.output[0]] = self.constants[tensor]
        elif tensor in self.nhwc:
            self.nhwc[node.output[0]] = self.nhwc[tensor]
        else:
            self.values[node.output[0]] = self._value(tensor, node.op_type)
            self.ranks[node.output[0]] = self.ranks[tensor]

    def _op_Identity(self, node: Any, attrs: dict[str, Any]) -> None:
        self._alias(node)

    def _op_Dropout(self, node: Any, attrs: dict[str, Any]) -> None:
        self._alias(node)  # its mask output is never computed: a node reading it is refused

    def _op_Constant(self, node: Any, attrs: dict[str, Any]) -> None:
        if "value" in attrs:
            value = attrs["value"]
        elif "value_float" in attrs or "value_floats" in attrs:
            value = np.asarray(attrs.get("value_float", attrs.get("value_floats")), np.float32)
        elif "value_int" in attrs or "value_ints" in attrs:
            value = np.asarray(attrs.get("value_int", attrs.get("value_ints")), np.int64)
        else:
            raise GoodnetError(f"{self.source}: constant {self._name(node)!r} of an unsupported "
                               "kind")
        self.constants[node.output[0]] = value

    def _activation(self, node: Any, attrs: dict[str, Any]) -> None:
        self._unary(node, {"op": "activation", "activation": _ACTIVATIONS[node.op_type]})

    def _op_Elu(self, node: Any, attrs: dict[str, Any]) -> None:
        if attrs.get("alpha", 1.0) != 1.0:
            raise GoodnetError(f"{self.source}: Elu {self._name(node)!r} with alpha != 1")
        self._unary(node, {"op": "activation", "activation": "elu"})

    def _op_LeakyRelu(self, node: Any, attrs: dict[str, Any]) -> None:
        self._unary(node, {"op": "leakyrelu", "alpha": float(attrs.get("alpha", 0.01))})

    def _op_Clip(self, node: Any, attrs: dict[str, Any]) -> None:
        bounds = [attrs.get("min"), attrs.get("max")]
        for i, tensor in enumerate(node.input[1:3]):
            if tensor:
                value = self._constant(tensor, "Clip")
                if value.size != 1:
                    raise GoodnetError(f"{self.source}: Clip {self._name(node)!r} needs scalar "
                                       "bounds")
                bounds[i] = float(value.reshape(()))
        low, high = (None if b is None else float(b) for b in bounds)
        if (low, high) == (0.0, 6.0):
            self._unary(node, {"op": "activation", "activation": "relu6"})
        elif (low, high) == (0.0, None):
            self._unary(node, {"op": "activation", "activation": "relu"})
        elif (low, high) == (None, None):
            self._alias(node)
        else:
            self._unary(node, {"op": "clip", "min": low, "max": high})

    def _softmax(self, node: Any, attrs: dict[str, Any], activation: str | None) -> None:
        rank = self.ranks.get(node.input[0], 0)
        axis = attrs.get("axis", 1 if self.opset < 13 else -1)
        if rank != 2 or axis not in (1, -1):
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} on a "
                               f"rank-{rank} tensor along axis {axis}; only over the classes")
        if node.output[0] == self.output:
            self._alias(node)
            self.notes.append(f"final {node.op_type} {self._name(node)!r} dropped (logits out)")
        elif activation is None:
            raise GoodnetError(f"{self.source}: {node.op_type} before the output is not supported")
        else:
            self._unary(node, {"op": "activation", "activation": activation})

    def _op_Softmax(self, node: Any, attrs: dict[str, Any]) -> None:
        self._softmax(node, attrs, "softmax")

    def _op_LogSoftmax(self, node: Any, attrs: dict[str, Any]) -> None:
        self._softmax(node, attrs, None)

    def _padding(self, node: Any, attrs: dict[str, Any]) -> str | list[list[int]]:
        auto = attrs.get("auto_pad", "NOTSET")
        if auto == "SAME_UPPER":
            return "same"
        if auto not in ("NOTSET", "VALID"):
            raise GoodnetError(f"{self.source}: {self._name(node)!r}: auto_pad {auto} is not "
                               "supported")
        pads = list(attrs.get("pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
        if len(pads) != 4 or min(pads) < 0:
            raise GoodnetError(f"{self.source}: {self._name(node)!r}: bad pads {pads}")
        return "valid" if not any(pads) else [[pads[0], pads[2]], [pads[1], pads[3]]]

    def _pair(self, node: Any, attrs: dict[str, Any], key: str, default: list[int]) -> list[int]:
        value = list(attrs.get(key, default))
        if len(value) != 2 or min(value) < 1:
            raise GoodnetError(f"{self.source}: {self._name(node)!r}: {key} {value} (goodnet "
                               "converts 2-D image layers)")
        return value

    def _op_Conv(self, node: Any, attrs: dict[str, Any]) -> None:
        weight = self._constant(node.input[1], "Conv")
        bias = self._constant(node.input[2], "Conv") if len(node.input) > 2 and node.input[2] \
            else None
        groups = int(attrs.get("group", 1))
        if weight.ndim != 4 or self.ranks.get(node.input[0]) != 4 or groups < 1:
            raise GoodnetError(f"{self.source}: Conv {self._name(node)!r} is not a 2-D image "
                               "convolution")
        kernel = self._pair(node, attrs, "kernel_shape", list(weight.shape[2:]))
        if kernel != list(weight.shape[2:]) or (bias is not None and
                                                 bias.shape != (weight.shape[0],)):
            raise GoodnetError(f"{self.source}: Conv {self._name(node)!r}: kernel or bias shape "
                               "does not fit its weight")
        self._unary(node, {"op": "conv2d", "in": int(weight.shape[1]) * groups,
                           "out": int(weight.shape[0]), "kernel": kernel,
                           "stride": self._pair(node, attrs, "strides", [1, 1]),
                           "dilation": self._pair(node, attrs, "dilations", [1, 1]),
                           "padding": self._padding(node, attrs), "groups": groups,
                           "bias": bias is not None, "activation": "linear"})
        self._weights(self.graph[-1], weight=weight,
                      **({"bias": bias} if bias is not None else {}))

    def _dense(self, node: Any, weight: np.ndarray, bias: np.ndarray | None) -> None:
        if self.ranks.get(node.input[0]) != 2:
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} on a tensor "
                               "that is not (N, features); flatten first")
        self._unary(node, {"op": "dense", "in": int(weight.shape[1]),
                           "out": int(weight.shape[0]), "bias": bias is not None,
                           "activation": "linear"})
        self._weights(self.graph[-1], weight=weight,
                      **({"bias": bias} if bias is not None else {}))

    def _op_Gemm(self, node: Any, attrs: dict[str, Any]) -> None:
        weight = self._constant(node.input[1], "Gemm")
        if attrs.get("transA", 0) or weight.ndim != 2:
            raise GoodnetError(f"{self.source}: Gemm {self._name(node)!r} with transA or a "
                               "non-matrix weight")
        weight = attrs.get("alpha", 1.0) * (weight if attrs.get("transB", 0) else weight.T)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self._constant(node.input[2], "Gemm") * attrs.get("beta", 1.0)
            if bias.size not in (1, weight.shape[0]) or bias.ndim > 2:
                raise GoodnetError(f"{self.source}: Gemm {self._name(node)!r}: bias shape "
                                   f"{bias.shape} does not fit")
            bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],))
        self._dense(node, weight, bias)

    def _op_MatMul(self, node: Any, attrs: dict[str, Any]) -> None:
        weight = self._constant(node.input[1], "MatMul")
        if weight.ndim != 2:
            raise GoodnetError(f"{self.source}: MatMul {self._name(node)!r} by a non-matrix")
        self._dense(node, weight.T, None)

    def _channels(self, node: Any, value: np.ndarray, rank: int, attrs: dict[str, Any]
                  ) -> np.ndarray:
        """A constant operand as one value per channel (or one for all), if it broadcasts so."""
        if self.opset < 7 and value.size != 1:  # legacy broadcasting: aligned at ``axis``
            if not attrs.get("broadcast") or attrs.get("axis") != 1 or value.ndim != 1:
                raise GoodnetError(f"{self.source}: {self._name(node)!r}: legacy broadcasting "
                                   "other than per channel is not supported")
            return value.astype(np.float32)
        shape = list(value.shape)
        while len(shape) > rank - 1 and shape and shape[0] == 1:
            shape.pop(0)
        if value.size != 1 and (len(shape) != rank - 1 or any(s != 1 for s in shape[1:])):
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} by a "
                               f"constant of shape {list(value.shape)}: only per-channel or "
                               "scalar constants are supported")
        return value.astype(np.float32).reshape(-1)

    def _elementwise(self, node: Any, attrs: dict[str, Any]) -> None:
        if len(node.input) != 2:
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} needs two "
                               "inputs")
        a, b = node.input
        if a not in self.constants and b not in self.constants:
            if node.op_type != "Add":
                raise GoodnetError(f"{self.source}: {node.op_type} of two computed tensors "
                                   f"({self._name(node)!r}) is not supported")
            self._merge(node, "add")
            return
        constant_first = a in self.constants
        tensor, constant = (b, a) if constant_first else (a, b)
        if tensor in self.constants:
            raise GoodnetError(f"{self.source}: {node.op_type} of two constants "
                               f"({self._name(node)!r}) is not supported")
        value = self._channels(node, self.constants[constant], self.ranks.get(tensor, 0), attrs)
        weight, bias = np.ones_like(value), np.zeros_like(value)
        if node.op_type == "Add":
            bias = value
        elif node.op_type == "Sub":
            weight, bias = (-weight, value) if constant_first else (weight, -value)
        elif node.op_type == "Mul":
            weight = value
        elif constant_first or not value.all():
            raise GoodnetError(f"{self.source}: Div {self._name(node)!r} by a computed tensor "
                               "or by zero")
        else:
            weight = 1 / value
        source = self._value(tensor, node.op_type)
        self._node(node.output[0], {"op": "affine", "inputs": [source],
                                    "features": int(value.size)},
                   self.ranks[tensor], self._name(node))
        self._weights(self.graph[-1], weight=weight, bias=bias)

    def _merge(self, node: Any, op: str) -> None:
        sources = [self._value(t, node.op_type) for t in node.input]
        ranks = {self.ranks[t] for t in node.input}  # every tensor with a value has a rank
        if len(ranks) != 1:
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} merges "
                               "tensors of different ranks")
        self._node(node.output[0], {"op": op, "inputs": sources}, ranks.pop(), self._name(node))

    def _op_Sum(self, node: Any, attrs: dict[str, Any]) -> None:
        if len(node.input) == 1:
            self._alias(node)
        else:
            self._merge(node, "add")

    def _op_Concat(self, node: Any, attrs: dict[str, Any]) -> None:
        if all(t in self.shapes or t in self.constants for t in node.input):
            parts = [self.shapes.get(t) or self.constants[t].reshape(-1).tolist()
                     for t in node.input]
            self.shapes[node.output[0]] = [v for part in parts for v in part]
            return
        rank = self.ranks.get(node.input[0], 0)
        if attrs.get("axis") not in (1, 1 - rank) and not (rank == 2 and attrs["axis"] == -1):
            raise GoodnetError(f"{self.source}: Concat {self._name(node)!r} along axis "
                               f"{attrs.get('axis')}; only along the channels")
        self._merge(node, "concatenate")

    def _op_BatchNormalization(self, node: Any, attrs: dict[str, Any]) -> None:
        scale, shift, mean, var = (self._constant(t, "BatchNormalization")
                                   for t in node.input[1:5])
        eps = float(attrs.get("epsilon", 1e-5))
        if len({a.shape for a in (scale, shift, mean, var)}) != 1 or scale.ndim != 1 or \
                not attrs.get("spatial", 1) or not eps > 0 or (var < 0).any():
            raise GoodnetError(f"{self.source}: BatchNormalization {self._name(node)!r} with "
                               "mismatched, non-spatial or negative statistics")
        if self.ranks.get(node.input[0]) == 4:
            self._unary(node, {"op": "batchnorm", "features": int(scale.size), "eps": eps})
            self._weights(self.graph[-1], weight=scale, bias=shift, running_mean=mean,
                          running_var=var)
            return
        weight = scale / np.sqrt(var + eps)
        self._unary(node, {"op": "affine", "features": int(scale.size)})
        self._weights(self.graph[-1], weight=weight, bias=shift - mean * weight)

    def _pool(self, node: Any, attrs: dict[str, Any], op: str) -> None:
        padding = self._padding(node, attrs)
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        if (ceil_mode and (op != "maxpool" or padding != "valid")) or \
                any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} with "
                               "dilations, or ceil_mode other than on an unpadded max pool, is "
                               "not supported")
        if self.ranks.get(node.input[0]) != 4:
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} is not a "
                               "2-D image pool")
        count_pad = bool(attrs.get("count_include_pad", 0))
        if padding == "same" and count_pad:
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r}: "
                               "count_include_pad with auto_pad is not supported")
        fields: dict[str, Any] = {"op": op, "pool": self._pair(node, attrs, "kernel_shape", [0]),
                  "stride": self._pair(node, attrs, "strides", [1, 1]), "padding": padding}
        if op == "avgpool":
            fields["count_include_pad"] = count_pad
        if ceil_mode:
            fields["ceil_mode"] = True
        self._unary(node, fields)

    def _op_MaxPool(self, node: Any, attrs: dict[str, Any]) -> None:
        self._pool(node, attrs, "maxpool")

    def _op_AveragePool(self, node: Any, attrs: dict[str, Any]) -> None:
        self._pool(node, attrs, "avgpool")

    def _global_pool(self, node: Any, op: str) -> None:
        if self.ranks.get(node.input[0]) != 4:
            raise GoodnetError(f"{self.source}: {node.op_type} {self._name(node)!r} is not on an "
                               "image tensor")
        self._unary(node, {"op": op, "keepdims": True})

    def _op_GlobalAveragePool(self, node: Any, attrs: dict[str, Any]) -> None:
        self._global_pool(node, "gap")

    def _op_GlobalMaxPool(self, node: Any, attrs: dict[str, Any]) -> None:
        self._global_pool(node, "gmp")

    def _flatten(self, node: Any, features: int | None = None) -> None:
        tensor = node.input[0]
        if tensor in self.nhwc:  # Transpose(0, 2, 3, 1) + Flatten: Keras's order
            self.values[tensor], self.ranks[tensor] = self.nhwc[tensor], 4
            fields: dict[str, Any] = {"op": "flatten"}
        else:
            fields = {"op": "flatten", "channels_first": True}
        self._unary(node, fields, rank=2)
        if features is not None:
            self.checks.append((self.graph[-1]["name"], features))

    def _op_Flatten(self, node: Any, attrs: dict[str, Any]) -> None:
        if attrs.get("axis", 1) != 1:
            raise GoodnetError(f"{self.source}: Flatten {self._name(node)!r} along axis "
                               f"{attrs.get('axis')}; only axis 1")
        self._flatten(node)

    def _op_Reshape(self, node: Any, attrs: dict[str, Any]) -> None:
        if len(node.input) > 1:
            target = self.shapes.get(node.input[1])
            if target is None:
                target = self._constant(node.input[1], "Reshape").reshape(-1).tolist()
        else:
            target = list(attrs.get("shape", []))
        batch, features = [*target, None, None][:2]
        if len(target) != 2 or attrs.get("allowzero", 0) or not (
                batch in ("N", 0, -1) or batch == self.batch) or not (
                (features == -1 and batch != -1) or (type(features) is int and features > 0)):
            raise GoodnetError(f"{self.source}: Reshape {self._name(node)!r} to {target}; only "
                               "to (N, features) is supported")
        self._flatten(node, None if features == -1 else features)

    def _op_Transpose(self, node: Any, attrs: dict[str, Any]) -> None:
        if list(attrs.get("perm", [])) != [0, 2, 3, 1]:
            raise GoodnetError(f"{self.source}: Transpose {self._name(node)!r} is supported only "
                               "to NHWC right before a flatten")
        self.nhwc[node.output[0]] = self._value(node.input[0], "Transpose")

    def _op_Pad(self, node: Any, attrs: dict[str, Any]) -> None:
        pads = attrs.get("pads", attrs.get("paddings"))
        if len(node.input) > 1 and node.input[1]:
            pads = self._constant(node.input[1], "Pad").reshape(-1).tolist()
        value = attrs.get("value", 0.0)
        if len(node.input) > 2 and node.input[2]:
            value = float(self._constant(node.input[2], "Pad").reshape(-1)[0])
        if attrs.get("mode", "constant") != "constant" or value != 0 or len(node.input) > 3 or \
                pads is None or len(pads) != 8 or min(pads) < 0 or \
                any(pads[i] for i in (0, 1, 4, 5)):
            raise GoodnetError(f"{self.source}: Pad {self._name(node)!r}: only zero padding of "
                               "height and width is supported")
        self._unary(node, {"op": "zeropad", "padding": [[int(pads[2]), int(pads[6])],
                                                       [int(pads[3]), int(pads[7])]]})

    # The Shape -> Gather(0) -> Unsqueeze -> Concat chain that a dynamic batch gives
    # ``x.view(x.size(0), -1)``: followed symbolically, "N" standing for the batch size.

    def _op_Shape(self, node: Any, attrs: dict[str, Any]) -> None:
        if node.input[0] not in self.values or attrs.get("start", 0) != 0:
            raise GoodnetError(f"{self.source}: Shape {self._name(node)!r} is supported only to "
                               "read the batch size of a computed tensor")
        self.shape_of.add(node.output[0])

    def _op_Gather(self, node: Any, attrs: dict[str, Any]) -> None:
        index = self.constants.get(node.input[1]) if len(node.input) > 1 else None
        if node.input[0] not in self.shape_of or index is None or index.size != 1 or \
                index.reshape(-1)[0] != 0 or attrs.get("axis", 0) != 0:
            raise GoodnetError(f"{self.source}: Gather {self._name(node)!r} is supported only "
                               "to read the batch size")
        self.shapes[node.output[0]] = ["N"]

    def _op_Unsqueeze(self, node: Any, attrs: dict[str, Any]) -> None:
        if node.input[0] not in self.shapes:
            raise GoodnetError(f"{self.source}: Unsqueeze {self._name(node)!r} is supported "
                               "only on the batch size")
        self.shapes[node.output[0]] = self.shapes[node.input[0]]

    def _op_Cast(self, node: Any, attrs: dict[str, Any]) -> None:
        if node.input[0] in self.shapes:
            self.shapes[node.output[0]] = self.shapes[node.input[0]]
        else:
            raise GoodnetError(f"{self.source}: Cast {self._name(node)!r} is supported only on "
                               "the batch size")


def _classes(graph: list[dict[str, Any]], input_shape: tuple[int, int, int],
             checks: list[tuple[str, int]], source: str) -> int:
    """The class count, after checking every layer against what it receives (through the
    layer graph's own shape check) and every reshape against what it flattens."""
    shapes = check_graph(graph, input_shape)
    for name, features in checks:
        shape = shapes[name]
        if shape[1:] != (1, 1) if features == -1 else math.prod(shape) != features:
            raise GoodnetError(f"{source}: layer {name!r} gives {list(shape)} per image, which "
                               "the reshape after it does not fit")
    out = shapes[graph[-1]["name"]]
    if len(out) != 1 or out[0] < 2:
        raise GoodnetError(f"{source}: the output is {list(out)} per image; goodnet imports "
                           "classifiers that give (N, classes)")
    return out[0]


def convert_onnx(model: Any, source: str, *, pixel_scale: float = PIXEL_SCALE,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """A parsed ONNX ``ModelProto`` as a goodnet model with its card.

    Args:
        model: the parsed file (:func:`read_onnx`).
        source: the file's name, for messages.
        pixel_scale: what the graph's input takes: 1 for [0, 1] pixels, 255 for raw pixels.
        mean: per-channel mean to subtract (after ``pixel_scale``) before the graph; 0 if None.
        std: per-channel standard deviation to divide by before the graph; 1 if None.
        input_shape: (C, H, W), for inputs whose file leaves them dynamic.
    """
    if not pixel_scale > 0 or not math.isfinite(pixel_scale):
        raise GoodnetError("pixel scale must be positive (255 for raw pixels, 1 for [0, 1])")
    converter = _Converter(model, source, input_shape)
    converter.convert(model)
    graph = converter.graph
    classes = _classes(graph, converter.input_shape, converter.checks, source)
    c, h, w = converter.input_shape
    mean = tuple(mean) if mean is not None else (0.0,) * c
    std = tuple(std) if std is not None else (1.0,) * c
    if len(mean) != c or len(std) != c:
        raise GoodnetError(f"mean and std need {c} values each, one per input channel")
    spec = ModelSpec(GRAPH, classes, c, h, w, mean, std, pixel_scale,
                     graph=json.dumps(graph, separators=(",", ":")))
    network = build_model(spec)
    own = network.state_dict()
    state = {**{k: v for k, v in own.items() if k not in converter.state}, **converter.state}
    for key, tensor in converter.state.items():
        if key not in own or own[key].shape != tensor.shape:
            raise GoodnetError(f"{source}: weight {key!r} of shape {list(tensor.shape)} does not "
                               "fit its layer")
    network.load_state_dict(state)
    network.eval()
    card = ModelCard(spec=spec, notes={
        "source": {"file": Path(source).name, "format": "onnx",
                   "producer": f"{model.producer_name} {model.producer_version}".strip(),
                   "opset": converter.opset, "import_notes": converter.notes}})
    return LoadedModel(network, card, {})


def import_onnx(path: str | os.PathLike[str], *, pixel_scale: float = PIXEL_SCALE,
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """An ONNX file as a goodnet model (see :func:`convert_onnx` for the options)."""
    return convert_onnx(read_onnx(path), str(path), pixel_scale=pixel_scale, mean=mean, std=std,
                        input_shape=input_shape)


def load(path: Path, options: ImportOptions) -> LoadedModel:
    """An ONNX file with the import options it reads (all but ``arch`` and ``arch_args``)."""
    return import_onnx(path, pixel_scale=options.scale(PIXEL_SCALE), mean=options.mean,
                       std=options.std, input_shape=options.input_shape)
