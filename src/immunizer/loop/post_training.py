"""The post-training refreshes of the loop, on TRL's trainers: SFT on the refreshed (prompt, response)
rows (`finetuning.sft`, TRL's SFTTrainer) and a Bradley–Terry reward model on the preference pairs
(TRL's RewardTrainer: loss −log σ(r(chosen) − r(rejected))). Each writes a model directory and returns
a record with the inputs' hashes, the start and result model hashes and a before/after measurement on
its own data, so that a refresh that did not train shows."""
from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from immunizer.errors import ImmunizerError
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.loop.refresh import sha256_rows
from immunizer.models import load_model, model_dir_sha256, resolve_model
from immunizer.paths import atomic_path
from immunizer.redteam.judges import response_nll


def _save(model, tokenizer, out: Path) -> str:
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model_dir_sha256(out)


def sft_refresh(start_model: str | Path, rows: list[dict], out: str | Path, spec: FinetuneSpec,
                progress: bool = False) -> dict:
    """Fine-tune `start_model` on (prompt, response) rows; save the model to `out`."""
    start_dir = resolve_model(start_model)
    model, tokenizer = load_model(start_dir)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    started = time.perf_counter()
    before = statistics.fmean(response_nll(model, tokenizer, prompts, responses, bf16=spec.bf16))
    trained = sft(model, tokenizer, rows, spec, progress=progress)
    after = statistics.fmean(response_nll(trained, tokenizer, prompts, responses, bf16=spec.bf16))
    return {"trainer": "trl.SFTTrainer", "input_sha256": sha256_rows(rows), "rows": len(rows),
            "start_model": str(start_dir), "start_model_sha256": model_dir_sha256(start_dir),
            "model": str(out), "model_sha256": _save(trained, tokenizer, Path(out)), "spec": asdict(spec),
            "response_nll_before": before, "response_nll_after": after,
            "seconds": round(time.perf_counter() - started, 1)}


def load_reward_model(path: str | Path):
    """A sequence-classification model with one output (the reward). A causal LM directory gives its
    backbone and a new reward head; a reward model directory is continued as it is."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ImmunizerError(f"could not load a reward model from {path}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@torch.no_grad()
def reward_margins(model, tokenizer, pairs: list[dict], max_length: int = 256) -> list[float]:
    """r(prompt, chosen) − r(prompt, rejected) for each pair, the answers in the chat template."""
    model.eval()
    device = next(model.parameters()).device

    def reward(prompt: str, answer: str) -> float:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)[-max_length:]
        return model(input_ids=torch.tensor([ids], device=device)).logits[0, 0].item()

    return [reward(p["prompt"], p["chosen"]) - reward(p["prompt"], p["rejected"]) for p in pairs]


def reward_refresh(start: str | Path, pairs: list[dict], out: str | Path, spec: FinetuneSpec,
                   progress: bool = False) -> dict:
    """Train a Bradley–Terry reward model on (prompt, chosen, rejected) pairs with TRL's RewardTrainer,
    starting from `start` (the last reward model, or a causal LM whose backbone gets a new head).
    `spec` is a FinetuneSpec; full training only (no LoRA, no frozen entries)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    if spec.lora_rank or spec.frozen:
        raise ImmunizerError("the reward model refresh trains the full model: set lora_rank to 0 and leave frozen empty")
    if not pairs:
        raise ImmunizerError("the reward model refresh has no preference pairs; adjudicate harmful or over-refusal items first")
    if not progress:
        datasets.disable_progress_bars()
    torch.manual_seed(spec.seed)  # the new reward head's initialisation
    model, tokenizer = load_reward_model(start)
    started = time.perf_counter()
    margins_before = reward_margins(model, tokenizer, pairs, spec.max_length)
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                                           "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                           "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="immunizer-reward-") as tmp:
        args = RewardConfig(
            output_dir=tmp, learning_rate=spec.lr, num_train_epochs=spec.epochs, max_steps=spec.steps or -1,
            per_device_train_batch_size=spec.batch_size, max_length=spec.max_length, seed=spec.seed, bf16=spec.bf16,
            use_cpu=not cuda, optim="adamw_torch", weight_decay=0.0, warmup_steps=0, lr_scheduler_type="constant",
            save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=not progress,
            dataloader_num_workers=0)
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trained_pairs = len(trainer.train_dataset)  # TRL drops pairs longer than max_length
        if trained_pairs == 0:
            raise ImmunizerError(f"every preference pair is longer than reward max_length={spec.max_length} tokens; "
                                 "raise it (immunizer cycle --set reward.max_length=512)")
        trainer.remove_callback(PrinterCallback)  # stdout belongs to the CLI's JSON
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        trained = trainer.model
    margins_after = reward_margins(trained, tokenizer, pairs, spec.max_length)

    def accuracy(margins):
        return sum(m > 0 for m in margins) / len(margins)

    return {"trainer": "trl.RewardTrainer", "loss": "bradley-terry", "input_sha256": sha256_rows(pairs), "pairs": len(pairs),
            "pairs_trained": trained_pairs,
            "start_model": str(start), "start_model_sha256": model_dir_sha256(Path(start)),
            "model": str(out), "model_sha256": _save(trained, tokenizer, Path(out)), "spec": asdict(spec),
            "mean_margin_before": statistics.fmean(margins_before), "mean_margin_after": statistics.fmean(margins_after),
            "accuracy_before": accuracy(margins_before), "accuracy_after": accuracy(margins_after),
            "seconds": round(time.perf_counter() - started, 1)}
