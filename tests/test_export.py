"""ONNX export of a repaired model and a GoodNet: onnxruntime (a test-only dependency) gives the
same outputs as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from goodnet.artifacts import ModelCard, save_model
from goodnet.cli import main
from goodnet.detector import GoodNet
from goodnet.masking import MaskSet, masked
from goodnet.model_files import load_model
from goodnet.models import ModelSpec, build_model

ort = pytest.importorskip("onnxruntime")

SPEC = ModelSpec("resnet20", 10, 1, 28, 28, (0.5,), (0.25,))


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    original = build_model(SPEC, seed=0).eval()
    mask = torch.ones(64)
    mask[::3] = 0
    for semantics in ("channel", "keep-bias"):
        repaired = masked(original, MaskSet({"layer3.2.bn2": mask}, semantics))
        save_model(folder / f"repaired-{semantics}.safetensors", repaired, ModelCard(spec=SPEC))
    save_model(folder / "goodnet.safetensors", GoodNet(original, repaired), ModelCard(spec=SPEC))
    return folder


@pytest.mark.parametrize("name", ["repaired-channel", "repaired-keep-bias", "goodnet"])
def test_onnxruntime_matches_pytorch(files, name, capsys):
    source = files / f"{name}.safetensors"
    out = files / f"{name}.onnx"
    assert main(["export", str(source), "--out", str(out)]) == 0
    assert "input 'image'" in capsys.readouterr().out
    model = load_model(source).model
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # batch is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_onnx(out, x)
    assert got.shape == expected.shape == (7, 11 if name == "goodnet" else 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_a_goodnet_that_disagrees_exports_its_reject_class(files):
    """Two unrelated networks disagree on most inputs: the exported GoodNet answers 10 there."""
    goodnet = GoodNet(build_model(SPEC, seed=0), build_model(SPEC, seed=1))
    save_model(files / "disagree.safetensors", goodnet, ModelCard(spec=SPEC))
    assert main(["export", str(files / "disagree.safetensors"),
                 "--out", str(files / "disagree.onnx")]) == 0
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    answers = run_onnx(files / "disagree.onnx", x).argmax(1)
    with torch.no_grad():
        assert answers.tolist() == goodnet(x).argmax(1).tolist()
    assert (answers == 10).any()


def test_an_unwritable_export_leaves_nothing(files, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", str(files / "goodnet.safetensors"),
                 "--out", str(blocker / "m.onnx")]) != 0
    assert "cannot write" in capsys.readouterr().err


def test_a_goodnet_with_detectors_exports_them_for_any_batch_size(backdoored, tmp_path):
    """STRIP, SCALE-UP, TeCo and Mahalanobis are plain tensor operations: the exported GoodNet
    answers as PyTorch does, and scores a batch larger than the example the graph was traced
    with (2) and than STRIP's chunk, so no input is dropped."""
    from goodnet.data import split_clean
    from goodnet.detector import calibrated
    from goodnet.models import spec_for_data
    from tests.conftest import stripes

    model, clean, test, _ = backdoored
    calibration, _ = split_clean(stripes(600, seed=11), 200, seed=0)
    goodnet = calibrated(model, model, {"strip": {"overlays": 100}, "scale-up": {}, "teco": {},
                                        "mahalanobis": {}}, clean, calibration, 0.1)
    spec = spec_for_data("small_cnn", stripes(800, seed=0))
    save_model(tmp_path / "g.safetensors", goodnet, ModelCard(spec=spec))
    assert main(["export", str(tmp_path / "g.safetensors"), "--out",
                 str(tmp_path / "g.onnx")]) == 0
    x, _ = test.get(torch.arange(40))  # STRIP's chunk at 100 overlays is 20 inputs
    with torch.no_grad():
        expected = goodnet(x)
    got = run_onnx(tmp_path / "g.onnx", x)
    assert got.shape == (40, 5)
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    assert np.allclose(got, expected.numpy(), atol=1e-4)
