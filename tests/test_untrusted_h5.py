"""Untrusted HDF5 files (Keras models, Keras weights, CSAW data) and untrusted Keras graphs.

Every HDF5 reader refuses, before it reads a byte, a file that could make it read another file
(external storage, virtual datasets, external links) or that is not a plain tree (soft links);
a small file cannot make goodnet allocate more than it stores; every Keras config is checked
whole (types, ranks, signs, shapes propagated from the input) before any weight is read; and
what ``import`` accepts, ``load_model`` accepts and runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from goodnet.artifacts import ModelCard, load_model, save_model
from goodnet.cli import main
from goodnet.data import load_csaw
from goodnet.errors import GoodnetError
from goodnet.importers.keras import import_keras
from goodnet.models import ModelSpec, build_model
from goodnet.models.keras_graph import OPS
from tests.bounded import assert_refused_cheaply, measure
from tests.conftest import tiny_keras_graph
from tests.keras_files import small_functional, write_keras2

SECRET = b"GOODNET-TEST-SECRET-7f3a9c-"
HOSTILE = ("external storage", "virtual dataset", "external link", "soft link")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A local file the hostile HDF5 files try to read (its bytes are finite as float32)."""
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET * 64)
    return path


def _plant(group: h5py.Group, name: str, array: np.ndarray, how: str, folder: Path,
           secret: Path) -> None:
    """Create ``group[name]`` shaped and typed as ``array``, but whose bytes come from
    ``secret`` (or, for a soft link, from elsewhere in the same file)."""
    if how == "external storage":
        group.create_dataset(name, shape=array.shape, dtype=array.dtype,
                             external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        return
    source = folder / "source.h5"
    with h5py.File(source, "w") as other:
        other.create_dataset("stolen", data=np.frombuffer(
            secret.read_bytes()[:array.nbytes], array.dtype).reshape(array.shape))
    if how == "virtual dataset":
        layout = h5py.VirtualLayout(shape=array.shape, dtype=array.dtype)
        layout[...] = h5py.VirtualSource(str(source), "stolen", shape=array.shape)
        group.create_virtual_dataset(name, layout)
    elif how == "external link":
        group[name] = h5py.ExternalLink(str(source), "/stolen")
    else:
        group.file.create_dataset("/elsewhere", data=array)
        group[name] = h5py.SoftLink("/elsewhere")


def _keras_model(folder: Path, secret: Path, how: str) -> Path:
    config, weights = small_functional()
    path = write_keras2(folder / "model.h5", config, weights)
    with h5py.File(path, "a") as f:
        layer = f["model_weights/out/out"]
        kernel = layer["kernel:0"][()]
        del layer["kernel:0"]
        _plant(layer, "kernel:0", kernel, how, folder, secret)
    return path


def _keras_weights(folder: Path, secret: Path, how: str) -> Path:
    """A weights-only file (the CSAW-HackML layout) whose last kernel is planted."""
    path = folder / "weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv", b"dense"]
        for name, shape in (("conv", (3, 3, 1, 2)), ("dense", (8, 3))):
            group = f.create_group(name)
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode()]
            inner = group.create_group(name)
            kernel = np.ones(shape, np.float32)
            if name == "dense":
                _plant(inner, "kernel:0", kernel, how, folder, secret)
            else:
                inner.create_dataset("kernel:0", data=kernel)
    return path


def _csaw(folder: Path, secret: Path, how: str) -> Path:
    path = folder / "faces.h5"
    with h5py.File(path, "w") as f:
        _plant(f, "data", np.zeros((2, 1, 8, 8), np.uint8), how, folder, secret)
        f.create_dataset("label", data=np.array([0, 1]))
    return path


READERS = {
    "keras model": (_keras_model, import_keras),
    "keras weights": (_keras_weights, lambda p: import_keras(p, arch="small_cnn")),
    "csaw data": (_csaw, lambda p: load_csaw(p, num_classes=2)),
}


@pytest.mark.parametrize("how", HOSTILE)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_no_hdf5_reader_follows_a_file_to_another_file(tmp_path, secret, reader, how):
    write, read = READERS[reader]
    path = write(tmp_path, secret, how)
    with pytest.raises(GoodnetError, match="refused") as error:
        read(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert ("link" if "link" in how else how.split()[0]) in message
    assert SECRET.decode() not in message


@pytest.mark.parametrize("how", HOSTILE)
def test_import_of_a_file_that_reads_another_writes_nothing(tmp_path, secret, capsys, how):
    path = _keras_model(tmp_path, secret, how)
    out = tmp_path / "out.safetensors"
    assert main(["import", str(path), "--out", str(out)]) != 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("goodnet: error:")
    assert SECRET.decode() not in captured.out + captured.err
    assert not out.exists()


def test_a_link_nested_anywhere_in_the_file_is_refused(tmp_path, secret):
    """The whole tree is checked, not only the datasets a reader asks for."""
    config, weights = small_functional()
    path = write_keras2(tmp_path / "model.h5", config, weights)
    with h5py.File(path, "a") as f:
        f.create_group("optimizer_weights/deep/er")["x"] = h5py.ExternalLink(str(secret), "/")
    with pytest.raises(GoodnetError, match=r"optimizer_weights/deep/er/x.*external link"):
        import_keras(path)


# ---------------------------------------------------------------- memory before allocation


def _unwritten(group: h5py.Group, name: str, shape: tuple[int, ...]) -> None:
    """A chunked float dataset that declares ``shape`` but was never written (stores 0 bytes)."""
    group.create_dataset(name, shape=shape, dtype="f4", chunks=(1024, *shape[1:]))


def _lambda_and_unwritten(folder: Path) -> Path:
    """The field report's file: a Lambda layer, and 10⁸-float weights that were never written."""
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape":
                                                [None, 4, 4, 1]}},
        {"class_name": "Lambda", "config": {"name": "evil", "function": ["0", None, None]}},
        {"class_name": "Flatten", "config": {"name": "f"}},
        {"class_name": "Dense", "config": {"name": "d", "units": 10**8}}]}}
    path = write_keras2(folder / "lambda.h5", config, {})
    with h5py.File(path, "a") as f:
        group = f["model_weights/d"]
        group.attrs["weight_names"] = [b"d/kernel:0", b"d/bias:0"]
        _unwritten(group, "d/kernel:0", (10**8,))
        _unwritten(group, "d/bias:0", (10**8,))
    return path


def _unwritten_dense(folder: Path) -> Path:
    """A valid model with a hidden Dense layer of 8·10⁷ weights that were never written."""
    config, weights = small_functional()
    units = 4 * 10**6
    layers = config["config"]["layers"]
    layers.insert(-1, {**layers[-1], "name": "hidden", "config": {
        "name": "hidden", "units": units, "activation": "relu", "use_bias": True}})
    layers[-1]["inbound_nodes"] = [[["hidden", 0, 0, {}]]]
    del weights["out"]
    path = write_keras2(folder / "dense.h5", config, weights)
    with h5py.File(path, "a") as f:
        for name, shape in (("hidden", (18, units)), ("out", (units, 3))):
            group = f[f"model_weights/{name}"]
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group.create_dataset(f"{name}/kernel:0", shape=shape, dtype="f4", chunks=True)
            group.create_dataset(f"{name}/bias:0", shape=shape[1:], dtype="f4", chunks=True)
    return path


def _unwritten_weights(folder: Path) -> Path:
    """A weights-only file whose two kernels declare 10⁸ floats each and store none."""
    path = folder / "weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1", b"fc1"]
        for name in ("conv1", "fc1"):
            group = f.create_group(name)
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode()]
            _unwritten(group, f"{name}/kernel:0", (10**8,))
    return path


def _unwritten_csaw(folder: Path) -> Path:
    path = folder / "faces.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(2000, 3, 55, 47), dtype="f4", chunks=(1, 3, 55, 47))
        f.create_dataset("label", data=np.zeros(2000, np.int16))
    return path


def _card(folder: Path, name: str, graph: list[dict[str, Any]]) -> Path:
    """A goodnet model file whose card carries ``graph`` (and no weights worth the name)."""
    spec = ModelSpec("graph", 10, 1, 8, 8, (0.0,), (1.0,), graph=json.dumps(graph))
    path = folder / f"{name}.safetensors"
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"goodnet.card": ModelCard(spec=spec).to_json()})
    return path


def _conv(name: str, source: str, c_in: int, c_out: int, kernel: list[Any]) -> dict[str, Any]:
    return {"name": name, "op": "conv2d", "inputs": [source], "in": c_in, "out": c_out,
            "kernel": kernel, "stride": [1, 1], "dilation": [1, 1], "padding": "same",
            "bias": False, "activation": "linear"}


INPUT = {"name": "in", "op": "input", "inputs": []}
HEAD = [{"name": "g", "op": "gap", "inputs": ["last"]},
        {"name": "d", "op": "dense", "inputs": ["g"], "in": 1, "out": 10, "bias": True,
         "activation": "linear"}]
CARD_GRAPHS = {
    # 10⁸ weights, balanced by a negative kernel so that the count looks small
    "negative kernel": [INPUT, _conv("big", "in", 1, 400, [500, 500]),
                        _conv("last", "big", 400, 1, [1, -10**6]), *HEAD],
    # BatchNorm layers whose features were not counted as weights
    "batchnorm features": [INPUT, *[{"name": f"bn{i}" if i < 3 else "last", "op": "batchnorm",
                                     "inputs": ["in" if i == 0 else f"bn{i - 1}"],
                                     "features": 10**7, "eps": 1e-3} for i in range(4)], *HEAD],
}


def test_hostile_files_are_refused_before_allocating(tmp_path):
    paths = {"lambda and unwritten weights": _lambda_and_unwritten(tmp_path),
             "unwritten dense": _unwritten_dense(tmp_path),
             "unwritten weights": _unwritten_weights(tmp_path),
             "unwritten csaw data": _unwritten_csaw(tmp_path),
             **{f"card: {name}": _card(tmp_path, name.replace(" ", "_"), graph)
                for name, graph in CARD_GRAPHS.items()}}
    assert all(path.stat().st_size < 200_000 for path in paths.values())
    calls = {name: f"import_keras({str(path)!r})" for name, path in paths.items()}
    calls["unwritten weights"] = f"import_keras({str(paths['unwritten weights'])!r}, " \
                                 "arch='small_cnn')"
    calls["unwritten csaw data"] = f"load_csaw({str(paths['unwritten csaw data'])!r})"
    calls.update({f"card: {name}": f"load_model({str(paths[f'card: {name}'])!r})"
                  for name in CARD_GRAPHS})
    results = measure(calls, setup="from goodnet.importers.keras import import_keras\n"
                                   "from goodnet.artifacts import load_model\n"
                                   "from goodnet.data import load_csaw")
    assert_refused_cheaply(results, match={
        "lambda and unwritten weights": "Lambda",
        "unwritten dense": "stores 0",
        "unwritten csaw data": "stores",
        "card: negative kernel": "kernel",
        "card: batchnorm features": "features",
    })


def test_a_compressed_dataset_may_expand_only_as_far_as_deflate_can(tmp_path):
    """Zeros compress about 1000-fold with deflate, and a genuine file that does so loads; a
    dataset that claims more than deflate's largest expansion of what it stores is refused."""
    config, weights = small_functional()
    weights["out"]["kernel"] = np.zeros((18, 3), np.float32)
    path = write_keras2(tmp_path / "zeros.h5", config, weights)
    with h5py.File(path, "a") as f:
        group = f["model_weights/out/out"]
        del group["kernel:0"]
        group.create_dataset("kernel:0", data=np.zeros((18, 3), np.float32), compression="gzip")
    import_keras(path)
    with h5py.File(tmp_path / "claim.h5", "w") as f:
        f.create_dataset("data", shape=(10**4, 1, 64, 64), dtype="u1", chunks=(1, 1, 64, 64),
                         compression="gzip", maxshape=(None, 1, 64, 64))
        f["data"][0] = 1  # one chunk stored, 10⁴ declared
        f.create_dataset("label", data=np.zeros(10**4, np.int64))
    with pytest.raises(GoodnetError, match=r"'/data' declares .* stores"):
        load_csaw(tmp_path / "claim.h5")


# ---------------------------------------------------------------- Keras configs, one line each


def _layer(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(layer for layer in config["config"]["layers"] if layer["name"] == name)


def _set(name: str, key: str, value: Any):
    def change(config: dict[str, Any], weights: dict[str, Any]) -> None:
        _layer(config, name)["config"][key] = value
    return change


def _input(shape: list[Any]):
    return _set("input_1", "batch_input_shape", shape)


def _dense_kernel(config: dict[str, Any], weights: dict[str, Any]) -> None:
    weights["out"]["kernel"] = np.zeros((17, 3), np.float32)


def _conv_kernel(config: dict[str, Any], weights: dict[str, Any]) -> None:
    weights["conv_a"]["kernel"] = np.zeros((3, 3, 2, 2), np.float32)


def _output_is_an_image(config: dict[str, Any], weights: dict[str, Any]) -> None:
    config["config"]["layers"] = config["config"]["layers"][:5]
    config["config"]["output_layers"] = [["bn", 0, 0]]


BAD_CONFIGS = {
    "kernel of rank 1": (_set("conv_a", "kernel_size", [3]), "kernel_size"),
    "kernel of rank 3": (_set("conv_a", "kernel_size", [3, 3, 3]), "kernel_size"),
    "string kernel": (_set("conv_a", "kernel_size", "3"), "kernel_size"),
    "negative kernel": (_set("conv_b", "kernel_size", [-1, -1]), "kernel_size"),
    "zero stride": (_set("conv_a", "strides", [0, 1]), "strides"),
    "boolean stride": (_set("conv_a", "strides", True), "strides"),
    "negative dilation": (_set("conv_a", "dilation_rate", -2), "dilation_rate"),
    "zero pool": (_set("pool", "pool_size", [0, 2]), "pool_size"),
    "string filters": (_set("conv_a", "filters", "2"), "filters"),
    "negative units": (_set("out", "units", -3), "units"),
    "string epsilon": (_set("bn", "epsilon", "1e-3"), "epsilon"),
    "string use_bias": (_set("conv_a", "use_bias", "false"), "use_bias"),
    "list padding": (_set("conv_a", "padding", ["same"]), "padding"),
    "config a list": (lambda c, w: _layer(c, "conv_a").__setitem__("config", [1]), "conv_a"),
    "kernel larger than the input": (_set("conv_b", "kernel_size", [7, 7]), "larger than"),
    "pool larger than the input": (_set("pool", "pool_size", [7, 7]), "larger than"),
    "mismatched dense kernel": (_dense_kernel, "kernel"),
    "mismatched conv kernel": (_conv_kernel, "kernel"),
    "100000×100000 input": (_input([None, 100_000, 100_000, 1]), "100000"),
    "string input side": (_input([None, "6", 6, 1]), "input"),
    "output an image": (_output_is_an_image, "output"),
    "inbound nodes a string": (lambda c, w: _layer(c, "add_1").__setitem__(
        "inbound_nodes", "conv_a"), "add_1"),
    "inbound node a number": (lambda c, w: _layer(c, "add_1").__setitem__(
        "inbound_nodes", [[7]]), "add_1"),
    "output layers a dict": (lambda c, w: c["config"].__setitem__("output_layers", {"a": 1}),
                             "output"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_keras_config_is_one_line_and_import_writes_nothing(tmp_path, capsys, case):
    change, message = BAD_CONFIGS[case]
    config, weights = small_functional()
    change(config, weights)
    path = write_keras2(tmp_path / "bad.h5", config, weights,
                        names=["input_1", "conv_a", "conv_b", "add_1", "bn", "pool", "flat",
                               "out"])
    with pytest.raises(GoodnetError, match=message) as error:
        import_keras(path)
    assert "\n" not in str(error.value)
    out = tmp_path / "out.safetensors"
    assert main(["import", str(path), "--out", str(out)]) != 0
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()


def test_a_keras_config_nested_100000_deep_is_one_line(tmp_path):
    config, weights = small_functional()
    text = json.dumps(config).replace('"linear"', "[" * 100_000 + "]" * 100_000)
    path = write_keras2(tmp_path / "deep.h5", text, weights,
                        names=["input_1", "conv_a", "conv_b", "add_1", "bn", "pool", "flat",
                               "out"])
    with pytest.raises(GoodnetError, match="nested"):
        import_keras(path)


@pytest.mark.parametrize("value", [b"out", 7, np.array([[b"out"]])],
                         ids=["scalar", "number", "two-dimensional"])
def test_layer_names_that_are_not_a_list_of_names_are_one_line(tmp_path, value):
    config, weights = small_functional()
    path = write_keras2(tmp_path / "names.h5", config, weights)
    with h5py.File(path, "a") as f:
        f["model_weights"].attrs["layer_names"] = value
    with pytest.raises(GoodnetError, match="layer_names"):
        import_keras(path)


def test_a_card_graph_whose_kernel_exceeds_its_input_is_refused_at_load(tmp_path):
    graph = [INPUT, {**_conv("last", "in", 1, 1, [9, 9]), "padding": "valid"}, *HEAD]
    with pytest.raises(GoodnetError, match=r"'last'.*larger than"):
        load_model(_card(tmp_path, "wide", graph))


def test_a_card_graph_whose_scores_disagree_with_its_classes_is_refused_at_load(tmp_path):
    graph = [INPUT, _conv("last", "in", 1, 1, [3, 3]), *HEAD[:1],
             {**HEAD[1], "out": 7}]  # the card says 10 classes
    with pytest.raises(GoodnetError, match="gives 7 class scores but the card says 10"):
        load_model(_card(tmp_path, "classes", graph))


# ---------------------------------------------------------------- structured fuzzing

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
NAMES = ["input_1", "conv_a", "conv_b", "add_1", "bn", "pool", "flat", "out"]
REPLACEMENTS = st.sampled_from([
    None, True, 0, -1, 1, 2, 3, 7, 10**12, -(10**12), 2.5, float("nan"), "", "x", "same",
    "relu", [], [0], [1, 1], [-2, 3], [[1, 1], [1, 1]], {}, {"a": 1}, "__deep__"])
CLASSES = ["Conv2D", "Dense", "BatchNormalization", "MaxPooling2D", "AveragePooling2D",
           "Flatten", "Add", "Concatenate", "ZeroPadding2D", "GlobalAveragePooling2D", "Dropout",
           "Activation", "ReLU", "Softmax", "InputLayer", "Lambda", "Custom"]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value, as the keys and indices that lead to it."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _mutated(draw: st.DrawFn, value: Any, kind: str, kinds: list[str]) -> str:
    """``value`` as JSON with one to three fields changed: a type, a value, a sign, a key
    deleted, a layer's kind (the ``kind`` field) swapped, or a value nested 100 000 deep."""
    for _ in range(draw(st.integers(1, 3))):
        place = draw(st.sampled_from(_paths(value)[1:]))
        parent = value
        for key in place[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "kind", "negate"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[place[-1]]
        elif action == "kind" and isinstance(parent, dict) and kind in parent:
            parent[kind] = draw(st.sampled_from(kinds))
        elif action == "negate" and isinstance(parent[place[-1]], int):
            parent[place[-1]] = -parent[place[-1]]
        else:
            parent[place[-1]] = copy.deepcopy(draw(REPLACEMENTS))
    return json.dumps(value).replace('"__deep__"', "[" * 100_000 + "]" * 100_000)


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    return _mutated(draw, small_functional()[0], "class_name", CLASSES)


@st.composite
def mutated_graphs(draw: st.DrawFn) -> str:
    return _mutated(draw, json.loads(tiny_keras_graph(10, 1)), "op", list(OPS))


@FUZZ
@given(text=mutated_configs())
def test_mutated_keras_configs_raise_only_goodnet_errors(tmp_path, text):
    _, weights = small_functional()
    path = write_keras2(tmp_path / "m.h5", text, weights, names=NAMES)
    loaded = None
    with contextlib.suppress(GoodnetError):  # the one error a user may see; others fail
        loaded = import_keras(path)
    if loaded is None:
        return
    # What import accepts, goodnet itself then loads and runs.
    saved = save_model(tmp_path / "m.safetensors", loaded.model, loaded.card)
    again = load_model(saved)
    x = torch.rand(2, *loaded.card.spec.input_shape)
    with torch.no_grad():
        assert torch.allclose(again.model(x), loaded.model(x))
        assert again.model(x).shape == (2, loaded.card.spec.num_classes)


@FUZZ
@given(text=mutated_graphs(), height=st.integers(1, 20))
def test_mutated_card_graphs_are_refused_or_run(text, height):
    """The graph a model card carries is checked as an imported one is: a mutated graph is
    refused with a GoodnetError when the model is built, or the model runs."""
    model = None
    with contextlib.suppress(GoodnetError):
        model = build_model(ModelSpec("graph", 10, 1, height, 12, (0.0,), (1.0,), graph=text))
    if model is not None:
        with torch.no_grad():
            assert model(torch.rand(2, 1, height, 12)).ndim == 2


@pytest.mark.parametrize("key", ["stride", "pool"])
def test_a_window_longer_than_any_image_is_refused(key):
    """A stride or pool of 10**12 (found by the fuzz test above) overflowed inside PyTorch when
    the model ran; the graph check refuses it when the model is built."""
    graph = json.loads(tiny_keras_graph(10, 1))
    pool = next(node for node in graph if node["op"] == "maxpool")
    pool[key] = [10**12, 2]
    with pytest.raises(GoodnetError, match=f"{key} must be two positive integers of at most"):
        build_model(ModelSpec("graph", 10, 1, 12, 12, (0.0,), (1.0,), graph=json.dumps(graph)))
