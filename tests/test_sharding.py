"""FSDP full sharding (FSDP2) under `accelerate launch --use_fsdp` with 2 CPU processes (gloo), against the
one-process run: the same canaries, the same step figures and a model within tolerance, with every Phase-1 and
Phase-2 path that reads weights or gradients between backward passes (the `inner` adversary, the benign
perturbation, the stabilization, LoX); resume after killing both processes, and from one process; the guard on
sharded weights; the launches that are refused."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from immunizer.errors import ImmunizerError
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.models import load_model, resolve_model
from immunizer.parallel import DataParallel
from immunizer.sharding import LocalRange

from helpers import run_cli
from test_parallel import (TINY as PARALLEL_TINY, assert_same_run, guarded_runs, kill_after_a_checkpoint, launch,
                           launch_command, metrics, steps)

# test_parallel.py's settings (fp32, the end-of-turn token unlearned), and every path that reads weights or
# gradients between backward passes.
TINY = [*PARALLEL_TINY, "--set", "phase1.adversary=inner", "--set", "phase2.benign_perturb_epsilon=0.1",
        "--set", "extrapolate.rank=2", "--set", "extrapolate.alpha=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    run_cli("immunize", *TINY, "--out", str(root / "one"))
    proc = launch("immunize", *TINY, "--out", str(root / "sharded"), fsdp=True)
    return root / "one", root / "sharded", proc


def test_fsdp_gives_the_one_process_run(runs):
    one, sharded, proc = runs
    assert json.loads(proc.stdout)["out"] == str(sharded)  # one summary for the job
    assert json.loads((sharded / "manifest.json").read_text())["parallel"] == {
        "engine": "accelerate", "world_size": 2, "distributed_type": "FSDP",
        "sharding": {"engine": "fsdp2", "offload_params": False}}
    assert metrics(sharded)[0]["sharding"]["engine"] == "fsdp2"

    # the released canary values are read from the gathered weights, after LoX
    assert_same_run(one, sharded, ("refusal_loss", "npo", "rkl", "adversary_sft_loss", "adversary_l2", "alignment_loss",
                                   "dpo", "kl", "grad_norm", "stabilization_loss", "canary_rms_drift",
                                   "sample_rms_drift"), canary_values_atol=1e-5)
    extrapolated = [r for r in metrics(sharded) if r.get("event") == "extrapolated"]
    assert len(extrapolated) == 1 and extrapolated[0]["weights"] > 0


def test_fsdp_resumes_after_both_processes_are_killed(runs, tmp_path):
    _, sharded, _ = runs
    out = tmp_path / "killed"
    kill_after_a_checkpoint(launch_command("immunize", *TINY, "--out", str(out), fsdp=True), out)
    launch("immunize", *TINY, "--out", str(out), "--resume", fsdp=True)
    assert json.loads((out / "manifest.json").read_text())["model_sha256"] == \
        json.loads((sharded / "manifest.json").read_text())["model_sha256"]
    keys = [(r["cycle"], r["phase"], r["step"]) for r in steps(metrics(out))]
    assert len(keys) == len(set(keys)) == len(steps(metrics(sharded)))


def test_a_sharded_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Each process wrote its pieces (torch.distributed.checkpoint); one process reads them back whole."""
    one, _, _ = runs
    out = tmp_path / "killed"
    kill_after_a_checkpoint(launch_command("immunize", *TINY, "--out", str(out), fsdp=True), out)
    pieces = list((out / "checkpoint" / "sharded").glob("*.distcp"))
    assert len(pieces) == 2  # one file per process, no whole copy of the weights
    assert "model" not in torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    run_cli("immunize", *TINY, "--out", str(out), "--resume")
    assert json.loads((out / "manifest.json").read_text())["parallel"]["world_size"] == 1
    a, b = load_file(one / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-3


@pytest.mark.parametrize("where", ["wherever it is killed", "at a phase's start"])
def test_a_one_process_checkpoint_resumes_under_fsdp(runs, tmp_path, where):
    """At a phase's start the checkpoint holds no optimizer (the phase begins with a fresh one): loading a fresh
    optimizer's empty moments, torch's FSDP state-dict helpers would fill them by a zero step that Adam then
    counts (the resumed run drifted by about lr per weight)."""
    one, _, _ = runs
    out = tmp_path / "killed"
    # without step checkpoints the first one is written at Phase 2's start (the weights do not depend on it)
    settings = [*TINY, "--set", "checkpoint_every=1000"] if where == "at a phase's start" else TINY
    kill_after_a_checkpoint([sys.executable, "-m", "immunizer", "immunize", *settings, "--out", str(out)], out)
    if where == "at a phase's start":  # (the other kill lands mostly inside Phase 1, at times at Phase 2's start)
        saved = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
        assert saved["position"]["step"] == 0 and saved["optimizer"] is None
    launch("immunize", *settings, "--out", str(out), "--resume", fsdp=True)
    assert json.loads((out / "manifest.json").read_text())["parallel"]["distributed_type"] == "FSDP"
    a, b = load_file(one / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-3


def test_the_guard_trips_at_the_same_step_on_sharded_weights(tmp_path):
    seen_one, seen_two = guarded_runs(tmp_path, "fsdp_guard_job.py", fsdp=True)
    assert [(h["step"], h["tripped"]) for h in seen_two["history"]] == \
        [(h["step"], h["tripped"]) for h in seen_one["history"]]
    for a, b in zip(seen_one["history"], seen_two["history"]):
        assert b["statistic"] == pytest.approx(a["statistic"], rel=0.02)
    assert seen_two["stopped_at"] == seen_one["stopped_at"] == 6 and seen_two["clean_step"] == 4
    assert seen_two["moved_since_clean"] == 0.0  # rolled back on every process's piece
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 1  # one incident, from the main process


@pytest.mark.parametrize("rows, world", [(101, 2), (5, 2), (1, 2), (7, 3), (16, 4)])
def test_a_piece_is_the_rows_torch_chunk_gives_this_process(rows, world):
    columns = 3
    chunks = torch.arange(rows * columns).reshape(rows, columns).chunk(world)
    for rank in range(world):
        found = LocalRange.rows_of(rows, columns, world, rank)
        expected = chunks[rank].reshape(-1) if rank < len(chunks) else torch.zeros(0, dtype=torch.long)
        assert torch.equal(torch.arange(found.start, found.end), expected)


def test_deepspeed_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ImmunizerError, match=r"DeepSpeed.*--use_fsdp"):
        DataParallel.from_environment()


@pytest.mark.parametrize("what, spec", [("LoRA", FinetuneSpec(lora_rank=4)),
                                        ("canary-aware", FinetuneSpec(frozen={"lm_head.weight": torch.tensor([0])}))])
def test_what_does_not_run_sharded_yet_is_refused_before_training(monkeypatch, what, spec):
    model, tokenizer = load_model(resolve_model("tiny"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ImmunizerError, match=rf"{what}.*FSDP.*--multi_gpu"):
        sft(model, tokenizer, [{"prompt": "a", "response": "b"}], spec)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_documented_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = "FSDP" if "fsdp" in path.name else ("NO" if "one-gpu" in path.name else "MULTI_GPU")
    assert str(config.distributed_type.value) == expected
    if expected == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2


def test_an_fsdp_launched_finetune_on_cpu_runs_data_parallel_and_says_so(tmp_path):
    """accelerate turns FSDP on for GPUs only: TRL's trainer then runs DDP, and run.json must not claim sharding."""
    args = ["finetune", "--model", "tiny", "--data", "arithmetic", "--samples", "8", "--batch-size", "8", "--lr", "1e-3"]
    one = json.loads(run_cli(*args, "--out", str(tmp_path / "one")).stdout)
    two = json.loads(launch(*args, "--out", str(tmp_path / "two"), fsdp=True).stdout)
    assert two["parallel"] == {"engine": "accelerate", "world_size": 2, "distributed_type": "MULTI_CPU"}
    assert two["steps"] == one["steps"] == 1
    a, b = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    mean = sum(float((a[k] - b[k]).abs().sum()) for k in a) / sum(v.numel() for v in a.values())
    assert mean < 5e-5  # Adam's first step is ±lr (1e-3) wherever the gradient is not ~0
