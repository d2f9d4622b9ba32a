"""The command line: end to end on tiny files, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from goodnet.cli import main
from goodnet.masking import Masked
from goodnet.model_files import load_model
from tests.conftest import stripes


@pytest.fixture(scope="module")
def trained(npz_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "bd.safetensors"
    train, test = npz_pair
    code = main(["--no-progress", "attack", "--data", str(train), "--test", str(test),
                 "-p", "target=1", "-p", "poison_rate=0.1", "--epochs", "3",
                 "--batch-size", "64", "--hold-out", "200", "--out", str(out)])
    assert code == 0
    return out


def test_attack_writes_a_backdoored_model(trained, capsys):
    assert trained.exists()
    assert main(["info", str(trained)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["attack"]["name"] == "badnets" and card["attack"]["config"]["target"] == 1
    assert card["metrics"]["clean_accuracy"] >= 0.95
    assert card["metrics"]["attack_success_rate"] >= 0.9


def test_eval_uses_the_attack_of_the_card(trained, npz_pair, capsys):
    assert main(["eval", str(trained), "--data", str(npz_pair[1]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_clean"] == 200 and report["n_poisoned"] == 150
    assert report["attack_success_rate"] >= 0.9
    # Against another trigger placement, the backdoor does not fire.
    assert main(["eval", str(trained), "--data", str(npz_pair[1]), "--json",
                 "--attack", "badnets", "-p", "target=1", "-p", "margin=6"]) == 0
    assert json.loads(capsys.readouterr().out)["attack_success_rate"] < 0.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attack", "--data", "nowhere.npz", "--test", "x.npz", "--out", "m.safetensors"],
         "nowhere.npz"),
        (["eval", "absent.safetensors"], "absent.safetensors: no such file"),
        (["attack", "--attack", "nope", "--out", "m.safetensors"], "unknown attack"),
        (["attack", "-p", "target", "--out", "m.safetensors"], "key=value"),
        (["attack", "-p", "target=x", "--out", "m.safetensors"], "'x' is not an integer"),
        (["attack", "-p", "target=99", "--out", "m.safetensors"], "out of range"),
        (["attack", "--arch", "resnet9000", "--out", "m.safetensors"], "unknown architecture"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, message, capsys, tmp_path, monkeypatch,
                                           npz_pair):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "attack" and "--data" not in argv:
        argv = [*argv, "--data", str(npz_pair[0]), "--test", str(npz_pair[1])]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_unwritable_output_fails_before_training(npz_pair, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    code = main(["attack", "--data", str(npz_pair[0]), "--test", str(npz_pair[1]),
                 "--out", str(blocker / "m.safetensors")])
    assert code != 0
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["attack"], ["train"]])
def test_unwritable_output_fails_before_the_data_is_read(command, tmp_path, capsys):
    """The --out error comes first, even when reading the data would fail (or take long)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert main([*command, "--data", str(tmp_path / "missing.npz"), "--test",
                 str(tmp_path / "missing-too.npz"), "--out", str(blocker / "m.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "blocker" in err[0], err


def test_eval_refuses_data_of_the_wrong_shape(trained, tmp_path, capsys):
    odd = tmp_path / "odd.npz"
    np.savez(odd, x=np.zeros((4, 1, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    assert main(["eval", str(trained), "--data", str(odd)]) != 0
    assert "but the model (small_cnn) takes 1×16×16" in capsys.readouterr().err


def test_usage_error_is_one_line():
    run = subprocess.run([sys.executable, "-m", "goodnet", "attack", "--epochs", "many"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "invalid int value" in run.stderr


def test_list_names_every_registry_entry(capsys):
    from goodnet import ATTACKS, DATASETS, DEFENSES, MODELS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*ATTACKS, *DATASETS, *MODELS, *DEFENSES])
    from goodnet.detectors import DETECTORS

    detectors = out[out.index("input detectors"):]
    assert all(f"  {name} " in detectors for name in DETECTORS)
    from goodnet.defenses import DEFAULT_DEFENSE

    assert f"recommended repair (goodnet repair without --defense): {DEFAULT_DEFENSE[0]}" in out


def test_repair_writes_models_goodnets_curve_and_plot(trained, npz_pair, tmp_path, capsys):
    out = tmp_path / "repair"
    assert main(["--no-progress", "repair", str(trained), "--defense", "prune",
                 "--clean", str(npz_pair[0]),
                 "--test", str(npz_pair[1]), "--max-drop", "0.05,0.2", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    # The old spelling of --max-drops still works, with a one-line warning.
    assert err.startswith("goodnet: warning: --max-drop with several budgets is now "
                          "--max-drops") and err.count("\n") == 1, err
    assert "GoodNet 0.05" in printed and "false alarm" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curve.csv", "curve.png", "goodnet-0.05.safetensors",
                     "goodnet-0.2.safetensors", "repair.json", "repaired-0.05.safetensors",
                     "repaired-0.2.safetensors"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "repair.json").read_text())
    assert summary["defense"] == "prune" and set(summary["goodnets"]) == {"0.05", "0.2"}
    assert summary["variants"]["0.2"]["clean_accuracy"] >= summary["before"][
        "clean_accuracy"] - 0.25
    header = (out / "curve.csv").read_text().splitlines()[0]
    assert "clean_data_accuracy" in header and "test_asr" in header
    # A GoodNet file evaluates with its detection figures, as repair reported them.
    assert main(["eval", str(out / "goodnet-0.2.safetensors"), "--data", str(npz_pair[1]),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["detection_rate"] == summary["goodnets"]["0.2"]["detection_rate"]


@pytest.fixture(scope="module")
def pruned_repair(trained, npz_pair, tmp_path_factory):
    """The folder a prune repair of ``trained`` wrote."""
    folder = tmp_path_factory.mktemp("pruned")
    clean = stripes(120, seed=3)
    np.savez(folder / "clean.npz", x=clean.images.numpy(), y=clean.labels.numpy())
    out = folder / "repair"
    assert main(["--no-progress", "repair", str(trained), "--defense", "prune",
                 "--clean", str(folder / "clean.npz"),
                 "--max-drop", "0.2", "--curve-limit", "0", "--out", str(out)]) == 0
    return out


def test_repair_json_records_the_channels_the_saved_model_prunes(pruned_repair):
    summary = json.loads((pruned_repair / "repair.json").read_text())
    model = load_model(pruned_repair / f"repaired-{summary['chosen']}.safetensors").model
    assert isinstance(model, Masked)
    zeros = {name: torch.nonzero(mask == 0).flatten().tolist()
             for name, mask in model.masks.masks.items() if (mask == 0).any()}
    assert zeros and summary["pruned"] == zeros
    assert summary["pruned_count"] == sum(len(v) for v in zeros.values())


def test_data_free_clp_repairs_a_repaired_model(pruned_repair, tmp_path, capsys):
    # The input shape is the wrapped network's: a masked model has none of its own.
    summary = json.loads((pruned_repair / "repair.json").read_text())
    repaired = pruned_repair / f"repaired-{summary['chosen']}.safetensors"
    out = tmp_path / "clp"
    assert main(["--no-progress", "repair", str(repaired), "--defense", "clp", "-p", "u=1",
                 "--out", str(out)]) == 0
    assert "no data" in capsys.readouterr().out
    again = json.loads((out / "repair.json").read_text())
    assert again["defense"] == "clp"
    assert again["pruned_count"] == sum(len(v) for v in again["pruned"].values()) > 0


@pytest.mark.parametrize(("defense", "settings", "variant"), [
    ("clp", ["-p", "u=2.5"], "u=2.5"),
    ("rnp", ["-p", "unlearn_epochs=2", "-p", "mask_epochs=2", "-p", "clip_norm=5",
             "-p", "select=threshold", "-p", "thresholds=0.1,0.2"], "t=0.20"),
    ("anp", ["-p", "iterations=10", "-p", "select=count", "-p", "count=3"], "count=3"),
])
def test_repair_with_the_mask_defenses(trained, npz_pair, tmp_path, capsys, defense, settings,
                                       variant):
    out = tmp_path / defense
    assert main(["--no-progress", "repair", str(trained), "--defense", defense, *settings,
                 "--clean", str(npz_pair[0]), "--clean-amount", "200",
                 "--test", str(npz_pair[1]), "--out", str(out)]) == 0
    summary = json.loads((out / "repair.json").read_text())
    assert summary["defense"] == defense and summary["chosen"] == variant
    assert (out / f"repaired-{variant}.safetensors").exists()
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GoodNet" in capsys.readouterr().out


def test_prune_takes_its_old_setting_name_with_a_one_line_warning(trained, npz_pair, tmp_path,
                                                                  capsys):
    out = tmp_path / "old-name"
    assert main(["--no-progress", "repair", str(trained), "--defense", "prune",
                 "-p", "select=0.2",
                 "--max-drops", "0.05,0.2", "--clean", str(npz_pair[0]), "--curve-limit", "0",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("goodnet: warning: prune: setting 'select' is now called "
                          "'max_drop'") and err.count("\n") == 1, err
    summary = json.loads((out / "repair.json").read_text())
    assert summary["chosen"] == "0.2" and summary["settings"]["max_drop"] == 0.2
    assert summary["settings"]["select"] == "budget"


def test_repair_refuses_an_unknown_layer_before_writing(trained, npz_pair, tmp_path, capsys):
    out = tmp_path / "nothing"
    assert main(["repair", str(trained), "--defense", "prune",
                 "--clean", str(npz_pair[0]), "--layer", "conv9",
                 "--out", str(out)]) != 0
    assert "no layer 'conv9'" in capsys.readouterr().err
    assert not out.exists()


def test_predict_prints_a_class_per_image(trained, npz_pair, tmp_path, capsys):
    from PIL import Image

    from tests.conftest import stripes

    data = stripes(4, seed=3)
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(data.images[i, 0].numpy()).save(path)
        paths.append(str(path))
    assert main(["predict", str(trained), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    assert [int(line.split("\t")[1]) for line in lines] == data.labels.tolist()


def test_predict_refuses_an_image_of_the_wrong_size(trained, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("L", (20, 20)).save(path)
    assert main(["predict", str(trained), str(path)]) != 0
    assert "the image is 20×20 (W×H) but the model takes 16×16" in capsys.readouterr().err


def _poisoned_npz(path, label):
    """Test images with the card's trigger planted, every label ``label`` (the lab's layout)."""
    images = stripes(40, seed=2).images.clone()
    images[:, :, -4:-1, -4:-1] = 255
    np.savez(path, x=images.numpy(), y=np.full(40, label))
    return path


def test_eval_takes_the_class_count_of_a_path_from_the_model(trained, npz_pair, tmp_path,
                                                             capsys):
    # Every label is the target (1), as in bd_test.h5: the file alone implies two classes.
    poisoned = _poisoned_npz(tmp_path / "poisoned.npz", 1)
    assert main(["eval", str(trained), "--data", str(npz_pair[1]), "--poisoned", str(poisoned),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_poisoned"] == 150 + 40


def test_eval_refuses_labels_the_model_cannot_answer(trained, npz_pair, tmp_path, capsys):
    poisoned = _poisoned_npz(tmp_path / "poisoned.npz", 4)
    assert main(["eval", str(trained), "--data", str(npz_pair[1]), "--poisoned",
                 str(poisoned)]) != 0
    err = capsys.readouterr().err
    assert "poisoned.npz: labels must lie in [0, 3]" in err and err.count("\n") == 1


def test_repair_takes_the_class_count_of_each_path_from_the_model(trained, npz_pair, tmp_path,
                                                                  capsys):
    # Clean and test data without the last class, and a poisoned set of the target only.
    subsets, counts = {}, {}
    for name, path in (("clean", npz_pair[0]), ("test", npz_pair[1])):
        with np.load(path) as arrays:
            keep = arrays["y"] < 3
            subsets[name] = tmp_path / f"{name}.npz"
            np.savez(subsets[name], x=arrays["x"][keep], y=arrays["y"][keep])
            counts[name] = int(keep.sum())
    out = tmp_path / "repair"
    assert main(["--no-progress", "repair", str(trained), "--defense", "clp",
                 "--clean", str(subsets["clean"]), "--test", str(subsets["test"]),
                 "--poisoned", str(_poisoned_npz(tmp_path / "poisoned.npz", 1)),
                 "--curve-limit", "50", "--out", str(out)]) == 0
    assert f"{counts['clean']} clean images" in capsys.readouterr().out
    assert json.loads((out / "repair.json").read_text())["defense"] == "clp"


@pytest.mark.parametrize(("command", "registry"), [("repair", "DEFENSES"),
                                                   ("attack", "ATTACKS")])
def test_help_lists_every_method_with_one_line(command, registry, capsys):
    import goodnet

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for name, cls in getattr(goodnet, registry).items():
        line = next((line for line in out.splitlines() if line.split()[:1] == [name]), "")
        assert cls.__doc__.splitlines()[0] in line, f"{name} has no line of its own"


def test_the_help_s_method_names_come_from_the_registries(monkeypatch, capsys):
    """The data-free defenses, the default scanners and the detectors named in ``--help`` are
    read from the registries: a change there shows in the help."""
    import goodnet.scans as scans
    from goodnet.defenses import CLP, DEFENSES
    from goodnet.detectors import DETECTORS, ScaleUp

    class OtherFree(CLP):
        """Another data-free defense (a test's)."""

        name = "other-free"

    monkeypatch.setitem(DEFENSES, "other-free", OtherFree)
    monkeypatch.setitem(DETECTORS, "other-detector", ScaleUp)
    monkeypatch.setitem(scans.DEFAULT_SCANNERS, "data-free", "other-scanner")
    helps = {}
    for command in ("repair", "scan"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "not needed by the data-free clp, other-free" in helps["repair"]
    assert "teco, other-detector)" in helps["repair"]
    assert "default: nc with --clean, the data-free other-scanner without" in helps["scan"]


def test_predict_refuses_a_huge_image_header_in_one_line(trained, tmp_path, capsys, recwarn):
    from tests.data.conftest import ppm_header

    path = tmp_path / "huge.ppm"
    path.write_bytes(ppm_header(60000, 60000))
    assert main(["predict", str(trained), str(path)]) != 0
    err = capsys.readouterr().err
    assert "huge.ppm: the image has more pixels than goodnet decodes" in err
    assert err.count("\n") == 1 and not [w for w in recwarn if "pixels" in str(w.message)]


def test_a_reader_that_goes_away_is_no_internal_error():
    """``goodnet list | head -1``: the pipe closes before goodnet has written everything."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "goodnet", "list"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # before goodnet writes a byte
    err = child.stderr.read().decode()
    child.wait(timeout=60)
    assert child.returncode != 0
    assert "internal error" not in err and "Traceback" not in err and "Exception" not in err, err


# ---------------------------------------------------------------- goodnet finetune


def _weights_differ(first, second):
    return any(not torch.equal(tensor, second[name]) for name, tensor in first.items()
               if tensor.is_floating_point())


def test_finetune_trains_the_model_further_and_records_how(trained, npz_pair, tmp_path, capsys):
    out = tmp_path / "ft.safetensors"
    assert main(["--no-progress", "finetune", str(trained), "--clean", str(npz_pair[0]),
                 "--clean-amount", "200", "--epochs", "2", "--lr", "0.02", "--batch-size",
                 "32", "--seed", "3", "--out", str(out)]) == 0
    assert "fine-tuned" in capsys.readouterr().out
    before, after = load_model(trained), load_model(out)
    assert not isinstance(after.model, Masked)
    assert _weights_differ(before.model.state_dict(), after.model.state_dict())
    note = after.card.notes["finetune"]
    # the file the model trained on: the images it held out, which the new one has now seen
    assert note["data"] == "train.npz:held-out[200]" and note["size"] == 200
    assert "held_out" in before.card.training and "held_out" not in after.card.training
    assert {k: note["config"][k] for k in ("epochs", "lr", "batch_size", "seed", "momentum",
                                           "weight_decay", "schedule")} == {
        "epochs": 2, "lr": 0.02, "batch_size": 32, "seed": 3, "momentum": 0.9,
        "weight_decay": 5e-4, "schedule": "cosine"}
    # Without --test nothing measured describes the new weights; the attack is still known.
    assert before.card.metrics and after.card.metrics == {}
    assert after.card.attack == before.card.attack


def test_finetune_keeps_a_repaired_models_masks(pruned_repair, tmp_path):
    summary = json.loads((pruned_repair / "repair.json").read_text())
    repaired = pruned_repair / f"repaired-{summary['chosen']}.safetensors"
    out = tmp_path / "ft.safetensors"
    clean = pruned_repair.parent / "clean.npz"  # the repair's own clean data, 120 images
    assert main(["--no-progress", "finetune", str(repaired), "--clean", str(clean),
                 "--epochs", "1", "--out", str(out)]) == 0
    assert load_model(out).card.notes["finetune"]["size"] == 120
    before, after = load_model(repaired).model, load_model(out).model
    assert isinstance(before, Masked) and isinstance(after, Masked)
    assert after.masks.semantics == before.masks.semantics
    assert after.masks.masks.keys() == before.masks.masks.keys()
    assert all(torch.equal(after.masks.masks[name], mask)
               for name, mask in before.masks.masks.items())
    assert any((mask == 0).any() for mask in after.masks.masks.values())
    assert _weights_differ(before.model.state_dict(), after.model.state_dict())


def test_finetune_with_test_data_reports_before_and_after(trained, npz_pair, tmp_path, capsys):
    # "Clean" data labelled one class off: after fine-tuning on it, the model is mostly wrong,
    # so the figures before and after cannot be confused.
    with np.load(npz_pair[0]) as arrays:
        shifted = tmp_path / "shifted.npz"
        np.savez(shifted, x=arrays["x"], y=(arrays["y"] + 1) % 4)
    out = tmp_path / "ft.safetensors"
    assert main(["--no-progress", "finetune", str(trained), "--clean", str(shifted),
                 "--test", str(npz_pair[1]), "--epochs", "3", "--lr", "0.05",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in printed if line.strip().startswith("small_cnn vs badnets")]
    assert [row[3] for row in rows] == ["before", "after"]
    original = load_model(trained).card.metrics
    assert rows[0][4] == f"{100 * original['clean_accuracy']:.2f}"
    metrics = load_model(out).card.metrics
    assert rows[1][4] == f"{100 * metrics['clean_accuracy']:.2f}"
    assert original["clean_accuracy"] >= 0.95 and metrics["clean_accuracy"] < 0.5
    # The stored figures are the new model's own, as eval measures them.
    assert main(["eval", str(out), "--data", str(npz_pair[1]), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert metrics["clean_accuracy"] == measured["clean_accuracy"]
    assert metrics["attack_success_rate"] == measured["attack_success_rate"]
    assert metrics["n_poisoned"] == measured["n_poisoned"] == 150


def test_finetune_takes_an_imported_checkpoint(trained, npz_pair, tmp_path):
    state = {k: v for k, v in load_model(trained).model.state_dict().items()
             if not k.startswith("normalize.")}
    checkpoint = tmp_path / "net.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "ft.safetensors"
    assert main(["--no-progress", "finetune", str(checkpoint), "--arch", "small_cnn",
                 "--input-shape", "1,16,16", "--clean", str(npz_pair[0]), "--epochs", "1",
                 "--out", str(out)]) == 0
    card = load_model(out).card
    assert card.notes["source"]["format"] == "pytorch" and "finetune" in card.notes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "absent.safetensors"}, "absent.safetensors: no such file"),
        ({"--epochs": "0"}, "--epochs must be at least 1, got 0"),
        ({"--epochs": "-2"}, "--epochs must be at least 1, got -2"),
        ({"--lr": "0"}, "learning rate must be positive"),
        ({"--out": "blocker/m.safetensors"}, "cannot write"),
        ({"--clean": "odd.npz"}, "but the model (small_cnn) takes 1×16×16"),
        ({"--test": "odd.npz"}, "but the model (small_cnn) takes 1×16×16"),
        ({"--clean-amount": "some"}, "--clean-amount must be a fraction or a count"),
    ],
)
def test_finetune_refuses_bad_input_in_one_line_before_training(
        trained, npz_pair, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    # The package's ``goodnet.train`` is the function; patch the module's.
    monkeypatch.setattr(sys.modules["goodnet.train"], "train",
                        lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "blocker").write_text("a file, not a folder")
    np.savez(tmp_path / "odd.npz", x=np.zeros((4, 1, 28, 28), np.uint8),
             y=np.zeros(4, np.int64))
    options = {"--clean": "mnist", "--out": "m.safetensors", **change}
    if "--clean" not in change and "--clean-amount" not in change:
        options["--clean"] = str(npz_pair[0])
    argv = ["finetune", str(options.pop("model", trained))]
    for key, value in options.items():
        argv += [key, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("goodnet: error: ") and message in err, err
    assert err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] in (["blocker", "odd.npz"], ["odd.npz",
                                                                             "blocker"])


def test_finetune_refuses_a_goodnet(pruned_repair, npz_pair, tmp_path, capsys):
    goodnet_file = next(pruned_repair.glob("goodnet-*.safetensors"))
    out = tmp_path / "ft.safetensors"
    assert main(["finetune", str(goodnet_file), "--clean", str(npz_pair[0]),
                 "--out", str(out)]) == 2
    assert "is a GoodNet" in capsys.readouterr().err
    assert not out.exists()


def test_a_goodnet_models_own_state_dict_imports_with_its_normalisation(trained, tmp_path):
    """``torch.save(model.state_dict())`` of a goodnet model carries ``normalize.mean``/``std``;
    imported without --mean/--std they are the model's normalisation, and the file loads and
    answers as the original (before, the stored buffers disagreed with a 0/1 card and
    ``load_model`` refused the file)."""
    original = load_model(trained)
    assert not torch.all(original.model.normalize.mean == 0)  # a normalisation to carry
    checkpoint = tmp_path / "full.pt"
    torch.save(original.model.state_dict(), checkpoint)
    out = tmp_path / "imported.safetensors"
    assert main(["import", str(checkpoint), "--arch", "small_cnn", "--input-shape", "1,16,16",
                 "--out", str(out)]) == 0
    imported = load_model(out)
    assert imported.card.spec.mean == pytest.approx(original.card.spec.mean)  # float32 stored
    assert imported.card.spec.std == pytest.approx(original.card.spec.std)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(imported.model(x), original.model(x), atol=1e-6)
    # --mean/--std still say what the network was trained on, over what the file stores.
    other = tmp_path / "other.safetensors"
    assert main(["import", str(checkpoint), "--arch", "small_cnn", "--input-shape", "1,16,16",
                 "--mean", "0", "--std", "1", "--out", str(other)]) == 0
    assert load_model(other).card.spec.mean == (0.0,)


def test_repair_without_a_defense_runs_the_recommended_one(trained, npz_pair, tmp_path, capsys,
                                                           monkeypatch):
    """No --defense: the recommended repair, named in what is printed and recorded; -p settings
    go to it. (Patched to a quick recipe: which repair it is is BENCHMARKS.md's business.)"""
    import goodnet.defenses as defenses

    monkeypatch.setattr(defenses, "DEFAULT_DEFENSE", ("sequence", {"steps": ("prune", "fst")}))
    out = tmp_path / "recommended"
    assert main(["--no-progress", "repair", str(trained), "--clean", str(npz_pair[0]),
                 "--test", str(npz_pair[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the recommended repair (sequence prune, fst)" in printed
    summary = json.loads((out / "repair.json").read_text())
    assert summary["defense"] == "sequence" and summary["settings"]["steps"] == ["prune", "fst"]
    assert [s["defense"] for s in summary["notes"]["steps"]] == ["prune", "fst"]
    monkeypatch.setattr(defenses, "DEFAULT_DEFENSE", ("fst", {}))
    assert main(["--no-progress", "repair", str(trained), "--clean", str(npz_pair[0]),
                 "-p", "epochs=1", "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "repair.json").read_text())["settings"]["epochs"] == 1


def test_above_many_classes_the_recommended_repair_is_the_other_default(trained, npz_pair,
                                                                        tmp_path, capsys,
                                                                        monkeypatch):
    """fst-kd's settings fail on the lab's 1283-class network: above ``MANY_CLASSES`` the
    repair run without --defense is ``DEFAULT_DEFENSE_MANY_CLASSES``, decided by the model's
    number of classes (patched small here, and to a quick recipe)."""
    import goodnet.defenses as defenses

    monkeypatch.setattr(defenses, "DEFAULT_DEFENSE_MANY_CLASSES", ("prune", {"max_drop": 0.2}))
    for many, expected in ((100, "fst"), (2, "prune")):
        monkeypatch.setattr(defenses, "MANY_CLASSES", many)
        monkeypatch.setattr(defenses, "DEFAULT_DEFENSE", ("fst", {"epochs": 1}))
        out = tmp_path / f"many-{many}"
        assert main(["--no-progress", "repair", str(trained), "--clean", str(npz_pair[0]),
                     "--verdict", "none", "--out", str(out)]) == 0
        assert json.loads((out / "repair.json").read_text())["defense"] == expected
        printed = capsys.readouterr().out
        assert f"the recommended repair ({expected} -p " in printed


def test_a_defense_is_described_with_the_settings_it_changes():
    from goodnet.cli.options import describe_defense
    from goodnet.defenses import default_defense, make_defense, recommended

    assert describe_defense(make_defense("fst", {})) == "fst"
    assert describe_defense(make_defense("fst", {"distill": 4.0, "epochs": 3})) == \
        "fst -p epochs=3 -p distill=4.0"
    _, settings = default_defense()
    assert describe_defense(recommended()).split(" -p ")[1:] == \
        [f"{k}={v}" for k, v in settings.items() if k not in ("temperature", "recover_lr")]
    assert default_defense(1283) != default_defense(10)


def test_the_recommended_repair_is_a_registered_defense_with_valid_settings():
    from goodnet.defenses import DEFAULT_DEFENSE, DEFENSES, RECOMMENDED, recommended

    assert DEFAULT_DEFENSE[0] in DEFENSES
    assert recommended().name == DEFAULT_DEFENSE[0]
    assert RECOMMENDED is DEFAULT_DEFENSE  # its old name


def test_every_registry_s_default_is_registered():
    """Each registry package names its defaults beside its registry; the old names still
    import."""
    from goodnet import detector
    from goodnet.attacks import ATTACKS, DEFAULT_ATTACK
    from goodnet.data.dataset import ImageData
    from goodnet.detectors import DEFAULT_DETECTORS, DETECTORS
    from goodnet.scans import DEFAULT_SCANNERS, SCANNERS, default_scanner

    assert DEFAULT_ATTACK in ATTACKS
    assert set(DEFAULT_DETECTORS) <= set(DETECTORS) and DEFAULT_DETECTORS
    assert detector.DEFAULT_DETECTORS is DEFAULT_DETECTORS
    assert set(DEFAULT_SCANNERS) == {"with-clean", "data-free"}
    assert set(DEFAULT_SCANNERS.values()) <= set(SCANNERS)
    assert not SCANNERS[DEFAULT_SCANNERS["data-free"]].needs_clean
    clean = ImageData(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 2, "two images")
    assert default_scanner(clean) == DEFAULT_SCANNERS["with-clean"]
    assert default_scanner(None) == DEFAULT_SCANNERS["data-free"]


def test_repair_without_a_defense_or_clean_data_is_one_line(trained, tmp_path, capsys):
    assert main(["repair", str(trained), "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs clean data" in err
    assert not (tmp_path / "x").exists()


def test_repair_with_neural_cleanse_writes_its_triggers(trained, npz_pair, tmp_path, capsys):
    """NC's reversed triggers are part of its result: saved (no pickle) and drawn beside the
    repaired model, its verdict in repair.json."""
    from goodnet.triggers import load_triggers

    out = tmp_path / "nc"
    assert main(["--no-progress", "repair", str(trained), "--defense", "nc",
                 "-p", "unlearn_epochs=2", "--clean", str(npz_pair[0]),
                 "--clean-amount", "200", "--test", str(npz_pair[1]), "--out", str(out)]) == 0
    summary = json.loads((out / "repair.json").read_text())
    verdict = load_triggers(out / "triggers.safetensors")
    assert len(verdict.triggers) == 4 and summary["scan"]["scores"] == list(verdict.scores)
    # The target's reversed trigger is the smallest: the most anomalous class. (Whether its
    # index passes NC's threshold of 2 on this tiny 4-class task depends on the split.)
    assert max(range(4), key=lambda k: verdict.scores[k]) == 1
    assert summary["scan"]["targets"] == list(verdict.targets)
    assert verdict.triggers[1].mask.shape == (1, *verdict.triggers[1].pattern.shape[1:])
    assert (out / "triggers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repair_with_detectors_writes_a_calibrated_goodnet(trained, npz_pair, tmp_path, capsys):
    """``--detect strip,disagree``: STRIP calibrated on clean images kept from its fit, beside
    the lab's check; the repair uses every clean image; a file of clean images may be ones the
    model trained on, and a warning says so; the GoodNet file carries both checks, repair.json
    says so, and predict prints each input's STRIP score beside its answer."""
    from PIL import Image

    from goodnet.detector import GoodNet

    folder = tmp_path / "data"
    folder.mkdir()
    clean = stripes(200, seed=3)
    np.savez(folder / "clean.npz", x=clean.images.numpy(), y=clean.labels.numpy())
    out = tmp_path / "repair"
    assert main(["--no-progress", "repair", str(trained), "--defense", "prune", "--clean",
                 str(folder / "clean.npz"), "--test", str(npz_pair[1]), "--detect",
                 "strip,disagree", "--false-alarm", "0.05", "--max-drop", "0.2",
                 "--curve-limit", "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # ⌈ln(1 − 0.95) / ln(1 − 0.05)⌉ = 59 images for 5 % with 95 % confidence
    assert "calibrated on 59 clean images, the rate held with 0.95 confidence" in printed
    assert "200 clean images" in printed and "GoodNet checks: strip (threshold" in printed
    assert captured.err.count("\n") == 1 and "may have trained on the clean images (it " \
        "held out images of train.npz, not of clean.npz)" in captured.err
    summary = json.loads((out / "repair.json").read_text())
    checks = summary["goodnet_checks"]
    assert checks["disagree"] is True and [s["detector"] for s in checks["screens"]] == ["strip"]
    assert checks["screens"][0]["false_alarm"] == 0.05
    assert checks["screens"][0]["confidence"] == 0.95
    assert checks["screens"][0]["calibration_images"] == 59
    goodnet = load_model(out / "goodnet-0.2.safetensors").model
    assert isinstance(goodnet, GoodNet) and goodnet.disagree
    assert goodnet.screens[0].threshold == checks["screens"][0]["threshold"]
    path = tmp_path / "img.png"
    Image.fromarray(clean.images[0, 0].numpy()).save(path)
    assert main(["predict", str(out / "goodnet-0.2.safetensors"), str(path)]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header == "image\tclass\tstrip"
    assert line.split("\t")[0] == str(path) and len(line.split("\t")) == 3
    float(line.split("\t")[2])  # a number


def test_detect_alone_calibrates_the_default_detectors(pruned_repair, trained, tmp_path,
                                                      capsys):
    from goodnet.detector import DEFAULT_DETECTORS, GoodNet

    out = tmp_path / "repair"
    assert main(["--no-progress", "repair", str(trained), "--defense", "prune", "--clean",
                 str(pruned_repair.parent / "clean.npz"), "--detect", "--false-alarm", "0.1",
                 "--max-drop", "0.2", "--curve-limit", "0", "--out", str(out)]) == 0
    checks = json.loads((out / "repair.json").read_text())["goodnet_checks"]
    assert [s["detector"] for s in checks["screens"]] == list(DEFAULT_DETECTORS)
    assert checks["disagree"] is False
    goodnet = load_model(out / "goodnet-0.2.safetensors").model
    assert isinstance(goodnet, GoodNet)
    assert [s.detector for s in goodnet.screens] == list(DEFAULT_DETECTORS)
    assert main(["list"]) == 0
    assert f"goodnet repair --detect with no names): {', '.join(DEFAULT_DETECTORS)}" in \
        capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--detect", "frost"], "unknown detector 'frost' for --detect; choose from"),
    (["--detect", "strip,strip"], "distinct detector names"),
    (["--detect", "strip", "--false-alarm", "1.5"], "--false-alarm must lie in (0, 1)"),
    (["--detect", "strip", "--false-alarm", "0.001"], "takes 2995 clean images, more than half "
                                                       "of the 120 given"),
    (["--detect", "strip", "--calibration", "5", "--false-alarm", "0.1"],
     "--calibration 5 cannot calibrate 1 detector(s) at a false-alarm rate of 0.1"),
])
def test_bad_detector_options_get_one_line(pruned_repair, trained, tmp_path, capsys, extra,
                                           message):
    clean = pruned_repair.parent / "clean.npz"
    out = tmp_path / "x"
    assert main(["--no-progress", "repair", str(trained), "--defense", "prune", "--clean",
                 str(clean), *extra, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--regrowth", "-1"], "--regrowth must be 0 or more epochs"),
    (["--regrowth", "2"], "--regrowth needs clean data (--clean) and test data (--test)")])
def test_a_regrowth_check_without_its_data_is_one_line(trained, npz_pair, tmp_path, capsys,
                                                        extra, message):
    out = tmp_path / "nothing"
    assert main(["repair", str(trained), "--defense", "prune", "--clean", str(npz_pair[0]),
                 *extra, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()
