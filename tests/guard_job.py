"""A guarded fine-tune for test_parallel.py, run in one process or under `accelerate launch`: TRL's SFTTrainer
on arithmetic with BreakerCallback watching, and a stand-in harmful gradient (every step from step 5 on also
moves the canaries). Prints, from the main process, what the guard saw.

    python tests/guard_job.py RELEASE_DIR INCIDENTS_FILE"""
import json
import sys

import torch
from transformers import TrainerCallback

from immunizer.breaker.breaker import Breaker
from immunizer.breaker.guard import BreakerCallback
from immunizer.data.tasks import arithmetic
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.models import load_model
from immunizer.launch import main_process
from immunizer.parallel import exit_launched_process


class PushCanaries(TrainerCallback):
    def __init__(self, breaker: Breaker, model, at: int):
        self.breaker, self.model, self.at = breaker, model, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, idx in self.breaker.reference.canary_index.items():
                    params[name].view(-1)[idx] += 0.02


def main():
    release, incidents = sys.argv[1], sys.argv[2]
    model, tokenizer = load_model(f"{release}/model")
    breaker = Breaker(release, threshold=3.0)
    guard = BreakerCallback(breaker, every=2, incidents=incidents)
    sft(model, tokenizer, arithmetic(64), FinetuneSpec(lr=1e-3, steps=12, batch_size=4, bf16=False),
        callbacks=[PushCanaries(breaker, model, at=5), guard])
    if main_process():
        print(json.dumps({"history": guard.guard.history, "clean_step": guard.guard.clean_step}))
    exit_launched_process(0)


if __name__ == "__main__":
    main()
