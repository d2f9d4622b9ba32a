"""The same repairs at two clean-data budgets, side by side (BENCHMARKS.md, "At 5 % clean data").

    python benchmarks/clean_budget.py \\
        --low benchmarks/results/repairs/results.jsonl \\
              benchmarks/results/repairs_sequences/results.jsonl \\
              benchmarks/results/repairs_fst_kd/results.jsonl \\
        --high benchmarks/results/repairs_5pct/results.jsonl \\
        --defenses nc fst-kd sau-then-fst [--seed 0]

Prints a row per (data set, attack) of the ``--high`` grid: the backdoored model's CA / ASR
and each defense's CA / ASR at the low budget → at the high one (★ bold: repaired, i.e. ASR
≤ 2 % at most 1 point below the backdoored CA; "none flagged": a Neural Cleanse repair that
returned the model unchanged); then per defense and budget the rule's counts (``recommend.py``'s
``summarise``), the rows at ASR ≤ 2 % at any CA cost, and the repair time, median / max.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recommend import ASR_BOUND, ROW_CA_BOUND, rows, summarise


def cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "–"
    before, after = record["before"], record["after"]
    text = f"{100 * after['clean_accuracy']:.1f} / {100 * after['attack_success_rate']:.1f}"
    drop = before["clean_accuracy"] - after["clean_accuracy"]
    if after["attack_success_rate"] <= ASR_BOUND and drop <= ROW_CA_BOUND + 1e-12:
        text = f"**{text}** ★"
    unchanged = (after["clean_accuracy"] == before["clean_accuracy"]
                 and after["attack_success_rate"] == before["attack_success_rate"])
    if record["defense"] == "nc" and unchanged:
        text += " (none flagged)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", nargs="+", type=Path, required=True)
    parser.add_argument("--high", nargs="+", type=Path, required=True)
    parser.add_argument("--defenses", nargs="+", required=True)
    parser.add_argument("--labels", nargs=2, default=["1 %", "5 %"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    low, high = rows(args.low, args.seed), rows(args.high, args.seed)
    keys = sorted({key for name in args.defenses for key in high.get(name, {})})
    if not keys:
        raise SystemExit(f"no cell of {', '.join(args.defenses)} in the --high results")
    a, b = args.labels
    print("| data | attack | backdoored | "
          + " | ".join(f"{name}: {a} → {b}" for name in args.defenses) + " |")
    print("|---|---|---|" + "---|" * len(args.defenses))
    for key in keys:
        backdoored = next(high[n][key]["before"] for n in args.defenses if key in high.get(n, {}))
        cells = " | ".join(f"{cell(low.get(n, {}).get(key))} → {cell(high.get(n, {}).get(key))}"
                           for n in args.defenses)
        print(f"| {key[0]} | {key[1]} | {100 * backdoored['clean_accuracy']:.1f} / "
              f"{100 * backdoored['attack_success_rate']:.1f} | {cells} |")
    datas = sorted({data for data, _ in keys})
    print(f"\n| defense | clean data | rows | repaired | {' | '.join(datas)} | ASR ≤ 2 % | "
          "mean CA drop | mean ASR | repair s, median / max |")
    print("|---|---|---|---|" + "---|" * len(datas) + "---|---|---|---|")
    for name in args.defenses:
        for label, grid in ((a, low), (b, high)):
            chosen = {k: v for k, v in grid.get(name, {}).items() if k in keys}
            if not chosen:
                continue
            s = summarise(chosen)
            per = " | ".join(str(s["by_data"].get(d, 0)) for d in datas)
            print(f"| {name} | {label} | {s['rows']} | {s['repaired']} | {per} | {s['low_asr']} "
                  f"| {100 * s['ca_drop']:.2f} | {100 * s['asr']:.1f} | "
                  f"{s['seconds']:.0f} / {s['max_seconds']:.0f} |")


if __name__ == "__main__":
    main()
