"""Hostile model files and cards: refused in one line, before they cost memory or time.

Each hostile file here is a few kilobytes; before the fixes of issue 14 several took gigabytes
(measured through :mod:`tests.bounded`, in a child process) or ended in an internal error.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from goodnet.artifacts import CARD_KEY, ModelCard, check_writable, load_model, save_model
from goodnet.attacks import make_attack
from goodnet.cli import main
from goodnet.errors import GoodnetError
from goodnet.importers.checkpoint import read_checkpoint
from goodnet.models import ModelSpec, build_model
from goodnet.models.spec import MAX_PIXELS, MAX_SIDE, check_input_size
from goodnet.paths import require_regular_file
from tests.bounded import Measured, assert_refused_cheaply, measure

SPEC = ModelSpec("small_cnn", 4, 1, 16, 16, (0.0,), (1.0,))


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, "the command should have failed"
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in build_model(SPEC, seed=0).state_dict().items()}


@pytest.fixture(scope="module")
def card_body() -> dict:
    card = ModelCard(spec=SPEC, attack={"name": "badnets", "config": {"patch_size": 3}},
                     metrics={"clean_accuracy": 0.5, "detection_rate": float("nan")},
                     training={"config": {"epochs": 1}}, data="stripes", seed=1,
                     notes={"source": {"file": "m.pt"}})
    return json.loads(card.to_json())


def write_model(path: Path, tensors: dict[str, torch.Tensor], card: dict | str) -> Path:
    text = card if isinstance(card, str) else json.dumps(card)
    save_file(tensors, str(path), metadata={CARD_KEY: text})
    return path


# ---------------------------------------------------------------- PyTorch checkpoints


@pytest.mark.parametrize(("tensor", "message"), [
    (lambda: torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8), "quantized"),
    (lambda: torch.eye(3).to_sparse(), "sparse"),
    (lambda: torch.eye(3).to_sparse_csr(), "sparse"),
    (lambda: torch.zeros(3, device="meta"), "meta"),
    (lambda: torch.tensor([complex("nan"), 1j]), "complex"),
    (lambda: torch.tensor([1 + 0j, 1j]), "complex"),
], ids=["quantized", "sparse-coo", "sparse-csr", "meta", "complex-nan", "complex"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own, on making such tensors
def test_checkpoint_tensors_that_are_no_plain_weights_are_one_line(tmp_path, capsys, tensor,
                                                                    message):
    path = tmp_path / "odd.pt"
    torch.save({"conv1.weight": tensor()}, path)
    with pytest.raises(GoodnetError, match=message):
        read_checkpoint(path)
    err = one_line_error(["import", str(path), "--arch", "small_cnn", "--out",
                          str(tmp_path / "out.safetensors")], capsys)
    assert "odd.pt" in err and message in err
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- what hostile files cost


def _hostile_calls(folder: Path, state: dict[str, torch.Tensor], card_body: dict) -> dict:
    """Hostile inputs of a few kilobytes, each named ``<kind> <case>`` with the statement that
    reads it, cheapest first before the fixes: a call's cost is the growth of the child's peak
    memory, which an earlier costlier call would hide."""
    calls = {}
    # Cards inside the input bound whose architecture is large (small_cnn at 256×256 has a
    # 128 MiB fc1; preact_resnet18 with 100 000 classes, 238 MiB of weights) over a file of
    # small_cnn's 16×16 weights: refused from the shapes alone, the architecture being built on
    # the meta device. At 1448² and 4096² the input bound refuses the card itself.
    for name, changes in {"256": {"height": 256, "width": 256},
                          "classes": {"arch": "preact_resnet18", "num_classes": 100_000,
                                      "in_channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3},
                          "1448": {"height": 1448, "width": 1448},
                          "4096": {"height": 4096, "width": 4096}}.items():
        body = copy.deepcopy(card_body)
        body["spec"].update(changes)
        path = write_model(folder / f"big{name}.safetensors", state, body)
        calls[f"shapes {name}"] = f"load_model({str(path)!r})"
    # Cards at the bounds, and an attack in a card far larger than the image.
    cases = {
        "classes": (("spec", "num_classes"), 100_000),
        "side": (("spec", "height"), MAX_SIDE),
        "channels": (("spec", "in_channels"), 64),
        "patch": (("attack", "config"), {"patch_size": 10**9}),
    }
    for name, (where, value) in cases.items():
        body = _set(card_body, where, value)
        if name == "channels":
            body["spec"].update(mean=[0.0] * value, std=[1.0] * value)
        path = write_model(folder / f"{name}.safetensors", state, body)
        calls[f"card {name}"] = (f"m = load_model({str(path)!r}); "
                                 "attack_from_card(m.card, m.extras, stripes(4))")
    # Attack settings larger than the image, refused before the trigger is built.
    too_large = {"badnets": {"patch_size": 20000}, "multi-target": {"patch_size": 20000},
                 "wanet": {"k": 1000000}, "adaptive-blend": {"pieces": 10**12}}
    for name, values in too_large.items():
        calls[f"attack {name}"] = f"make_attack({name!r}, {values!r}, (3, 28, 28), 10)"
    # A checkpoint whose one stored float is viewed as 30000×30000 (3.4 GiB once
    # materialised) or 10⁶×10⁶ (4 TB): its storage is smaller than its element count.
    for side in (30_000, 1_000_000):
        path = folder / f"stride0-{side}.pt"
        torch.save({"fc.weight": torch.zeros(1).expand(side, side)}, path)
        assert path.stat().st_size < 4096
        calls[f"stride0 {side}"] = f"read_checkpoint({str(path)!r})"
    return calls


@pytest.fixture(scope="module")
def costs(tmp_path_factory, state, card_body) -> dict[str, Measured]:
    """Peak-memory growth and time of each hostile input, measured in one child process."""
    calls = _hostile_calls(tmp_path_factory.mktemp("hostile"), state, card_body)
    return measure(calls, setup="from goodnet.artifacts import load_model\n"
                                "from goodnet.attacks import make_attack\n"
                                "from goodnet.backdoor import attack_from_card\n"
                                "from goodnet.importers.checkpoint import read_checkpoint\n"
                                "from tests.conftest import stripes")


def _kind(costs: dict[str, Measured], kind: str) -> dict[str, Measured]:
    found = {name: r for name, r in costs.items() if name.startswith(kind + " ")}
    assert found
    return found


def test_a_stride_zero_checkpoint_is_refused_before_its_values_are_touched(costs):
    results = _kind(costs, "stride0")
    assert_refused_cheaply(results, match={name: "storage" for name in results})


def test_a_card_whose_shapes_disagree_is_refused_before_the_model_is_built(costs):
    """Checking shapes costs no memory: far below the 128-238 MiB of building the model."""
    assert_refused_cheaply(_kind(costs, "shapes"), limit_mib=64, match={
        "shapes 256": "expects", "shapes classes": "expects", "shapes 1448": "larger than",
        "shapes 4096": "larger than"})


def test_attack_settings_are_bounded_by_the_image_before_allocating(costs):
    results = _kind(costs, "attack")
    assert_refused_cheaply(results, match={name: "28×28" for name in results})


def test_cards_at_the_bounds_are_refused_cheaply(costs):
    assert_refused_cheaply(_kind(costs, "card"))


# ---------------------------------------------------------------- the input-size bound


def test_the_input_bound_admits_every_real_use_and_refuses_the_rest():
    for shape in [(1, 28, 28), (3, 32, 32), (3, 55, 47), (3, 224, 224), (3, 256, 256),
                  (1, 64, 1024), (4, 64, 64)]:
        check_input_size(*shape)
    assert MAX_SIDE >= 224 and MAX_PIXELS >= 224 * 224
    for shape in [(3, 257, 256), (1, 1025, 8), (65, 8, 8), (0, 8, 8), (1, -3, 8),
                  (1, 8.0, 8), (1, True, 8), (1, "8", 8)]:
        with pytest.raises(GoodnetError, match="input"):
            check_input_size(*shape)


def test_a_well_formed_model_with_a_huge_declared_input_is_refused(tmp_path, capsys):
    """ResNet-20's weights do not depend on the input size: a card declaring 3×4096×4096 made
    `export` take 9 GiB; the input bound refuses it before anything runs."""
    spec = ModelSpec("resnet20", 10, 3, 32, 32, (0.0,) * 3, (1.0,) * 3)
    body = json.loads(ModelCard(spec=spec).to_json())
    body["spec"].update(height=4096, width=4096)
    state = {k: v.contiguous() for k, v in build_model(spec).state_dict().items()}
    path = write_model(tmp_path / "r20.safetensors", state, body)
    with pytest.raises(GoodnetError, match="larger than goodnet runs"):
        load_model(path)
    err = one_line_error(["export", str(path), "--out", str(tmp_path / "m.onnx")], capsys)
    assert "r20.safetensors" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("settings", [
    {"patch_size": "3"}, {"patch_size": 3.5}, {"patch_size": True}, {"poison_rate": "0.1"},
    {"poison_rate": float("nan")}, {"mode": 3}, {"pattern": ["white"]}, {"margin": None},
    {"target": 2**70},
])
def test_attack_settings_of_the_wrong_type_are_one_line(settings):
    with pytest.raises(GoodnetError, match="badnets"):
        make_attack("badnets", settings, (1, 16, 16), 4)


# ---------------------------------------------------------------- malformed cards


def _deep(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


MALFORMED = {
    "notes a list": (("notes",), [1, 2], "notes"),
    "attack a string": (("attack",), "badnets", "attack"),
    "attack name a number": (("attack", "name"), 3, "attack"),
    "attack config a list": (("attack", "config"), [3], "attack"),
    "metrics a list": (("metrics",), [0.5], "metrics"),
    "metric a string": (("metrics", "clean_accuracy"), "high", "metrics"),
    "metric infinite": (("metrics", "clean_accuracy"), float("inf"), "finite"),
    "training a string": (("training",), "fast", "training"),
    "data a number": (("data",), 3, "data"),
    "seed a string": (("seed",), "one", "seed"),
    "seed a bool": (("seed",), True, "seed"),
    "version a list": (("goodnet_version",), [1], "goodnet_version"),
    "kind a list": (("kind",), ["model"], "kind"),
    "format_version a bool": (("format_version",), True, "version"),
    "spec a list": (("spec",), [], "architecture"),
    "arch a number": (("spec", "arch"), 3, "arch"),
    "pixel_scale NaN": (("spec", "pixel_scale"), float("nan"), "pixel_scale"),
    "pixel_scale huge int": (("spec", "pixel_scale"), 10**400, "pixel_scale"),
    "pixel_scale beyond float32": (("spec", "pixel_scale"), 1e300, "pixel_scale"),
    "pixel_scale zero": (("spec", "pixel_scale"), 0.0, "pixel_scale"),
    "mean NaN": (("spec", "mean"), [float("nan")], "mean"),
    "mean beyond float32": (("spec", "mean"), [3e38], "mean"),
    "std zero": (("spec", "std"), [0.0], "std"),
    "std a string": (("spec", "std"), "1", "std"),
    "height a string": (("spec", "height"), "16", "input shape"),
    "height a float": (("spec", "height"), 16.0, "input shape"),
    "classes negative": (("spec", "num_classes"), -4, "classes"),
    "classes huge": (("spec", "num_classes"), 2**70, "classes"),
    "graph a dict": (("spec", "graph"), {"op": "input"}, "graph"),
    "training NaN": (("training", "loss"), float("nan"), "finite"),
    "notes 200 deep": (("notes", "deep"), _deep(200), "deep"),
}


def _set(body: dict, where: tuple[str, ...], value: object) -> dict:
    body = copy.deepcopy(body)
    target = body
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return body


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_card_field_is_one_line(case, state, card_body, tmp_path, capsys):
    where, value, message = MALFORMED[case]
    path = write_model(tmp_path / "m.safetensors", state, _set(card_body, where, value))
    with pytest.raises(GoodnetError, match=message):
        load_model(path)
    err = one_line_error(["info", str(path)], capsys)
    assert "m.safetensors" in err


def test_json_nested_100000_deep_in_a_card_is_one_line(state, card_body, tmp_path, capsys):
    text = json.dumps(card_body)[:-1] + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write_model(tmp_path / "deep.safetensors", state, text)
    with pytest.raises(GoodnetError, match="deep"):
        load_model(path)
    one_line_error(["info", str(path)], capsys)


@pytest.mark.parametrize(("buffer", "value"), [("std", 0.0), ("mean", 3e38), ("std", 2.0)])
def test_stored_normalisation_that_disagrees_with_the_card_is_refused(state, card_body, tmp_path,
                                                                       capsys, buffer, value):
    """The card says mean 0, std 1; a file whose stored buffers say otherwise would give NaN
    scores (std 0) that ``eval`` would count as class 0, or silently other scores."""
    tensors = {**state, f"normalize.{buffer}": torch.full_like(state[f"normalize.{buffer}"],
                                                              value)}
    path = write_model(tmp_path / "m.safetensors", tensors, card_body)
    with pytest.raises(GoodnetError, match="normalisation"):
        load_model(path)
    one_line_error(["predict", str(path), str(tmp_path / "m.safetensors")], capsys)


def test_the_cards_goodnet_writes_load_back(state, card_body, tmp_path):
    """NaN in metrics is how goodnet records a figure that is not defined (no poisoned
    inputs): it stays readable."""
    path = write_model(tmp_path / "m.safetensors", state, card_body)
    card = load_model(path).card
    assert card.attack == {"name": "badnets", "config": {"patch_size": 3}}
    assert card.metrics["clean_accuracy"] == 0.5


def test_a_card_attack_too_large_for_the_image_is_refused_at_eval(state, card_body, tmp_path,
                                                                   capsys):
    import numpy as np

    from tests.conftest import stripes

    body = _set(card_body, ("attack", "config"), {"patch_size": 20000})
    path = write_model(tmp_path / "m.safetensors", state, body)
    data = stripes(16)
    np.savez(tmp_path / "d.npz", x=data.images.numpy(), y=data.labels.numpy())
    err = one_line_error(["eval", str(path), "--data", str(tmp_path / "d.npz")], capsys)
    assert "16×16" in err


@pytest.mark.parametrize(("mask", "message"), [
    (torch.zeros(0), "mask"),
    (torch.zeros(2, 32), "mask"),
    (torch.full((32,), float("nan")), "NaN"),
    (torch.tensor([1 + 0j] * 32), "complex"),
], ids=["empty", "2-d", "nan", "complex"])
def test_a_malformed_mask_beside_the_weights_is_one_line(state, card_body, tmp_path, mask,
                                                         message):
    path = write_model(tmp_path / "m.safetensors", {**state, "extra/mask/conv1": mask},
                       card_body)
    with pytest.raises(GoodnetError, match=message):
        load_model(path)


# ---------------------------------------------------------------- paths that are not files


@pytest.fixture()
def fifo(tmp_path):
    """A named pipe; readers that block on it are released (they read an empty file) from
    1.5 s on, so a command that wrongly opens it ends, late, instead of hanging the suite."""
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    stop = threading.Event()

    def release() -> None:
        stop.wait(1.5)
        while not stop.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader is waiting
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            stop.wait(0.05)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()


@pytest.mark.parametrize("command", ["info", "predict", "eval"])
def test_a_model_path_that_is_a_named_pipe_is_refused_at_once(fifo, tmp_path, capsys, command):
    extra = {"info": [], "predict": [str(tmp_path / "x.png")], "eval": ["--data", "mnist"]}
    start = time.monotonic()
    err = one_line_error([command, str(fifo), *extra[command]], capsys)
    assert time.monotonic() - start < 1.0
    assert "model.safetensors: not a regular file" in err


def test_require_regular_file(tmp_path):
    regular = tmp_path / "a.bin"
    regular.write_bytes(b"x")
    assert require_regular_file(regular) == regular
    os.mkfifo(tmp_path / "fifo")
    for path, message in [(tmp_path / "fifo", "not a regular file"),
                          (tmp_path, "is a folder"), (tmp_path / "absent", "no such file"),
                          (Path("/dev/null"), "not a regular file")]:
        with pytest.raises(GoodnetError, match=message):
            require_regular_file(path)


def test_output_over_a_device_or_pipe_is_refused_and_the_node_kept(tmp_path, capsys):
    """Writing replaces the destination by rename; over a device node (as root, /dev/null) or a
    pipe that would replace the node itself. Only a regular file or a new path is written."""
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    model = save_model(tmp_path / "m.safetensors", build_model(SPEC), ModelCard(spec=SPEC))
    for path in (fifo, Path("/dev/null"), Path("/dev/full")):
        with pytest.raises(GoodnetError, match="not a regular file"):
            check_writable(path)
    with pytest.raises(GoodnetError, match="not a regular file"):
        save_model(fifo, build_model(SPEC), ModelCard(spec=SPEC))
    for out in (fifo, Path("/dev/null")):
        err = one_line_error(["import", str(model), "--out", str(out)], capsys)
        assert "not a regular file" in err
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ---------------------------------------------------------------- structured fuzzing

_MUTATIONS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2, 5000,
                                                                           10**6, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                              st.integers(), max_size=2),
    st.sampled_from(["small_cnn", "resnet20", "graph", "keras", "badnets", "white", "goodnet",
                     "channel"]),
    st.integers(1, 300).map(_deep),
)
_DELETE = object()


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (object keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _paths(inner, (*prefix, index))
    return found


def _mutate(body: dict, path: tuple, value: object) -> dict:
    body = json.loads(json.dumps(body))  # a copy (deepcopy recurses too deep for nested lists)
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_cards_raise_only_goodnet_errors(state, card_body, tmp_path, data):
    """Mutate one to three fields of a valid card (type, NaN, negative or huge numbers, a
    missing key, deep nesting) inside a real model file: loading it either works or raises
    GoodnetError; any other exception escapes and fails the test."""
    body = card_body
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(body)
        path = data.draw(st.sampled_from(paths))
        value = data.draw(st.one_of(_MUTATIONS, st.just(_DELETE)))
        body = _mutate(body, path, value)
    file = write_model(tmp_path / "m.safetensors", state, json.dumps(body, allow_nan=True))
    try:
        loaded = load_model(file)
    except GoodnetError as error:
        assert "\n" not in str(error)
        return
    json.loads(loaded.card.to_json())  # what loads can be saved again
    assert loaded.card.spec.input_shape == (1, 16, 16)
