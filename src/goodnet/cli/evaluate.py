"""``goodnet eval``: CA, ASR and RA of a saved model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from goodnet.backdoor import attack_from_card
from goodnet.cli.options import (
    Commands,
    add_data_options,
    add_keras_options,
    attack_from_args,
    data_for,
    open_model,
    poisoned_from_args,
)
from goodnet.metrics import evaluate, metrics_table


def cmd_eval(args: argparse.Namespace) -> int:
    loaded = open_model(args)
    card = loaded.card
    test = data_for(card.spec, args.data, "test", args.data_root)
    attack = None
    if args.attack is not None:
        attack = attack_from_args(args.attack, args.param, test)
    else:
        attack = attack_from_card(card, loaded.extras, test)
    reject = card.spec.num_classes if card.kind == "goodnet" else None
    metrics = evaluate(loaded.model, test, attack, batch_size=args.batch_size,
                       reject_class=reject, poisoned=poisoned_from_args(args, card.spec))
    if args.json:
        print(json.dumps({"model": str(args.model), "data": test.name,
                          "attack": attack.describe() if attack else None,
                          **dataclasses.asdict(metrics)}, indent=2))
    else:
        label = f"{card.spec.arch}" + (f" vs {attack.name}" if attack else "")
        print(f"{args.model} on {test.name} ({metrics.n_clean} clean, "
              f"{metrics.n_poisoned} poisoned inputs)")
        print(metrics_table([(label, metrics)]))
    return 0


def add_eval(sub: Commands) -> None:
    ev = sub.add_parser("eval", help="CA, ASR and RA of a saved model")
    ev.add_argument("model", type=Path)
    add_data_options(ev, "mnist")
    ev.add_argument("--attack", default=None,
                    help="attack to evaluate against (default: the one in the model card)")
    ev.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--batch-size", type=int, default=512)
    ev.add_argument("--poisoned", default=None,
                    help="already-poisoned test images labelled with their targets (the "
                         "CSAW-HackML bd_test.h5 layout)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    add_keras_options(ev)
    ev.set_defaults(func=cmd_eval)

