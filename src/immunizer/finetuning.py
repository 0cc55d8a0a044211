"""Supervised fine-tuning of a causal LM on (prompt, response) rows with TRL's `SFTTrainer`, full or
LoRA (PEFT): the fine-tunes the breaker is calibrated on, and the harness's attacks and benign
fine-tunes. Loss on the response tokens only, chat template applied by TRL."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from immunizer.errors import ImmunizerError
from immunizer.launch import launched_sharded, launched_world_size, main_process, split_evenly
from immunizer.models.loading import runtime_device
from immunizer.paths import atomic_path
from immunizer.precision import use_bf16
from immunizer.sharding import full_state, is_sharded, trainer_settings


@dataclass
class FinetuneSpec:
    lr: float = 5e-5
    """AdamW learning rate (the standard harmful-SFT attack: 5e-5 full, 2e-4 LoRA)."""
    epochs: float = 1.0
    steps: int = 0
    """Optimizer steps; 0 runs `epochs` passes over the rows instead."""
    batch_size: int = 4
    lora_rank: int = 0
    """0: full fine-tuning; otherwise LoRA of this rank on every linear layer, alpha = 2·rank."""
    max_length: int = 160
    """Tokens per example (prompt + response), longer ones are cut."""
    seed: int = 0
    bf16: bool = True
    frozen: dict | None = None
    """Flat indices per parameter name to hold at their starting values (full fine-tuning only): the
    canary-aware adaptive attack, which knows the manifest and leaves the canaries alone."""
    save_steps: list[int] = field(default_factory=list)
    """Optimizer steps after which to save a snapshot into `snapshot_dir`/step{N}/ (`model/`, or `adapter/`
    for LoRA): the attack-strength curve reads several points of one run."""
    snapshot_dir: str | None = None


def spec_for(config, **extra) -> FinetuneSpec:
    """The FinetuneSpec of an attack's or a benign fine-tune's config (settings.py): the knobs they share
    with it, by name (lr, epochs, steps, batch_size, lora_rank, max_length, seed, bf16, save_steps), plus `extra`."""
    shared = {f.name for f in dataclasses.fields(FinetuneSpec)} & {f.name for f in dataclasses.fields(config)}
    return FinetuneSpec(**{name: copy.copy(getattr(config, name)) for name in shared}, **extra)


def to_dataset(rows: list[dict]):
    from datasets import Dataset

    if not rows:
        raise ImmunizerError("the fine-tuning set is empty; give at least one (prompt, response) row")
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])


def freeze_entries(model: torch.nn.Module, frozen: dict) -> None:
    """Zero the gradient at the given flat indices of each named parameter: with AdamW and no weight
    decay those weights then never move (their moments stay zero)."""
    params = dict(model.named_parameters())
    for name, idx in frozen.items():
        if name not in params or idx.numel() == 0:
            continue
        index = idx.to(params[name].device)

        def hook(grad, index=index):
            grad = grad.clone()
            grad.view(-1)[index] = 0
            return grad
        params[name].register_hook(hook)


def save_model(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """`save_pretrained` into `directory` atomically, by the main process of a launched job. Every process calls
    it: under FSDP the weights are first gathered from their pieces (into the main process's CPU memory)."""
    weights = None
    if any(is_sharded(p) for p in model.parameters()):
        weights, _ = full_state(model)
    if main_process():
        with atomic_path(directory) as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)


def snapshot_callback(steps: tuple[int, ...], directory: str, tokenizer):
    """A TrainerCallback that saves the model being trained after each of `steps` (atomically, so an
    interrupted run never leaves a half-written snapshot)."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in steps:
                lora = hasattr(model, "peft_config")
                save_model(model, tokenizer, Path(directory) / f"step{state.global_step}" / ("adapter" if lora else "model"))
            return control

    return Snapshots()


def per_process_batch(batch_size: int) -> int:
    """Under `accelerate launch` the Trainer runs data-parallel (DDP) by itself; each process takes an equal share
    of `batch_size`, so that a launched fine-tune takes the same optimizer steps as a one-process one."""
    return split_evenly(batch_size, launched_world_size(), "a batch of", "--batch-size N")


def sft(model: torch.nn.Module, tokenizer, rows: list[dict], spec: FinetuneSpec, callbacks=(), progress: bool = False):
    """Fine-tune `model` in place (full) or through a LoRA wrapper; returns the trained model (a
    `PeftModel` for LoRA, adapter unmerged)."""
    import datasets
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if not progress:
        datasets.disable_progress_bars()

    sharded = launched_sharded()
    if sharded and (spec.lora_rank or spec.frozen):
        raise ImmunizerError(f"{'LoRA' if spec.lora_rank else 'the canary-aware attack (--adaptive-release)'} does not "
                             "run under FSDP yet; launch it data-parallel (`accelerate launch --multi_gpu ...`)")
    if spec.frozen:
        if spec.lora_rank:
            raise ImmunizerError("freezing canaries applies to full fine-tuning; a LoRA update B·A cannot skip single weights")
        freeze_entries(model, spec.frozen)
    # IMMUNIZER_DEVICE=cpu keeps TRL's trainer off a GPU too; a launched job's device is the launcher's
    cuda = torch.cuda.is_available() if launched_world_size() > 1 else runtime_device().type == "cuda"
    with tempfile.TemporaryDirectory(prefix="immunizer-sft-") as out:
        args = SFTConfig(
            output_dir=out, learning_rate=spec.lr, num_train_epochs=spec.epochs, max_steps=spec.steps or -1,
            per_device_train_batch_size=per_process_batch(spec.batch_size), max_length=spec.max_length, seed=spec.seed,
            bf16=use_bf16(spec.bf16), use_cpu=not cuda, optim="adamw_torch", weight_decay=0.0, warmup_steps=0,
            lr_scheduler_type="constant", save_strategy="no", report_to="none", logging_strategy="no",
            disable_tqdm=not progress, dataloader_num_workers=0, completion_only_loss=True,
            **(trainer_settings(model) if sharded else {}),
        )
        peft_config = (LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, target_modules="all-linear",
                                  lora_dropout=0.0, task_type="CAUSAL_LM") if spec.lora_rank else None)
        callbacks = list(callbacks)
        if spec.save_steps:
            if not spec.snapshot_dir:
                raise ImmunizerError("save_steps needs a snapshot_dir to write the snapshots to")
            callbacks.append(snapshot_callback(tuple(spec.save_steps), spec.snapshot_dir, tokenizer))
        trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(rows), processing_class=tokenizer,
                             peft_config=peft_config, callbacks=callbacks)
        if len(trainer.train_dataset) == 0:
            raise ImmunizerError(f"every fine-tuning example lost its whole response to truncation at max_length="
                                 f"{spec.max_length} tokens; raise max_length or shorten the prompts")
        trainer.remove_callback(PrinterCallback)  # stdout belongs to the CLI's JSON; progress bars go to stderr
        with contextlib.redirect_stdout(sys.stderr):  # the progress bar's end-of-run log too
            trainer.train()
        trained = trainer.model
    trained.eval()
    return trained
