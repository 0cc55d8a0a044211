"""Where a bench stands, read from its folder alone: which method-seeds are measured, which are half done (and
which pieces of them), which are training (how far), what is left, and how long that should take at the speed
this bench has measured so far. Nothing is trained or evaluated, no model is loaded: a matrix that runs over
several sessions, shards or machines can be checked at any time (`immunizer bench --out DIR --status`)."""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.redteam import claims
from immunizer.redteam.bench import BenchConfig, RunSpec, build_owner, pieces_done, run_done


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent, or written by a run in progress: counted as not done


def bench_config_of(out: Path) -> tuple[BenchConfig, int, set[str]]:
    """The configuration the bench in `out` was started with (OUT/bench_config.json), its --seeds and its
    prebuilt methods. Its methods are not part of it (each call may name others)."""
    recorded = _read(out / "bench_config.json")
    if recorded is None or "config" not in recorded:
        raise ImmunizerError(f"{out} holds no bench (no readable bench_config.json); pass the --out of an "
                             "`immunizer bench` run")
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    config = BenchConfig(**{k: v for k, v in recorded["config"].items() if k in fields})
    return config, int(recorded.get("seeds", 1)), set(recorded.get("prebuilt") or {})


def _methods(out: Path, methods: list[str] | None) -> list[str]:
    """--methods, else the methods the bench has started (its shard plan's, those with results, and those whose
    first build is under way)."""
    if methods:
        return methods
    plan = _read(out / "shard_plan.json")
    found = [name for _, name in plan["order"]] if plan else []
    found += sorted(p.name for p in (out / "runs").glob("*") if p.is_dir())
    found += sorted(p.name for p in (out / "methods").glob("*") if p.is_dir())
    return list(dict.fromkeys(found))


def _run_pieces(run_dir: Path, spec: RunSpec) -> tuple[bool, float | None]:
    """Whether one attack or fine-tune is done (record, result's evaluation and scan, every curve point), and the
    seconds it took (training plus its evaluations) when it is."""
    if not run_done(run_dir, spec):
        return False, None
    evals = [run_dir / "eval.json", *(run_dir / "curve" / f"step{s}.json" for s in spec.curve_steps)]
    seconds = [(_read(f) or {}).get("seconds") for f in [run_dir / "run.json", *evals]]
    return True, (sum(seconds) if all(isinstance(s, (int, float)) for s in seconds) else None)


def _training(release: Path) -> str | None:
    """How far an unfinished training has got, from its metrics log (None: not started on this machine)."""
    metrics = release / "metrics.jsonl"
    if (release / "manifest.json").is_file():
        return "built"
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "step" in record and "phase" in record and "event" not in record:  # a step run, not where one resumes
            last = record
    if last is None:
        return "training (started)"
    return f"training (cycle {last.get('cycle', 0) + 1}, phase {last['phase']}, step {last['step'] + 1})"


def bench_status(out_dir: str | Path, methods: list[str] | None = None) -> dict:
    """Each method-seed's state (`measured`, `in progress`, `training`, `to do`), its pieces done and to do, the
    pieces processes are measuring now and who (`measuring`), the shard that owns it where the bench is split,
    `rebuild` where a half-measured one's weights are missing here (how far their retraining has got, or "to
    train"), the seconds spent so far and an estimate of the seconds left (medians of the pieces finished here;
    None where no such piece has finished yet)."""
    from immunizer.baselines import extrapolation_parent

    out = Path(out_dir)
    config, seeds, prebuilt = bench_config_of(out)
    specs = config.runs()
    names = _methods(out, methods)
    held = claims.holders(out)
    plan = _read(out / "shard_plan.json")
    owner = {tuple(key): i % plan["shards"] + 1 for i, key in enumerate(plan["order"])} if plan else {}
    rows, spent = [], {"training": [], "pre_attack": [], **{s.name: [] for s in specs}}
    for name in names:
        for seed in range(config.method_seeds.get(name, seeds)):
            runs_dir = out / "runs" / name / f"seed{seed}"
            method = _read(runs_dir / "method.json")
            pre = _read(runs_dir / "pre_attack.json")
            done = ["pre_attack"] if pre else []
            if pre and isinstance(pre.get("seconds"), (int, float)) and not (name == "none" and seed > 0):  # copies of seed 0's
                spent["pre_attack"].append(pre["seconds"])
            for spec in specs:
                finished, seconds = _run_pieces(runs_dir / spec.name, spec)
                if finished:
                    done.append(spec.name)
                    if seconds is not None:
                        spent[spec.name].append(seconds)
            cost = (method or {}).get("own_seconds") or (method or {}).get("cost_seconds")
            if method and name != "none" and isinstance(cost, (int, float)) and cost > 0:
                spent["training"].append(cost)
            trains = name != "none" and name not in prebuilt and extrapolation_parent(name) is None
            training = _training(out / "methods" / name / f"seed{seed}") if trains else None
            measured = pieces_done(runs_dir, specs)
            # a half-measured method-seed whose weights are not on this machine (a fresh clone: builds are not
            # committed) trains again before its next piece, and must come out as the same model
            rebuild = trains and not measured and (done or method) and training != "built"
            if measured:
                state = "measured"
            elif done or method:
                state = "in progress"
            elif training and training != "built":
                state = training
            else:
                state = "to do"
            key = build_owner(name, seed, prebuilt)  # the shard plan's key
            prefix = claims.piece(name, seed, "")  # of the pieces processes are measuring now (claims.py)
            rows.append({"method": name, "seed": seed, "state": state, "shard": owner.get(key),
                         "done": done, "to_do": [p for p in ["pre_attack", *(s.name for s in specs)] if p not in done],
                         "rebuild": (training or "to train") if rebuild else None,
                         "measuring": {piece.removeprefix(prefix): who for piece, who in held.items()
                                       if piece.startswith(prefix)},
                         "trained": not trains or training == "built" or (bool(method) and not rebuild)})
    median = {piece: statistics.median(values) if values else None for piece, values in spent.items()}
    left, unknown = 0.0, set()
    for row in rows:
        for piece in (["training"] if not row["trained"] else []) + row["to_do"]:
            if median[piece] is None:
                unknown.add(piece)
            else:
                left += median[piece]
    return {"out": str(out), "method_seeds": len(rows), "measured": sum(r["state"] == "measured" for r in rows),
            "rows": rows, "seconds_spent": {k: sum(v) for k, v in spent.items()},
            "median_seconds": median, "seconds_left": left, "not_estimated": sorted(unknown),
            "shards": plan["shards"] if plan else None}


def format_status(status: dict) -> str:
    """The status as a table for a terminal."""
    lines = [f"{status['out']}: {status['measured']} of {status['method_seeds']} method-seeds measured"
             + (f" (split into {status['shards']} shards)" if status["shards"] else "")
             + ("; no method started yet: name them with --methods" if not status["rows"] else "")]
    width = max(len(r["method"]) for r in status["rows"]) if status["rows"] else 6
    for row in status["rows"]:
        shard = f" [shard {row['shard']}]" if row["shard"] else ""
        detail = f": done {', '.join(row['done']) or 'nothing yet'}" if row["state"] == "in progress" else ""
        if row["rebuild"]:
            detail += ("; its weights are not here: it trains again first" if row["rebuild"] == "to train"
                       else f"; its weights are not here: {row['rebuild']} again")
        if row["measuring"]:
            detail += "; now measuring " + ", ".join(f"{piece} (pid {who['pid']} on {who['host']}, since "
                                                     f"{who['since']})" for piece, who in row["measuring"].items())
        lines.append(f"  {row['method']:<{width}}  seed {row['seed']}  {row['state']}{shard}{detail}")
    hours = status["seconds_spent"]
    lines.append("time spent: " + ", ".join(f"{k} {v / 3600:.1f} h" for k, v in hours.items() if v))
    estimate = f"time left: about {status['seconds_left'] / 3600:.1f} h of one process at the medians measured here"
    if status["not_estimated"]:
        estimate += f", plus {', '.join(status['not_estimated'])} (none finished yet to measure)"
    lines.append(estimate + "; divide by the processes measuring it at once")
    return "\n".join(lines)
