"""Apply the recommended-repair rule of BENCHMARKS.md ("The recommended repair") to grid results.

    python benchmarks/recommend.py benchmarks/results/standard/results.jsonl \
        benchmarks/results/repairs/results.jsonl [--seed 0] [--ca-bound 1]

Reads every results file given (the latest record of each cell wins, as ``goodnet report``
reads them), keeps the cells of ``--seed``, and prints, per defense (grid label): the rows it
repairs (ASR <= 2 % and CA at most 1 point below the backdoored model's, on the same test
images), per data set, its mean CA drop and mean ASR over the rows, and its median repair time;
then the candidate the rule picks, and the two best by rows repaired and mean ASR with the
CA bound lifted (the sequences' step of the rule). A defense with fewer than all rows is
listed but not ranked.

``--rule rows`` applies the rule written for issue 29's second choice instead (BENCHMARKS.md,
"The second rule"): no bound on the mean CA drop; the most rows repaired under the per-row
bound, then the lower mean CA drop, the lower mean ASR, the lower median repair time.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from goodnet.bench.results import latest, read_records

ASR_BOUND = 0.02  # a row is repaired at ASR <= 2 % ...
ROW_CA_BOUND = 0.01  # ... and CA at most 1 point below the backdoored model's


def rows(paths: list[Path], seed: int) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """defense label → (data, attack) → its cell's record."""
    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for path in paths:
        for record in latest(read_records(path)).values():
            if record.get("status") != "ok" or record.get("seed") != seed:
                continue
            if not record.get("after") or not record.get("before"):
                continue
            out[record["defense"]][(record["data"], record["attack"])] = record
    return out


def summarise(cells: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    drops, asrs, repaired = [], [], defaultdict(int)
    for (data, _attack), record in cells.items():
        drop = record["before"]["clean_accuracy"] - record["after"]["clean_accuracy"]
        asr = record["after"]["attack_success_rate"]
        drops.append(drop)
        asrs.append(asr)
        if asr <= ASR_BOUND and drop <= ROW_CA_BOUND + 1e-12:
            repaired[data] += 1
    seconds = [r["repair_seconds"] for r in cells.values()]
    # The regrowth check (issue 29): of the rows repaired, those still at ASR <= 2 % after the
    # fine-tuning epochs the records carry (None where no record has one).
    fixed = [r for r in cells.values() if _repaired(r)]
    checked = [r for r in fixed if r.get("regrowth")]
    held = (sum(r["regrowth"]["attack_success_rate"] <= ASR_BOUND for r in checked), len(checked)
            ) if checked else None
    return {"held": held, "rows": len(cells), "repaired": sum(repaired.values()),
            "by_data": dict(repaired),
            "ca_drop": statistics.fmean(drops), "asr": statistics.fmean(asrs),
            "low_asr": sum(a <= ASR_BOUND for a in asrs),
            "seconds": statistics.median(seconds), "max_seconds": max(seconds)}


def _repaired(record: dict[str, Any]) -> bool:
    drop = record["before"]["clean_accuracy"] - record["after"]["clean_accuracy"]
    return record["after"]["attack_success_rate"] <= ASR_BOUND and drop <= ROW_CA_BOUND + 1e-12


def choose(table: dict[str, dict[str, Any]], full: int, ca_bound: float) -> tuple[str, str]:
    """The rule: mean CA drop <= ca_bound (1 point, then 2, then none), then most rows
    repaired, then lower mean ASR, then lower median time. Returns (winner, the bound used)."""
    complete = {k: v for k, v in table.items() if v["rows"] == full}
    for bound, said in ((ca_bound, f"{100 * ca_bound:g} point"), (0.02, "2 points"),
                        (float("inf"), "none (amendment)")):
        kept = {k: v for k, v in complete.items() if v["ca_drop"] <= bound}
        if kept:
            best = min(kept, key=lambda k: (-kept[k]["repaired"], kept[k]["asr"],
                                            kept[k]["seconds"]))
            return best, said
    raise SystemExit("no defense has every row")


def choose_by_rows(table: dict[str, dict[str, Any]], full: int) -> str:
    """Issue 29's second rule: the most rows repaired (each row under its own CA bound), then
    the lower mean CA drop, the lower mean ASR, the lower median time."""
    complete = {k: v for k, v in table.items() if v["rows"] == full}
    if not complete:
        raise SystemExit("no defense has every row")
    return min(complete, key=lambda k: (-complete[k]["repaired"], complete[k]["ca_drop"],
                                        complete[k]["asr"], complete[k]["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ca-bound", type=float, default=1.0, help="points (rule step 1)")
    parser.add_argument("--rule", choices=("mean-ca", "rows"), default="mean-ca",
                        help="issue 16's rule (default) or issue 29's second rule")
    args = parser.parse_args()
    cells = rows(args.results, args.seed)
    full = max(len(v) for v in cells.values())
    table = {name: summarise(v) for name, v in cells.items()}
    datas = sorted({d for v in cells.values() for d, _ in v})
    print(f"| defense | rows | repaired | {' | '.join(datas)} | mean CA drop | mean ASR | "
          "median repair s |")
    print("|---|---|---|" + "---|" * len(datas) + "---|---|---|")
    for name, s in sorted(table.items(), key=lambda kv: (-kv[1]["repaired"], kv[1]["asr"])):
        per = " | ".join(str(s["by_data"].get(d, 0)) for d in datas)
        print(f"| {name} | {s['rows']} | {s['repaired']} | {per} | {100 * s['ca_drop']:.2f} | "
              f"{100 * s['asr']:.1f} | {s['seconds']:.1f} |")
        if s["held"] is not None:
            print(f"  {name}: {s['held'][0]} of the {s['held'][1]} repaired rows keep ASR <= 2 % "
                  "after the regrowth check")
    if args.rule == "rows":
        winner = choose_by_rows(table, full)
        print(f"\nrule (rows repaired): {winner} (rows in full: {full})")
    else:
        winner, bound = choose(table, full, args.ca_bound / 100)
        print(f"\nrule: {winner} (CA bound used: {bound}; rows in full: {full})")
    complete = {k: v for k, v in table.items() if v["rows"] == full}
    ranked = sorted(complete, key=lambda k: (-complete[k]["repaired"], complete[k]["asr"],
                                             complete[k]["seconds"]))
    attacks = full // max(1, len(datas))
    short = any(table[winner]["by_data"].get(d, 0) < 0.8 * attacks for d in datas)
    print(f"the winner repairs fewer than 8 of {attacks} attacks on a data set: {short}; the "
          f"two best with the CA bound lifted: {', '.join(ranked[:2])}")


if __name__ == "__main__":
    main()
