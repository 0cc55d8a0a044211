"""Measure chosen runs of one half-measured method-seed of a bench, with the bench's own functions, on a core the
bench's shards leave idle: how `bench_quick`'s `sft` seeds 0 and 1 got their last runs on 2026-12-02, so that a
method-seed finished within one session (its build is not committed, and another CPU cannot rebuild it bit for bit).

    IMMUNIZER_BF16=0 OMP_NUM_THREADS=1 python bench/finish_pieces.py METHOD SEED RUN[,RUN...] [--out DIR]

The runs are written exactly as the bench writes them, and the bench reads them back. The method-seed must be
built and evaluated before any attack (a shard has started it). Nothing coordinates this script with a shard
measuring the same method-seed: give it the runs the shard reaches last, and stop the shard (OUT/STOP) before it
gets to them, or both measure one run (once, a shard reached a run this script was still evaluating and stopped
with an error). Piece-level sharding in the bench itself is the proper fix (see the 2026-12-02 closing note)."""
import argparse
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.parallel import DataParallel
from immunizer.redteam import bench as b

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("method")
parser.add_argument("seed", type=int)
parser.add_argument("runs", help="comma-separated run names, e.g. harmful-sft-lora,benign-task")
parser.add_argument("--out", default="bench/results/bench_quick")
parser.add_argument("--preset", default="quick")
parser.add_argument("--set", dest="overrides", action="append", default=["breaker_calibration=quick_calibration_v1.json"])
args = parser.parse_args()

out = Path(args.out)
config = b.load_bench_config(args.preset, overrides=args.overrides)
specs = {spec.name: spec for spec in config.runs()}
unknown = [name for name in args.runs.split(",") if name not in specs]
if unknown:
    raise SystemExit(f"unknown run(s) {unknown}; the preset's are {', '.join(specs)}")
b._pin_precision(out)
runs_dir = out / "runs" / args.method / f"seed{args.seed}"
built = args.method == "none" or (out / "methods" / args.method / f"seed{args.seed}" / "manifest.json").is_file()
if not built or not (runs_dir / "pre_attack.json").is_file():  # never touch a training in progress
    raise SystemExit(f"{args.method} seed {args.seed} is not built and evaluated in {out}: let a shard start it first")
try:  # a recipe that changed since, or a build that is not the model measured, is refused as the bench does
    method = b._built_or_resume(args.method, config, args.seed, out, {})
    b._check_same_build(method, runs_dir / "pre_attack.json")
except ImmunizerError as exc:
    raise SystemExit(f"error: {exc}") from None
dp = DataParallel.single()
b._prepare_breaker(method, config, True, dp)
pre = b._evaluate(method.model_dir, runs_dir / "pre_attack.json", config)
for name in args.runs.split(","):
    print(f"finish_pieces: {args.method} seed {args.seed}: {name}", flush=True)
    b._run(method, specs[name], args.seed, runs_dir / name, config, True, pre, dp)
print("finish_pieces: done", flush=True)
