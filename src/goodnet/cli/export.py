"""``goodnet export``: export a model, repaired model or GoodNet to ONNX.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.artifacts import check_writable
from goodnet.cli.options import Commands, add_keras_options, open_model
from goodnet.export import export_onnx


def cmd_export(args: argparse.Namespace) -> int:
    check_writable(Path(args.out))
    loaded = open_model(args)
    path = export_onnx(loaded.model, loaded.card, args.out)
    print(f"exported {args.model} to {path} (input 'image', N×"
          f"{'×'.join(map(str, loaded.card.spec.input_shape))} in [0, 1]; output 'scores')")
    return 0


def add_export(sub: Commands) -> None:
    export = sub.add_parser("export", help="export a model, repaired model or GoodNet to ONNX "
                                           "(masks folded into the weights)")
    export.add_argument("model", type=Path)
    export.add_argument("--out", required=True, help="ONNX file to write")
    add_keras_options(export)
    export.set_defaults(func=cmd_export)

