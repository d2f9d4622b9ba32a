"""How repair time grows with the number of clean samples and the size of the network.

Times ``defense.repair`` alone (no evaluation) for each defense, clean-set size and architecture
on one zoo model per architecture (MNIST BadNets, seed 0), the median of ``--repeats`` runs.
The clean sets are nested draws from the training set (the first n of one shuffled 1 % ... 4 %
split). Writes ``results.jsonl`` and ``table.md`` into ``--out`` and prints the table.

    python benchmarks/repair_time_scaling.py --zoo zoo --out runs/scaling

ANP runs a fixed number of iterations whatever the clean-set size; ``--anp-iterations`` (200 by
default, a tenth of the reference's 2000) keeps the sweep short, and the table gives the time
per 100 iterations, from which its 2000-iteration time follows (the zoo benchmark measures
that directly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from goodnet import load_dataset, load_model
from goodnet.defenses import DEFENSES, make_defense
from goodnet.zoo import ZooCell


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--arch", nargs="+", default=["small_cnn", "resnet20"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[150, 300, 600, 1200, 2400])
    parser.add_argument("--defenses", nargs="+", default=["rnp", "anp", "clp", "fine-pruning"])
    parser.add_argument("--anp-iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = load_dataset("mnist", "train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    records = []
    for arch in args.arch:
        cell = ZooCell(data="mnist", arch=arch, attack="badnets", seed=0)
        model = load_model(cell.path(args.zoo)).model
        params = count_parameters(model)
        for name in args.defenses:
            settings = {"iterations": args.anp_iterations} if name == "anp" else {}
            defense = make_defense(name, settings)
            sizes = args.sizes if DEFENSES[name].needs_clean else [0]  # 0: data-free
            for n in sizes:
                clean = train.subset(order[:n]) if n else None
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    defense.repair(model, clean)
                    seconds.append(time.perf_counter() - start)
                record = {"arch": arch, "parameters": params, "defense": name, "clean": n,
                          "seconds": statistics.median(seconds), "runs": seconds,
                          "threads": torch.get_num_threads(),
                          "anp_iterations": args.anp_iterations if name == "anp" else None}
                records.append(record)
                print(json.dumps(record), flush=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = table(records, args.sizes)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


def table(records: list[dict], sizes: list[int]) -> str:
    lines = ["| arch (parameters) | defense | " + " | ".join(f"n = {n}" for n in sizes) + " |",
             "|" + "---|" * (2 + len(sizes))]
    for arch, params in dict.fromkeys((r["arch"], r["parameters"]) for r in records):
        for name in dict.fromkeys(r["defense"] for r in records):
            rows = {r["clean"]: r for r in records if r["arch"] == arch and r["defense"] == name}
            if not rows:
                continue
            if 0 in rows:  # a data-free defense, timed once
                cells = [f"{rows[0]['seconds']:.2f} s (data-free)"] + [""] * (len(sizes) - 1)
                label = name
            elif name == "anp":
                per = 100 / rows[sizes[0]]["anp_iterations"]
                cells = [f"{rows[n]['seconds'] * per:.1f} s" if n in rows else "–" for n in sizes]
                label = "anp, per 100 iterations"
            else:
                cells = [f"{rows[n]['seconds']:.1f} s" if n in rows else "–" for n in sizes]
                label = name
            lines.append(f"| {arch} ({params:,}) | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
