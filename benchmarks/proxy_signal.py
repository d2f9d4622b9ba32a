"""Does a reversed trigger found again on the repaired model carry a backdoor signal? (issue 29,
item 4, measured once on the zoo's seed-0 MNIST rows).

For each cell of a grid with the given defense label: Neural Cleanse reverses a trigger per
class on the *original* model from two thirds of the clean data; the defense repairs the model
on all of it; then, for the three classes of smallest reversed norm, on the other third
(held-out images of other classes):

- ``reuse``: the share the original's reversed trigger sends to its class, stamped unchanged
  on the images given to the repaired model;
- ``bounded``: the share a trigger *found again on the repaired model* sends there: started
  from the original's, optimised 5 passes (Adam, lr 0.1, cross-entropy to the class) with its
  mask's L1 norm held at most at the original's (the mask scaled down when it grows past it).

Prints one JSON line per cell, with the measured CA and ASR (test set) before and after.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/proxy_signal.py \
        benchmarks/recommend_29.yaml fst-kd [--data mnist] > signal.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch.nn import functional as F

from goodnet.backdoor import attack_from_card
from goodnet.bench.cell import _model_and_data
from goodnet.bench.grid import load_grid
from goodnet.data import split_clean
from goodnet.data.dataset import ImageData, batches
from goodnet.defenses import make_defense
from goodnet.defenses.proxy import proxy_asr
from goodnet.methods import ReversedTrigger
from goodnet.metrics import evaluate
from goodnet.scans.nc import NCScanConfig, anomaly_indices, detect
from goodnet.scans.stamping import squash


def unsquash(v: torch.Tensor) -> torch.Tensor:
    """The tanh-space weights whose :func:`squash` is ``v``."""
    return torch.atanh((v.clamp(1e-4, 1 - 1e-4) - 0.5) * (2 - 1e-7))


def bounded(model: torch.nn.Module, fit: ImageData, start: ReversedTrigger, budget: float,
            passes: int = 5, lr: float = 0.1, seed: int = 0) -> ReversedTrigger:
    """``start``'s trigger optimised again on ``model`` with its mask's L1 norm <= ``budget``."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mask_w = unsquash(start.mask.clone()).requires_grad_(True)
    pattern_w = unsquash(start.pattern.clone()).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_w, pattern_w], lr=lr, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(seed)

    def current() -> tuple[torch.Tensor, torch.Tensor]:
        mask = squash(mask_w)
        return mask * torch.clamp(budget / mask.sum(), max=1.0), squash(pattern_w)

    for _ in range(passes):
        for x, y in batches(fit, 32, shuffle=True, generator=generator):
            keep = y != start.target
            if not keep.any():
                continue
            mask, pattern = current()
            logits = model((1 - mask) * x[keep] + mask * pattern)
            loss = F.cross_entropy(logits, torch.full((int(keep.sum()),), start.target))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        mask, pattern = current()
    return ReversedTrigger(start.target, mask, pattern, float(mask.sum()), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid")
    parser.add_argument("label")
    parser.add_argument("--data", default=None, help="only this data set's cells")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for cell in load_grid(args.grid).cells():
        job = cell.model
        if cell.defense.label != args.label or (args.data and job.data != args.data):
            continue
        started = time.time()
        loaded, test, clean = _model_and_data(job, cell.clean)
        attack = attack_from_card(loaded.card, dict(loaded.extras), test)
        held, fit = split_clean(clean, max(1, round(len(clean) / 3)), seed=0)
        original = loaded.model.eval()
        scan = detect(copy.deepcopy(original), fit, NCScanConfig(seed=0))
        norms = torch.tensor([t.norm for t in scan.triggers], dtype=torch.float64)
        order = [int(i) for i in torch.argsort(norms)[:3]]
        defense = make_defense(cell.defense.name, dict(cell.defense.settings))
        repaired = defense.repair(original, clean).model.eval()
        before, after = evaluate(original, test, attack), evaluate(repaired, test, attack)
        row = {"data": job.data, "attack": str(getattr(job.attack, "label", job.attack)),
               "ca0": before.clean_accuracy, "asr0": before.attack_success_rate,
               "ca1": after.clean_accuracy, "asr1": after.attack_success_rate,
               "flagged": list(scan.targets), "top3": order,
               "norms": [round(float(norms[k]), 1) for k in order],
               "ai": [round(float(a), 2) for a in anomaly_indices(norms)[order]]}
        for k in order:
            trigger = scan.triggers[k]
            for name, model in (("orig", original), ("rep", repaired)):
                found = bounded(model, fit, trigger, trigger.norm)
                row[f"{name}_{k}"] = {"reuse": proxy_asr(model, held, trigger),
                                      "bounded": proxy_asr(model, held, found)}
        row["seconds"] = time.time() - started
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
