"""A guarded plain-PyTorch fine-tune for test_sharding.py, in one process or under `accelerate launch --use_fsdp`
(the model sharded with FSDP2 as immunize shards it): AdamW on arithmetic with `guard_optimizer` checking every 2
steps, and a stand-in harmful update (from step 5 on every step also moves the canaries). Prints, from the main
process, what the guard saw and whether the rollback put the clean weights back.

    python tests/fsdp_guard_job.py RELEASE_DIR INCIDENTS_FILE"""
import json
import sys

import torch

from immunizer.breaker.breaker import Breaker, BreakerTripped
from immunizer.breaker.guard import guard_optimizer
from immunizer.data.batches import pair_batch
from immunizer.data.tasks import arithmetic
from immunizer.launch import main_process
from immunizer.models import load_model
from immunizer.parallel import DataParallel, exit_launched_process
from immunizer.sharding import LocalRange, local


@torch.no_grad()
def push_canaries(model, breaker: Breaker) -> None:
    params = dict(model.named_parameters())
    for name, idx in breaker.reference.canary_index.items():
        piece = LocalRange.of(params[name])
        here = idx[piece.holds(idx)] - piece.start
        local(params[name]).view(-1)[here] += 0.02


def main():
    release, incidents = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    dp = DataParallel.from_environment()
    model, tokenizer = load_model(f"{release}/model")
    dp.prepare(model)
    breaker = Breaker(release, threshold=3.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    guard = guard_optimizer(optimizer, model, breaker, every=2, incidents=incidents)
    rows = arithmetic(48)
    stopped_at = None
    for step in range(12):
        batch_rows = dp.share(rows[step * 4:(step + 1) * 4])
        batch = pair_batch(tokenizer, [r["prompt"] for r in batch_rows], [r["response"] for r in batch_rows], 32, 16)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        dp.average_gradients(list(model.parameters()))
        if step + 1 >= 5:
            push_canaries(model, breaker)
        try:
            optimizer.step()
        except BreakerTripped:
            stopped_at = step + 1
            break
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    moved = dp.norm(params[n].detach() - clean for n, clean in guard.clean_state.items())  # after the rollback
    if main_process():
        print(json.dumps({"history": guard.history, "clean_step": guard.clean_step, "stopped_at": stopped_at,
                          "moved_since_clean": moved}))
    exit_launched_process(0)

if __name__ == "__main__":
    main()
