"""Keras HDF5 models, read as data with h5py: no TensorFlow, nothing from the file executed.

Two kinds of file:

- **Full-model files** (``model.save("x.h5")``, Keras 2 or 3): the ``model_config`` JSON is
  parsed into goodnet's own layer graph (:mod:`goodnet.models.keras_graph`) and the weights in
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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from goodnet.artifacts import LoadedModel, ModelCard
from goodnet.errors import GoodnetError
from goodnet.models import MODELS, ModelSpec, build_model
from goodnet.models.keras_graph import ACTIVATIONS, check_graph, module_name

MAX_FILE_BYTES = 4 * 1024**3
DROPOUTS = ("Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout")


def is_hdf5(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with the HDF5 signature."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _open(path: Path) -> Any:
    import h5py

    if not path.is_file():
        raise GoodnetError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise GoodnetError(f"{path}: larger than {MAX_FILE_BYTES // 1024**3} GiB; refused")
    if not is_hdf5(path):
        raise GoodnetError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise GoodnetError(f"{path}: cannot read as HDF5 ({error})") from None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_weights(group: Any, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Layer name → {"kernel" | "bias" | "gamma" | ...: array}, from a Keras weights group."""
    import h5py

    if "layer_names" not in group.attrs:
        raise GoodnetError(f"{path}: no Keras weights (the 'layer_names' attribute is missing)")
    weights: dict[str, dict[str, np.ndarray]] = {}
    for layer in (_text(n) for n in group.attrs["layer_names"]):
        if layer not in group:
            raise GoodnetError(f"{path}: layer {layer!r} is listed but has no weights group")
        entry = group[layer]
        arrays = {}
        for name in (_text(n) for n in entry.attrs.get("weight_names", [])):
            dataset = entry.get(name)
            if not isinstance(dataset, h5py.Dataset):
                raise GoodnetError(f"{path}: weight {layer}/{name} is missing")
            if dataset.dtype.kind != "f" or dataset.size > 10**9:
                raise GoodnetError(f"{path}: weight {layer}/{name} is not a float array of "
                                   "reasonable size")
            array = np.asarray(dataset[()], dtype=np.float32)
            if not np.isfinite(array).all():
                raise GoodnetError(f"{path}: weight {layer}/{name} holds NaN or infinite values")
            arrays[name.rsplit("/", 1)[-1].split(":")[0]] = array
        if arrays:
            weights[layer] = arrays
    return weights


# ------------------------------------------------------------------------ config → graph

def _pair(value: Any, what: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) for v in value):
        return list(value)
    raise GoodnetError(f"{what}: expected an int or a pair of ints, got {value!r}")


def _inbound(layer: dict[str, Any]) -> list[str]:
    """Names of the layers feeding ``layer`` (Keras 2 and Keras 3 formats)."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise GoodnetError(f"layer {layer.get('name')!r} is called more than once (a shared "
                           "layer); not supported")
    if not nodes:
        return []
    node = nodes[0]
    if isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        return [str(entry[0]) for entry in node]
    names: list[str] = []

    def walk(value: Any) -> None:  # Keras 3: {"args": [...], "kwargs": {...}}
        if isinstance(value, dict):
            history = value.get("config", {}).get("keras_history") \
                if value.get("class_name") == "__keras_tensor__" else None
            if history:
                names.append(str(history[0]))
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(node.get("args", []))
    return names


def _activation(value: Any, layer: str) -> str:
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise GoodnetError(f"layer {layer!r}: unsupported activation {value!r}")
    return value


def _channel_axis(axis: Any, rank: int, layer: str) -> None:
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if axis not in (-1, rank - 1):
        raise GoodnetError(f"layer {layer!r}: only the channel axis (-1) is supported, got "
                           f"{axis!r}")


def config_to_graph(config: dict[str, Any], weights: dict[str, dict[str, np.ndarray]]
                    ) -> tuple[list[dict[str, Any]], tuple[int, int, int], list[str]]:
    """goodnet's layer graph for a Keras model config; also the input shape (C, H, W) and notes
    on what was changed (a dropped final softmax)."""
    kind = config.get("class_name")
    body = config.get("config")
    if kind not in ("Sequential", "Functional", "Model"):
        raise GoodnetError(f"unsupported Keras model class {kind!r}")
    layers = body if isinstance(body, list) else (body or {}).get("layers")
    if not isinstance(layers, list) or not layers:
        raise GoodnetError("the Keras model config lists no layers")
    graph: list[dict[str, Any]] = []
    ranks: dict[str, int] = {}
    shape: tuple[int, int, int] | None = None
    previous: str | None = None

    def add_input(batch_shape: Any, name: str) -> None:
        nonlocal shape
        if not isinstance(batch_shape, list) or len(batch_shape) != 4 or not all(
                isinstance(v, int) and v > 0 for v in batch_shape[1:]):
            raise GoodnetError(f"goodnet imports image classifiers (input H×W×C); input "
                               f"{name!r} has shape {batch_shape!r}")
        height, width, channels = batch_shape[1:]
        shape = (channels, height, width)
        graph.append({"name": name, "op": "input", "inputs": []})
        ranks[name] = 4

    for layer in layers:
        if not isinstance(layer, dict):
            raise GoodnetError("malformed Keras layer entry")
        cls = layer.get("class_name")
        cfg = layer.get("config") or {}
        name = str(layer.get("name") or cfg.get("name") or "")
        if not name:
            raise GoodnetError(f"a {cls} layer has no name")
        if cls == "Lambda":
            raise GoodnetError(f"layer {name!r} is a Lambda layer: it holds code, and goodnet "
                               "never runs code from a model file; refused")
        if cls == "InputLayer":
            add_input(cfg.get("batch_input_shape") or cfg.get("batch_shape"), name)
            previous = name
            continue
        if kind == "Sequential":
            if previous is None:  # no InputLayer: the first layer carries the input shape
                add_input(cfg.get("batch_input_shape"), f"{name}_input")
                previous = f"{name}_input"
            inputs = [previous]
        else:
            inputs = _inbound(layer)
        if any(i not in ranks for i in inputs) or not inputs:
            raise GoodnetError(f"layer {name!r} reads an input that is not defined before it")
        rank = ranks[inputs[0]]
        node: dict[str, Any] = {"name": name, "inputs": inputs}
        held = weights.get(name, {})
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise GoodnetError(f"layer {name!r}: only channels_last Keras models are supported")
        if cls == "Conv2D":
            if cfg.get("groups", 1) != 1 or rank != 4:
                raise GoodnetError(f"layer {name!r}: grouped or non-image convolution")
            if "kernel" not in held:
                raise GoodnetError(f"layer {name!r}: no kernel in the weights")
            padding = cfg.get("padding", "valid")
            if padding not in ("valid", "same"):
                raise GoodnetError(f"layer {name!r}: unsupported padding {padding!r}")
            node.update(op="conv2d", kernel=_pair(cfg.get("kernel_size"), name),
                        stride=_pair(cfg.get("strides", 1), name),
                        dilation=_pair(cfg.get("dilation_rate", 1), name), padding=padding,
                        bias=bool(cfg.get("use_bias", True)),
                        activation=_activation(cfg.get("activation", "linear"), name),
                        **{"in": int(held["kernel"].shape[2]), "out": int(cfg["filters"])})
        elif cls == "Dense":
            if rank != 2 or "kernel" not in held:
                raise GoodnetError(f"layer {name!r}: a Dense layer needs a flat input and a "
                                   "kernel")
            node.update(op="dense", bias=bool(cfg.get("use_bias", True)),
                        activation=_activation(cfg.get("activation", "linear"), name),
                        **{"in": int(held["kernel"].shape[0]), "out": int(cfg["units"])})
        elif cls == "BatchNormalization":
            _channel_axis(cfg.get("axis", -1), rank, name)
            if "moving_mean" not in held:
                raise GoodnetError(f"layer {name!r}: no moving mean in the weights")
            if rank != 4:
                raise GoodnetError(f"layer {name!r}: BatchNormalization on a flat tensor is not "
                                   "supported")
            node.update(op="batchnorm", features=int(held["moving_mean"].shape[0]),
                        eps=float(cfg.get("epsilon", 1e-3)))
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            pool = _pair(cfg.get("pool_size", 2), name)
            padding = cfg.get("padding", "valid")
            if padding not in ("valid", "same"):
                raise GoodnetError(f"layer {name!r}: unsupported padding {padding!r}")
            node.update(op="maxpool" if cls == "MaxPooling2D" else "avgpool", pool=pool,
                        stride=_pair(cfg.get("strides") or pool, name), padding=padding)
        elif cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            if cfg.get("keepdims"):
                raise GoodnetError(f"layer {name!r}: keepdims=True is not supported")
            node.update(op="gap" if cls == "GlobalAveragePooling2D" else "gmp")
            rank = 2
        elif cls == "Flatten":
            node.update(op="flatten")
            rank = 2
        elif cls in ("Activation", "ReLU", "Softmax"):
            if cls == "ReLU" and any(cfg.get(k) not in (None, 0, 0.0) for k in (
                    "max_value", "negative_slope", "threshold")):
                raise GoodnetError(f"layer {name!r}: a ReLU with max_value, negative_slope or "
                                   "threshold is not supported")
            activation = {"ReLU": "relu", "Softmax": "softmax"}.get(
                cls, cfg.get("activation"))
            node.update(op="activation", activation=_activation(activation, name))
        elif cls in DROPOUTS:
            node.update(op="dropout")
        elif cls == "ZeroPadding2D":
            padding = cfg.get("padding", 1)
            if isinstance(padding, int):
                padding = [[padding, padding], [padding, padding]]
            elif isinstance(padding, list) and all(isinstance(p, int) for p in padding):
                padding = [[padding[0], padding[0]], [padding[1], padding[1]]]
            node.update(op="zeropad", padding=[_pair(p, name) for p in padding])
        elif cls in ("Add", "Concatenate"):
            if cls == "Concatenate":
                _channel_axis(cfg.get("axis", -1), rank, name)
            if any(ranks[i] != rank for i in inputs):
                raise GoodnetError(f"layer {name!r} merges tensors of different ranks")
            node.update(op="add" if cls == "Add" else "concatenate")
        else:
            raise GoodnetError(f"layer {name!r} is a {cls} layer, which goodnet does not "
                               "import (custom layers are never run)")
        graph.append(node)
        ranks[name] = rank
        previous = name
    if shape is None:
        raise GoodnetError("the Keras model has no input layer with a known shape")
    notes = []
    if kind != "Sequential":
        outputs = body.get("output_layers") if isinstance(body, dict) else None
        if outputs and isinstance(outputs[0], str):  # Keras 3 writes one output unnested
            outputs = [outputs]
        if outputs and (len(outputs) != 1 or _output_name(outputs) != graph[-1]["name"]):
            raise GoodnetError("goodnet imports models with one output, the last layer")
    last = graph[-1]
    if last["op"] == "activation" and last["activation"] == "softmax" and len(graph) > 2:
        graph.pop()
        notes.append(f"final softmax layer {last['name']!r} dropped (logits out)")
    elif last.get("activation") == "softmax":
        last["activation"] = "linear"
        notes.append(f"final softmax of {last['name']!r} dropped (logits out)")
    return graph, shape, notes


def _output_name(outputs: Any) -> str:
    first = outputs[0]
    return str(first[0] if isinstance(first, list) else first)


def _state_for(model: nn.Module, weights: dict[str, dict[str, np.ndarray]], path: Path
               ) -> dict[str, torch.Tensor]:
    """PyTorch tensors for every Keras weight, by layer name, checked against ``model``."""
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for layer, arrays in weights.items():
        target = modules.get(module_name(layer))
        if target is None:
            raise GoodnetError(f"{path}: the weights hold layer {layer!r}, which the model does "
                               "not have")
        prefix = module_name(layer)
        for kind, array in arrays.items():
            tensor = torch.from_numpy(array)
            if kind == "kernel":
                tensor = tensor.permute(3, 2, 0, 1) if tensor.ndim == 4 else tensor.t()
                key = "weight"
            else:
                key = {"bias": "bias", "gamma": "weight", "beta": "bias",
                       "moving_mean": "running_mean", "moving_variance": "running_var"}.get(kind)
            if key is None:
                raise GoodnetError(f"{path}: unexpected weight {layer}/{kind}")
            state[f"{prefix}.{key}"] = tensor.contiguous()
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise GoodnetError(f"{path}: the model has no parameter for {key!r}")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise GoodnetError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model "
                               f"expects {tuple(expected[key].shape)}")
    for key, reference in expected.items():  # BN without scale/centre: keep identity defaults
        if key not in state and not key.endswith("num_batches_tracked") and \
                not key.startswith("normalize."):
            if key.endswith(".weight") or key.endswith(".bias"):
                owner = modules[key.rsplit(".", 1)[0]]
                if not isinstance(owner, nn.BatchNorm2d):
                    raise GoodnetError(f"{path}: no weights for {key}")
            else:
                raise GoodnetError(f"{path}: no weights for {key}")
        if key not in state:
            state[key] = reference
    return state


def import_keras(path: str | os.PathLike[str], *, arch: str | None = None,
                 pixel_scale: float = 255.0, input_shape: tuple[int, int, int] | None = None
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
    if pixel_scale <= 0:
        raise GoodnetError("pixel scale must be positive (255 for raw pixels, 1 for [0, 1])")
    with _open(path) as handle:
        group = handle.get("model_weights", handle)
        weights = read_weights(group, path)
        raw_config = handle.attrs.get("model_config")
        version = _text(handle.attrs.get("keras_version", group.attrs.get("keras_version", "")))
    notes: list[str] = []
    if arch is not None:
        if arch not in MODELS:
            raise GoodnetError(f"unknown architecture {arch!r}; choose from {sorted(MODELS)}")
        outputs = [a["kernel"] for a in weights.values() if "kernel" in a]
        firsts = [a["kernel"] for a in weights.values() if "kernel" in a and a["kernel"].ndim == 4]
        if not outputs or not firsts:
            raise GoodnetError(f"{path}: no convolution and dense kernels to load")
        channels = int(firsts[0].shape[2])
        default = {"deepid": (channels, 55, 47)}.get(arch, (channels, 32, 32))
        c, h, w = input_shape or default
        spec = ModelSpec(arch, int(outputs[-1].shape[-1]), c, h, w, (0.0,) * c, (1.0,) * c,
                         pixel_scale)
    else:
        if raw_config is None:
            raise GoodnetError(f"{path}: a weights-only Keras file (no model config); name its "
                               "architecture with --arch (deepid for the CSAW-HackML files)")
        try:
            config = json.loads(_text(raw_config))
        except ValueError:
            raise GoodnetError(f"{path}: the model config is not valid JSON") from None
        if not isinstance(config, dict):
            raise GoodnetError(f"{path}: the model config is not a JSON object")
        graph, (c, h, w), notes = config_to_graph(config, weights)
        check_graph(graph)
        sized = [node for node in graph if "out" in node or "features" in node]
        classes = (sized[-1].get("out") or sized[-1].get("features")) if sized else None
        if classes is None:
            raise GoodnetError(f"{path}: the model has no layer whose width gives its classes")
        spec = ModelSpec("keras", int(classes), c, h, w, (0.0,) * c, (1.0,) * c, pixel_scale,
                         graph=json.dumps(graph, separators=(",", ":")))
    model = build_model(spec)
    model.load_state_dict(_state_for(model, weights, path))
    model.eval()
    card = ModelCard(spec=spec, notes={
        "source": {"file": path.name, "format": "keras-h5",
                   "keras_version": version,
                   "import_notes": notes},
        "pixel_scale_note": "raw pixels 0-255" if pixel_scale == 255 else f"x{pixel_scale:g}"})
    return LoadedModel(model, card, {})
