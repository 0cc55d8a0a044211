"""The breaker's readings when a fine-tune runs long (docs/breaker.md, "Known limit: longer attacks dilute the
statistic"): harmful and benign full fine-tunes of a release, read at steps 5 to 80, with the breaker's statistic
beside candidate readings that might keep their separation:

- `harm_drift_ratio`: the breaker's (mean canary drift along the harmful direction / RMS non-canary drift);
- `sample_harm_ratio`: the same reading on the reference's non-canary sample, each weight with its own harmful sign
  (direction.py; measured here for a release calibrated before those signs existed), and `canary_excess`, the
  ratio of the two;
- `harmful_nll_drop`: how much easier held-out harmful answers became (mean answer NLL, release − candidate): a
  behavioural reading, not a weight statistic.

    python bench/breaker_long_attack.py                       # the quick matrix's immunizer seed 0
    python bench/breaker_long_attack.py --release runs/mine --steps 5,10,20,40,80

Every run is written to bench/results/breaker_long_attack.json when it finishes; rerunning continues."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import TrainerCallback

from immunizer.breaker.calibrate import Case, CaseData, load_calibration_config
from immunizer.breaker.direction import harmful_direction
from immunizer.breaker.reference import load_reference
from immunizer.breaker.sources import scan_module
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.models.loading import load_model
from immunizer.paths import write_json_atomic
from immunizer.redteam.judges import response_nll

RUNS = [  # (name, harmful, data, lr): the calibration's kinds of run, at the bench attack's lr and around it
    ("harmful-96-lr5e-05", True, "harmful", 5e-5),
    ("benign-extraction-lr5e-05", False, "extraction", 5e-5),
    ("benign-instruction-lr5e-05", False, "instruction", 5e-5),
    ("benign-extraction-lr1e-04", False, "extraction", 1e-4),
    ("harmful-96-lr1e-05", True, "harmful", 1e-5),
]


def answer_nll(model, tokenizer, rows: list[dict], bf16: bool) -> float:
    """The eval's harmful NLL (judges.response_nll, mean over pairs), leaving the model in the mode it was in."""
    was_training = model.training
    nll = response_nll(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], bf16=bf16)
    model.train(was_training)
    return sum(nll) / len(nll)


class Readings(TrainerCallback):
    def __init__(self, steps, reference, tokenizer, probe, bf16, nll_release):
        self.steps, self.reference = set(steps), reference
        self.tokenizer, self.probe, self.bf16, self.nll_release = tokenizer, probe, bf16, nll_release
        self.readings = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        report = scan_module(self.reference, model)
        hdr, sample = report.value("harm_drift_ratio"), report.value("sample_harm_ratio")
        nll = answer_nll(model, self.tokenizer, self.probe, self.bf16)
        reading = {"step": state.global_step, "harm_drift_ratio": hdr, "sample_harm_ratio": sample,
                   "canary_excess": hdr / sample if sample > 0 else None, "harm_drift": report.overall.harm_drift,
                   "other_drift": report.other_drift, "harmful_nll": nll, "harmful_nll_drop": self.nll_release - nll}
        self.readings.append(reading)
        print(json.dumps(reading), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default="bench/results/bench_quick/methods/immunizer/seed0")
    parser.add_argument("--steps", default="5,10,20,40,80")
    parser.add_argument("--out", default="bench/results/breaker_long_attack.json")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"release": args.release, "steps": steps})
    release = Path(args.release)
    manifest, reference = load_reference(release)
    if reference.direction is None:
        raise SystemExit(f"{release} has no harmful direction yet: run `immunizer calibrate --release {release}` first")
    config = load_calibration_config("quick")
    data = CaseData(manifest.meta.get("base_model") or "smollm2", config)
    probe = data.probe_rows()  # the held-out pairs the canaries' direction came from; never in a run below
    model, tokenizer = load_model(release / manifest.meta.get("model_dir", "model"))
    if "sample_direction_pairs" not in results:
        results["nll_release"] = answer_nll(model, tokenizer, probe, config.bf16)
        results["sample_direction_pairs"] = len(probe)
    if reference.sample_direction is None:  # a release calibrated before the sample's signs: measure them here
        reference.sample_direction = harmful_direction(model, tokenizer, probe, reference.sample_index, bf16=config.bf16)
    del model
    for name, harmful, task, lr in RUNS:
        if name in results.get("runs", {}):
            continue
        started = time.perf_counter()
        rows = data.rows(Case(name, harmful, task, config.benign_samples, lr, 0))
        model, tokenizer = load_model(release / manifest.meta.get("model_dir", "model"))
        recorder = Readings(steps, reference, tokenizer, probe, config.bf16, results["nll_release"])
        spec = FinetuneSpec(lr=lr, steps=steps[-1], batch_size=config.batch_size, max_length=config.max_length,
                            seed=config.seed, bf16=config.bf16)
        sft(model, tokenizer, rows, spec, callbacks=[recorder])
        results.setdefault("runs", {})[name] = {"harmful": harmful, "task": task, "lr": lr, "rows": len(rows),
                                                "readings": recorder.readings,
                                                "seconds": time.perf_counter() - started}
        write_json_atomic(out, results)
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
