"""How far does each Phase-1 adversary reach, next to the real attack? On one model (default: the tuned `sft`
release), the harmful SFT loss on 16 of the standard attack's pairs after each simulated attack and after the
real attack's snapshots (steps 10, 20, 39 of `bench/lox_probe.py --attack`), with the L2 / RMS displacement of
the weights. In sample for all, as in Phase 1 (the one-step adversaries step on those 16 pairs, `inner` on 4-pair
batches drawn from 32 that include them; the real attack trains on all 100). `sign_epsilon` and the `inner`
ranges are chosen from this.

    python bench/adversary_reach.py [--model runs/sft-tuning/phase2.lr_2e-6] [--attack-dir DIR]

Writes bench/results/adversary_reach.json."""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from immunizer.adversaries import harmful_sft_loss, inner_attack, lat_perturb, sign_perturb
from immunizer.data.batches import pair_batch
from immunizer.data.teacher import Teacher
from immunizer.models import load_model
from immunizer.paths import write_json_atomic
from immunizer.redteam.attacks import AttackConfig, harmful_rows


def rms(model, reference) -> tuple[float, float]:
    sq, n = 0.0, 0
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            sq += float(((p - q).float() ** 2).sum())
            n += p.numel()
    return math.sqrt(sq), math.sqrt(sq / n)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/sft-tuning/phase2.lr_2e-6")
    parser.add_argument("--attack-dir", default="runs/lox-probe/phase2.lr_2e-6/r0-a0/attack")
    parser.add_argument("--out", default="bench/results/adversary_reach.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = harmful_rows(AttackConfig(), Teacher("smollm2"))
    model, tokenizer = load_model(args.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    root_n = math.sqrt(sum(p.numel() for p in params))

    def batch(part):
        return pair_batch(tokenizer, [r["prompt"] for r in part], [r["response"] for r in part], 96, 48)

    step_batch = eval_batch = batch(rows[:16])

    def eval_loss() -> float:
        with torch.no_grad():
            return harmful_sft_loss(model, eval_batch, False).item()

    results = {"model": args.model, "eval_pairs": 16, "unattacked": eval_loss(), "adversaries": {}, "attack": {}}
    print("unattacked", results["unattacked"])
    trials = [("lat", 0.1), ("lat", 1.0)] + [("sign", e) for e in (1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3)]
    for kind, size in trials:
        started = time.perf_counter()
        moved = (lat_perturb if kind == "lat" else sign_perturb)(model, params, step_batch, size, False)
        entry = {"size": size, "loss": eval_loss(), "l2": moved.stats["adversary_l2"],
                 "rms": moved.stats["adversary_l2"] / root_n,
                 "seconds": time.perf_counter() - started}
        moved.undo()
        results["adversaries"][f"{kind} {size:g}"] = entry
        print(kind, size, entry)
    for k, lr in ((4, 5e-5), (8, 5e-5), (8, 1e-4)):
        started = time.perf_counter()
        batches = [batch(rows[(4 * i) % 32:(4 * i) % 32 + 4]) for i in range(k)]
        moved = inner_attack(model, params, batches, lr, False)
        entry = {"steps": k, "lr": lr, "loss": eval_loss(), "l2": moved.stats["adversary_l2"],
                 "rms": moved.stats["adversary_l2"] / root_n,
                 "seconds": time.perf_counter() - started}
        moved.undo()
        results["adversaries"][f"inner {k}x{lr:g}"] = entry
        print("inner", k, lr, entry)
    attack_dir = Path(args.attack_dir)
    for step, path in ((10, attack_dir / "steps/step10/model"), (20, attack_dir / "steps/step20/model"),
                       (39, attack_dir / "model")):
        if not path.is_dir():
            continue
        attacked, _ = load_model(path)
        l2, r = rms(attacked, model)
        with torch.no_grad():
            loss = harmful_sft_loss(attacked, eval_batch, False).item()
        results["attack"][str(step)] = {"loss": loss, "l2": l2, "rms": r}
        print("attack step", step, results["attack"][str(step)])
    write_json_atomic(Path(args.out), results)


if __name__ == "__main__":
    main()
