"""The CSAW-HackML lab end to end on its own file formats: the real BadNet weight files (Keras
``.h5``, weights only) with small data files in the lab's HDF5 layout, since the YouTube Faces
data are not available here. The clean labels are the BadNet's own answers, so the BadNet is
100 % accurate on them and every drop is the pruning's."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from goodnet.cli import main
from goodnet.importers.keras import import_keras
from tests.conftest import requires_shared

CSAW = ["lab3_bd_weights.h5", "sunglasses_bd_weights.h5",
        "multi_trigger_multi_target_bd_weights.h5", "anonymous_1_bd_weights.h5",
        "anonymous_2_bd_weights.h5"]


def faces(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour images, 3×55×47 in [0, 1], whole-valued in 0..255."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 5, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(55, 47), mode="bilinear")
    return (images * 255).round() / 255


def write_csaw(path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The lab's layout: ``data`` (N, 3, 55, 47) as whole-valued floats 0..255, ``label``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=(images * 255).numpy().astype(np.float64))
        f.create_dataset("label", data=labels.numpy().astype(np.float64))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    weights = requires_shared("csaw-hackml", "lab3_bd_weights.h5")
    folder = tmp_path_factory.mktemp("csaw")
    model = import_keras(weights, arch="deepid").model
    for name, n, seed in (("valid", 96, 0), ("test", 48, 1)):
        images = faces(n, seed)
        with torch.no_grad():
            labels = model(images).argmax(1)
        write_csaw(folder / f"{name}.h5", images, labels)
    poisoned = faces(32, 2)
    poisoned[:, :, 20:26, 8:39] = 0.0  # a dark band across the eyes, labelled with target 0
    write_csaw(folder / "bd_test.h5", poisoned, torch.zeros(32, dtype=torch.long))
    return weights, folder


def test_the_lab_runs_end_to_end_on_its_own_formats(lab, capsys):
    weights, folder = lab
    out = folder / "repaired"
    assert main(["--no-progress", "repair", str(weights), "--arch", "deepid",
                 "--clean", str(folder / "valid.h5"), "--test", str(folder / "test.h5"),
                 "--poisoned", str(folder / "bd_test.h5"), "--defense", "prune",
                 "--layer", "conv_3", "--rank-layer", "pool_3", "--semantics", "keep-bias",
                 "-p", "rule=lab", "--max-drop", "0.02,0.04,0.10,0.30",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "repair.json").read_text())
    assert summary["before"]["clean_accuracy"] == 1.0  # the labels are its own answers
    assert summary["before"]["n_poisoned"] == 32
    assert set(summary["variants"]) == {"0.02", "0.04", "0.1", "0.3"}
    pruned = summary["notes"]["pruned"]
    assert pruned["0.02"] <= pruned["0.04"] <= pruned["0.1"] <= pruned["0.3"] <= 60
    for x in summary["variants"]:
        assert (out / f"repaired-{x}.safetensors").exists()
        assert (out / f"goodnet-{x}.safetensors").exists()
    capsys.readouterr()

    # eval takes the lab's clean and poisoned test files
    assert main(["eval", str(out / "goodnet-0.1.safetensors"), "--data",
                 str(folder / "test.h5"), "--poisoned", str(folder / "bd_test.h5"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_clean"] == 48 and report["n_poisoned"] == 32
    assert report["clean_accuracy"] == summary["goodnets"]["0.1"]["clean_accuracy"]
    assert report["detection_rate"] == summary["goodnets"]["0.1"]["detection_rate"]

    # predict prints a class in [0, 1283] per image
    from PIL import Image

    paths = []
    for i, image in enumerate(faces(3, 5)):
        path = folder / f"face{i}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    assert main(["predict", str(out / "goodnet-0.1.safetensors"), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert all(0 <= int(line.split("\t")[1]) <= 1283 for line in lines)


def test_the_lab_model_imports_into_a_goodnet_file(lab, tmp_path, capsys):
    weights, _ = lab
    assert main(["import", str(weights), "--arch", "deepid", "--out",
                 str(tmp_path / "bd.safetensors")]) == 0
    assert "deepid (1283 classes, input 3×55×47, pixels ×255)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "bd.safetensors")]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["spec"]["pixel_scale"] == 255.0
    assert card["notes"]["source"]["file"] == "lab3_bd_weights.h5"


@pytest.mark.parametrize("name", CSAW)
def test_clp_runs_data_free_on_the_real_badnets(name, tmp_path, capsys):
    weights = requires_shared("csaw-hackml", name)
    out = tmp_path / "clp"
    assert main(["--no-progress", "repair", str(weights), "--arch", "deepid",
                 "--defense", "clp", "--out", str(out)]) == 0
    summary = json.loads((out / "repair.json").read_text())
    assert summary["chosen"] == "u=3"
    assert set(summary["notes"]["layers"]) == {"conv_1", "conv_2", "conv_3", "conv_4"}
    assert (out / "repaired-u=3.safetensors").exists()
    # The u sweep is reported: a smaller u never prunes less, and u = 0 prunes the channels
    # above their layer's mean.
    curve = [line.split(",") for line in (out / "curve.csv").read_text().splitlines()]
    header = curve[0]
    rows = [dict(zip(header, row, strict=True)) for row in curve[1:]]
    by_u = sorted((float(r["u"]), int(r["pruned"])) for r in rows)
    assert [p for _, p in by_u] == sorted((p for _, p in by_u), reverse=True)
    assert by_u[0][1] > 0
    assert dict(by_u)[3.0] == summary["notes"]["pruned_count"]
    assert "no data" in capsys.readouterr().out


def test_a_defense_that_needs_data_says_so(tmp_path, capsys):
    weights = requires_shared("csaw-hackml", "lab3_bd_weights.h5")
    assert main(["repair", str(weights), "--arch", "deepid", "--defense", "prune",
                 "--out", str(tmp_path / "x")]) != 0
    assert "prune needs clean data: give --clean" in capsys.readouterr().err
