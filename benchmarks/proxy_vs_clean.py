"""``select=proxy`` against the clean-data rule, cell by cell (BENCHMARKS.md, "Choosing by the
reversed trigger").

    python benchmarks/proxy_vs_clean.py benchmarks/results/standard/results.jsonl \
        runs/proxy/results.jsonl [--seed 0]

Pairs each defense of the standard grid (``prune``, ``rnp``, ``anp``: the clean-data rule, and
prune's budget) with its ``<name>-proxy`` twin on the same backdoored model, and prints
markdown: CA / ASR (%) per model, then per defense and rule the mean CA drop, the mean ASR, the
rows at ASR <= 2 %, the rows repaired (ASR <= 2 % at <= 1 point of CA), the rows on which the
proxy ends at least 5 points of ASR below the clean rule (and above it), and how often the
proxy's class was the attack's target (all-to-one attacks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recommend import ASR_BOUND, ROW_CA_BOUND, rows

DEFENSES = ("prune", "rnp", "anp")
CLEARLY = 0.05  # a difference in ASR worth counting: 5 points


def figures(record: dict[str, Any] | None) -> str:
    if record is None or record.get("after") is None:
        return "-"
    after = record["after"]
    return f"{100 * after['clean_accuracy']:.1f} / {100 * after['attack_success_rate']:.1f}"


def target(record: dict[str, Any]) -> int | None:
    settings = record.get("config", {}).get("attack_settings", {})
    if settings.get("mode", "all-to-one") != "all-to-one" or "target" not in settings:
        return None
    return int(settings["target"])


def summary(cells: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    drops = [r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"] for r in cells.values()]
    asrs = [r["after"]["attack_success_rate"] for r in cells.values()]
    return {"drop": statistics.fmean(drops), "asr": statistics.fmean(asrs),
            "low": sum(a <= ASR_BOUND for a in asrs),
            "repaired": sum(a <= ASR_BOUND and d <= ROW_CA_BOUND + 1e-12
                            for a, d in zip(asrs, drops, strict=True)),
            "seconds": statistics.median(r["repair_seconds"] for r in cells.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table = rows(args.results, args.seed)
    keys = sorted({key for name in DEFENSES for key in table.get(f"{name}-proxy", {})})
    if not keys:
        print("no select=proxy cells in these results", file=sys.stderr)
        return 1
    head = ["data", "attack", "backdoored"]
    for name in DEFENSES:
        head += [name, f"{name} proxy"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        some = next(table[f"{n}-proxy"][key] for n in DEFENSES if key in table[f"{n}-proxy"])
        before = some["before"]
        line = [*key, f"{100 * before['clean_accuracy']:.1f} / "
                      f"{100 * before['attack_success_rate']:.1f}"]
        for name in DEFENSES:
            line += [figures(table.get(name, {}).get(key)),
                     figures(table.get(f"{name}-proxy", {}).get(key))]
        print("| " + " | ".join(line) + " |")
    print()
    print("| defense | rule | rows | mean CA drop | mean ASR | ASR <= 2 % | repaired | "
          "proxy clearly lower / higher | proxy class = target | median s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in DEFENSES:
        proxied = table.get(f"{name}-proxy", {})
        clean = {k: v for k, v in table.get(name, {}).items() if k in proxied}
        for rule, cells in (("clean", clean), ("proxy", proxied)):
            if not cells:
                continue
            s = summary(cells)
            versus = hits = ""
            if rule == "proxy":
                both = [k for k in cells if k in clean]
                lower = sum(cells[k]["after"]["attack_success_rate"] + CLEARLY
                            <= clean[k]["after"]["attack_success_rate"] for k in both)
                higher = sum(cells[k]["after"]["attack_success_rate"] - CLEARLY
                             >= clean[k]["after"]["attack_success_rate"] for k in both)
                versus = f"{lower} / {higher} (of {len(both)})"
                aimed = [(r, target(r)) for r in cells.values() if target(r) is not None]
                right = sum(((r.get("suspected") or {}).get("proxy") or {}).get("class") == t
                            for r, t in aimed)
                hits = f"{right} of {len(aimed)}"
            print(f"| {name} | {rule} | {len(cells)} | {100 * s['drop']:.2f} | "
                  f"{100 * s['asr']:.1f} | {s['low']} | {s['repaired']} | {versus} | {hits} | "
                  f"{s['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
