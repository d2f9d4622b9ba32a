"""The importers' registry (``goodnet.importers.IMPORTERS``) and the files it leaves behind.

Each importer knows its own sample file and no other; :func:`import_model` picks the importer
the file and the options call for; Keras, ONNX and own-class imports are stored as the
``graph`` architecture and come back equal; a file whose card says ``keras`` (the name before
issue 28) still loads; and the storage layer imports nothing from the GoodNet above it.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import goodnet.artifacts
from goodnet.artifacts import ModelCard, read_card, save_model
from goodnet.cli import main
from goodnet.detector import GoodNet
from goodnet.errors import GoodnetError
from goodnet.importers import IMPORTERS, ImportOptions, find_importer, import_model, is_foreign
from goodnet.model_files import load_model
from goodnet.models import GRAPH, ModelSpec, build_model, is_graph
from tests.keras_files import small_functional, write_keras2

TINY = "tests.test_importers:TinyNet"
# The sample file each importer reads: your own class's weights are a checkpoint too.
SAMPLE_OF = {"keras": "keras", "onnx": "onnx", "checkpoint": "checkpoint",
             "own_class": "checkpoint"}
SPEC = ModelSpec("small_cnn", 3, 1, 6, 6, (0.0,), (1.0,))


class TinyNet(nn.Module):
    """A network of "your own class" (``--arch tests.test_importers:TinyNet``) on 1×6×6."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Path]:
    """One file of each format: a Keras full model, an ONNX file and a checkpoint (of
    :class:`TinyNet`), and a goodnet model file, which no importer reads."""
    folder = tmp_path_factory.mktemp("samples")
    net = TinyNet().eval()
    torch.save(net.state_dict(), folder / "tiny.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 1, 6, 6),), str(folder / "tiny.onnx"),
                          dynamo=False, input_names=["x"])
    return {"keras": write_keras2(folder / "model.h5", *small_functional()),
            "onnx": folder / "tiny.onnx", "checkpoint": folder / "tiny.pt",
            "goodnet": save_model(folder / "model.safetensors", build_model(SPEC),
                                  ModelCard(spec=SPEC))}


@pytest.mark.parametrize("name", list(IMPORTERS))
def test_each_importer_sniffs_its_own_sample_and_no_other(name, samples):
    sniffed = {sample for sample, path in samples.items() if IMPORTERS[name].sniff(path)}
    assert sniffed == {SAMPLE_OF[name]}


@pytest.mark.parametrize(("sample", "options", "expected"), [
    ("keras", ImportOptions(), "keras"),
    ("keras", ImportOptions(arch="deepid"), "keras"),
    ("onnx", ImportOptions(input_shape=(1, 6, 6)), "onnx"),
    ("checkpoint", ImportOptions(), "checkpoint"),
    ("checkpoint", ImportOptions(arch="small_cnn"), "checkpoint"),
    ("checkpoint", ImportOptions(arch=TINY, arch_args={"classes": 3}), "own_class"),
    ("goodnet", ImportOptions(), None),
])
def test_the_file_and_the_options_pick_the_importer(samples, sample, options, expected):
    assert find_importer(samples[sample], options) == expected
    assert is_foreign(samples[sample]) == (expected is not None)


def test_a_goodnet_file_is_no_import_and_arch_args_need_a_class(samples):
    with pytest.raises(GoodnetError, match="not a model file of a format goodnet imports"):
        import_model(samples["goodnet"])
    with pytest.raises(GoodnetError, match=r"use it with --arch package\.module:Class"):
        ImportOptions(arch="small_cnn", arch_args={"classes": 3})


@pytest.mark.parametrize(("sample", "options", "said"), [
    ("keras", ImportOptions(pixel_scale=1.0), "a Keras graph"),
    ("onnx", ImportOptions(), "an ONNX graph"),
    ("checkpoint", ImportOptions(arch=TINY, input_shape=(1, 6, 6)),
     f"a traced PyTorch network ({TINY})"),
])
def test_a_graph_import_round_trips_as_graph(samples, sample, options, said, tmp_path, capsys):
    """Imported, saved and loaded back (the library's way and the command line's), a layer
    graph is architecture ``graph`` and gives the outputs it gave when imported."""
    if sample != "keras":
        pytest.importorskip("onnx")
    imported = import_model(samples[sample], options)
    path = save_model(tmp_path / "m.safetensors", imported.model, imported.card)
    loaded = load_model(path)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), imported.model(x))
    assert loaded.card.spec.arch == GRAPH == read_card(path).spec.arch
    argv = ["import", str(samples[sample]), "--out", str(tmp_path / "cli.safetensors")]
    if options.arch:
        argv += ["--arch", options.arch, "--input-shape", "1,6,6"]
    assert main([*argv, "--pixel-scale", "1"]) == 0
    assert f" as {said} (3 classes" in capsys.readouterr().out
    assert read_card(tmp_path / "cli.safetensors").spec.arch == GRAPH


def test_a_card_that_says_keras_still_loads(samples, tmp_path, capsys):
    """A file written before issue 28 names the layer graph ``keras``: it loads, runs and
    keeps its card as written."""
    imported = import_model(samples["keras"], ImportOptions(pixel_scale=1.0))
    spec = dataclasses.replace(imported.card.spec, arch="keras")
    path = save_model(tmp_path / "old.safetensors", imported.model,
                      dataclasses.replace(imported.card, spec=spec))
    loaded = load_model(path)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), imported.model(x))
    assert loaded.card.spec.arch == "keras" and is_graph(loaded.card.spec.arch)
    assert main(["info", str(path)]) == 0
    assert '"arch": "keras"' in capsys.readouterr().out


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at the top or inside a function
    (``from a import b`` names both ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_storage_layer_imports_nothing_from_the_goodnet():
    """``goodnet.artifacts`` saves and loads GoodNet files without importing the GoodNet, its
    detectors or the loader above it (:mod:`goodnet.model_files`)."""
    above = ("goodnet.detector", "goodnet.detectors", "goodnet.model_files")
    imported = _imported_modules(Path(goodnet.artifacts.__file__))
    assert "goodnet.models" in imported  # the walk sees the imports that are there
    assert not {name for name in imported if name.startswith(above)}


def test_the_storage_layers_loader_reads_plain_models_only(tmp_path):
    path = save_model(tmp_path / "g.safetensors", GoodNet(build_model(SPEC), build_model(SPEC)),
                      ModelCard(spec=SPEC))
    with pytest.raises(GoodnetError, match=r"goodnet file .*read it with goodnet\.load_model"):
        goodnet.artifacts.load_model(path)
    assert isinstance(load_model(path).model, GoodNet)
