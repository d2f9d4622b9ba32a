"""``goodnet zoo``: build and tabulate a zoo of backdoored models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.cli.options import ArgumentParser, Commands
from goodnet.metrics import percent
from goodnet.train import TrainConfig
from goodnet.zoo import build_zoo, grid, zoo_table


def cmd_zoo_build(args: argparse.Namespace) -> int:
    cells = grid(args.attacks, args.data, args.arch, args.seeds)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    built = skipped = 0
    for cell, card, seconds in build_zoo(args.root, cells, config, progress=args.progress):
        if card is None:
            skipped += 1
            continue
        built += 1
        m = card.metrics
        print(f"{cell.data:<14} {cell.arch:<10} {cell.attack:<17} seed {cell.seed}: "
              f"CA {percent(m['clean_accuracy'])}  ASR {percent(m['attack_success_rate'])}  "
              f"({seconds:.0f} s)", flush=True)
    print(f"built {built}, already there {skipped}; {args.root}")
    if built + skipped:
        print(zoo_table(args.root))
    return 0


def cmd_zoo_table(args: argparse.Namespace) -> int:
    print(zoo_table(args.root))
    return 0


def add_zoo(sub: Commands) -> None:
    zoo = sub.add_parser("zoo", help="build and tabulate a zoo of backdoored models")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=ArgumentParser)
    build = zoo_sub.add_parser("build", help="train every missing model of the grid")
    build.add_argument("--root", type=Path, default=Path("zoo"), help="zoo folder")
    build.add_argument("--attacks", nargs="+", default=None,
                       help="attacks (default: every attack, plus clean models)")
    build.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    build.add_argument("--arch", nargs="+", default=["small_cnn", "resnet20"])
    build.add_argument("--seeds", nargs="+", type=int, default=[0])
    build.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    build.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    build.add_argument("--lr", type=float, default=TrainConfig().lr)
    build.set_defaults(func=cmd_zoo_build)
    table = zoo_sub.add_parser("table", help="the zoo as a Markdown table")
    table.add_argument("--root", type=Path, default=Path("zoo"))
    table.set_defaults(func=cmd_zoo_table)

