"""Canary selection time as a share of one training step, and its extra memory.

    python bench/canary_selection.py [--model smollm2] [--k-percent 1.0] [--repeats 5]

Scores are the real accumulated |gradient| of the SFT loss on a few harmful batches. The
training step is one full fine-tuning step (batch 4 x 96 tokens, bf16 autocast, AdamW).
Extra memory is the peak resident memory during selection minus the resident memory before
it (the scores, one fp32 per parameter, already exist then), sampled every millisecond. It is
measured in a fresh child process that only loads the scores: in the training process the
allocator reuses memory freed by the training steps, which would hide the selection's own use.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from immunizer.canaries import CanaryScores, ScoreShard, select_top_percent
from immunizer.data.batches import pair_batch
from immunizer.data.prompts import weak_set
from immunizer.data.teacher import autocast
from immunizer.losses import sft_loss
from immunizer.models import load_model

HERE = Path(__file__).parent


class PeakRSS:
    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.extra = max(0, self.peak - self.base)


def measure_memory(scores_file: str, k_percent: float) -> int:
    """Child process: peak extra RSS of one selection over scores loaded from `scores_file`."""
    scores = torch.load(scores_file)
    shards = [ScoreShard(n, s) for n, s in scores.items()]
    with PeakRSS() as mem:
        select_top_percent(shards, k_percent)
    return mem.extra


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child-memory":
        print(measure_memory(sys.argv[2], float(sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--k-percent", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "canary_selection.json"))
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.train()
    prompts = list(weak_set("train").prompts[:4])
    batch = pair_batch(tok, prompts, ["Sure, here is how to do that. " * 12] * 4, 48, 48)  # 96 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scores = CanaryScores(model)
    step_times = []
    for _ in range(args.repeats + 1):
        started = time.perf_counter()
        opt.zero_grad()
        with autocast(True):
            loss = sft_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - started)
        scores.accumulate(model)
    step = statistics.median(step_times[1:])
    select_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        selected = select_top_percent(scores.shards(), args.k_percent)
        select_times.append(time.perf_counter() - started)
    extras = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(scores.state_dict(), f"{tmp}/scores.pt")
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child-memory", f"{tmp}/scores.pt", str(args.k_percent)],
                                 check=True, capture_output=True, text=True).stdout
            extras.append(int(out.split()[-1]))
    num_parameters = sum(s.numel() for s in scores.scores.values())
    num_canaries = sum(v.numel() for v in selected.values())
    result = {
        "model": args.model, "num_parameters": num_parameters, "k_percent": args.k_percent, "num_canaries": num_canaries,
        "train_step_median_s": step, "selection_median_s": statistics.median(select_times),
        "selection_share_of_step": statistics.median(select_times) / step,
        "scores_bytes": num_parameters * 4,
        "selection_extra_rss_median_bytes": statistics.median(extras),
        "selection_extra_rss_max_bytes": max(extras),
        "output_indices_bytes": num_canaries * 8,
        "extra_rss_per_parameter_bytes": statistics.median(extras) / num_parameters,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
