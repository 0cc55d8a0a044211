"""Scale-out figures for issue 18, in one command on a GPU machine (each piece is kept when done: rerun to continue).

    python bench/scale_gpu.py [--processes 1,8] [--steps 8] [--skip-quick]

1. `quick`: the quick preset on the embedded model in one process: wall time, device and peak memory (the
   `finished` event of metrics.jsonl).
2. `llama-1b`: a randomly initialised ~1.1B-parameter Llama (2048 hidden, 16 layers, 8192 MLP; the tiny
   byte-level tokenizer, so no weights or vocabulary are needed) immunized for --steps steps per phase under
   `accelerate launch --num_processes N`, data-parallel (key "N": every GPU holds the model and takes 1/N of
   each batch) and with FSDP full sharding (key "fsdp-N", N > 1: every GPU holds 1/N of the student, the
   reference and their optimizer state); the batch is 2 sequences per process. Reported per run: tokens/s over
   the timed steps (the steps' batch_tokens over their seconds; the first step of each phase is left out as
   warm-up), the speed-up over N = 1, and the peak memory per process.
On a machine without a GPU the script runs too (slowly: use --small --skip-quick --steps 2 to check it), which
is how CI-less changes to it are tried.
Results: bench/results/scale_gpu.json."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
ROOT = HERE.parent


def write(out: Path, results: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


def llama_1b(directory: Path, hidden: int = 2048, layers: int = 16) -> Path:
    """A random ~1.1B Llama with the tiny tokenizer, saved once (bf16 on disk: half the bytes)."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import LlamaConfig, LlamaForCausalLM

    from immunizer.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(directory)
    return directory


def run_figures(out_dir: Path, world_size: int) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "batch_tokens" in r and r.get("step", 0) > 0]
    finished = next(r for r in records if r.get("event") == "finished")
    tokens, seconds = sum(r["batch_tokens"] for r in steps), sum(r["seconds"] for r in steps)
    return {"processes": world_size, "seconds": finished["seconds"], "device": finished.get("device"),
            "peak_memory_bytes_per_process": finished.get("peak_memory_bytes"),
            # FSDP on CUDA: the peak while the whole models sat on the GPU, before they were sharded
            "loading_peak_memory_bytes": finished.get("loading_peak_memory_bytes"),
            "timed_steps": len(steps), "tokens_per_second": tokens / seconds if seconds else None,
            "median_step_seconds": statistics.median(r["seconds"] for r in steps) if steps else None}


def immunize_command(world_size: int, *args: str, engine: str = "ddp") -> list[str]:
    if world_size == 1:
        return [sys.executable, "-m", "immunizer", "immunize", *args]
    sharding = ["--use_fsdp", "--fsdp_version", "2"] if engine == "fsdp" else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *sharding, "--num_processes", str(world_size),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "immunizer", "immunize", *args]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", default=None, help="Comma-separated process counts (default: 1 and every GPU).")
    ap.add_argument("--steps", type=int, default=8, help="Steps per phase for the 1B model.")
    ap.add_argument("--engines", default="ddp,fsdp", help="Comma-separated: ddp (data-parallel), fsdp (FSDP2 full "
                    "sharding; runs only with 2+ processes).")
    ap.add_argument("--skip-quick", action="store_true")
    ap.add_argument("--small", action="store_true", help="A 2-layer, 256-wide model instead of 1B: checks the script "
                    "on a CPU in minutes (its figures go to --out under llama_small).")
    ap.add_argument("--work", default=str(ROOT / "runs" / "scale"))
    ap.add_argument("--out", default=str(HERE / "results" / "scale_gpu.json"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = (torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}") if torch.cuda.is_available() \
        else f"CPU ({os.cpu_count()} cores)"
    gpus = max(1, torch.cuda.device_count())
    counts = [int(n) for n in args.processes.split(",")] if args.processes else sorted({1, gpus})

    if not args.skip_quick and "quick" not in results:
        target = work / "quick"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(immunize_command(1, "--model", "smollm2", "--preset", "quick", "--out", str(target)), check=True)
        results["quick"] = {**run_figures(target, 1), "wall_seconds": time.perf_counter() - started}
        write(out, results)

    name = "llama_small" if args.small else "llama_1b"
    model = llama_1b(work / f"{name}-random", *((256, 2) if args.small else ()))
    done = results.setdefault(name, {})
    runs = [(engine, n) for engine in args.engines.split(",") for n in counts if engine == "ddp" or n > 1]
    for engine, n in runs:
        key = str(n) if engine == "ddp" else f"{engine}-{n}"
        if key in done:
            continue
        target = work / f"{name}-{key}"
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run(immunize_command(
            n, "--model", str(model), "--preset", "tiny", "--out", str(target), "--set", "cycles=1",
            "--set", f"phase1.steps={args.steps}", "--set", f"phase2.steps={args.steps}",
            "--set", f"phase1.batch_size={2 * n}", "--set", f"phase2.batch_size={2 * n}",
            "--set", "data.max_prompt_tokens=256", "--set", "data.max_response_tokens=128",
            "--set", f"checkpoint_every={10 * args.steps}", engine=engine), check=True)
        done[key] = {**run_figures(target, n), "engine": engine}
        one = done.get("1", {}).get("tokens_per_second")
        if one and done[key]["tokens_per_second"]:
            done[key]["speedup_over_one"] = done[key]["tokens_per_second"] / one
        write(out, results)
        shutil.rmtree(target / "model", ignore_errors=True)  # 2+ GB of random weights nobody needs
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
