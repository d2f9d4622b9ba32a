"""``goodnet finetune``: train a model some more on clean data.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from goodnet.artifacts import check_writable, save_model
from goodnet.backdoor import attack_from_card
from goodnet.cli.options import (
    Commands,
    add_clean_options,
    add_keras_options,
    clean_from_args,
    data_for,
    open_model,
)
from goodnet.data.holdout import forget_held_out
from goodnet.errors import GoodnetError
from goodnet.masking import is_mask_tensor
from goodnet.metrics import evaluate, metrics_table
from goodnet.train import finetune_config, train
from goodnet.version import __version__


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train any model goodnet opens some more on clean data (the report's
    ``continue_training``); a repaired model's masks stay fixed while its weights train."""
    if args.epochs < 1:
        raise GoodnetError(f"--epochs must be at least 1, got {args.epochs}")
    config = finetune_config(args.epochs, args.lr, args.batch_size, args.seed)
    loaded = open_model(args)
    card = loaded.card
    if card.kind == "goodnet":
        raise GoodnetError(f"{args.model} is a GoodNet (two models and a reject class); "
                           "fine-tune its repaired model instead")
    clean, _ = clean_from_args(args, card)
    test = data_for(card.spec, args.test, "test", args.data_root) if args.test else None
    out = Path(args.out)
    check_writable(out)
    attack = attack_from_card(card, loaded.extras, test) if test is not None else None
    before = evaluate(loaded.model, test, attack) if test is not None else None
    model = copy.deepcopy(loaded.model)  # a Masked copy keeps its masks, fixed (not parameters)
    history = train(model, clean, config, progress=args.progress)
    model.eval()
    after = evaluate(model, test, attack) if test is not None else None
    notes = {**card.notes, "finetune": {
        "config": dataclasses.asdict(config), "data": clean.name, "size": len(clean),
        "seconds": history.seconds, "final_loss": history.epochs[-1].loss}}
    # Figures measured before fine-tuning no longer describe the model: keep only new ones.
    new_card = dataclasses.replace(
        card, notes=notes, goodnet_version=__version__, training=forget_held_out(card.training),
        metrics=dataclasses.asdict(after) if after is not None else {})
    # Masks are saved from the model itself; the rest (an attack's learned trigger) is kept.
    extras = {k: v for k, v in loaded.extras.items() if not is_mask_tensor(k)}
    save_model(out, model, new_card, extras=extras)
    print(f"fine-tuned {args.model} on {len(clean)} clean images ({clean.name}), "
          f"{config.epochs} epochs, {history.seconds:.1f} s")
    if before is not None and after is not None:
        label = card.spec.arch + (f" vs {attack.name}" if attack else "")
        print(metrics_table([(f"{label} before", before), (f"{label} after", after)]))
    print(f"saved {out}")
    return 0


def add_finetune(sub: Commands) -> None:
    finetune = sub.add_parser("finetune", help="train a model (a repaired one keeps its masks) "
                                               "some more on clean data and save it")
    finetune.add_argument("model", type=Path)
    add_clean_options(finetune, required=True)
    finetune.add_argument("--test", default=None,
                          help="test data: report CA and ASR (the card's attack) before and "
                               "after, and store the new figures in the card")
    finetune.add_argument("--epochs", type=int, default=5, help="default 5")
    finetune.add_argument("--lr", type=float, default=0.01,
                          help="peak learning rate of SGD (momentum 0.9, weight decay 5e-4, "
                               "cosine schedule); default 0.01")
    finetune.add_argument("--batch-size", type=int, default=64, help="default 64")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", required=True, help="model file to write (.safetensors)")
    add_keras_options(finetune)
    finetune.set_defaults(func=cmd_finetune)

