"""Sparse fine-pruning swept over the masked share X (10-50 %) and the rounds (epochs), with the
curves as plots: the sweep the project report ran, on the zoo.

For each zoo model (small CNN, by default BadNets, Blend and the multi-target attack on MNIST and
Fashion-MNIST, seeds 0-2), the defender gets 1 % of the training set (split with the model's
seed); sparse fine-pruning runs 10 rounds at each X with the mask's magnitude score (mean
activation by default). After every round the *moving* mask's model is measured on the first
``--curve-limit`` test images (CA, and ASR on the eligible ones poisoned); the final model (the
X % lowest-magnitude channels pruned after the last round) is measured on the whole test set.

Writes ``results.jsonl`` (resumable: finished (model, X) pairs are skipped), ``table.md`` (final
CA and ASR per X, mean ± std over seeds) and ``curves-<data>-<attack>.png`` (CA and ASR per round,
one line per X, mean over seeds) into ``--out``.

    goodnet zoo build --root zoo --arch small_cnn --seeds 0 1 2
    python benchmarks/sparse_fine_pruning_sweep.py --zoo zoo --out runs/sfp_sweep
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from lab_defenses import zoo_model  # the same defender's data, next to this script

from goodnet.attacks import ATTACK_ALIASES
from goodnet.defenses import SparseFinePruning, SparseFinePruningConfig
from goodnet.workflow import repair_and_measure
from goodnet.zoo import collect


def run(path: Path, data: str, seed: int, fractions: list[float], rounds: int, score: str,
        curve_limit: int, cache: dict) -> list[dict]:
    loaded, clean, test, attack = zoo_model(path, data, seed, cache)
    records = []
    for fraction in fractions:
        defense = SparseFinePruning(SparseFinePruningConfig(fraction=fraction, rounds=rounds,
                                                            score=score, seed=seed))
        report = repair_and_measure(loaded.model, defense, clean, test, attack,
                                    curve_limit=curve_limit, goodnets=False)
        result = report.result
        final = report.variants[result.chosen]
        records.append({
            "data": data, "attack": loaded.card.attack["name"], "seed": seed,
            "fraction": fraction, "score": score, "rounds": rounds,
            "before_ca": report.original.clean_accuracy,
            "before_asr": report.original.attack_success_rate,
            "final_ca": final.clean_accuracy, "final_asr": final.attack_success_rate,
            "seconds": result.timings.repair,
            "curve": [{k: r[k] for k in ("round", "clean_data_accuracy", "test_ca", "test_asr")}
                      for r in result.curve.records()],
        })
    return records


def spread(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(records: list[dict]) -> str:
    fractions = sorted({r["fraction"] for r in records})
    groups = sorted({(r["data"], r["attack"]) for r in records})
    header = "| data | attack | backdoored CA / ASR | " + " | ".join(
        f"X = {round(100 * f)} %: CA / ASR" for f in fractions) + " |"
    lines = [header, "|" + "---|" * (3 + len(fractions))]
    for data, attack in groups:
        rows = [r for r in records if (r["data"], r["attack"]) == (data, attack)]
        cells = [f"{spread([r['before_ca'] for r in rows if r['fraction'] == fractions[0]])} / "
                 f"{spread([r['before_asr'] for r in rows if r['fraction'] == fractions[0]])}"]
        for fraction in fractions:
            chosen = [r for r in rows if r["fraction"] == fraction]
            cells.append(f"{spread([r['final_ca'] for r in chosen])} / "
                         f"{spread([r['final_asr'] for r in chosen])}" if chosen else "–")
        lines.append(f"| {data} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, sharex=True)
    fractions = sorted({r["fraction"] for r in rows})
    colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(fractions)).tolist())
    for fraction, colour in zip(fractions, colours, strict=True):
        curves = [r["curve"] for r in rows if r["fraction"] == fraction]
        steps = [c["round"] for c in curves[0]]
        for axes, key in ((left, "test_ca"), (right, "test_asr")):
            mean = [100 * statistics.fmean(c[i][key] for c in curves) for i in range(len(steps))]
            axes.plot(steps, mean, color=colour, label=f"X = {round(100 * fraction)} %")
    for axes, title in ((left, "test CA (moving mask)"), (right, "test ASR (moving mask)")):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("round (one clean-data epoch)")
        axes.set_ylim(0, 101)
    left.set_ylabel("%")
    right.legend(fontsize=8)
    figure.suptitle(f"sparse fine-pruning, {rows[0]['data']} {rows[0]['attack']}, "
                    f"mean over {len({r['seed'] for r in rows})} seed(s)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blend", "multi-target"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--score", default="activation", choices=("activation", "weight"))
    parser.add_argument("--curve-limit", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/sfp_sweep"))
    args = parser.parse_args()
    args.attacks = [ATTACK_ALIASES.get(a, a) for a in args.attacks]  # old names read as new
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    cache: dict = {}
    for cell, _card in collect(args.zoo):
        if (cell.arch != args.arch or cell.data not in args.data or cell.seed not in args.seeds
                or cell.attack not in args.attacks):
            continue
        done = {r["fraction"] for r in records
                if (r["data"], ATTACK_ALIASES.get(r["attack"], r["attack"]), r["seed"],
                    r["score"]) == (cell.data, cell.attack, cell.seed, args.score)}
        todo = [f for f in args.fractions if f not in done]
        if not todo:
            continue
        new = run(cell.path(args.zoo), cell.data, cell.seed, todo, args.rounds, args.score,
                  args.curve_limit, cache)
        with results.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in new)
        records += new
        print(f"{cell.data} {cell.attack} seed {cell.seed}: done", flush=True)
    records = [r for r in records if r["score"] == args.score]
    for data, attack in sorted({(r["data"], r["attack"]) for r in records}):
        plot(args.out / f"curves-{data}-{attack}.png",
             [r for r in records if (r["data"], r["attack"]) == (data, attack)])
    text = table(records)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
