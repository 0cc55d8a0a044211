"""The harmful direction at the canaries: the sign of the step a harmful fine-tune takes there.

Canaries are the weights with the largest |∂L_refusal/∂w|, so a harmful fine-tune's gradient is
large and consistent on them; AdamW then moves each one by ~lr per step in the sign of −∂L_SFT/∂w.
A benign fine-tune moves them too, but not consistently along this sign, so its projected drift
averages out near zero. Measured once, on the released model, from harmful (prompt, answer) pairs
held apart from the calibration runs; stored as ±1 per canary in reference.safetensors.

The same signs are kept for the reference's non-canary sample (`sample_harm_ratio`, drift.py): each sampled weight
with its own harmful sign. That reading dilutes far less than the canaries' when an attack runs on past what it
needs (bench/breaker_long_attack.py), and it does not depend on the canaries at all."""
from __future__ import annotations

import torch

from immunizer.data.batches import pair_batch
from immunizer.data.teacher import autocast


def harmful_direction(model: torch.nn.Module, tokenizer, rows: list[dict], canary_index: dict[str, torch.Tensor],
                      batch_size: int = 4, max_prompt_tokens: int = 96, max_response_tokens: int = 48,
                      bf16: bool = True) -> dict[str, torch.Tensor]:
    """sign(−Σ ∂L_SFT/∂w) at each canary over `rows`: +1 where harmful fine-tuning raises the weight."""
    return harmful_signs(model, tokenizer, rows, [canary_index], batch_size, max_prompt_tokens, max_response_tokens,
                         bf16)[0]


def harmful_signs(model: torch.nn.Module, tokenizer, rows: list[dict], index_sets: list[dict[str, torch.Tensor]],
                  batch_size: int = 4, max_prompt_tokens: int = 96, max_response_tokens: int = 48,
                  bf16: bool = True) -> list[dict[str, torch.Tensor]]:
    """sign(−Σ ∂L_SFT/∂w) over `rows` at each set of flat indices (per parameter name), from one gradient pass."""
    model.train()
    model.zero_grad(set_to_none=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = pair_batch(tokenizer, [r["prompt"] for r in chunk], [r["response"] for r in chunk],
                           max_prompt_tokens, max_response_tokens)
        device = next(model.parameters()).device
        with autocast(bf16):
            loss = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                         labels=batch.labels.to(device)).loss
        loss.backward()
    params = dict(model.named_parameters())
    signs = []
    for index in index_sets:
        direction = {}
        for name, idx in index.items():
            if idx.numel() == 0:
                continue
            grad = params[name].grad
            g = grad.reshape(-1)[idx.to(grad.device)].float().cpu() if grad is not None else torch.zeros(idx.numel())
            direction[name] = -torch.sign(g)
        signs.append(direction)
    model.zero_grad(set_to_none=True)
    model.eval()
    return signs
