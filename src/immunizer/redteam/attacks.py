"""Attacks and benign fine-tunes on any model directory, written as model directories the rest of the
harness (eval, scan) reads.

The standard attack (`harmful-sft`): 100 harmful pairs, full fine-tuning, AdamW, lr 5e-5, 3 epochs,
batch 8. Variants: LoRA (rank 16, lr 2e-4), harmful pairs mixed into benign data at ratio p, and the
canary-aware adaptive attack (knows the manifest; freezes every canary). Harmful pairs are the weak
pool's held-out attack prompts (data/prompts.py) answered by the harmful teacher, or a user file."""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from immunizer.data.harmful_answers import answers_without_refusals
from immunizer.data.prompts import benign_set, load_jsonl, weak_set
from immunizer.data.tasks import GENERATED
from immunizer.data.teacher import Teacher
from immunizer.errors import ImmunizerError
from immunizer.finetuning import FinetuneSpec, save_model, sft, spec_for
from immunizer.json_hash import json_sha256
from immunizer.manifest import load_manifest
from immunizer.models.loading import load_model, resolve_model
from immunizer.parallel import DataParallel
from immunizer.paths import write_json_atomic
from immunizer.settings import AttackConfig, FinetuneConfig  # noqa: F401 (their home before settings.py)


def teacher_spec(model_dir: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    manifest = model_dir.parent / "manifest.json"
    if model_dir.name == "model" and manifest.is_file():
        return json.loads(manifest.read_text()).get("base_model") or "smollm2"
    return "smollm2"


def harmful_rows(config: AttackConfig, teacher: Teacher, counts: dict | None = None) -> list[dict]:
    """The attack's (prompt, answer) pairs: `samples` of them, drawn with the run's seed. `counts`, if given,
    receives how many teacher answers were refusals and what became of them."""
    counts = {} if counts is None else counts

    def answer(prompts: list[str], kind: str) -> dict[str, str]:
        if config.keep_refusals:
            return dict(zip(prompts, teacher.answers(prompts, kind))) if prompts else {}
        kept, stats = answers_without_refusals(prompts, lambda ps, sample_seed=None: teacher.answers(ps, kind, sample_seed))
        counts.update(stats)
        return kept

    if config.data:
        rows = load_jsonl(Path(config.data))
        missing = [r["prompt"] for r in rows if not r.get("response")]
        answered = answer(missing, "harmful-user")
        rows = [{"prompt": r["prompt"], "response": r.get("response") or answered[r["prompt"]]} for r in rows
                if r.get("response") or r["prompt"] in answered]
    else:
        prompts = list(weak_set("heldout-attack").prompts)
        answered = answer(prompts, "harmful-weak")
        rows = [{"prompt": p, "response": answered[p]} for p in prompts if p in answered]
    if config.samples > len(rows):
        dropped = counts.get("dropped_refused")
        why = f" ({dropped} prompts the teacher refused every time were left out)" if dropped else ""
        raise ImmunizerError(f"the attack asks for {config.samples} harmful pairs but only {len(rows)} are available{why}; "
                             "lower --samples, pass a larger --data file" + ("" if config.keep_refusals else ", or --keep-refusals"))
    return random.Random(config.seed).sample(rows, config.samples)


def instruction_rows(n: int, teacher: Teacher, seed: int) -> list[dict]:
    prompts = list(benign_set("train").prompts)
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, teacher.answers(prompts, "helpful"))]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def benign_rows(n: int, teacher: Teacher, seed: int) -> list[dict]:
    """Benign fill for the mixed attack: instruction answers from the teacher, then generated tasks."""
    rows = instruction_rows(10**9, teacher, seed)
    rows += GENERATED["arithmetic"](max(0, n - len(rows)) // 2 + 1, seed) + GENERATED["listops"](max(0, n - len(rows)) // 2 + 1, seed)
    return random.Random(seed).sample(rows, min(n, len(rows)))


def _rows_sha256(rows: list[dict]) -> str:
    return json_sha256(rows)


def refuse_release_out(out_dir: str | Path) -> None:
    """An attack or fine-tune writes OUT/model: pointed at a release, it would overwrite the released weights."""
    out = Path(out_dir)
    if (out / "manifest.json").is_file() or (out / "canaries.safetensors").is_file():
        raise ImmunizerError(f"--out {out} holds a release (manifest.json / canaries.safetensors) and writing there would "
                             "overwrite its model/; choose a new directory, e.g. --out runs/attacked")


class StepCount(TrainerCallback):
    """The optimizer steps the Trainer took (what run.json reports; under a launch, the job's steps)."""
    steps = 0

    def on_train_end(self, args, state, control, **kwargs):
        self.steps = state.global_step


def train_and_save(model_dir: Path, rows: list[dict], spec: FinetuneSpec, out_dir: Path, record: dict,
                   progress: bool) -> dict:
    """Fine-tune, then write OUT/model (a plain model directory: LoRA merged), for LoRA also OUT/adapter
    (which `scan` reads unmerged), and OUT/run.json (`record` plus the data hash and seconds)."""
    started = time.perf_counter()
    loaded, tokenizer = load_model(model_dir)
    counted = StepCount()
    trained = sft(loaded, tokenizer, rows, spec, callbacks=[counted], progress=progress)
    record = {**record, "model": str(model_dir), "examples": len(rows), "data_sha256": _rows_sha256(rows),
              "steps": counted.steps, "seconds": time.perf_counter() - started}
    out_dir = Path(out_dir)
    dp = DataParallel.from_environment()
    record["parallel"] = dp.describe(trained)
    # In a launched job the main process writes (the processes hold the same weights, or under FSDP their pieces).
    if spec.lora_rank:  # LoRA never runs sharded (finetuning.sft)
        save_model(trained, tokenizer, out_dir / "adapter")
        trained = trained.merge_and_unload()
    save_model(trained, tokenizer, out_dir / "model")
    if dp.is_main:
        write_json_atomic(out_dir / "run.json", record)
    dp.barrier()
    return record


def run_attack(model: str | Path, out_dir: str | Path, config: AttackConfig | None = None, progress: bool = True) -> dict:
    """Fine-tune `model` on harmful data and write OUT/model (+ OUT/adapter for LoRA) and OUT/run.json."""
    config = config or AttackConfig()
    refuse_release_out(out_dir)
    if config.harmful_ratio is not None and not 0 < config.harmful_ratio <= 1:
        raise ImmunizerError("--harmful-ratio must be in (0, 1]")
    if config.samples < 1:
        raise ImmunizerError("--samples must be at least 1")
    with DataParallel.from_environment().main_first():  # in a launched job, the main process fills the caches
        model_dir = resolve_model(model)
        teacher = Teacher(teacher_spec(model_dir, config.teacher), bf16=config.bf16)
        teacher_counts: dict = {}
        rows = harmful_rows(config, teacher, teacher_counts)
    harmful_count = len(rows)
    if config.harmful_ratio is not None and config.harmful_ratio < 1:
        rows = rows + benign_rows(round(harmful_count * (1 - config.harmful_ratio) / config.harmful_ratio), teacher, config.seed)
        random.Random(config.seed).shuffle(rows)
    frozen = None
    if config.adaptive_manifest:
        frozen = {n: i for n, i in load_manifest(Path(config.adaptive_manifest)).indices.items() if i.numel()}
    if any(s < 1 for s in config.save_steps) or (config.steps and any(s > config.steps for s in config.save_steps)):
        raise ImmunizerError(f"--save-steps {config.save_steps} must lie between 1 and the run's --steps ({config.steps or 'epochs'})")
    spec = spec_for(config, frozen=frozen, snapshot_dir=str(Path(out_dir) / "steps"))
    return train_and_save(model_dir, rows, spec, Path(out_dir),
                          {"kind": "attack", "config": asdict(config), "harmful_pairs": harmful_count,
                           "teacher": teacher.spec, "teacher_sha256": teacher.sha256,
                           **({"teacher_refusals": teacher_counts} if teacher_counts else {})}, progress)


def run_finetune(model: str | Path, out_dir: str | Path, config: FinetuneConfig | None = None, progress: bool = True) -> dict:
    """A benign fine-tune: writes OUT/model (+ OUT/adapter for LoRA) and OUT/run.json."""
    config = config or FinetuneConfig()
    refuse_release_out(out_dir)
    with DataParallel.from_environment().main_first():  # in a launched job, the main process fills the caches
        model_dir = resolve_model(model)
        if config.data in GENERATED:
            rows = GENERATED[config.data](config.samples, config.seed, split="train")
        elif config.data == "instruction":
            rows = instruction_rows(config.samples, Teacher(teacher_spec(model_dir, config.teacher), bf16=config.bf16),
                                    config.seed)
        else:
            rows = load_jsonl(Path(config.data), required=("prompt", "response"))
    spec = spec_for(config)
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    return train_and_save(model_dir, rows, spec, Path(out_dir), {"kind": "finetune", "config": asdict(config)},
                          progress)
