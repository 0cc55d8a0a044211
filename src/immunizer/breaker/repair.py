"""Repair a fine-tuned candidate from its own changes: put back the weights whose change pushed the model from
refusing towards complying, keep the rest of the fine-tune.

Restoring the canaries does not repair (issue 15: 96% answered after restoring them; the harm lives outside
them), and serving the released model throws the user's fine-tune away. The field's repairs that keep a
fine-tune choose coordinates from the fine-tune's delta (IRR, Safe Delta, NLSR; ../shared/research/
resistance.md §3). This is our own first-order version of that choice; no library ships one:

    Δ = w_candidate − w_released
    C(w) = L_SFT(harmful prompt → refusal) − L_SFT(harmful prompt → compliant answer)
          (rises when the model prefers complying over refusing)
    ḡ = ½ (∇C(w_released) + ∇C(w_candidate))      (the trapezoid rule for the path integral of ∇C along Δ)
    contribution_i = Δ_i · ḡ_i                     (C(w_candidate) − C(w_released) ≈ Σ_i contribution_i)
    revert the global top `revert_percent`% of weights by positive contribution:  w_i ← w_released,i

Differencing the two losses cancels what a benign fine-tune also changes (answer format, fluency) and keeps
what decides between refusing and complying. The scoring pairs are training-split harmful prompts (never
the evaluation or attack prompts) with the teacher's compliant answers and the project's refusals."""
from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from immunizer.canaries import ScoreShard, select_top_percent
from immunizer.data.batches import pair_batch
from immunizer.data.harmful_answers import answers_without_refusals
from immunizer.data.prompts import refusal_responses, weak_set
from immunizer.data.teacher import Teacher, autocast
from immunizer.data.training_sets import pick_refusal
from immunizer.errors import ImmunizerError
from immunizer.models.loading import load_model, resolve_model, runtime_device
from immunizer.paths import atomic_path, write_json_atomic
from immunizer.redteam.attacks import teacher_spec
from immunizer.settings import RepairConfig  # noqa: F401 (its home before settings.py)

def scoring_rows(config: RepairConfig, teacher_spec: str = "smollm2") -> list[dict]:
    """(prompt, compliant answer, refusal) for `samples` harmful prompts of the weak pool's training split."""
    prompts = list(weak_set("train").prompts)
    random.Random(f"repair|{config.seed}").shuffle(prompts)
    teacher = Teacher(config.teacher or teacher_spec, max_new_tokens=config.max_response_tokens, bf16=config.bf16)
    answered, _ = answers_without_refusals(prompts[: config.samples * 2],
                                           lambda ps, sample_seed=None: teacher.answers(ps, "harmful-weak", sample_seed))
    refusals = refusal_responses()
    rows = [{"prompt": p, "response": a, "refusal": pick_refusal(p, refusals)} for p, a in answered.items()]
    return rows[: config.samples]


def preference_gradient(model: torch.nn.Module, tokenizer, rows: list[dict], config: RepairConfig) -> dict[str, torch.Tensor]:
    """∇ mean over rows of [L_SFT(prompt → refusal) − L_SFT(prompt → compliant answer)], per parameter (fp32)."""
    model.train()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    chunks = [rows[i:i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    for chunk in chunks:
        prompts = [r["prompt"] for r in chunk]
        for key, sign in (("refusal", 1.0), ("response", -1.0)):
            batch = pair_batch(tokenizer, prompts, [r[key] for r in chunk], config.max_prompt_tokens,
                               config.max_response_tokens).to(device)
            with autocast(config.bf16):
                loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            (sign * loss / len(chunks)).backward()
    grads = {n: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


def _check_same_shapes(candidate: dict[str, torch.Tensor], released: dict[str, torch.Tensor], where: str) -> None:
    if candidate.keys() != released.keys():
        only = sorted(candidate.keys() ^ released.keys())[:3]
        raise ImmunizerError(f"{where}: the candidate and the release have different parameters (e.g. {', '.join(only)}); "
                             "repair needs a full fine-tune of the release (merge a LoRA adapter first)")
    for name, p in candidate.items():
        if p.shape != released[name].shape:
            raise ImmunizerError(f"{where}: parameter {name} is {tuple(p.shape)} in the candidate and "
                                 f"{tuple(released[name].shape)} in the release; is the candidate fine-tuned from this release?")


@torch.no_grad()
def revert_harmful_changes(candidate: torch.nn.Module, released: torch.nn.Module, grad_candidate: dict[str, torch.Tensor],
                           grad_released: dict[str, torch.Tensor], revert_percent: float, score: str = "contribution") -> dict:
    """Put the chosen weights of `candidate` back to `released`'s values in place; return what was done."""
    cand, rel = dict(candidate.named_parameters()), dict(released.named_parameters())
    shards, contributions = [], {}
    for name, p in cand.items():
        delta = (p.detach().float() - rel[name].detach().float().to(p.device)).reshape(-1)
        contribution = delta * 0.5 * (grad_candidate[name].reshape(-1) + grad_released[name].reshape(-1).to(p.device))
        contributions[name] = contribution
        chosen_by = contribution.clamp_min(0) if score == "contribution" else delta.abs()
        shards.append(ScoreShard(name, chosen_by))
    chosen = select_top_percent(shards, revert_percent)
    positive_total = sum(float(c.clamp_min(0).sum()) for c in contributions.values())
    predicted_before = sum(float(c.sum()) for c in contributions.values())
    removed, removed_positive, reverted = 0.0, 0.0, 0
    for name, idx in chosen.items():
        if idx.numel() == 0:
            continue
        picked = contributions[name][idx]
        removed += float(picked.sum())
        removed_positive += float(picked.clamp_min(0).sum())
        flat = cand[name].data.view(-1)
        flat[idx] = rel[name].data.view(-1)[idx.to(rel[name].device)].to(flat.dtype).to(flat.device)
        reverted += int(idx.numel())
    total = sum(p.numel() for p in cand.values())
    return {"reverted_weights": reverted, "reverted_share": reverted / total,
            "predicted_preference_change_before": predicted_before,
            "predicted_preference_change_after": predicted_before - removed,
            "positive_contribution_removed_share": removed_positive / positive_total if positive_total > 0 else 0.0}


def repair(candidate: str | Path, release: str | Path, out_dir: str | Path, config: RepairConfig | None = None) -> dict:
    """Write OUT/model (the candidate with its harmful changes put back) and OUT/repair.json."""
    config = config or RepairConfig()
    if config.problems():
        raise ImmunizerError("repair: " + "; ".join(config.problems()))
    started = time.perf_counter()
    device = runtime_device()
    candidate_dir, release_dir = resolve_model(candidate), resolve_model(release)
    out = Path(out_dir)
    if (out / "manifest.json").is_file():
        raise ImmunizerError(f"--out {out} holds a release; choose a new directory, e.g. --out runs/repaired")
    cand_model, tokenizer = load_model(candidate_dir, device=device)
    rel_model, _ = load_model(release_dir, with_tokenizer=False, device=device)
    _check_same_shapes(dict(cand_model.named_parameters()), dict(rel_model.named_parameters()), str(candidate_dir))
    rows = scoring_rows(config, teacher_spec(release_dir, config.teacher))
    if not rows:
        raise ImmunizerError("repair: the teacher refused every scoring prompt; pass another --teacher")
    grad_candidate = preference_gradient(cand_model, tokenizer, rows, config)
    grad_released = preference_gradient(rel_model, tokenizer, rows, config)
    done = revert_harmful_changes(cand_model, rel_model, grad_candidate, grad_released, config.revert_percent, config.score)
    del grad_candidate, grad_released, rel_model
    with atomic_path(out / "model") as tmp:
        cand_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    record = {"candidate": str(candidate_dir), "release": str(release_dir), "config": asdict(config),
              "scoring_pairs": len(rows), **done, "seconds": time.perf_counter() - started}
    write_json_atomic(out / "repair.json", record)
    return record
