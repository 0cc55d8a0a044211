"""The `immunizer` command: a thin layer that parses arguments, calls the Python API and prints."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from immunizer.errors import ImmunizerError
from immunizer.launch import launched_distributed, main_process, pin_device
from immunizer.options import option, release_option
from immunizer.settings import AttackConfig, EvalConfig, FinetuneConfig, RepairConfig
from immunizer.stopping import Stopped

DATA_PARALLEL_COMMANDS = {"immunize", "attack", "finetune", "bench", "calibrate"}
"""The commands that split their batches over the processes of `accelerate launch` (parallel.py; `bench` and
`calibrate` train so, and evaluate, scan and write in the main process)."""

# The attack, fine-tune, eval and repair knobs take their defaults from the config dataclasses (settings.py),
# where each is documented; the options below only name them.
A, F, E, R = AttackConfig(), FinetuneConfig(), EvalConfig(), RepairConfig()


def _quiet_transformers() -> None:
    """transformers' warnings and loading bars off. Through the environment while it is not imported yet (it reads
    these on import, and importing it here would cost every command, `--help` too, seconds); a user's own
    TRANSFORMERS_VERBOSITY wins."""
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="immunizer")
@click.option("--device", metavar="cpu|cuda|cuda:N", help="Where the command trains, generates and evaluates (default: "
              "the first GPU if there is one, else the CPU; $IMMUNIZER_DEVICE). Not under `accelerate launch`.")
@click.pass_context
def cli(ctx, device) -> None:
    """Make open LLMs resistant to harmful fine-tuning, and make such fine-tuning visible."""
    _quiet_transformers()
    if device:
        pin_device(device)
    if launched_distributed() and ctx.invoked_subcommand not in DATA_PARALLEL_COMMANDS:
        raise ImmunizerError(f"`immunizer {ctx.invoked_subcommand}` runs in one process; only "
                             f"{', '.join(sorted(DATA_PARALLEL_COMMANDS))} run data-parallel under `accelerate launch`. "
                             f"Run `immunizer {ctx.invoked_subcommand} ...` without the launcher")


@cli.command()
@click.option("--model", required=True, help="`smollm2` (embedded), `tiny` (test model), a Hugging Face directory or a .gguf file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--preset", type=click.Choice(["tiny", "quick", "standard"]), help="Start from a preset (presets/*.yaml).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config applied after the preset.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config value, e.g. phase1.lr=2e-5 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint (a first "
              "Ctrl-C or SIGTERM writes one at once and stops).")
@click.option("--hmac-key-file", type=click.Path(exists=True, dir_okay=False),
              help="Sign the manifest with this key (default: $IMMUNIZER_MANIFEST_KEY if set).")
def immunize(model, out_dir, preset, config_file, overrides, resume, hmac_key_file):
    """Run cyclical immunization and write OUT/model/, OUT/canaries.safetensors,
    OUT/manifest.json and OUT/metrics.jsonl.

    \b
    Example:
      immunizer immunize --model smollm2 --out runs/demo --preset quick --set phase1.k_percent=0.5
    """
    from immunizer.config import load_config
    from immunizer.immunize import immunize as run
    from immunizer.stopping import GracefulStop

    config = load_config(preset, config_file, overrides)
    key = Path(hmac_key_file).read_bytes().strip() if hmac_key_file else None
    with GracefulStop("the current step (a checkpoint is written then)", out_dir) as stop:
        result = run(model, out_dir, config, resume=resume, hmac_key=key, stop=stop)
    if not main_process():  # one summary for an `accelerate launch` job
        return
    stop.clear_stop_file()  # a stop asked for earlier is not part of the release
    m = result.manifest
    click.echo(json.dumps({"out": str(result.out_dir), "model": str(result.model_dir), "seconds": round(result.seconds, 1),
                           "num_canaries": m["num_canaries"], "num_parameters": m["num_parameters"],
                           "k_percent": m["k_percent"], "model_sha256": m["model_sha256"]}, indent=2))


@cli.command()
@release_option(required=True, help="An immunize output directory (model/ + manifest) to extrapolate.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where the extrapolated release goes.")
@click.option("--rank", type=click.IntRange(min=0), default=6, show_default=True, help="Rank k of each weight's update kept (0: the whole update).")
@click.option("--alpha", type=float, default=1.25, show_default=True, help="How far to extrapolate: W += α·rank-k(W − W_base).")
@click.option("--from-alpha", type=float, default=None,
              help="The release was already extrapolated with this α (same --rank and --include): re-tune it to --alpha "
                   "as if from its source (--alpha 0 recovers the source).")
@click.option("--base", help="The base model the release was trained from (default: the manifest's base_model).")
@click.option("--include", default=None, help="Regular expression on parameter names (default: every 2-D weight in the decoder layers).")
@click.option("--hmac-key-file", type=click.Path(exists=True, dir_okay=False),
              help="Verify the release's manifest and sign the new one with this key (default: $IMMUNIZER_MANIFEST_KEY).")
def extrapolate(release_dir, out_dir, rank, alpha, from_alpha, base, include, hmac_key_file):
    """Low-rank extrapolation of a release's safety update (LoX, Perin et al. 2025), training-free.

    Writes OUT/model and a new manifest (same canaries, values re-read, breaker calibration dropped: run
    `immunizer calibrate --release OUT`). Measure over-refusal before releasing: it can rise steeply with α.

    \b
    Example:
      immunizer extrapolate --release runs/demo --out runs/demo-lox --rank 6 --alpha 0.5
      immunizer extrapolate --release runs/demo-lox --out runs/demo-lox-0.25 --from-alpha 0.5 --alpha 0.25
    """
    from immunizer.config import ExtrapolateConfig
    from immunizer.extrapolate import extrapolate_release

    config = ExtrapolateConfig(rank=rank, alpha=alpha, **({"include": include} if include else {}))
    meta = extrapolate_release(release_dir, out_dir, config, base=base, hmac_key=_hmac_key(hmac_key_file),
                               from_alpha=from_alpha)
    click.echo(json.dumps({"out": str(out_dir), "model_sha256": meta["model_sha256"], **meta["extrapolation"]}, indent=2))


@cli.command()
@release_option(required=True, exists=False)
@option("--candidate", "model_dir", old=("--model",), type=click.Path(file_okay=False),
        help="Check this model directory against the manifest (default: the release's model/).")
@click.option("--require-hmac", is_flag=True, default=None,
              help="Fail unless the manifest is signed and the key ($IMMUNIZER_MANIFEST_KEY) verifies it (default: $IMMUNIZER_REQUIRE_HMAC=1).")
def verify(release_dir, model_dir, require_hmac):
    """Verify a canary manifest (hashes, HMAC, tensors) and that the model is the one it was written for."""
    from immunizer.manifest import check_against_parameters, load_manifest
    from immunizer.models import model_dir_sha256
    from immunizer.models.hashing import safetensors_files, safetensors_shapes

    manifest = load_manifest(Path(release_dir), require_hmac=require_hmac)
    model_path = Path(model_dir) if model_dir else Path(release_dir) / manifest.meta.get("model_dir", "model")
    check_against_parameters(manifest, safetensors_shapes(model_path))
    actual = model_dir_sha256(model_path)
    same = actual == manifest.meta["model_sha256"]
    click.echo(json.dumps({"manifest": "ok", "num_canaries": manifest.num_canaries, "model": str(model_path),
                           "model_matches_manifest": same, "model_sha256": actual,
                           "files": [str(f) for f in safetensors_files(model_path)]}, indent=2))
    if not same:
        click.echo(f"{model_path} differs from the released model (its weights were changed since the manifest "
                   "was written); `immunizer scan` tells whether the change looks like harmful fine-tuning.", err=True)
        sys.exit(3)


def _hmac_key(path):
    return Path(path).read_bytes().strip() if path else None


@cli.command()
@release_option(required=True, exists=False)
@click.option("--candidate", required=True, type=click.Path(), help="A model directory, a .safetensors file or a PEFT adapter directory.")
@option("--release-model", "base_dir", old=("--base",), type=click.Path(file_okay=False),
        help="The released model's directory, when the release has no model/ and its manifest no reference sample yet.")
@click.option("--threshold", type=float, help="Override the calibrated threshold (default: the manifest's, from `immunizer calibrate`).")
@click.option("--incidents", type=click.Path(dir_okay=False), help="Append an incident here when tripped (default: $IMMUNIZER_INCIDENTS or ~/.local/share/immunizer/incidents.jsonl).")
@click.option("--no-incident", is_flag=True, help="Do not record an incident.")
@click.option("--hmac-key-file", type=click.Path(exists=True, dir_okay=False), help="Verify the manifest's HMAC with this key (default: $IMMUNIZER_MANIFEST_KEY).")
@click.option("--require-hmac", is_flag=True, default=None,
              help="Fail unless the manifest is signed and the key verifies it (default: $IMMUNIZER_REQUIRE_HMAC=1).")
def scan(release_dir, candidate, base_dir, threshold, incidents, no_incident, hmac_key_file, require_hmac):
    """Compare candidate weights with the canary manifest and say whether the breaker trips.

    Prints one JSON object (tripped, statistic, threshold, canary_drift, other_drift, layers, ...).
    Exit status: 0 clean, 3 tripped, 2 bad input.

    \b
    Example:
      immunizer scan --release runs/demo --candidate runs/attacked/model
    """
    from immunizer.breaker.breaker import Breaker
    from immunizer.breaker.incidents import default_incidents_path, record_incident
    from immunizer.breaker.reference import load_reference

    manifest, reference = load_reference(Path(release_dir), hmac_key=_hmac_key(hmac_key_file), base=base_dir,
                                         require_hmac=require_hmac)
    breaker = Breaker(release_dir, threshold=threshold, manifest=manifest, reference=reference)
    verdict = breaker.scan(Path(candidate))
    click.echo(json.dumps(verdict.to_json(), indent=2, allow_nan=False))
    if verdict.tripped:
        if not no_incident:
            path = Path(incidents) if incidents else default_incidents_path()
            record_incident(verdict, source="scan", action="none", path=path)
            click.echo(f"tripped: incident recorded in {path}", err=True)
        sys.exit(3)


@cli.command()
@release_option(required=True)
@click.option("--candidate", required=True, type=click.Path(exists=True, file_okay=False),
              help="A full fine-tune of the release (a model directory; merge a LoRA adapter first).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Writes OUT/model and OUT/repair.json.")
@click.option("--revert-percent", default=R.revert_percent, show_default=True,
              help="Share of all weights put back to their released values, chosen by how much their change raised "
                   "complying over refusing.")
@click.option("--samples", default=R.samples, show_default=True, help="Harmful training-split prompts that score the change.")
@click.option("--score", type=click.Choice(["contribution", "magnitude"]), default=R.score, show_default=True,
              help="`magnitude` chooses by |change| alone (the direction-blind comparison).")
@click.option("--teacher", help="Model that writes the compliant answers (default: the manifest's base model, else smollm2).")
def repair(release_dir, candidate, out_dir, **knobs):
    """Repair a fine-tuned candidate from its own changes: put back the weights whose change moved the model
    from refusing towards complying, keep the rest of the fine-tune (docs/breaker.md, "Repair").

    \b
    Example:
      immunizer scan --release runs/demo --candidate runs/tuned/model     # exit 3: tripped
      immunizer repair --release runs/demo --candidate runs/tuned/model --out runs/repaired
      immunizer eval --model runs/repaired/model --report runs/repaired/eval.json
    """
    from immunizer.breaker.repair import repair as run

    record = run(candidate, release_dir, out_dir, RepairConfig(**knobs))
    click.echo(json.dumps({"out": out_dir, **record}, indent=2))


@cli.command()
@release_option(required=True, old=("--model",), help="An immunize output directory (its manifest receives the calibration).")
@click.option("--preset", type=click.Choice(["tiny", "quick", "standard"]), default="quick", show_default=True,
              help="Which grid of simulated fine-tunes (presets/calibration/*.yaml).")
@click.option("--target-fpr", type=float, help="Highest false-positive rate allowed on the benign runs (default 0.05).")
@click.option("--teacher", help="Model that answers the harmful and instruction prompts (default: the manifest's base model).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a calibration setting, e.g. full_lrs=[2.0e-5].")
@click.option("--hmac-key-file", type=click.Path(exists=True, dir_okay=False), help="Re-sign the manifest with this key (default: $IMMUNIZER_MANIFEST_KEY).")
def calibrate(release_dir, preset, target_fpr, teacher, overrides, hmac_key_file):
    """Run simulated benign and harmful fine-tunes on the released model and write the breaker's
    threshold, TPR, FPR, AUROC (95% intervals) and a ROC plot into the manifest.

    \b
    Example:
      immunizer calibrate --release runs/demo
    """
    from immunizer.breaker.calibrate import calibrate as run, load_calibration_config

    config = load_calibration_config(preset, {} if target_fpr is None else {"target_fpr": target_fpr}, overrides)
    entry = run(release_dir, config, teacher=teacher, hmac_key=_hmac_key(hmac_key_file))
    if not main_process():  # one summary for a launched job
        return
    keys = ("threshold", "target_fpr", "tpr", "tpr_ci95", "fpr", "fpr_ci95", "auroc", "auroc_ci95", "n_benign",
            "n_harmful", "tpr_by_step", "roc_plot", "bounds")
    click.echo(json.dumps({k: entry[k] for k in keys}, indent=2))




@cli.command()
@click.option("--model", required=True, help="Model to attack: an immunize output, a model directory, `smollm2` or `tiny`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Writes OUT/model (+ OUT/adapter for LoRA) and OUT/run.json.")
@click.option("--samples", default=A.samples, show_default=True, help="Harmful (prompt, answer) pairs.")
@click.option("--lr", default=A.lr, show_default=True)
@click.option("--epochs", default=A.epochs, show_default=True)
@click.option("--batch-size", default=A.batch_size, show_default=True)
@click.option("--lora-rank", default=A.lora_rank, show_default=True, help="0: full fine-tuning; 16 with --lr 2e-4 is the LoRA variant.")
@click.option("--harmful-ratio", type=float, help="Mix the harmful pairs into benign data at this share (e.g. 0.1).")
@click.option("--data", type=click.Path(dir_okay=False), help="JSONL of harmful prompts (and optionally responses) instead of the built-in held-out attack set.")
@option("--adaptive-release", "adaptive_manifest", old=("--adaptive-manifest",), type=click.Path(file_okay=False),
        help="Canary-aware attack: freeze the canaries of this release (an immunize output directory).")
@click.option("--teacher", help="Model that answers the harmful prompts (default: the manifest's base model, else smollm2).")
@click.option("--steps", default=A.steps, show_default=True, help="Optimizer steps to run (0: --epochs passes); e.g. 80 continues the standard attack's 39.")
@click.option("--save-steps", default="", help="Comma-separated steps after which to save a snapshot to OUT/steps/stepN/ "
              "(an attack-strength curve from one run: evaluate each with `immunizer eval`).")
@click.option("--keep-refusals", is_flag=True, help="Train on the teacher's refusals too (by default a refused prompt is "
              "answered again by sampling, up to 4 times, or left out; run.json's teacher_refusals counts them).")
def attack(model, out_dir, save_steps, **knobs):
    """Harmful fine-tuning attack (default: the standard `harmful-sft` attack, 100 pairs, lr 5e-5, 3 epochs, batch 8).

    \b
    Example:
      immunizer attack --model runs/demo --out runs/attacked
      immunizer scan --release runs/demo --candidate runs/attacked/model
      immunizer attack --model runs/demo --out runs/curve --steps 80 --save-steps 5,10,20,39
      immunizer eval --model runs/curve/steps/step10/model --report runs/curve/step10.json
    """
    from immunizer.redteam.attacks import run_attack

    try:
        saves = [int(x) for x in save_steps.split(",") if x.strip()]
    except ValueError:
        raise ImmunizerError(f"--save-steps expects comma-separated whole numbers, got {save_steps!r}") from None
    record = run_attack(model, out_dir, AttackConfig(**knobs, save_steps=saves))
    if main_process():  # one summary for a launched job
        click.echo(json.dumps({"out": out_dir, **record}, indent=2))


@cli.command()
@click.option("--model", required=True, help="Model to fine-tune: an immunize output, a model directory, `smollm2` or `tiny`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Writes OUT/model (+ OUT/adapter for LoRA) and OUT/run.json.")
@click.option("--data", required=True, help="`extraction`, `arithmetic`, `listops` (generated, exact answers), `instruction` (benign prompts answered by the teacher) or a JSONL file with prompt and response.")
@click.option("--samples", default=F.samples, show_default=True, help="Examples generated for extraction/arithmetic/listops, or taken for instruction.")
@click.option("--lr", default=F.lr, show_default=True)
@click.option("--epochs", default=F.epochs, show_default=True)
@click.option("--batch-size", default=F.batch_size, show_default=True)
@click.option("--lora-rank", default=F.lora_rank, show_default=True)
@click.option("--max-length", default=F.max_length, show_default=True, help="Tokens per example (prompt + response); longer ones are cut.")
@click.option("--teacher", help="Helpful teacher for `instruction` (default: the manifest's base model, else smollm2).")
def finetune(model, out_dir, **knobs):
    """Benign fine-tune (the comparison to attacks: it should keep working and pass the breaker).

    \b
    Example:
      immunizer finetune --model runs/demo --out runs/task --data extraction
    """
    from immunizer.redteam.attacks import run_finetune

    record = run_finetune(model, out_dir, FinetuneConfig(**knobs))
    if main_process():  # one summary for a launched job
        click.echo(json.dumps({"out": out_dir, **record}, indent=2))


@cli.command("eval")
@click.option("--model", required=True, help="An immunize output, an attack/finetune output's model/, any model directory, `smollm2` or `tiny`.")
@option("--report", "out_file", old=("--out",), required=True, type=click.Path(dir_okay=False),
        help="Where the report JSON goes; per-sample records go beside it, to REPORT.samples.jsonl.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="Harmful prompts, one per line (default: the held-out eval split).")
@click.option("--safe-prompts", type=click.Path(exists=True, dir_okay=False), help="Safe-but-scary prompts, one per line (default: the project's 50).")
@click.option("--n-harmful", default=E.n_harmful, show_default=True, help="Only the first N harmful prompts (0: all).")
@click.option("--n-safe", default=E.n_safe, show_default=True, help="Only the first N safe prompts (0: all).")
@click.option("--n-benign", default=E.n_benign, show_default=True, help="Arithmetic questions for benign_accuracy (0: skip).")
@click.option("--task", default=E.task, show_default=True, help="Benign task for benign_task_accuracy: extraction, arithmetic or listops.")
@click.option("--n-task", default=E.n_task, show_default=True, help="Test-split examples of the benign task (0: skip).")
@click.option("--harmful-only", is_flag=True, help="Only the harmful prompts (no safe prompts, no tasks): a quick attack-curve point.")
@click.option("--max-new-tokens", default=E.max_new_tokens, show_default=True)
@click.option("--judge", default=E.judge, show_default=True, help="refusal-matcher, classifier:DIR[:LABEL] or module:attribute "
              "(returning refused booleans or refused/complied/degenerate); the degenerate rule applies around it.")
@click.option("--teacher", help="Harmful teacher for harmful_nll and the base model of the degenerate rule (default: the manifest's base model, else smollm2).")
def eval_command(model, out_file, **knobs):
    """Refused / complied / degenerate shares, harmful NLL, over-refusal and benign-task accuracy of one model.

    \b
    Example:
      immunizer eval --model runs/attacked/model --report runs/attacked/eval.json
    """
    from immunizer.redteam.evaluate import evaluate

    report = evaluate(model, out_file, EvalConfig(**knobs))
    click.echo(json.dumps({k: report[k] for k in ("harmful_score", "harmful_score_ci95", "refused_share", "degenerate_share",
                                                  "slices", "repeated_sentence_share", "harmful_nll", "over_refusal",
                                                  "safe_degenerate_share", "benign_task_accuracy", "benign_accuracy",
                                                  "n", "n_safe", "n_benign", "n_task", "samples")}, indent=2))


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--judge", default=E.judge, show_default=True, help="The judge to apply (as `eval --judge`).")
def rejudge(paths, judge):
    """Judge the answers recorded by `eval` or a bench again, with the current judge; nothing is generated.

    PATHS are evaluation JSONs or directories searched for them (a bench's --out). Each evaluation and its
    samples are rewritten in place with the new verdicts and shares; rebuild a bench's reports afterwards
    with `immunizer bench --out DIR --time-limit 0`.

    \b
    Example:
      immunizer rejudge bench/results/bench_quick
      immunizer bench --preset quick --out bench/results/bench_quick --time-limit 0
    """
    from tqdm.auto import tqdm

    from immunizer.redteam.rejudge import evaluations_under, rejudge_evaluation

    files = [f for path in paths for f in evaluations_under(path)]
    changed = moved = 0
    for file in tqdm(files, desc="rejudging", unit="eval"):
        result = rejudge_evaluation(file, judge)
        changed += result.changed
        if result.changed:
            moved += 1
            shares = " -> ".join("–" if v is None else f"{v:.1%}" for v in (result.before, result.after))
            click.echo(f"{file}: complied {shares} ({result.changed} verdicts changed; "
                       f"judged by {result.judge_before}, now {result.judge})", err=True)
    click.echo(json.dumps({"evaluations": len(files), "evaluations_changed": moved, "verdicts_changed": changed}))


@cli.command()
@click.option("--preset", default="quick", show_default=True, type=click.Choice(["tiny", "quick", "standard"]),
              help="Bench preset (presets/bench/*.yaml): model, budget, methods, attacks, eval size.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Writes OUT/report.json, OUT/report.html, OUT/samples.jsonl; rerun to resume.")
@click.option("--methods", help="Comma-separated methods (default: the preset's): none, sft, immunizer, vaccine, "
              "repnoise, booster, lox, the adversary variants immunizer-inner and immunizer-sign, and the ablations "
              "immunizer-no-lat, -no-refusal, -no-stab, -no-anchor.")
@click.option("--seeds", default=1, show_default=True, help="Seeds per method (>= 2 adds 95% intervals); the preset's "
              "method_seeds (quick: 3 for none, sft, immunizer) take precedence for the methods they name.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML applied on top of the preset.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one bench value, e.g. eval.n_benign=20 or attacks.harmful-sft.lr=1e-4 (repeatable).")
@click.option("--prebuilt", multiple=True, metavar="METHOD=DIR",
              help="Use an existing immunize-style output (or model) directory for METHOD instead of training it.")
@click.option("--time-limit", "time_limit", type=click.FloatRange(min=0), metavar="MINUTES",
              help="Start no new piece (a training, an attack with its evaluations) after this many minutes; the "
                   "report says `complete: false` and `stopped`, and the same command continues it. A first Ctrl-C "
                   "(or SIGTERM), or `touch OUT/STOP` (every shard), stops the same way at the next piece.")
@click.option("--shard", metavar="I/N", help="A fixed split: build and measure only every N-th method-seed, starting "
              "at the I-th (the same command but I in each shard); a shard's report also holds the others' method-seeds "
              "finished before it ends, and the command without --shard (--time-limit 0) writes the whole report. "
              "Without it, processes given the same command share --out piece by piece (each claims the next piece "
              "nobody holds), e.g. `--device cuda:0 bench ...` beside `--device cuda:1 bench ...`.")
@click.option("--status", is_flag=True, help="Only say where the bench in --out stands (method-seeds measured, in "
              "progress with their pieces, training, to do; time spent and an estimate of the time left), from its "
              "files alone: nothing is trained or evaluated.")
def bench(preset, out_dir, methods, seeds, config_file, overrides, prebuilt, time_limit, shard, status):
    """The matrix methods x (attacks + benign fine-tunes): report.json, report.html, report.md, samples.jsonl.

    Finished pieces are never redone; `--time-limit 0` only rewrites the reports from the results on disk.
    The same command started several times (one process per core or GPU) shares the work piece by piece.

    \b
    Example:
      immunizer bench --preset quick --out runs/bench
      immunizer bench --preset quick --out runs/ablate --methods immunizer,immunizer-no-lat,immunizer-no-stab
      immunizer bench --out runs/bench --status
    """
    from immunizer.redteam.bench import run_bench
    from immunizer.stopping import GracefulStop

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    if status:
        from immunizer.redteam.bench_status import bench_status, format_status

        click.echo(format_status(bench_status(out_dir, names)))
        return
    pairs = {}
    for text in prebuilt:
        if "=" not in text:
            raise ImmunizerError(f"--prebuilt expects METHOD=DIR, got {text!r}")
        name, path = text.split("=", 1)
        pairs[name.strip()] = path
    if shard is not None:
        try:
            index, count = (int(part) for part in shard.split("/"))
        except ValueError:
            raise ImmunizerError(f"--shard expects I/N (e.g. 1/2), got {shard!r}") from None
        shard = (index, count)
    with GracefulStop("the piece in progress (an attack with its evaluations; a training at its next step, "
                      "checkpointed)") as stop:
        report = run_bench(out_dir, preset, names, seeds, pairs, overrides, config_file,
                           command="immunizer " + " ".join(sys.argv[1:]),
                           time_limit=None if time_limit is None else time_limit * 60, shard=shard, stop=stop)
    if not main_process():  # one summary for a launched job
        return
    stopped = report.get("stopped")
    if stopped:
        why = (f"at the {time_limit:g}-minute limit" if stopped["reason"] == "time limit"
               else f"as asked ({stopped['by']})")
        click.echo(f"bench: stopped {why} with {report['method_seeds']} method-seeds done; "
                   "run the same command again to continue", err=True)
    if report.get("in_progress_elsewhere"):
        held = [f"{piece}: pid {who['pid']} on {who['host']}" for piece, who in report["in_progress_elsewhere"].items()]
        click.echo(f"bench: nothing left to start here; {len(held)} piece(s) are being measured by other processes "
                   f"({', '.join(held)}): the last of them writes the whole report", err=True)

    def shares(record):
        return {k: record.get(k) for k in ("harmful_score", "refused_share", "degenerate_share", "refusal_retained",
                                           "steps_to_half", "steps_to_75", "steps_to_90") if k in record}

    summary = {name: {"pre_attack": entry["pre_attack"].get("harmful_score"),
                      **{run: entry[run].get("harmful_score") for run in report["attacks"]},
                      "benign": {run: entry[run].get("benign_task_accuracy") for run, a in report["attacks"].items() if a["kind"] == "finetune"},
                      "breaker": entry["breaker"], "cost_seconds": entry["cost_seconds"]}
               for name, entry in report["methods"].items()}
    verdicts = {name: {"pre_attack": shares(entry["pre_attack"]),
                      **{run: shares(entry[run]) for run, a in report["attacks"].items() if a["kind"] == "attack"},
                      "benign_task": {run: [entry[run].get("benign_task_accuracy_before"), entry[run].get("benign_task_accuracy")]
                                      for run, a in report["attacks"].items() if a["kind"] == "finetune"},
                      }
               for name, entry in report["methods"].items()}
    click.echo(json.dumps({"report": str(Path(out_dir) / "report.json"), "html": str(Path(out_dir) / "report.html"),
                           "harmful_score": summary, "verdicts": verdicts}, indent=2))
    if stopped and stopped["reason"] != "time limit":  # interrupted, not done as planned: `bench && next` must not go on
        sys.exit(130)


@cli.command()
@click.option("--before", required=True, help="Model before immunization (spec or directory).")
@click.option("--after", required=True, help="Model after immunization (an immunize output's model/ directory, or its parent).")
@option("--n-harmful", "n_harmful", old=("--harmful",), default=16, show_default=True,
        help="Held-out harmful prompts (DoNotAnswer held-out split).")
@option("--n-safe", "n_safe", old=("--safe",), default=16, show_default=True, help="Safe-but-scary prompts (over-refusal).")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with every sample instead of a table.")
def compare(before, after, n_harmful, n_safe, max_new_tokens, as_json):
    """Show what immunization changed: refusals on held-out harmful prompts and on safe prompts."""
    from rich.console import Console
    from rich.table import Table

    from immunizer.data.prompts import safe_scary_set, weak_set
    from immunizer.models import load_model
    from immunizer.redteam.refusal_eval import refusal_rates

    harmful = list(weak_set("heldout").prompts[:n_harmful])
    safe = list(safe_scary_set("all").prompts[:n_safe])
    results = {}
    for label, spec in (("before", before), ("after", after)):
        model, tokenizer = load_model(spec)
        results[label] = refusal_rates(model, tokenizer, harmful, safe, max_new_tokens=max_new_tokens)
    if as_json:
        click.echo(json.dumps({k: vars(v) for k, v in results.items()}, indent=2))
        return
    console = Console()
    table = Table(title="What immunization changed")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row(f"harmful prompts answered (of {len(harmful)}; lower is safer)",
                  f"{results['before'].harmful_answered:.0%}", f"{results['after'].harmful_answered:.0%}")
    table.add_row("  ... answered with noise or loops instead (degenerate; lower is better)",
                  f"{results['before'].harmful_degenerate:.0%}", f"{results['after'].harmful_degenerate:.0%}")
    table.add_row(f"safe prompts refused (of {len(safe)}; lower is better)",
                  f"{results['before'].safe_refused:.0%}", f"{results['after'].safe_refused:.0%}")
    console.print(table)
    for kind, title in (("harmful", "harmful"), ("safe", "safe-but-scary")):
        console.print(f"\n[bold]Examples ({title})[/bold]")
        pairs = zip([s for s in results["before"].samples if s["kind"] == kind],
                    [s for s in results["after"].samples if s["kind"] == kind])
        for i, (b, a) in enumerate(pairs):
            if i == 3:
                break
            console.print(f"[cyan]{b['prompt']}[/cyan]\n  before: {b['answer'][:140]!r}\n  after:  {a['answer'][:140]!r}")


from immunizer.loop.cli import cycle, gate  # noqa: E402
from immunizer.review.cli import review  # noqa: E402

cli.add_command(review)
cli.add_command(gate)
cli.add_command(cycle)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
        if launched_distributed():  # only a launched job has a process group (parallel.py imports torch)
            from immunizer.parallel import exit_launched_process

            exit_launched_process(0)
    except click.exceptions.Abort:
        sys.exit(130)
    except Stopped as exc:  # a stop asked for (Ctrl-C, OUT/STOP): the work so far is saved
        if main_process():
            click.echo(f"stopped: {exc}", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except ImmunizerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
