"""``goodnet attack`` and ``goodnet train``: train a backdoored or a clean model and save it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from goodnet.artifacts import check_writable, save_model
from goodnet.attacks import ATTACKS, DEFAULT_ATTACK
from goodnet.backdoor import train_model
from goodnet.cli.options import Commands, add_data_options, attack_from_args, methods_help
from goodnet.data import DATASETS, ImageData, load_dataset
from goodnet.data.holdout import DEFENDER_SHARE
from goodnet.errors import GoodnetError
from goodnet.metrics import metrics_table
from goodnet.models import fixed_archs
from goodnet.train import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, TrainConfig


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        augment=args.augment, seed=args.seed,
    )


def load_splits(name: str, test: str | None, root: Path | None) -> tuple[ImageData, ImageData]:
    """Training and test sets: a registry name gives both splits, a path needs ``--test``."""
    if name in DATASETS:
        return load_dataset(name, "train", root), load_dataset(test or name, "test", root)
    if test is None:
        raise GoodnetError(f"{name} is a file or folder: also give the test set with --test")
    return load_dataset(name, "train", root), load_dataset(test, "test", root)


def cmd_attack(args: argparse.Namespace) -> int:
    return _cmd_train(args, attack_name=args.attack)


def cmd_train(args: argparse.Namespace) -> int:
    return _cmd_train(args, attack_name=None)


def _cmd_train(args: argparse.Namespace, attack_name: str | None) -> int:
    out = Path(args.out)
    # what can be checked without the data first: loading a large data set takes long
    if args.arch not in fixed_archs():  # the layer graph is imported, never trained anew
        raise GoodnetError(f"unknown architecture {args.arch!r}; choose from "
                           f"{sorted(fixed_archs())}")
    check_writable(out)
    train_data, test_data = load_splits(args.data, args.test, args.data_root)
    attack = attack_from_args(attack_name, args.param, train_data) if attack_name else None
    result = train_model(args.arch, train_data, test_data, train_config(args), attack,
                         hold_out=args.hold_out, progress=args.progress)
    save_model(out, result.model, result.card, extras=result.extras)
    held = result.card.training.get("held_out")
    if held is not None:
        print(f"held out {held['count']} of the {len(train_data)} training images for the "
              f"defender (the model never saw them; --clean {args.data} draws from them)")
    label = args.arch + (f" + {attack.name}" if attack else " (clean)")
    print(metrics_table([(label, result.metrics)]))
    print(f"saved {out}")
    return 0


def _hold_out(text: str) -> float | int:
    """--hold-out: 0, a fraction in (0, 1) or a count."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0:
        return 0
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"--hold-out takes 0, a fraction in (0, 1) or a count, "
                                     f"got {text!r}")


def add_training_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--momentum", type=float, default=defaults.momentum)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    group.add_argument("--augment", choices=AUGMENTATIONS, default=defaults.augment)


def _add_training_command(command: argparse.ArgumentParser) -> None:
    """The options ``goodnet attack`` and ``goodnet train`` share."""
    add_data_options(command, "mnist")
    command.add_argument("--test", default=None, help="test set (when --data is a path)")
    command.add_argument("--arch", default="small_cnn")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--out", required=True, help="model file to write (.safetensors)")
    command.add_argument("--hold-out", dest="hold_out", type=_hold_out, default=DEFENDER_SHARE,
                         help="fraction or count of the training split left out of training "
                              "for the defender: --clean with the same data set later draws "
                              "from these images, which the model never saw (default "
                              f"{DEFENDER_SHARE:g}; 0 trains on all)")
    add_training_options(command, epochs=2)


def add_attack(sub: Commands) -> None:
    attack = sub.add_parser("attack", help="train a backdoored model and save it",
                            epilog=methods_help("attacks for --attack", ATTACKS),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_training_command(attack)
    attack.add_argument("--attack", default=DEFAULT_ATTACK, help="the attack (listed below)")
    attack.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="attack setting, repeatable (see 'goodnet list')")
    attack.set_defaults(func=cmd_attack)


def add_train(sub: Commands) -> None:
    clean = sub.add_parser("train", help="train a clean model (a baseline) and save it")
    _add_training_command(clean)
    clean.set_defaults(func=cmd_train, param=[])

