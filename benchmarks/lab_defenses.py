"""The lab's defenses on the zoo: Prune at each budget X, the GoodNet at each X, fine-pruning and
sparse fine-pruning, against every attack, on MNIST and Fashion-MNIST, over seeds.

For each zoo model (built by ``goodnet zoo build``), the defender gets 1 % of the *training* set
(split with the model's seed) and nothing else; CA and ASR are measured on the full test set.
Writes ``results.jsonl`` (one record per model and defense variant, resumable: finished models
are skipped) and ``table.md`` (mean ± std over seeds) into ``--out`` and prints the table.

    goodnet zoo build --root zoo --arch small_cnn --seeds 0 1 2
    python benchmarks/lab_defenses.py --zoo zoo --arch small_cnn --seeds 0 1 2 --out runs/lab

``--defenses`` runs other defenses the same way, each ``name`` or ``label=name:key=value,...``
(settings as ``goodnet repair -p``), for example the state-of-the-art pruning defenses with
goodnet's defaults and the references' settings side by side:

    python benchmarks/lab_defenses.py --zoo zoo --out runs/sota --defenses rnp anp clp \
        rnp-reference=rnp:reference=true anp-t0.2=anp:select=threshold
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

from goodnet import attack_from_card, load_dataset, load_model, split_clean
from goodnet.attacks import ATTACK_ALIASES
from goodnet.defenses import DEFENSES, Defense, make_defense
from goodnet.metrics import poisoned_batches, predict_all
from goodnet.settings import pairs_to_dict
from goodnet.workflow import repair_and_measure
from goodnet.zoo import CLEAN, collect


def summarise(metrics) -> dict:
    return {k: v for k, v in dataclasses.asdict(metrics).items() if k != "per_trigger"}


LAB = ("prune", "fine-pruning", "sparse-fine-pruning")


def parse_defense(text: str) -> tuple[str, Defense]:
    """``name`` or ``label=name:key=value,...`` → (label, defense)."""
    head = text.split(":", 1)[0]
    label, _, rest = text.partition("=") if "=" in head else ("", "", text)
    name, _, pairs = rest.partition(":")
    if name not in DEFENSES:
        raise SystemExit(f"unknown defense {name!r}; choose from {sorted(DEFENSES)}")
    settings = pairs_to_dict([p for p in pairs.split(",") if p], name)
    return label or name, make_defense(name, settings, text=True)


def zoo_model(path: Path, data: str, seed: int, cache: dict) -> tuple:
    """(loaded model, the defender's clean data, test set, attack) for one zoo model: 1 % of the
    training set, split with the model's seed; data sets cached across models."""
    if data not in cache:
        cache[data] = (load_dataset(data, "train"), load_dataset(data, "test"))
    train, test = cache[data]
    clean, _ = split_clean(train, 0.01, seed=seed)
    loaded = load_model(path)
    return loaded, clean, test, attack_from_card(loaded.card, loaded.extras, test)


def run_model(path: Path, data: str, seed: int, cache: dict,
              defenses: list[tuple[str, Defense]]) -> list[dict]:
    loaded, clean, test, attack = zoo_model(path, data, seed, cache)
    prepared = list(poisoned_batches(test, attack))  # the poisoned test set, made once
    baseline = predict_all({"original": loaded.model}, test, attack,
                           prepared=prepared)["original"]
    records = []
    for label, defense in defenses:
        start = time.perf_counter()
        # The mask defenses' threshold curves get test CA and ASR (2000 images, reporting only).
        report = repair_and_measure(loaded.model, defense, clean, test, attack,
                                    curve_limit=0 if label in LAB else 2000,
                                    goodnets=defense.name == "prune", baseline=baseline,
                                    prepared=prepared)
        seconds = time.perf_counter() - start
        result = report.result
        base = {"data": data, "attack": loaded.card.attack["name"], "seed": seed,
                "defense": label, "repair_seconds": result.timings.repair,
                "measure_seconds": seconds - result.timings.repair,
                "chosen_variant": result.chosen}
        records.append({**base, "variant": "before", **summarise(report.original)})
        curve = None if label in LAB else result.curve  # the lab's runs measure no curve
        for name, metrics in report.variants.items():
            # the lab's defenses show every variant; the others their chosen one, as "chosen"
            shown = name if label in LAB or name != result.chosen else "chosen"
            records.append({**base, "variant": shown, "variant_name": name,
                            **summarise(metrics), "pruned": result.pruned_in(name),
                            "curve": curve.records() if curve is not None else None,
                            "curve_axis": curve.axis if curve is not None else None})
        for name, metrics in report.goodnets.items():
            records.append({**base, "variant": f"GoodNet {name}", **summarise(metrics)})
    return records


# The variant each defense chose, for results files written before the records named it
# ("chosen_variant").
CHOSEN_BEFORE_RECORDED = {"fine-pruning": "fine-tuned", "sparse-fine-pruning": "final"}


def is_chosen(record: dict) -> bool:
    """Whether ``record`` is the variant its defense chose."""
    if "chosen_variant" in record:
        return record.get("variant_name") == record["chosen_variant"]
    return record["variant"] == CHOSEN_BEFORE_RECORDED.get(record["defense"], "chosen")


def spread(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(records: list[dict]) -> str:
    keys = []
    for r in records:
        key = (r["data"], r["attack"], "" if r["variant"] == "before" else r["defense"],
               r["variant"])
        if key not in keys:
            keys.append(key)
    lines = ["| data | attack | model | CA % | ASR % | detected % | false alarm % | s |",
             "|---|---|---|---|---|---|---|---|"]
    for data, attack, defense, variant in keys:
        rows = [r for r in records if (r["data"], r["attack"], r["variant"]) == (
            data, attack, variant) and (variant == "before" or r["defense"] == defense)]
        if variant == "before":  # one per model, whichever defense recorded it
            rows = list({(r["seed"]): r for r in rows}.values())
        label = "backdoored" if variant == "before" else (
            f"{defense} {variant}" if not variant.startswith("GoodNet") else variant)
        seconds = ""
        if variant != "before":
            seconds = f"{statistics.median(r['repair_seconds'] for r in rows):.1f}"
        lines.append(
            f"| {data} | {attack} | {label} | {spread([r['clean_accuracy'] for r in rows])} | "
            f"{spread([r['attack_success_rate'] for r in rows])} | "
            f"{spread([r['detection_rate'] for r in rows])} | "
            f"{spread([r['false_alarm_rate'] for r in rows])} | {seconds} |")
    return "\n".join(lines)


def _cell(rows: list[dict], keys: tuple[str, ...]) -> str:
    if not rows:
        return "–"
    return " / ".join(spread([r[k] for r in rows]) for k in keys)


def compact(records: list[dict]) -> str:
    """One row per (data, attack): the backdoored model and each defense's main result, CA / ASR
    (mean ± std over seeds); the GoodNet at X = 4 % with its detection and false-alarm rates;
    each other defense at its chosen variant."""
    labels = list(dict.fromkeys(r["defense"] for r in records if r["variant"] != "before"))
    # (heading, defense label, variant: None for the one the defense chose, metrics)
    columns: list[tuple[str, str, str | None, tuple[str, ...]]] = [
        ("backdoored", "", "before", ("clean_accuracy", "attack_success_rate"))]
    for label in labels:
        if label == "prune":
            columns += [(f"prune X={x}", "prune", v, ("clean_accuracy", "attack_success_rate"))
                        for x, v in (("2%", "0.02"), ("4%", "0.04"), ("10%", "0.1"))]
            columns.append(("GoodNet X=4%: CA / ASR / detected / false alarm", "prune",
                            "GoodNet 0.04", ("clean_accuracy", "attack_success_rate",
                                             "detection_rate", "false_alarm_rate")))
        else:
            columns.append((label, label, None, ("clean_accuracy", "attack_success_rate")))
    lines = ["| data | attack | " + " | ".join(c[0] for c in columns) + " |",
             "|" + "---|" * (2 + len(columns))]
    for data, attack in sorted({(r["data"], r["attack"]) for r in records}):
        cells = []
        for _, label, variant, keys in columns:
            if variant is None:
                rows = [r for r in records if (r["data"], r["attack"], r["defense"]) == (
                    data, attack, label) and is_chosen(r)]
            else:
                rows = [r for r in records if (r["data"], r["attack"], r["variant"]) == (
                    data, attack, variant) and (variant == "before" or r["defense"] == label)]
            if variant == "before":
                rows = list({r["seed"]: r for r in rows}.values())
            cells.append(_cell(rows, keys))
        lines.append(f"| {data} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve_points(curve: list[dict] | None) -> list[dict]:
    """The points of a curve that carry test CA and ASR (the first is the unpruned model)."""
    return [p for p in curve or [] if isinstance(p.get("test_ca"), int | float)
            and isinstance(p.get("test_asr"), int | float)]


def oracle_point(curve: list[dict], max_drop: float = 0.01) -> tuple[float, float] | None:
    """The lowest test ASR on a mask defense's curve among the points within ``max_drop`` of the
    unpruned test CA, as (CA, ASR): what a defender who could see the test set would pick.
    For evaluation only: no defense in goodnet chooses this way."""
    points = _curve_points(curve)
    if not points:
        return None
    base = points[0]["test_ca"]
    within = [p for p in points if p["test_ca"] >= base - max_drop - 1e-12]
    best = min(within, key=lambda p: (p["test_asr"], -p["test_ca"]))
    return best["test_ca"], best["test_asr"]


def reach(curve: list[dict], target: float = 0.02) -> float | None:
    """The smallest test-CA loss (from the unpruned point) at which a mask defense's curve gets
    ASR to ``target`` or below; inf if no point does. Evaluation only, like the oracle."""
    points = _curve_points(curve)
    if not points:
        return None
    losses = [points[0]["test_ca"] - p["test_ca"] for p in points if p["test_asr"] <= target]
    return min(losses) if losses else math.inf


def _curve_table(records: list[dict], labels: list[str], heading: str, cell) -> str:
    """Per (data, attack): ``cell(rows)`` for each defense label, its chosen records by seed."""
    lines = ["| data | attack | " + " | ".join(f"{label}: {heading}" for label in labels)
             + " |", "|" + "---|" * (2 + len(labels))]
    for data, attack in sorted({(r["data"], r["attack"]) for r in records}):
        cells = []
        for label in labels:
            rows = sorted((r for r in records if (r["data"], r["attack"], r["defense"]) == (
                data, attack, label) and is_chosen(r)), key=lambda r: r["seed"])
            cells.append(cell(rows))
        lines.append(f"| {data} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def oracle_table(records: list[dict], labels: list[str], max_drop: float = 0.01) -> str:
    """Per (data, attack): each mask defense's oracle point (mean ± std over seeds)."""

    def cell(rows: list[dict]) -> str:
        points = [p for p in (oracle_point(r.get("curve"), max_drop) for r in rows) if p]
        return " / ".join(spread([p[i] for p in points]) for i in (0, 1)) if points else "–"

    return _curve_table(records, labels, "oracle CA / ASR", cell)


def reach_table(records: list[dict], labels: list[str], target: float = 0.02) -> str:
    """Per (data, attack): each seed's CA loss for ASR <= target on each defense's curve."""

    def cell(rows: list[dict]) -> str:
        values = [reach(r.get("curve"), target) for r in rows]
        return ", ".join("never" if v == math.inf else f"{100 * v:.1f}"
                         for v in values if v is not None) or "–"

    return _curve_table(records, labels, "CA points lost", cell)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--attacks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/lab_defenses"))
    parser.add_argument("--defenses", nargs="+", default=list(LAB))
    parser.add_argument("--also", nargs="+", type=Path, default=[],
                        help="other results files whose records join the tables (e.g. the "
                             "lab run's fine-pruning beside RNP, ANP and CLP)")
    parser.add_argument("--show", nargs="+", default=None,
                        help="defense labels in the compact table, in order (default: all)")
    parser.add_argument("--table-only", action="store_true", help="run nothing; tabulate")
    args = parser.parse_args()
    defenses = [parse_defense(text) for text in args.defenses]
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    # an attack recorded under its old name is the same attack (goodnet.attacks.ATTACK_ALIASES)
    done = {(r["data"], ATTACK_ALIASES.get(r["attack"], r["attack"]), r["seed"], r["defense"])
            for r in records}
    if args.attacks:
        args.attacks = [ATTACK_ALIASES.get(a, a) for a in args.attacks]
    cache: dict = {}
    for cell, _card in ([] if args.table_only else collect(args.zoo)):
        if (cell.arch != args.arch or cell.attack == CLEAN or cell.data not in args.data
                or cell.seed not in args.seeds
                or (args.attacks and cell.attack not in args.attacks)
                or all((cell.data, cell.attack, cell.seed, label) in done
                       for label, _ in defenses)):
            continue
        todo = [(label, d) for label, d in defenses
                if (cell.data, cell.attack, cell.seed, label) not in done]
        new = run_model(cell.path(args.zoo), cell.data, cell.seed, cache, todo)
        with results.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in new)
        records += new
        print(f"{cell.data} {cell.attack} seed {cell.seed}: done", flush=True)
    for extra in args.also:
        mine = {r["defense"] for r in records}
        records += [r for r in map(json.loads, extra.read_text().splitlines())
                    if r["defense"] not in mine]
    records = [r for r in records if r["data"] in args.data and r["seed"] in args.seeds
               and (not args.attacks or r["attack"] in args.attacks)]
    text = table(records)
    (args.out / "table.md").write_text(text + "\n")
    if args.show:
        order = {label: i for i, label in enumerate(args.show)}
        records = sorted((r for r in records if r["defense"] in order or r["variant"] ==
                          "before"), key=lambda r: order.get(r["defense"], -1))
    summary = compact(records)
    (args.out / "compact.md").write_text(summary + "\n")
    print(summary)
    masked = [label for label in dict.fromkeys(r["defense"] for r in records)
              if any(r["defense"] == label and r.get("curve") for r in records)]
    if masked:
        text = oracle_table(records, masked)
        (args.out / "oracle.md").write_text(text + "\n")
        print("\nOracle points (lowest test ASR within 1 point of test CA; evaluation only):")
        print(text)
        text = reach_table(records, masked)
        (args.out / "reach.md").write_text(text + "\n")
        print("\nCA points each seed's curve loses before ASR <= 2 % (evaluation only):")
        print(text)


if __name__ == "__main__":
    main()
