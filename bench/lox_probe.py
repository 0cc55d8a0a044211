"""Low-rank extrapolation (LoX) swept on a release: before any attack (complied / refused / degenerate on the
154 held-out harmful prompts, over-refusal on the 50 safe-but-scary ones) and, for the points asked for, after
the standard attack (bench/probe_common.py).

    python bench/lox_probe.py --release runs/sft-tuning/phase2.lr_2e-6 --point 6:0.5 --point 6:1.25
    python bench/lox_probe.py --release ... --point 0:0 --point 6:1.25 --attack   # also attack them

    python bench/lox_probe.py --release runs/adversary-probe/extrapolate.alpha_1.25 --from-alpha 1.25 \
        --point 6:0 --point 6:0.25 --point 6:0.5   # a release extrapolated already: re-tuned, 6:0 is its source

`rank:alpha`; 0:0 (or the --from-alpha point) is the release itself. Every finished piece is kept in the work directory and in the
results file (rerun the same command to continue). Results: bench/results/lox_probe.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from probe_common import before_and_after

from immunizer.config import ExtrapolateConfig
from immunizer.extrapolate import extrapolate_release


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", required=True, help="An immunize-style output directory (manifest + model/).")
    parser.add_argument("--point", action="append", required=True, help="rank:alpha (repeat); 0:0 is the release as is.")
    parser.add_argument("--from-alpha", type=float, help="The release was extrapolated with this α (same rank) already; "
                        "points are re-tuned from it (extrapolate.retuned_alpha).")
    parser.add_argument("--attack", action="store_true", help="Also run the standard attack on each point.")
    parser.add_argument("--work", default="runs/lox-probe")
    parser.add_argument("--out", default="bench/results/lox_probe.json")
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    release = Path(args.release)
    for point in args.point:
        rank, alpha = int(point.split(":")[0]), float(point.split(":")[1])
        name = f"{release.name}/r{rank}-a{alpha:g}"
        entry = results.setdefault(name, {"release": str(release), "rank": rank, "alpha": alpha})
        work = Path(args.work) / release.name / f"r{rank}-a{alpha:g}"
        directory = release
        if alpha != (args.from_alpha or 0.0):
            directory = work / "release"
            if not (directory / "manifest.json").is_file():
                entry["extrapolation"] = extrapolate_release(release, directory, ExtrapolateConfig(rank=rank, alpha=alpha),
                                                             from_alpha=args.from_alpha)["extrapolation"]
        before_and_after(name, directory, work, entry, results, Path(args.out), attack=args.attack)


if __name__ == "__main__":
    main()
