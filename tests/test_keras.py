"""Keras HDF5 import without TensorFlow: layer-by-layer parity with Keras 3 (PyTorch backend, a
test-only dependency), files in the Keras 2 layout written by hand with h5py, the real CSAW-HackML
and CIFAR-10 files, and the refusal of anything that would run code."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import h5py
import numpy as np
import pytest
import torch

from goodnet.errors import GoodnetError
from goodnet.importers.keras import import_keras
from tests.conftest import requires_shared
from tests.keras_files import keras2_layer, write_keras2

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - a user's own Keras setting
    pytest.skip("Keras is set to another backend than torch", allow_module_level=True)
layers = keras.layers


def keras_output(model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def ours(path, x: np.ndarray, **kwargs) -> np.ndarray:
    loaded = import_keras(path, pixel_scale=1.0, **kwargs)
    with torch.no_grad():
        return loaded.model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def randomise(model, seed: int = 0) -> None:
    """Random weights everywhere, BatchNorm statistics included, so no layer is an identity."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for weight in layer.get_weights():
            value = rng.normal(0, 0.5, weight.shape).astype(np.float32)
            if "variance" in str(weight) or (isinstance(layer, layers.BatchNormalization)
                                             and len(values) == 3):
                value = np.abs(value) + 0.5
            values.append(value)
        layer.set_weights(values)


def functional(body, shape=(9, 11, 3)):
    """A classifier around ``body``: its output, flattened if an image, into a dense layer."""
    inputs = keras.Input(shape, name="image")
    x = body(inputs)
    if len(x.shape) == 4:
        x = layers.Flatten(name="flatten_out")(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


CASES = {
    "conv valid": lambda x: layers.Conv2D(4, 3, activation="relu", name="c")(x),
    "conv same, even kernel, stride 2": lambda x: layers.Conv2D(
        5, 4, strides=2, padding="same", name="c")(x),
    "conv dilated, no bias": lambda x: layers.Conv2D(
        3, 3, dilation_rate=2, padding="same", use_bias=False, activation="tanh", name="c")(x),
    "batchnorm": lambda x: layers.BatchNormalization(epsilon=1e-3, name="bn")(
        layers.Conv2D(4, 1, name="c")(x)),
    "maxpool valid": lambda x: layers.MaxPooling2D(2, name="p")(x),
    "maxpool same, stride 2": lambda x: layers.MaxPooling2D(3, 2, padding="same", name="p")(x),
    "avgpool same": lambda x: layers.AveragePooling2D(3, 2, padding="same", name="p")(x),
    "avgpool valid": lambda x: layers.AveragePooling2D(2, name="p")(x),
    "global average": lambda x: layers.GlobalAveragePooling2D(name="g")(x),
    "global max": lambda x: layers.GlobalMaxPooling2D(name="g")(x),
    "flatten and dense": lambda x: layers.Dense(6, activation="sigmoid", name="d")(
        layers.Flatten(name="f")(x)),
    "zero padding": lambda x: layers.ZeroPadding2D(((1, 2), (0, 3)), name="z")(x),
    "add": lambda x: layers.Add(name="a")([layers.Conv2D(3, 1, name="c1")(x),
                                           layers.Conv2D(3, 3, padding="same", name="c2")(x)]),
    "concatenate": lambda x: layers.Concatenate(name="cat")(
        [layers.Conv2D(2, 1, name="c1")(x), x]),
    "activation, relu, dropout": lambda x: layers.Dropout(0.5, name="drop")(
        layers.ReLU(name="r")(layers.Activation("elu", name="act")(x))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_layer_matches_keras(case, tmp_path):
    model = functional(CASES[case])
    randomise(model)
    path = tmp_path / "m.h5"
    model.save(path)
    x = np.random.default_rng(1).random((4, 9, 11, 3), dtype=np.float32)
    np.testing.assert_allclose(ours(path, x), keras_output(model, x), atol=1e-4, rtol=1e-4)


def test_a_sequential_model_with_a_final_softmax_gives_its_logits(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(3, 3, name="c"),
                              layers.Flatten(name="f"), layers.Dense(4, name="d"),
                              layers.Softmax(name="s")])
    randomise(model)
    model.save(tmp_path / "s.h5")
    x = np.random.default_rng(2).random((5, 8, 8, 1), dtype=np.float32)
    logits = ours(tmp_path / "s.h5", x)
    probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
    np.testing.assert_allclose(probabilities, keras_output(model, x), atol=1e-5)
    assert import_keras(tmp_path / "s.h5").card.notes["source"]["import_notes"]


# --- files in the Keras 2 layout, written by hand ---------------------------------------------

def test_a_keras2_functional_file_with_a_residual_add(tmp_path):
    rng = np.random.default_rng(3)
    kernel_a = rng.normal(0, 0.5, (3, 3, 2, 4)).astype(np.float32)
    kernel_b = rng.normal(0, 0.5, (1, 1, 2, 4)).astype(np.float32)
    dense = rng.normal(0, 0.5, (4 * 3 * 3, 5)).astype(np.float32)
    bias = rng.normal(0, 0.5, (5,)).astype(np.float32)
    config = {"class_name": "Model", "config": {"name": "m", "layers": [
        keras2_layer("InputLayer", "input_1", [], batch_input_shape=[None, 6, 6, 2]),
        keras2_layer("Conv2D", "conv_a", ["input_1"], filters=4, kernel_size=[3, 3],
                     strides=[1, 1], padding="same", activation="relu", use_bias=False),
        keras2_layer("Conv2D", "conv_b", ["input_1"], filters=4, kernel_size=[1, 1],
                     strides=[1, 1], padding="valid", activation="linear", use_bias=False),
        keras2_layer("Add", "add_1", ["conv_a", "conv_b"]),
        keras2_layer("MaxPooling2D", "pool", ["add_1"], pool_size=[2, 2], strides=[2, 2],
                     padding="valid"),
        keras2_layer("Flatten", "flatten_1", ["pool"]),
        keras2_layer("Dense", "out", ["flatten_1"], units=5, activation="softmax"),
    ], "input_layers": [["input_1", 0, 0]], "output_layers": [["out", 0, 0]]}}
    path = tmp_path / "k2.h5"
    write_keras2(path, config, {"conv_a": {"kernel": kernel_a}, "conv_b": {"kernel": kernel_b},
                                "out": {"kernel": dense, "bias": bias}})
    # The same network in Keras 3, given the same weights.
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(4, 3, padding="same", activation="relu", use_bias=False)(inputs)
    b = layers.Conv2D(4, 1, use_bias=False)(inputs)
    x = layers.Flatten()(layers.MaxPooling2D(2)(layers.Add()([a, b])))
    output = layers.Dense(5)(x)
    reference = keras.Model(inputs, output)
    reference.set_weights([kernel_a, kernel_b, dense, bias])
    x = rng.random((3, 6, 6, 2), dtype=np.float32)
    np.testing.assert_allclose(ours(path, x), keras_output(reference, x), atol=1e-4)
    loaded = import_keras(path)
    assert [n for n, _ in loaded.model.named_children()][:3] == ["normalize", "activations",
                                                                 "conv_a"]


def test_a_lambda_layer_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')"
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape":
                                                [None, 4, 4, 1]}},
        {"class_name": "Lambda", "config": {"name": "evil", "function": [code, None, None],
                                            "function_type": "lambda"}},
    ]}}
    write_keras2(tmp_path / "lambda.h5", config, {})
    with pytest.raises(GoodnetError, match=r"'evil' is a Lambda layer.*never runs code"):
        import_keras(tmp_path / "lambda.h5")
    assert not marker.exists()


@pytest.mark.parametrize(("layer", "message"), [
    ({"class_name": "MyAttention", "config": {"name": "mine"}}, "'mine' is a MyAttention"),
    ({"class_name": "Conv2D", "config": {"name": "c", "filters": 2, "kernel_size": 3,
                                         "activation": "mish"}}, "unsupported activation"),
    ({"class_name": "Conv2D", "config": {"name": "c", "filters": 2, "kernel_size": 3,
                                         "data_format": "channels_first"}}, "channels_last"),
])
def test_unsupported_layers_are_named(tmp_path, layer, message):
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape":
                                                [None, 4, 4, 1]}}, layer]}}
    write_keras2(tmp_path / "bad.h5", config,
                 {"c": {"kernel": np.zeros((3, 3, 1, 2), np.float32)}})
    with pytest.raises(GoodnetError, match=message):
        import_keras(tmp_path / "bad.h5")


def test_bad_files_get_one_clear_error(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(GoodnetError, match="not an HDF5 file"):
        import_keras(tmp_path / "text.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(GoodnetError, match="no Keras weights"):
        import_keras(tmp_path / "empty.h5")
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape":
                                                [None, 4, 4, 1]}},
        {"class_name": "Conv2D", "config": {"name": "c", "filters": 2, "kernel_size": 3,
                                            "use_bias": False}},
        {"class_name": "Flatten", "config": {"name": "f"}},
        {"class_name": "Dense", "config": {"name": "d", "units": 2, "use_bias": False}}]}}
    write_keras2(tmp_path / "nan.h5", config,
                 {"c": {"kernel": np.full((3, 3, 1, 2), np.nan, np.float32)},
                  "d": {"kernel": np.zeros((8, 2), np.float32)}})
    with pytest.raises(GoodnetError, match="NaN"):
        import_keras(tmp_path / "nan.h5")
    write_keras2(tmp_path / "weights_only.h5", config, {})
    with h5py.File(tmp_path / "weights_only.h5", "a") as f:
        del f.attrs["model_config"]
    with pytest.raises(GoodnetError, match="--arch"):
        import_keras(tmp_path / "weights_only.h5")


# --- the real files -----------------------------------------------------------------------------

def keras_deepid(classes: int = 1283):
    """The CSAW-HackML DeepID in Keras (its README's architecture), logits out."""
    inputs = keras.Input((55, 47, 3))
    x = layers.MaxPooling2D(2)(layers.Conv2D(20, 4, activation="relu", name="conv_1")(inputs))
    x = layers.MaxPooling2D(2)(layers.Conv2D(40, 3, activation="relu", name="conv_2")(x))
    pool = layers.MaxPooling2D(2)(layers.Conv2D(60, 3, activation="relu", name="conv_3")(x))
    a = layers.Dense(160, name="fc_1")(layers.Flatten()(pool))
    b = layers.Dense(160, name="fc_2")(
        layers.Flatten()(layers.Conv2D(80, 2, activation="relu", name="conv_4")(pool)))
    output = layers.Dense(classes, name="output")(layers.ReLU()(layers.Add()([a, b])))
    return keras.Model(inputs, output)


CSAW = ["lab3_bd_weights.h5", "sunglasses_bd_weights.h5",
        "multi_trigger_multi_target_bd_weights.h5", "anonymous_1_bd_weights.h5",
        "anonymous_2_bd_weights.h5"]


@pytest.mark.parametrize("name", CSAW)
def test_the_csaw_badnets_load_into_deepid_as_keras_computes_them(name):
    path = requires_shared("csaw-hackml", name)
    reference = keras_deepid()
    with h5py.File(path) as f:
        for layer in ("conv_1", "conv_2", "conv_3", "conv_4", "fc_1", "fc_2", "output"):
            reference.get_layer(layer).set_weights(
                [f[layer][layer]["kernel:0"][()], f[layer][layer]["bias:0"][()]])
    x = np.random.default_rng(4).random((6, 55, 47, 3), dtype=np.float32) * 255
    loaded = import_keras(path, arch="deepid", pixel_scale=255)
    assert loaded.card.spec.arch == "deepid" and loaded.card.spec.num_classes == 1283
    with torch.no_grad():
        got = loaded.model(torch.from_numpy(x / 255).permute(0, 3, 1, 2)).numpy()
    expected = keras_output(reference, x)
    # The Keras model's output, softmax probabilities, within 1e-4; the logits (thousands on
    # raw pixels) agree to float32 rounding, 1e-4 of their scale.
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(got), 1).numpy(),
                               torch.softmax(torch.from_numpy(expected), 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_the_third_party_cifar_model_classifies_the_genuine_images_as_keras_does():
    from goodnet.data.images import read_image

    path = requires_shared("keras-cifar10-cnn", "cnn_model.h5")
    files = sorted(requires_shared("sample-images").glob("cifar10_*.png"))
    assert len(files) == 20
    loaded = import_keras(path, pixel_scale=255)
    images = torch.stack([read_image(f, (3, 32, 32)) for f in files])
    with torch.no_grad():
        ours_out = loaded.model(images).numpy()
    reference = keras.models.load_model(path, compile=False)
    keras_out = keras_output(reference, images.permute(0, 2, 3, 1).numpy() * 255)
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    assert ours_out.argmax(1).tolist() == labels == keras_out.argmax(1).tolist()
    np.testing.assert_allclose(ours_out, keras_out, atol=1e-3, rtol=1e-4)
