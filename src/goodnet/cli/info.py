"""``goodnet info``: print a saved model's card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from goodnet.artifacts import read_card
from goodnet.cli.options import Commands, add_keras_options, open_model
from goodnet.importers import is_foreign
from goodnet.paths import require_regular_file


def cmd_info(args: argparse.Namespace) -> int:
    require_regular_file(args.model)
    card = open_model(args).card if is_foreign(args.model) else read_card(args.model)
    print(json.dumps(json.loads(card.to_json()), indent=2))
    return 0


def add_info(sub: Commands) -> None:
    info = sub.add_parser("info", help="print a saved model's card")
    info.add_argument("model", type=Path)
    add_keras_options(info)
    info.set_defaults(func=cmd_info)

