"""Untrusted model files and bad input: nothing a file carries is run, every refusal is one line
naming the file and the problem, and nothing half-written is left behind.

The malicious files are made here, by the tests: each would create a marker file if any of its
code ran, and each test asserts the marker does not exist.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goodnet.artifacts import ModelCard, load_model, save_model
from goodnet.cli import main
from goodnet.errors import GoodnetError
from goodnet.importers.checkpoint import import_checkpoint, read_checkpoint
from goodnet.importers.keras import import_keras
from goodnet.models import ModelSpec, build_model

SPEC = ModelSpec("small_cnn", 4, 1, 16, 16, (0.0,), (1.0,))
FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _payload(kind: str, marker: Path):
    """An object whose unpickling would create ``marker`` (by three different routes)."""

    class Evil:
        def __reduce__(self):
            if kind == "os.system":
                return (os.system, (f"touch {marker}",))
            if kind == "exec":
                return (exec, (f"open({str(marker)!r}, 'w').close()",))
            return (open, (str(marker), "w"))

    return Evil()


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, "the command should have failed"
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- the malicious corpus


@pytest.mark.parametrize("kind", ["os.system", "exec", "open"])
def test_a_checkpoint_that_runs_code_is_refused_and_nothing_runs(kind, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(2, 1, 3, 3), "hook": _payload(kind, marker)}, path)
    with pytest.raises(GoodnetError, match=r"refused: its pickle names .* could run code"):
        read_checkpoint(path)
    err = one_line_error(["import", str(path), "--arch", "small_cnn", "--out",
                          str(tmp_path / "out.safetensors")], capsys)
    assert "evil.pt: refused" in err
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["os.system", "open"])
def test_a_bare_pickle_or_legacy_checkpoint_is_refused_unread(kind, tmp_path):
    marker = tmp_path / "pwned"
    bare = tmp_path / "model.pth"
    bare.write_bytes(pickle.dumps(_payload(kind, marker), protocol=2))
    with pytest.raises(GoodnetError, match="legacy"):
        read_checkpoint(bare)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(GoodnetError, match="legacy"):
        read_checkpoint(legacy)
    assert not marker.exists()


def test_a_pickle_dressed_as_any_model_format_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_payload("open", marker))
    for name in ("model.safetensors", "model.h5", "model.pt", "model.npz"):
        (tmp_path / name).write_bytes(blob)
        err = one_line_error(["info", str(tmp_path / name), "--arch", "small_cnn"], capsys)
        assert name in err
    assert not marker.exists()


def test_a_checkpoint_that_would_inflate_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", pickle.dumps({}))
        archive.writestr("bomb/data/0", b"\0" * (64 * 2**20))  # 64 MiB of zeros, ~64 KiB
    with pytest.raises(GoodnetError, match="refused before allocating"):
        read_checkpoint(path)


def test_a_zip_that_is_no_checkpoint_is_named_so(tmp_path):
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(GoodnetError, match="not a PyTorch checkpoint"):
        read_checkpoint(path)


# ---------------------------------------------------------------- genuine checkpoints


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return build_model(SPEC, seed=3).eval()


def test_a_state_dict_checkpoint_imports_exactly(net, tmp_path, capsys):
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")}
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "net.pt"
    torch.save(wrapped, path)
    loaded = import_checkpoint(path, arch="small_cnn", input_shape=(1, 16, 16))
    x = torch.rand(5, 1, 16, 16)
    assert torch.equal(loaded.model(x), net(x))
    assert loaded.card.spec.num_classes == 4 and loaded.card.notes["source"]["format"] == "pytorch"
    out = tmp_path / "net.safetensors"
    assert main(["import", str(path), "--arch", "small_cnn", "--input-shape", "1,16,16",
                 "--out", str(out)]) == 0
    assert torch.equal(load_model(out).model(x), net(x))
    assert "imported" in capsys.readouterr().out


@pytest.mark.parametrize(("change", "message"), [
    ("nan", "NaN or infinite"),
    ("missing", "does not fit small_cnn \\(missing"),
    ("shape", "has shape"),
    ("not-tensors", "not a named tensor"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(net, tmp_path, change, message):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if change == "nan":
        state["fc2.weight"][0, 0] = float("nan")
    elif change == "missing":
        del state["conv1.weight"]
    elif change == "shape":
        state["fc2.bias"] = torch.zeros(7)
    else:
        state["note"] = "hello"
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(GoodnetError, match=message):
        import_checkpoint(path, arch="small_cnn", input_shape=(1, 16, 16))


def test_a_checkpoint_needs_its_architecture_named(net, tmp_path, capsys):
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    err = one_line_error(["info", str(path)], capsys)
    assert "name the architecture to load it onto with --arch" in err


# ---------------------------------------------------------------- random and damaged bytes


def _mutated(base: bytes) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, max(0, len(base) - 1)), st.integers(0, 255)),
                     max_size=12)
    cut = st.integers(0, len(base))

    def apply(args: tuple) -> bytes:
        changes, length = args
        data = bytearray(base)
        for position, value in changes:
            data[position] = value
        return bytes(data[:length])

    return st.one_of(st.binary(max_size=512), st.tuples(edits, cut).map(apply))


def _model_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("fuzz")
    path = save_model(folder / "m.safetensors", build_model(SPEC), ModelCard(spec=SPEC))
    return path.read_bytes()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    return _model_file(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint_bytes(net):
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keras_bytes(tmp_path_factory):
    """A small Keras-layout weights file, written with h5py."""
    path = tmp_path_factory.mktemp("keras") / "w.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"conv", b"dense"]
        for name, arrays in (("conv", {"kernel:0": np.ones((3, 3, 1, 2), np.float32),
                                       "bias:0": np.zeros(2, np.float32)}),
                             ("dense", {"kernel:0": np.ones((8, 3), np.float32),
                                        "bias:0": np.zeros(3, np.float32)})):
            group = handle.create_group(name)
            group.attrs["weight_names"] = [f"{name}/{k}".encode() for k in arrays]
            inner = group.create_group(name)
            for key, value in arrays.items():
                inner.create_dataset(key, data=value)
    return path.read_bytes()


def _only_goodnet_errors(load, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    # GoodnetError is the one error a user may see; any other exception escapes and fails.
    with contextlib.suppress(GoodnetError):
        load(path)


@FUZZ
@given(data=st.data())
def test_damaged_model_files_raise_only_goodnet_errors(model_bytes, tmp_path, data):
    _only_goodnet_errors(load_model, tmp_path / "m.safetensors",
                         data.draw(_mutated(model_bytes)))


@FUZZ
@given(data=st.data())
def test_damaged_checkpoints_raise_only_goodnet_errors(checkpoint_bytes, tmp_path, data):
    _only_goodnet_errors(read_checkpoint, tmp_path / "c.pt",
                         data.draw(_mutated(checkpoint_bytes)))


@FUZZ
@given(data=st.data())
def test_damaged_keras_files_raise_only_goodnet_errors(keras_bytes, tmp_path, data):
    _only_goodnet_errors(lambda p: import_keras(p, arch="small_cnn"), tmp_path / "k.h5",
                         data.draw(_mutated(keras_bytes)))


# ---------------------------------------------------------------- a kill mid-write


WRITER = """
import sys, torch
from goodnet.artifacts import ModelCard, save_model
from goodnet.models import ModelSpec, build_model
spec = ModelSpec("resnet20", 10, 3, 32, 32, (0.0,) * 3, (1.0,) * 3)
model = build_model(spec, seed=int(sys.argv[2]))
print("ready", flush=True)
while True:
    save_model(sys.argv[1], model, ModelCard(spec=spec))
"""


def test_a_kill_mid_write_leaves_the_previous_file_intact(tmp_path):
    """SIGKILL a process that keeps rewriting a model file, at several moments: the file always
    loads, whole, as one of the two versions; the only debris is the killed writer's temporary
    file (at most one per kill), never a torn model."""
    path = tmp_path / "model.safetensors"
    spec = ModelSpec("resnet20", 10, 3, 32, 32, (0.0,) * 3, (1.0,) * 3)
    save_model(path, build_model(spec, seed=0), ModelCard(spec=spec))
    versions = {seed: build_model(spec, seed=seed).state_dict()["fc.weight"] for seed in (0, 1)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (0.05, 0.2, 0.4):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "1"], env=env,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        weight = load_model(path).model.state_dict()["fc.weight"]
        assert any(torch.equal(weight, v) for v in versions.values())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.safetensors"]
    assert len(leftovers) <= 3  # at most one temporary per kill, never a torn model.safetensors


# ---------------------------------------------------------------- bad input, one line each


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 4-class model for 1×16×16 images, and data files that are wrong in one way each."""
    from tests.conftest import stripes

    folder = tmp_path_factory.mktemp("bad")
    model = save_model(folder / "m.safetensors", build_model(SPEC), ModelCard(spec=SPEC))
    good = stripes(64, seed=0)
    x, y = good.images.numpy(), good.labels.numpy()
    arrays = {
        "good": (x, y),
        "ten_classes": (x, np.arange(64) % 10),
        "negative_label": (x, np.where(np.arange(64) == 5, -1, y)),
        "empty": (x[:0], y[:0]),
        "one_class": (x, np.full_like(y, 3)),
        "wrong_shape": (np.zeros((8, 1, 28, 28), np.uint8), y[:8]),
    }
    paths = {}
    for name, (images, labels) in arrays.items():
        paths[name] = folder / f"{name}.npz"
        np.savez(paths[name], x=images, y=labels)
    nan = folder / "nan.safetensors"
    broken = build_model(SPEC)
    with torch.no_grad():
        broken.fc2.weight[0, 0] = float("inf")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in broken.state_dict().items()}, str(nan),
              metadata={"goodnet.card": ModelCard(spec=SPEC).to_json()})
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return {"model": model, "nan": nan, "truncated": truncated, **paths}


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "{model}", "--data", "{ten_classes}"], "labels must lie in [0, 3]"),
    (["eval", "{model}", "--data", "{negative_label}"], "negative_label.npz"),
    (["eval", "{model}", "--data", "{empty}"], "empty.npz"),
    (["eval", "{model}", "--data", "{wrong_shape}"], "takes 1×16×16"),
    (["eval", "{nan}", "--data", "{good}"], "NaN or infinite"),
    (["eval", "{truncated}", "--data", "{good}"], "truncated.safetensors"),
    (["repair", "{model}", "--clean", "{one_class}", "--out", "{out}"], "single class"),
    (["repair", "{model}", "--defense", "prune", "--clean", "{good}", "--layer", "nope",
      "--out", "{out}"], "nope"),
    (["attack", "--data", "{good}", "--test", "{good}", "-p", "target=4", "--out",
      "{out}/m.safetensors"], "out of range"),
    (["repair", "{model}", "--clean", "{good}", "--out", "{model}/sub"], "cannot write"),
])
def test_bad_input_is_one_line_naming_the_problem_and_writes_nothing(files, tmp_path, capsys,
                                                                      argv, message):
    out = tmp_path / "out"
    argv = [a.format(out=out, **files) for a in argv]
    err = one_line_error(["--no-progress", *argv], capsys)
    assert message in err, err
    assert not out.exists() or not any(out.iterdir())
