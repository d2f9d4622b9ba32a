"""Keras HDF5 files written by hand with h5py, in the layout Keras 2.x writes (no Keras needed):
a small valid Functional model to start from, and the writer the hostile variants use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def keras2_layer(cls: str, name: str, inbound: list[str], **config: Any) -> dict[str, Any]:
    """One layer entry of a Keras 2 Functional config."""
    return {"class_name": cls, "name": name, "config": {"name": name, **config},
            "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]] if inbound else []}


def write_keras2(path: Path, config: dict[str, Any] | str,
                 weights: dict[str, dict[str, np.ndarray]], names: list[str] | None = None
                 ) -> Path:
    """A full-model file as Keras 2.x writes it: ``model_config`` and ``model_weights`` with
    ``layer_names`` / ``weight_names`` attributes and ``:0``-suffixed datasets.

    ``config`` may be JSON text (to write what no dict can hold); ``names`` then lists the
    layers (by default, those of the config)."""
    text = config if isinstance(config, str) else json.dumps(config)
    if names is None:
        names = [layer["config"]["name"] for layer in json.loads(text)["config"]["layers"]]
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = text.encode()
        f.attrs["keras_version"] = b"2.3.1"
        f.attrs["backend"] = b"tensorflow"
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            entry = group.create_group(name)
            arrays = weights.get(name, {})
            entry.attrs["weight_names"] = np.array(
                [f"{name}/{kind}:0".encode() for kind in arrays])
            for kind, array in arrays.items():
                entry.create_dataset(f"{name}/{kind}:0", data=array)
    return path


def small_functional() -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """A valid Keras 2 Functional classifier of 6×6×1 images into 3 classes, and its weights:
    two convolutions added, BatchNorm, max-pooling, flatten, a dense softmax layer."""
    rng = np.random.default_rng(0)
    config = {"class_name": "Model", "config": {"name": "m", "layers": [
        keras2_layer("InputLayer", "input_1", [], batch_input_shape=[None, 6, 6, 1]),
        keras2_layer("Conv2D", "conv_a", ["input_1"], filters=2, kernel_size=[3, 3],
                     strides=[1, 1], padding="same", dilation_rate=[1, 1],
                     activation="relu", use_bias=True),
        keras2_layer("Conv2D", "conv_b", ["input_1"], filters=2, kernel_size=[1, 1],
                     strides=[1, 1], padding="valid", activation="linear", use_bias=False),
        keras2_layer("Add", "add_1", ["conv_a", "conv_b"]),
        keras2_layer("BatchNormalization", "bn", ["add_1"], axis=-1, epsilon=1e-3),
        keras2_layer("MaxPooling2D", "pool", ["bn"], pool_size=[2, 2], strides=[2, 2],
                     padding="valid"),
        keras2_layer("Flatten", "flat", ["pool"]),
        keras2_layer("Dense", "out", ["flat"], units=3, activation="softmax", use_bias=True),
    ], "input_layers": [["input_1", 0, 0]], "output_layers": [["out", 0, 0]]}}

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape).astype(np.float32)

    weights = {
        "conv_a": {"kernel": normal(3, 3, 1, 2), "bias": normal(2)},
        "conv_b": {"kernel": normal(1, 1, 1, 2)},
        "bn": {"gamma": normal(2), "beta": normal(2), "moving_mean": normal(2),
               "moving_variance": np.abs(normal(2)) + 0.5},
        "out": {"kernel": normal(18, 3), "bias": normal(3)},
    }
    return config, weights
