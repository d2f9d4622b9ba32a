"""``goodnet predict``: classify image files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from goodnet.cli.options import Commands, add_keras_options, open_model
from goodnet.data.images import read_image
from goodnet.detector import GoodNet


def cmd_predict(args: argparse.Namespace) -> int:
    loaded = open_model(args)
    spec = loaded.card.spec
    images = torch.stack([read_image(path, spec.input_shape) for path in args.images])
    with torch.no_grad():
        classes = loaded.model(images).argmax(1).tolist()
        scores = loaded.model.scores(images) if isinstance(loaded.model, GoodNet) else {}
    if scores:
        print("image\tclass\t" + "\t".join(scores))
    for i, (path, label) in enumerate(zip(args.images, classes, strict=True)):
        extra = "".join(f"\t{float(s[i]):.4g}" for s in scores.values())
        print(f"{path}\t{label}{extra}")
    return 0


def add_predict(sub: Commands) -> None:
    predict = sub.add_parser("predict", help="classify image files (a GoodNet answers N for "
                                             "inputs it judges poisoned)")
    predict.add_argument("model", type=Path)
    predict.add_argument("images", nargs="+", type=Path)
    add_keras_options(predict)
    predict.set_defaults(func=cmd_predict)

