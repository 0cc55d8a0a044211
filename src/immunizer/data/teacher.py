"""Teacher generations: greedy (or seeded sampled) answers from a teacher model, generated once and cached by
a hash of (teacher weights, prompts, generation settings)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from immunizer.data.chat import PROMPT_FIT, fit_prompt_ids
from immunizer.json_hash import json_sha256
from immunizer.models.hashing import model_dir_sha256
from immunizer.models.loading import load_model, resolve_model, runtime_device
from immunizer.paths import atomic_path, cache_dir
from immunizer.precision import use_bf16


def autocast(enabled: bool):
    """bf16 autocast when asked for and the hardware runs bf16 natively (precision.py), else a no-op."""
    if not use_bf16(enabled):
        return contextlib.nullcontext()
    return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int = 64, batch_size: int = 8,
             max_prompt_tokens: int = 256, bf16: bool = True, desc: str = "generating",
             sample_seed: int | None = None, done: dict[int, str] | None = None,
             on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """Greedy completions (or, with `sample_seed`, sampled ones: temperature 1, top-p 0.95, reproducible for a
    seed on the same hardware), batched with left padding. Long prompts keep the chat template's turn markers and
    the end of their text (the request; data/chat.py).
    Prompts are batched in order of length, so a batch pads to its own longest prompt, not the set's:
    prefill dominates generation on a CPU, and jailbreak-wrapped prompts are ten times longer than the rest.
    `done` (prompt index → answer) skips the batches it covers whole, so a resumed run makes the same batches
    (and draws the same samples) as one that was never interrupted; `on_batch(indices, answers)` sees each new one."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = [fit_prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str | None] = [None] * len(encoded)
    done = done or {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start:start + batch_size]
        if all(i in done for i in batch):
            for i in batch:
                outputs[i] = done[i]
            continue
        ids = [encoded[i] for i in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        decoding = {"do_sample": False}
        if sample_seed is not None:
            torch.manual_seed(sample_seed * 1_000_003 + start)
            decoding = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0}
        with autocast(bf16):
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **decoding)
        texts = [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        for i, text in zip(batch, texts):
            outputs[i] = text
        if on_batch is not None:
            on_batch(batch, texts)
    return outputs


def _finished_batches(partial: Path, prompts: list[str]) -> dict[int, str]:
    """The answers an interrupted generation kept (one JSON line per answer); a line torn by a crash is cut off."""
    if not partial.is_file():
        return {}
    data = partial.read_bytes()
    if data and not data.endswith(b"\n"):  # torn last line: appending after it would corrupt the next one
        data = data[:data.rfind(b"\n") + 1]
        with open(partial, "r+b") as sink:
            sink.truncate(len(data))
    done = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            if 0 <= row["index"] < len(prompts) and prompts[row["index"]] == row["prompt"]:
                done[row["index"]] = row["response"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def cache_path(prompts: list[str], model_sha256: str, kind: str, **settings) -> Path:
    """Where `cached_generate` keeps these answers."""
    # keyed on the precision the answers are generated at, not the one asked for (`bf16: true` is fp32 on a CPU
    # without native bf16, or under IMMUNIZER_BF16=0): greedy answers differ between the two, and a cache shared
    # by both would hand a later fp32 training the answers of an earlier bf16 one
    # and on how long prompts are cut (PROMPT_FIT): the teacher saw another prompt under the old cut
    key = json_sha256([model_sha256, list(prompts), {**settings, "bf16": use_bf16(settings.get("bf16", True)),
                                                     "prompt_fit": PROMPT_FIT}])
    return cache_dir() / "teacher" / f"{kind}-{key[:24]}.jsonl"


def _cached(path: Path, prompts: list[str]) -> list[str] | None:
    """The answers in a finished cache file for exactly these prompts, else None."""
    if not path.is_file():
        return None
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["response"] for r in rows] if [r["prompt"] for r in rows] == prompts else None


def cached_generate(model, tokenizer, prompts, model_sha256: str, kind: str, **settings) -> list[str]:
    """`generate`, memoized on disk under the cache directory. Each finished batch is appended (and synced) to a
    `.partial.jsonl` beside the cache file, so an interrupted generation (minutes for a teacher's answers on a
    CPU) continues where it stopped; the cache file itself is written atomically at the end. Processes that need
    the same answers at once (bench processes sharing one bench) generate them once: the first holds a file lock
    on them, the others wait for its cache file (the kernel frees the lock if it dies; the next continues its
    partial file)."""
    prompts = list(prompts)
    path = cache_path(prompts, model_sha256, kind, **settings)
    if (found := _cached(path, prompts)) is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.stem + ".lock")):
        if (found := _cached(path, prompts)) is not None:  # another process generated them while this one waited
            return found
        partial = path.with_name(path.stem + ".partial.jsonl")
        done = _finished_batches(partial, prompts)
        with open(partial, "a", encoding="utf-8") as sink:
            def keep(indices: list[int], answers: list[str]) -> None:
                sink.write("".join(json.dumps({"index": i, "prompt": prompts[i], "response": a}) + "\n"
                                   for i, a in zip(indices, answers)))
                sink.flush()
                os.fsync(sink.fileno())

            responses = generate(model, tokenizer, prompts, desc=f"teacher: {kind}", done=done, on_batch=keep,
                                 **settings)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses)))
        partial.unlink(missing_ok=True)
    return responses


class Teacher:
    """A teacher model loaded on first use; answers are cached on disk like immunize's own generations
    (same settings, so a run and a later calibration or attack share the cache)."""

    def __init__(self, spec: str, max_new_tokens: int = 48, bf16: bool = True):
        self.spec, self.max_new_tokens, self.bf16 = spec, max_new_tokens, bf16
        self._loaded = None

    @functools.cached_property
    def sha256(self) -> str:
        """Content hash of the teacher's weights: recorded with what it taught, even when every answer came from the cache."""
        return model_dir_sha256(resolve_model(self.spec))

    def model(self):
        """(model, tokenizer), loaded once."""
        if self._loaded is None:
            self._loaded = load_model(self.spec, device=runtime_device())
        return self._loaded

    def answers(self, prompts: list[str], kind: str, sample_seed: int | None = None) -> list[str]:
        """Greedy answers, or sampled ones for a `sample_seed` (cached apart from the greedy ones)."""
        model, tokenizer = self.model()
        sampling = {} if sample_seed is None else {"sample_seed": sample_seed}
        return cached_generate(model, tokenizer, prompts, self.sha256, kind, max_new_tokens=self.max_new_tokens,
                               batch_size=16, max_prompt_tokens=96, bf16=self.bf16, **sampling)
