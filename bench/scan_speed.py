"""`scan` speed: a full checkpoint against merely reading it, and a LoRA adapter read without
merging against merging it and then scanning.

    python bench/scan_speed.py --release runs/quick [--repeats 5]

All timings in one process, alternating the contenders, medians over --repeats. Reading = every
tensor of the .safetensors file copied into memory with safetensors' own reader (what any loader
does at least). Measured from disk (page cache dropped before each; needs root) and warm.
The adapter is rank 16 on every linear layer (the standard LoRA attack's shape) with random B.
"Merge then scan" = PEFT loads the released model and the adapter, `merge_and_unload()`, and the
merged module is scanned in memory (cheaper than saving it and scanning the file)."""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from immunizer.breaker.reference import load_reference
from immunizer.breaker.sources import scan_module, scan_path

HERE = Path(__file__).parent


def read_file(path: Path) -> int:
    """Every tensor copied into memory: the least any loader does (safetensors maps the file; without
    the copy nothing but the header would be read)."""
    n = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            n += f.get_tensor(k).clone().numel()
    return n


def drop_page_cache() -> bool:
    """Cold-cache timings need root (Linux); returns False where the kernel does not allow it."""
    try:
        import os

        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", dest="manifest", default="runs/quick", help="an immunize output directory")
    ap.add_argument("--manifest", dest="manifest", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old name
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "scan_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    directory = Path(args.manifest)
    model_dir = directory / "model"
    weights = model_dir / "model.safetensors"
    _, reference = load_reference(directory)

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        lora = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        adapter = Path(tmp) / "adapter"
        lora.save_pretrained(adapter)
        del lora, base

        def merge_then_scan():
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter))
            return scan_module(reference, model.merge_and_unload())

        cold = {"read": [], "scan": []}
        for _ in range(args.repeats if drop_page_cache() else 0):  # from disk: what a registry scanning uploads sees
            drop_page_cache()
            cold["read"].append(timed(lambda: read_file(weights)))
            drop_page_cache()
            cold["scan"].append(timed(lambda: scan_path(reference, weights)))
        read_file(weights), scan_path(reference, weights)  # warm the page cache for both
        t = {"read": [], "scan": [], "adapter_scan": [], "merge_then_scan": []}
        for _ in range(args.repeats):
            t["read"].append(timed(lambda: read_file(weights)))
            t["scan"].append(timed(lambda: scan_path(reference, weights)))
            t["adapter_scan"].append(timed(lambda: scan_path(reference, adapter)))
            t["merge_then_scan"].append(timed(merge_then_scan))
        same = abs(scan_path(reference, adapter).statistic - merge_then_scan().statistic)
    med = {k: statistics.median(v) for k, v in t.items()}
    cold_med = {k: statistics.median(v) for k, v in cold.items() if v}
    result = {
        "cold_cache_median_seconds": cold_med or None,
        "cold_scan_over_read": cold_med["scan"] / cold_med["read"] if cold_med else None,
        "manifest": str(directory), "file_bytes": weights.stat().st_size, "repeats": args.repeats,
        "median_seconds": med, "all_seconds": t,
        "warm_scan_over_read": med["scan"] / med["read"],
        "merge_then_scan_over_adapter_scan": med["merge_then_scan"] / med["adapter_scan"],
        "adapter_vs_merged_statistic_abs_difference": same,
        "machine": "2-core CPU (no GPU)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=2))


if __name__ == "__main__":
    main()
