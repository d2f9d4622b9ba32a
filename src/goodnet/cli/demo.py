"""``goodnet demo``: train a BadNet, repair it, compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.cli.options import Commands, add_data_options
from goodnet.demo import run_demo
from goodnet.models import fixed_archs


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), data=args.data, arch=args.arch, epochs=args.epochs, seed=args.seed,
             data_root=args.data_root, progress=args.progress)
    return 0


def add_demo(sub: Commands) -> None:
    demo = sub.add_parser("demo", help="train a BadNet on MNIST, repair it, compare")
    add_data_options(demo, "mnist")
    demo.add_argument("--arch", default="small_cnn", choices=sorted(fixed_archs()))
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's models")
    demo.set_defaults(func=cmd_demo)

