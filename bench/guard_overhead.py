"""The fine-tuning guard's cost per check as a share of training time at the default interval.

    python bench/guard_overhead.py --release runs/quick [--steps 6]

A full fine-tuning step (batch 4 x 96 tokens, bf16 autocast, AdamW) and a LoRA step (rank 16,
all linear layers) on the released model; a guard check = scanning the live weights plus, when
clean, copying the trainable weights as the new rollback point. Medians; the share is
check / (DEFAULT_EVERY x step)."""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from immunizer.breaker.breaker import Breaker
from immunizer.breaker.guard import DEFAULT_EVERY, FinetuneGuard
from immunizer.breaker.reference import load_reference
from immunizer.data.batches import pair_batch
from immunizer.data.prompts import weak_set
from immunizer.data.teacher import autocast
from immunizer.models import load_model

HERE = Path(__file__).parent


def measure(model, tokenizer, breaker, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    prompts = list(weak_set("train").prompts)[:4]
    batch = pair_batch(tokenizer, prompts, ["Sure, here is how."] * 4, 96, 48)
    guard = FinetuneGuard(breaker, model, every=DEFAULT_EVERY)
    step_s, check_s = [], []
    model.train()
    for i in range(steps + 1):
        started = time.perf_counter()
        with autocast(True):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step pays one-off allocations
            step_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        guard.check(i)
        check_s.append(time.perf_counter() - started)
    step, check = statistics.median(step_s), statistics.median(check_s[1:])
    return {"step_seconds": step, "check_seconds": check, "check_over_step": check / step,
            "share_at_default_interval": check / (DEFAULT_EVERY * step)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", dest="manifest", default="runs/quick", help="an immunize output directory")
    ap.add_argument("--manifest", dest="manifest", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old name
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(HERE / "results" / "guard_overhead.json"))
    args = ap.parse_args()
    manifest, reference = load_reference(Path(args.manifest))
    breaker = Breaker(args.manifest, threshold=float("inf"), manifest=manifest, reference=reference)
    model, tokenizer = load_model(Path(args.manifest) / "model")
    full = measure(model, tokenizer, breaker, args.steps)
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(Path(args.manifest) / "model")
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    lora_result = measure(lora, tokenizer, breaker, args.steps)
    result = {"manifest": args.manifest, "default_every": DEFAULT_EVERY, "full": full, "lora": lora_result,
              "machine": "2-core CPU (no GPU)"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
