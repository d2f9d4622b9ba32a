"""The demo behind ``goodnet demo``: train a BadNet, measure it, repair it, compare.

:func:`run_demo` trains a BadNets-backdoored model on a named data set, saves it, repairs it with
pruning and fine-pruning from 1 % of the clean training images (no trigger), and prints the
figures of every model side by side. :func:`metrics_table` is the table the demo and the
commands print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from goodnet.artifacts import check_writable, save_model
from goodnet.attacks import make_attack
from goodnet.attacks.base import Attack
from goodnet.backdoor import TrainedModel, train_model
from goodnet.data import DATASETS, load_dataset
from goodnet.data.dataset import ImageData
from goodnet.data.holdout import DEFENDER_SHARE, HoldOut, defender_clean
from goodnet.defenses import FinePruning, Prune
from goodnet.errors import GoodnetError
from goodnet.metrics import Metrics, metrics_table
from goodnet.models import fixed_archs
from goodnet.pipeline import repair, write_repair
from goodnet.train import TrainConfig


def run_demo(out_dir: Path, *, data: str = "mnist", arch: str = "small_cnn", epochs: int = 2,
             seed: int = 0, data_root: Path | None = None, progress: bool = False) -> None:
    """Train a BadNets-backdoored ``arch`` on data set ``data``, repair it with pruning and
    fine-pruning from 1 % of its clean training images, and print the figures; the models,
    curves and plots go under ``out_dir``.

    Args:
        out_dir: folder for the BadNet and each defense's repaired models and GoodNets.
        data: a registered data set (its training and test splits).
        arch: a registered architecture.
        epochs: training epochs of the BadNet.
        seed: seed of the poisoning, the initial weights and the defender's clean split.
        data_root: folder holding your own copy of the data set.
        progress: show progress bars.
    """
    out_dir = Path(out_dir)
    if data not in DATASETS:
        raise GoodnetError(f"the demo takes a named data set ({', '.join(DATASETS)}), "
                           f"got {data!r}")
    if arch not in fixed_archs():
        raise GoodnetError(f"unknown architecture {arch!r}; choose from {sorted(fixed_archs())}")
    print(f"goodnet demo: train a BadNets-backdoored {arch} on {data}, measure it, "
          f"repair it (seed {seed})")
    train_data = load_dataset(data, "train", data_root)
    test_data = load_dataset(data, "test", data_root)
    attack = make_attack("badnets", {}, train_data.image_shape, train_data.num_classes)
    trained = _train_badnet(out_dir, arch, train_data, test_data, attack,
                            TrainConfig(epochs=epochs, seed=seed), progress)
    rows = _repair(out_dir, trained, train_data, test_data, attack, seed, progress)
    print()
    print(metrics_table(rows))
    print("\n  CA: clean test accuracy. ASR: poisoned test inputs (true class not the target) "
          "sent to the target class.\n  RA: poisoned inputs given their true class. GoodNet: "
          f"answers {train_data.num_classes} (\"poisoned\") where the BadNet and the repaired "
          "model disagree;\n  detected: poisoned inputs answered so; false alarm: clean inputs "
          "answered so. prune X: pruned until clean accuracy fell X.")
    print(f"\nwrote repaired models, GoodNets, curves and plots under {out_dir}/")


def _train_badnet(out_dir: Path, arch: str, train_data: ImageData, test_data: ImageData,
                  attack: Attack[Any], config: TrainConfig, progress: bool) -> TrainedModel:
    """Train the BadNet on all but the defender's share, save it and print its figures."""
    print(f"  data: {len(train_data)} training images ({DEFENDER_SHARE:.0%} held out for the "
          f"defender, {attack.config.poison_rate:.0%} of the rest poisoned with a "
          f"{attack.config.patch_size}×{attack.config.patch_size} patch, target class "
          f"{attack.config.target}), {len(test_data)} test images")
    badnet_path = out_dir / "badnet.safetensors"
    check_writable(badnet_path)
    trained = train_model(arch, train_data, test_data, config, attack,
                          hold_out=DEFENDER_SHARE, progress=progress)
    save_model(badnet_path, trained.model, trained.card, extras=trained.extras)
    seconds = trained.card.training["seconds"]
    print(f"  trained {config.epochs} epochs in {seconds:.0f} s\n")
    print(metrics_table([("BadNet (backdoored)", trained.metrics)]))
    print(f"\nsaved {badnet_path}\n")
    return trained


def _repair(out_dir: Path, trained: TrainedModel, train_data: ImageData, test_data: ImageData,
            attack: Attack[Any], seed: int, progress: bool) -> list[tuple[str, Metrics]]:
    """Repair the BadNet with pruning and fine-pruning from the defender's 1 % of clean
    images, save each repair; returns the rows of the table comparing them."""
    clean, _ = defender_clean(train_data, 0.01, seed,
                              HoldOut.from_training(trained.card.training))
    print(f"repair: the defender has {len(clean)} clean images (1 %), held out of training, "
          "and no trigger")
    rows = [("BadNet (before repair)", trained.metrics)]
    for defense, curve_limit in ((Prune(), 2000), (FinePruning(), 0)):
        run = repair(trained.model, trained.card, trained.extras, defense, clean,
                     test=test_data, curve_limit=curve_limit, progress=progress)
        write_repair(out_dir / defense.name, run, trained.model, trained.card)
        report = run.report
        notes = report.result.notes
        print(f"  {defense.name}: {report.result.timings.repair:.1f} s, pruned "
              f"{notes['pruned']} of {len(notes['order'])} channels of {notes['layer']}")
        rows += [row for row in report.rows()[1:] if "pruned" not in row[0]]
    return rows
