"""``goodnet import``: convert a model file of another format into a goodnet model file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.artifacts import check_writable, save_model
from goodnet.cli.options import Commands, add_keras_options, open_model
from goodnet.importers import imported_as


def cmd_import(args: argparse.Namespace) -> int:
    check_writable(Path(args.out))
    loaded = open_model(args)
    path = save_model(args.out, loaded.model, loaded.card)
    spec = loaded.card.spec
    print(f"imported {args.model} as {imported_as(loaded.card)} ({spec.num_classes} classes, input "
          f"{'×'.join(map(str, spec.input_shape))}, pixels ×{spec.pixel_scale:g}) into {path}")
    return 0


def add_import(sub: Commands) -> None:
    imp = sub.add_parser("import", help="convert a Keras .h5, ONNX or PyTorch model (read as "
                                        "data, never run) into a goodnet model file")
    imp.add_argument("model", type=Path)
    imp.add_argument("--out", required=True, help="model file to write (.safetensors)")
    add_keras_options(imp)
    imp.set_defaults(func=cmd_import)

