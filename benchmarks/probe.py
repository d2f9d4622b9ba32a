"""One defense on a few zoo models, measured as the benchmark grids measure (a quick look).

    python benchmarks/probe.py rnp -p recover_epochs=5 --attacks badnets,blend --data mnist

Seed-0 zoo models (``--zoo``, default ./zoo, built by ``goodnet zoo build``), 1 % of the
training split as clean data (``--clean``; split with the model's seed, as the grids do), CA and
ASR on the first 2000 test images. Prints CA and ASR before and after, the repair time and the
defense's message. Settings are ``-p key=value`` as for ``goodnet repair``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from goodnet import attack_from_card, make_defense
from goodnet.artifacts import load_model
from goodnet.data import load_dataset, split_clean
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.settings import pairs_to_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("defense")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--attacks", default="badnets,blend,trojannn,wanet")
    parser.add_argument("--data", default="mnist,fashion-mnist")
    parser.add_argument("--clean", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--test-limit", type=int, default=2000)
    args = parser.parse_args()
    defense = make_defense(args.defense, pairs_to_dict(args.param, args.defense), text=True)
    print("| data | attack | CA before → after | ASR before → after | repair s |")
    print("|---|---|---|---|---|")
    for data in args.data.split(","):
        train = load_dataset(data, "train")
        test = load_dataset(data, "test")
        test = test.subset(torch.arange(min(args.test_limit, len(test))))
        clean, _ = split_clean(train, args.clean, seed=args.seed)
        for name in args.attacks.split(","):
            path = args.zoo / data / "small_cnn" / name / f"seed{args.seed}.safetensors"
            loaded = load_model(path)
            attack = attack_from_card(loaded.card, loaded.extras, test)
            before = evaluate(loaded.model, test, attack)
            start = time.perf_counter()
            result = defense.repair(loaded.model, clean)
            seconds = time.perf_counter() - start
            after = evaluate(result.model, test, attack)
            note = f" {result.message}" if result.message else ""
            print(f"| {data} | {name} | {100 * before.clean_accuracy:.1f} → "
                  f"{100 * after.clean_accuracy:.1f} | {100 * before.attack_success_rate:.1f} → "
                  f"{100 * after.attack_success_rate:.1f} | {seconds:.1f} |{note}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except GoodnetError as error:
        raise SystemExit(f"probe: error: {error}") from None
