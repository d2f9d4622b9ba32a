"""Keras HDF5 models, read as data with h5py: no TensorFlow, nothing from the file executed.

Two kinds of file:

- **Full-model files** (``model.save("x.h5")``, Keras 2 or 3): the ``model_config`` JSON is
  parsed into goodnet's own layer graph (architecture ``graph``,
  :mod:`goodnet.models.keras_graph`) and the weights in
  ``model_weights`` are loaded onto it. Sequential and Functional models built from the common
  layers are supported (InputLayer, Conv2D, Dense, MaxPooling2D, AveragePooling2D,
  GlobalAveragePooling2D, GlobalMaxPooling2D, Flatten, Add, Concatenate, Activation, ReLU,
  Softmax, BatchNormalization, Dropout, ZeroPadding2D). A ``Lambda`` layer, a custom layer or
  any other class is refused with the layer's name: its code is never run.
- **Weights-only files** (``model.save_weights("x.h5")``, such as the CSAW-HackML BadNets): the
  weights are loaded by layer name onto a known goodnet architecture (``arch="deepid"``), whose
  layers carry the Keras names.

Kernels are moved from Keras's layout ((kh, kw, in, out), (in, out)) to PyTorch's; images are
channels-first inside and flattening follows Keras's (H, W, C) order, so dense weights load as
they are. Whether the model takes raw pixels 0–255 or [0, 1] is not in the file: it is
``pixel_scale`` (255 or 1) and is written into the model card. A final softmax is dropped
(goodnet models output logits; the predicted class is the same).

What a file may do is bounded before anything is allocated. The file is opened through
:mod:`goodnet.hdf5` (no links, external or virtual datasets: nothing outside the file is read).
The whole config is then checked (each layer's settings for their type, sign and rank, the
shapes propagated from the input through every layer, every weight counted) and the model is
built on the meta device; only when every weight in the file has the shape that model expects,
and the file stores what each declares, is any weight read. What ``import`` writes passes the
same checks when it is loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from goodnet.artifacts import LoadedModel, ModelCard
from goodnet.bounds import check_input_size
from goodnet.errors import GoodnetError
from goodnet.hdf5 import attribute, check_stored, child, is_hdf5, open_hdf5, read
from goodnet.importers.base import ImportOptions
from goodnet.models import GRAPH, MODELS, ModelSpec, build_model, fixed_archs, is_graph
from goodnet.models.keras_graph import (
    ACTIVATIONS,
    Shape,
    check_graph,
    layer_shape,
    module_name,
    parse_json,
)

__all__ = ["PIXEL_SCALE", "config_to_graph", "import_keras", "is_hdf5", "load"]

PIXEL_SCALE = 255.0  # Keras models (the CSAW-HackML lab's) usually take raw pixels

DROPOUTS = ("Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout")
# Keras weight names → the PyTorch parameter or buffer they fill.
STATE_KEYS = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
              "moving_mean": "running_mean", "moving_variance": "running_var"}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _names(item: Any, key: str, path: Path) -> list[str]:
    """The attribute ``key`` (``layer_names``, ``weight_names``): a list of strings."""
    value = attribute(item, key, path)
    if value is None:
        return []
    if not (isinstance(value, np.ndarray) and value.ndim == 1 and (not value.size or (
            value.dtype.kind in "SUO" and all(isinstance(v, (bytes, str)) for v in value)))):
        raise GoodnetError(f"{path}: the '{key}' attribute must be a list of names, got "
                           f"{value!r:.60}")
    return [_text(v) for v in value]


def weight_index(group: Any, path: Path) -> dict[str, dict[str, h5py.Dataset]]:
    """Layer name → {"kernel" | "bias" | "gamma" | ...: dataset}, from a Keras weights group:
    the datasets are found and typed, not read."""
    if attribute(group, "layer_names", path) is None:
        raise GoodnetError(f"{path}: no Keras weights (the 'layer_names' attribute is missing)")
    index: dict[str, dict[str, h5py.Dataset]] = {}
    for layer in _names(group, "layer_names", path):
        entry = child(group, layer, path)
        if not isinstance(entry, h5py.Group):
            raise GoodnetError(f"{path}: layer {layer!r} is listed but has no weights group")
        datasets = {}
        for name in _names(entry, "weight_names", path):
            dataset = child(entry, name, path)
            if not isinstance(dataset, h5py.Dataset):
                raise GoodnetError(f"{path}: weight {layer}/{name} is missing")
            if dataset.dtype.kind != "f":
                raise GoodnetError(f"{path}: weight {layer}/{name} is {dataset.dtype}, not "
                                   "floating point")
            datasets[name.rsplit("/", 1)[-1].split(":")[0]] = dataset
        if datasets:
            index[layer] = datasets
    return index


# ------------------------------------------------------------------------ config → graph

def _pair(cfg: dict[str, Any], key: str, layer: str, default: Any, low: int = 1) -> list[int]:
    """A Keras size given as one integer or two (kernel_size, strides, pool_size, ...)."""
    value = cfg.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        kind = "positive" if low == 1 else "non-negative"
        raise GoodnetError(f"layer {layer!r}: {key} must be a {kind} integer or two, got "
                           f"{value!r:.60}")
    return value


def _size(cfg: dict[str, Any], key: str, layer: str) -> int:
    value = cfg.get(key)
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise GoodnetError(f"layer {layer!r}: {key} must be a positive integer, got "
                           f"{value!r:.40}")
    return value


def _flag(cfg: dict[str, Any], key: str, layer: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise GoodnetError(f"layer {layer!r}: {key} must be true or false, got {value!r:.40}")
    return value


def _padding(cfg: dict[str, Any], layer: str) -> str:
    padding = cfg.get("padding", "valid")
    if padding not in ("valid", "same"):
        raise GoodnetError(f"layer {layer!r}: unsupported padding {padding!r:.40}")
    return padding


def _activation(value: Any, layer: str) -> str:
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise GoodnetError(f"layer {layer!r}: unsupported activation {value!r:.40}")
    return value


def _channel_axis(axis: Any, rank: int, layer: str) -> None:
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if isinstance(axis, bool) or axis not in (-1, rank - 1):
        raise GoodnetError(f"layer {layer!r}: only the channel axis (-1) is supported, got "
                           f"{axis!r:.40}")


def _inbound(layer: dict[str, Any], name: str) -> list[str]:
    """Names of the layers feeding ``layer`` (Keras 2 and Keras 3 formats)."""
    nodes = layer.get("inbound_nodes", [])
    malformed = GoodnetError(f"layer {name!r}: malformed inbound_nodes")
    if not isinstance(nodes, list):
        raise malformed
    if len(nodes) > 1:
        raise GoodnetError(f"layer {name!r} is called more than once (a shared layer); not "
                           "supported")
    if not nodes:
        return []
    node = nodes[0]
    if isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        if not all(isinstance(e, list) and e and isinstance(e[0], str) for e in node):
            raise malformed
        return [entry[0] for entry in node]
    if not isinstance(node, dict):
        raise malformed
    names: list[str] = []

    def walk(value: Any) -> None:  # Keras 3: {"args": [...], "kwargs": {...}}
        if isinstance(value, dict):
            config = value.get("config")
            if value.get("class_name") == "__keras_tensor__" and isinstance(config, dict):
                history = config.get("keras_history")
                if not (isinstance(history, list) and history and isinstance(history[0], str)):
                    raise malformed
                names.append(history[0])
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(node.get("args", []))  # nesting is bounded by parse_json
    return names


def _input_shape(batch_shape: Any, name: str) -> Shape:
    """(C, H, W) of a Keras input (N, H, W, C), within goodnet's bounds on inputs."""
    if not (isinstance(batch_shape, list) and len(batch_shape) == 4):
        raise GoodnetError(f"goodnet imports image classifiers (input H×W×C); input {name!r} "
                           f"has shape {batch_shape!r:.60}")
    height, width, channels = batch_shape[1:]
    check_input_size(channels, height, width, f"input {name!r}")
    return channels, height, width


# One converter per Keras layer class: the layer's name, its config and the shapes of its inputs
# → the node's fields after "name" and "inputs" ("op" and that op's settings).
Converter = Callable[[str, dict[str, Any], list[Shape]], dict[str, Any]]


def _conv2d(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    if cfg.get("groups", 1) != 1:
        raise GoodnetError(f"layer {name!r}: grouped convolutions are not supported")
    return dict(op="conv2d", kernel=_pair(cfg, "kernel_size", name, None),
                stride=_pair(cfg, "strides", name, 1),
                dilation=_pair(cfg, "dilation_rate", name, 1),
                padding=_padding(cfg, name), bias=_flag(cfg, "use_bias", name, True),
                activation=_activation(cfg.get("activation", "linear"), name),
                **{"in": inputs[0][0], "out": _size(cfg, "filters", name)})


def _dense(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    return dict(op="dense", bias=_flag(cfg, "use_bias", name, True),
                activation=_activation(cfg.get("activation", "linear"), name),
                **{"in": inputs[0][0], "out": _size(cfg, "units", name)})


def _batchnorm(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    _channel_axis(cfg.get("axis", -1), len(inputs[0]) + 1, name)
    eps = cfg.get("epsilon", 1e-3)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
            and math.isfinite(eps) and eps > 0):
        raise GoodnetError(f"layer {name!r}: epsilon must be a positive number, got "
                           f"{eps!r:.40}")
    return dict(op="batchnorm", features=inputs[0][0], eps=float(eps))


def _pooling(op: str) -> Converter:
    """MaxPooling2D or AveragePooling2D; the stride defaults to the pool size."""
    def convert(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
        pool = _pair(cfg, "pool_size", name, 2)
        strides = cfg.get("strides")
        return dict(op=op, pool=pool,
                    stride=pool if strides is None else _pair(cfg, "strides", name, None),
                    padding=_padding(cfg, name))
    return convert


def _global_pooling(op: str) -> Converter:
    def convert(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
        if cfg.get("keepdims") not in (None, False):
            raise GoodnetError(f"layer {name!r}: keepdims=True is not supported")
        return dict(op=op)
    return convert


def _plain(op: str) -> Converter:
    """A layer with no settings goodnet uses (Flatten, the dropouts)."""
    def convert(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
        return dict(op=op)
    return convert


def _activation_layer(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    return dict(op="activation", activation=_activation(cfg.get("activation"), name))


def _relu(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    if any(cfg.get(k) not in (None, 0, 0.0) for k in (
            "max_value", "negative_slope", "threshold")):
        raise GoodnetError(f"layer {name!r}: a ReLU with max_value, negative_slope or "
                           "threshold is not supported")
    return dict(op="activation", activation=_activation("relu", name))


def _softmax(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    _channel_axis(cfg.get("axis", -1), len(inputs[0]) + 1, name)
    return dict(op="activation", activation=_activation("softmax", name))


def _zero_padding(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
    padding = cfg.get("padding", 1)
    if isinstance(padding, list) and len(padding) == 2 and all(
            isinstance(p, list) for p in padding):
        pairs = [_pair({"padding": p}, "padding", name, None, low=0) for p in padding]
    else:
        pairs = [[p, p] for p in _pair(cfg, "padding", name, 1, low=0)]
    return dict(op="zeropad", padding=pairs)


def _merge(op: str) -> Converter:
    """Add or Concatenate (along the channels)."""
    def convert(name: str, cfg: dict[str, Any], inputs: list[Shape]) -> dict[str, Any]:
        if op == "concatenate":
            _channel_axis(cfg.get("axis", -1), len(inputs[0]) + 1, name)
        if any(len(shape) != len(inputs[0]) for shape in inputs):
            raise GoodnetError(f"layer {name!r} merges tensors of different ranks")
        return dict(op=op)
    return convert


CONVERTERS: dict[str, Converter] = {
    "Conv2D": _conv2d,
    "Dense": _dense,
    "BatchNormalization": _batchnorm,
    "MaxPooling2D": _pooling("maxpool"),
    "AveragePooling2D": _pooling("avgpool"),
    "GlobalAveragePooling2D": _global_pooling("gap"),
    "GlobalMaxPooling2D": _global_pooling("gmp"),
    "Flatten": _plain("flatten"),
    "Activation": _activation_layer,
    "ReLU": _relu,
    "Softmax": _softmax,
    "ZeroPadding2D": _zero_padding,
    "Add": _merge("add"),
    "Concatenate": _merge("concatenate"),
    **{dropout: _plain("dropout") for dropout in DROPOUTS},
}


def config_to_graph(config: dict[str, Any]) -> tuple[list[dict[str, Any]], Shape, list[str]]:
    """goodnet's layer graph for a Keras model config; also the input shape (C, H, W) and notes
    on what was changed (a dropped final softmax).

    Every layer is checked as it is read: its class (a ``Lambda`` or any class not in
    :data:`CONVERTERS` is refused, its code never run), the type, sign and rank of each setting,
    and its shape, propagated from the input (:func:`goodnet.models.keras_graph.layer_shape`).
    Layer widths (``in``, ``features``) come from those shapes, not from the weights, which are
    read later.
    """
    kind, body, layers = _model_layers(config)
    graph: list[dict[str, Any]] = []
    shapes: dict[str, Shape] = {}
    shape: Shape | None = None
    previous: str | None = None

    def add_input(batch_shape: Any, name: str) -> None:
        nonlocal shape
        shape = shapes[name] = _input_shape(batch_shape, name)
        graph.append({"name": name, "op": "input", "inputs": []})

    for layer in layers:
        cls, cfg, name = _read_layer(layer, shapes)
        if cls == "InputLayer":
            add_input(cfg.get("batch_input_shape") or cfg.get("batch_shape"), name)
            previous = name
            continue
        if kind == "Sequential":
            if previous is None:  # no InputLayer: the first layer carries the input shape
                previous = f"{name}_input"
                add_input(cfg.get("batch_input_shape"), previous)
            inputs = [previous]
        else:
            inputs = _inbound(layer, name)
        node, shapes[name] = _layer_node(name, cls, cfg, inputs, shapes)
        graph.append(node)
        previous = name
    if shape is None:
        raise GoodnetError("the Keras model has no input layer with a known shape")
    if kind != "Sequential":
        _check_output(body, graph[-1]["name"])
    return graph, shape, _logits_out(graph)


def _model_layers(config: dict[str, Any]) -> tuple[str, Any, list[Any]]:
    """The Keras model's class, its config and its list of layers (refusing other models)."""
    kind = config.get("class_name")
    body = config.get("config")
    if not isinstance(kind, str) or kind not in ("Sequential", "Functional", "Model"):
        raise GoodnetError(f"unsupported Keras model class {kind!r:.40}")
    layers = body if isinstance(body, list) else \
        body.get("layers") if isinstance(body, dict) else None
    if not isinstance(layers, list) or not layers:
        raise GoodnetError("the Keras model config lists no layers")
    return kind, body, layers


def _read_layer(layer: Any, shapes: dict[str, Shape]) -> tuple[Any, dict[str, Any], str]:
    """A layer entry's class, config and name (new: not in ``shapes``); a Lambda is refused."""
    if not isinstance(layer, dict):
        raise GoodnetError("malformed Keras layer entry")
    cls, cfg = layer.get("class_name"), layer.get("config", {})
    name = layer.get("name") or (cfg.get("name") if isinstance(cfg, dict) else None)
    if not isinstance(name, str) or not name or name in shapes:
        raise GoodnetError(f"a {cls!r:.40} layer has no name, or a name already used")
    if not isinstance(cfg, dict):
        raise GoodnetError(f"layer {name!r}: its config is not a JSON object")
    if cls == "Lambda":
        raise GoodnetError(f"layer {name!r} is a Lambda layer: it holds code, and goodnet "
                           "never runs code from a model file; refused")
    return cls, cfg, name


def _layer_node(name: str, cls: Any, cfg: dict[str, Any], inputs: list[str],
                shapes: dict[str, Shape]) -> tuple[dict[str, Any], Shape]:
    """The graph node of a layer reading ``inputs`` (shapes known), and its output shape."""
    if not inputs or any(i not in shapes for i in inputs):
        raise GoodnetError(f"layer {name!r} reads an input that is not defined before it")
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise GoodnetError(f"layer {name!r}: only channels_last Keras models are supported")
    convert = CONVERTERS.get(cls) if isinstance(cls, str) else None
    if convert is None:
        raise GoodnetError(f"layer {name!r} is a {cls!s:.40} layer, which goodnet does "
                           "not import (custom layers are never run)")
    received = [shapes[i] for i in inputs]
    node: dict[str, Any] = {"name": name, "inputs": inputs, **convert(name, cfg, received)}
    return node, layer_shape(node, received)


def _logits_out(graph: list[dict[str, Any]]) -> list[str]:
    """Drop the graph's final softmax (a layer of its own, or its last layer's activation), so
    that the model answers logits; returns a note on what was dropped."""
    notes = []
    last = graph[-1]
    if last["op"] == "activation" and last["activation"] == "softmax" and len(graph) > 2:
        graph.pop()
        notes.append(f"final softmax layer {last['name']!r} dropped (logits out)")
    elif last.get("activation") == "softmax":
        last["activation"] = "linear"
        notes.append(f"final softmax of {last['name']!r} dropped (logits out)")
    return notes


def _check_output(body: Any, last: str) -> None:
    """A Functional model's one output must be its last layer."""
    outputs = body.get("output_layers") if isinstance(body, dict) else None
    if not outputs:
        return
    if isinstance(outputs, list) and isinstance(outputs[0], str):  # Keras 3, one output
        outputs = [outputs]
    if not (isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], list)
            and outputs[0] and outputs[0][0] == last):
        raise GoodnetError("goodnet imports models with one output, the last layer")


# ------------------------------------------------------------------------ weights → state

def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """A Keras weight's shape in PyTorch's layout."""
    if kind == "kernel" and len(shape) == 4:  # (kh, kw, in, out) → (out, in, kh, kw)
        return shape[3], shape[2], shape[0], shape[1]
    if kind == "kernel" and len(shape) == 2:  # (in, out) → (out, in)
        return shape[1], shape[0]
    return shape


def _keras_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """A PyTorch weight's shape in Keras's layout."""
    if kind == "kernel" and len(shape) == 4:
        return shape[2], shape[3], shape[1], shape[0]
    return _torch_shape(shape, kind)


def _plan(index: dict[str, dict[str, h5py.Dataset]], model: nn.Module, path: Path
          ) -> dict[str, tuple[h5py.Dataset, str]]:
    """State key → (dataset, Keras weight kind) for every weight in the file, each declared
    shape checked against ``model`` (built on the meta device); nothing is read."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    plan: dict[str, tuple[h5py.Dataset, str]] = {}
    for layer, datasets in index.items():
        for kind, dataset in datasets.items():
            key = f"{module_name(layer)}.{STATE_KEYS.get(kind, kind)}"
            if kind not in STATE_KEYS or key not in expected or key in plan:
                raise GoodnetError(f"{path}: weight {layer}/{kind} has no place in the model")
            if _torch_shape(dataset.shape, kind) != expected[key]:
                raise GoodnetError(f"{path}: weight {layer}/{kind} has shape {dataset.shape}, "
                                   f"the model expects {_keras_shape(expected[key], kind)}")
            plan[key] = (dataset, kind)
    modules = dict(model.named_modules())
    for key in expected:
        owner, _, field = key.rpartition(".")
        optional = field == "num_batches_tracked" or owner == "normalize" or (
            field in ("weight", "bias") and isinstance(modules.get(owner), nn.BatchNorm2d))
        if key not in plan and not optional:  # BN without scale or centre keeps 1 and 0
            raise GoodnetError(f"{path}: no weights for {key}")
    return plan


def _tensor(dataset: h5py.Dataset, kind: str, path: Path) -> torch.Tensor:
    array = np.asarray(read(dataset, path), dtype=np.float32)
    if not np.isfinite(array).all():
        raise GoodnetError(f"{path}: weight {dataset.name} holds NaN or infinite values")
    tensor = torch.from_numpy(array)
    if kind == "kernel":
        tensor = tensor.permute(3, 2, 0, 1) if tensor.ndim == 4 else tensor.t()
    return tensor.contiguous()


def _spec_from_config(raw: Any, pixel_scale: float, path: Path
                      ) -> tuple[ModelSpec, list[str]]:
    """The spec of a full-model file, its config checked whole (every error names the file)."""
    try:
        if not isinstance(raw, (bytes, str)):
            raise GoodnetError("the model config is not text")
        config = parse_json(_text(raw), "the model config")
        if not isinstance(config, dict):
            raise GoodnetError("the model config is not a JSON object")
        graph, (c, h, w), notes = config_to_graph(config)
        output = check_graph(graph, (c, h, w))[graph[-1]["name"]]
        if len(output) != 1:
            raise GoodnetError(f"the model's output ({graph[-1]['name']!r}) gives "
                               f"{'×'.join(map(str, output))} values per image; goodnet "
                               "imports classifiers whose output is a vector of class scores")
        spec = ModelSpec(GRAPH, output[0], c, h, w, (0.0,) * c, (1.0,) * c, pixel_scale,
                         graph=json.dumps(graph, separators=(",", ":")))
    except GoodnetError as error:
        raise GoodnetError(f"{path}: {error}") from None
    return spec, notes


def _spec_for_arch(arch: str, index: dict[str, dict[str, h5py.Dataset]],
                   input_shape: tuple[int, int, int] | None, pixel_scale: float, path: Path
                   ) -> ModelSpec:
    if arch not in MODELS or is_graph(arch):
        raise GoodnetError(f"unknown architecture {arch!r}; choose from {sorted(fixed_archs())}")
    kernels = [d.shape for layer in index.values() for k, d in layer.items() if k == "kernel"]
    firsts = [shape for shape in kernels if len(shape) == 4]
    if not firsts or len(kernels[-1]) != 2:
        raise GoodnetError(f"{path}: no convolution and dense kernels to load")
    channels = firsts[0][2]
    default = {"deepid": (channels, 55, 47)}.get(arch, (channels, 32, 32))
    c, h, w = input_shape or default
    return ModelSpec(arch, kernels[-1][1], c, h, w, (0.0,) * c, (1.0,) * c, pixel_scale)


def import_keras(path: str | os.PathLike[str], *, arch: str | None = None,
                 pixel_scale: float = PIXEL_SCALE, input_shape: tuple[int, int, int] | None = None
                 ) -> LoadedModel:
    """A Keras ``.h5`` file as a goodnet model (with its card), read as data only.

    Args:
        path: a full-model file, or a weights-only file when ``arch`` is given.
        arch: load the weights by layer name onto this goodnet architecture (``"deepid"`` for
            the CSAW-HackML files) instead of building the model from the file's config.
        pixel_scale: 255 if the model takes raw pixels 0–255, 1 if it takes [0, 1].
        input_shape: (C, H, W) for ``arch`` (default: the architecture's usual input).
    """
    path = Path(path)
    if not (pixel_scale > 0 and math.isfinite(pixel_scale)):
        raise GoodnetError("pixel scale must be positive (255 for raw pixels, 1 for [0, 1])")
    notes: list[str] = []
    with open_hdf5(path) as handle:
        weights = child(handle, "model_weights", path)
        group = weights if isinstance(weights, h5py.Group) else handle
        version = attribute(handle, "keras_version", path)
        if version is None:
            version = attribute(group, "keras_version", path)
        version = _text(version)[:40] if isinstance(version, (bytes, str)) else ""
        raw_config = attribute(handle, "model_config", path)
        if arch is None and raw_config is not None:  # the whole config is checked first
            spec, notes = _spec_from_config(raw_config, pixel_scale, path)
            index = weight_index(group, path)
        elif arch is None:
            weight_index(group, path)  # no weights at all, or weights only:
            raise GoodnetError(f"{path}: a weights-only Keras file (no model config); name its "
                               "architecture with --arch (deepid for the CSAW-HackML files)")
        else:
            index = weight_index(group, path)
            spec = _spec_for_arch(arch, index, input_shape, pixel_scale, path)
        plan = _plan(index, build_model(spec, device="meta"), path)
        for dataset, _ in plan.values():  # every size checked before any weight is read
            check_stored(dataset, path)
        state = {key: _tensor(dataset, kind, path) for key, (dataset, kind) in plan.items()}
    model = build_model(spec)
    model.load_state_dict({**model.state_dict(), **state})
    model.eval()
    card = ModelCard(spec=spec, notes={
        "source": {"file": path.name, "format": "keras-h5",
                   "keras_version": version,
                   "import_notes": notes},
        "pixel_scale_note": "raw pixels 0-255" if pixel_scale == 255 else f"x{pixel_scale:g}"})
    # What is returned (and what `import` writes) passes the checks a saved card meets on load.
    card = ModelCard.from_json(card.to_json(), str(path))
    return LoadedModel(model, card, {})


def load(path: Path, options: ImportOptions) -> LoadedModel:
    """A Keras file with the import options it reads: ``arch`` for a weights-only file, and the
    pixel scale (the input shape, mean and std, options for checkpoints and ONNX, are not read:
    the model's own input and normalisation are kept, as the command line always has)."""
    return import_keras(path, arch=options.arch, pixel_scale=options.scale(PIXEL_SCALE))
