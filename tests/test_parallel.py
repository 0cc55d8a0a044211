"""Data-parallel immunization under `accelerate launch` with 2 CPU processes (gloo), against the one-process run:
the same canaries, the same step figures, a model within tolerance; resume after killing both processes; and
the even-split check. (accelerate's own `--cpu` launcher needs MPI; `--multi_gpu` on a machine without GPUs
starts torchrun, and immunizer asks accelerate for CPU processes.)"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from immunizer import load_config
from immunizer.errors import ImmunizerError
from immunizer.immunize import check_batch_sizes
from immunizer.models import resolve_model
from immunizer.parallel import DataParallel

from helpers import make_release, run_cli

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# fp32: one process and two agree to float rounding; under bf16 autocast (the default where a CPU runs bf16
# natively) each process's smaller batch rounds differently (a grad norm 3.6e-4 apart on an AVX512-BF16 CPU).
# The end-of-turn token unlearned: the tiny teacher answers with an empty string, so without it every refusal score
# is 0 and the canaries are the tie-break order's, the same in any run whatever the averaging.
TINY = ["--model", "tiny", "--preset", "tiny", "--set", "bf16=false", "--set", "phase1.unlearn_end_of_turn=true"]


def launch_command(*args, fsdp: bool = False, script: str | None = None) -> list[str]:
    """2 CPU processes running `immunizer *args` (or `script *args`), data-parallel or with FSDP (test_sharding.py)."""
    with socket.socket() as s:  # a free port: a killed job's rendezvous port may still be held
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    return [ACCELERATE, "launch", *engine, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            *([script] if script else ["-m", "immunizer"]), *args]


def launch(*args, check=True, fsdp: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_command(*args, fsdp=fsdp), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}")
    return proc


def kill_tree(pid: int) -> None:
    """kill -9 the launcher and every worker (torchrun starts the workers in their own sessions)."""
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        p.kill()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "step" in r and "event" not in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    run_cli("immunize", *TINY, "--out", str(root / "one"))
    proc = launch("immunize", *TINY, "--out", str(root / "two"))
    return root / "one", root / "two", proc


def test_two_processes_give_the_one_process_run(runs):
    one, two, proc = runs
    summary = json.loads(proc.stdout)  # one summary for the job, not one per process
    assert summary["out"] == str(two)
    assert json.loads((two / "manifest.json").read_text())["parallel"] == {
        "engine": "accelerate", "world_size": 2, "distributed_type": "MULTI_CPU"}
    assert json.loads((one / "manifest.json").read_text())["parallel"]["world_size"] == 1
    started = metrics(two)[0]
    assert started["event"] == "started" and started["world_size"] == 2

    assert_same_run(one, two, ("refusal_loss", "npo", "rkl", "alignment_loss", "dpo", "kl", "grad_norm"))


def assert_same_run(one: Path, two: Path, figures: tuple[str, ...], canary_values_atol: float | None = None) -> None:
    """The launched run `two` took the one-process run `one`'s steps: the same canaries (and, with
    `canary_values_atol`, their released values), each step's `figures` (the whole batch's, the processes'
    mean), and weights within summation-order noise."""
    canaries_one, canaries_two = load_file(one / "canaries.safetensors"), load_file(two / "canaries.safetensors")
    assert canaries_one.keys() == canaries_two.keys()
    assert len(canaries_one) > 4  # chosen by score across parameters, not only the first by name
    for key in canaries_one:
        if key.endswith("::index"):
            assert torch.equal(canaries_one[key], canaries_two[key]), key
        elif canary_values_atol is not None:
            assert torch.allclose(canaries_one[key], canaries_two[key], atol=canary_values_atol), key

    for a, b in zip(steps(metrics(one)), steps(metrics(two)), strict=True):
        for key in figures:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["phase"], a["step"], key)

    weights_one = load_file(one / "model" / "model.safetensors")
    weights_two = load_file(two / "model" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    # Adam turns summation-order differences of near-zero gradients into steps of up to lr (1e-3, 12 steps).
    worst = max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one)
    assert worst < 5e-3
    mean = sum(float((weights_one[k] - weights_two[k]).abs().sum()) for k in weights_one) / \
        sum(v.numel() for v in weights_one.values())
    assert mean < 1e-4


def kill_after_a_checkpoint(command: list[str], out: Path) -> None:
    """Start the launched `command` (an immunize writing to `out`) and kill -9 every process of it once it has
    written a checkpoint and a few log lines."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        if (out / "checkpoint" / "state.pt").exists() and log.exists() and len(log.read_text().splitlines()) > 3:
            kill_tree(proc.pid)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    time.sleep(1)
    assert not (out / "manifest.json").exists()


def test_two_processes_resume_after_both_are_killed(runs, tmp_path):
    _, two, _ = runs
    out = tmp_path / "killed"
    kill_after_a_checkpoint(launch_command("immunize", *TINY, "--out", str(out)), out)

    launch("immunize", *TINY, "--out", str(out), "--resume")
    assert json.loads((out / "manifest.json").read_text())["model_sha256"] == \
        json.loads((two / "manifest.json").read_text())["model_sha256"]
    keys = [(r["cycle"], r["phase"], r["step"]) for r in steps(metrics(out))]
    assert len(keys) == len(set(keys)) == len(steps(metrics(two)))  # nothing lost, nothing logged twice


def test_a_batch_that_does_not_split_is_refused_with_the_fix():
    config = load_config("tiny")  # batch size 2
    check_batch_sizes(config, 2)
    with pytest.raises(ImmunizerError, match=r"phase1.batch_size 2 cannot be split evenly over 3 processes.*--set"):
        check_batch_sizes(config, 3)
    with pytest.raises(ImmunizerError, match="multiple of 2"):
        DataParallel(rank=1, world_size=2).share([1, 2, 3])
    assert DataParallel(rank=1, world_size=2).share([1, 2, 3, 4]) == [3, 4]
    assert DataParallel.single().share([1, 2, 3]) == [1, 2, 3]


def test_a_launched_job_with_a_bad_batch_size_stops_before_training(tmp_path):
    proc = launch("immunize", *TINY, "--set", "phase1.batch_size=3", "--out", str(tmp_path / "odd"), check=False)
    assert proc.returncode != 0
    assert "cannot be split evenly over 2 processes" in proc.stderr
    assert not (tmp_path / "odd" / "metrics.jsonl").exists()


def test_a_launched_finetune_takes_the_one_process_step(tmp_path):
    """TRL's trainer runs DDP by itself; immunizer gives each process its share of --batch-size and one writer.
    One step over the whole data: the step cannot depend on how the samplers order it."""
    args = ["finetune", "--model", "tiny", "--data", "arithmetic", "--samples", "8", "--batch-size", "8",
            "--lr", "1e-3"]
    one = json.loads(run_cli(*args, "--out", str(tmp_path / "one")).stdout)
    proc = launch(*args, "--out", str(tmp_path / "two"))
    two = json.loads(proc.stdout)  # one summary
    assert two["steps"] == one["steps"] == 1
    assert two["parallel"]["world_size"] == 2 and one["parallel"]["world_size"] == 1
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    base = load_file(Path(resolve_model("tiny")) / "model.safetensors")

    def mean_abs(x, y):
        return sum(float((x[k] - y[k]).abs().sum()) for k in x) / sum(v.numel() for v in x.values())

    # Adam's first step is ±lr wherever the gradient is not ~0: only near-zero gradients may flip
    assert mean_abs(a, base) > 5e-4 and mean_abs(a, b) < 0.05 * mean_abs(a, base)

    # Two batches of 8: the Trainer must take 2 steps under 2 processes too (each process 4 examples a step).
    more = ["finetune", "--model", "tiny", "--data", "arithmetic", "--samples", "16", "--batch-size", "8"]
    assert json.loads(launch(*more, "--out", str(tmp_path / "two-steps")).stdout)["steps"] == 2


def guarded_runs(tmp_path: Path, job: str, fsdp: bool = False) -> tuple[dict, dict]:
    """What the guard saw in tests/`job` (a guarded fine-tune of a fresh release), in one process and launched in
    two; each run records its incidents in tmp_path/{one,two}.jsonl."""
    release = tmp_path / "release"
    make_release(release)
    job = str(Path(__file__).parent / job)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, job, str(release), str(tmp_path / "one.jsonl")], capture_output=True,
                         text=True, env=env, check=True)
    cmd = launch_command(str(release), str(tmp_path / "two.jsonl"), fsdp=fsdp, script=job)  # a script, not -m immunizer
    two = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    return json.loads(one.stdout), json.loads(two.stdout)


def test_the_guard_trips_at_the_same_step_under_two_processes(tmp_path):
    seen_one, seen_two = guarded_runs(tmp_path, "guard_job.py")
    assert [(h["step"], h["tripped"]) for h in seen_two["history"]] == \
        [(h["step"], h["tripped"]) for h in seen_one["history"]]
    assert seen_one["history"][-1]["tripped"] and seen_two["clean_step"] == seen_one["clean_step"] == 4
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 1  # one incident, from the main process


def test_a_launched_bench_trains_on_both_processes_and_measures_once(tmp_path):
    """`bench` and the calibration inside it, launched: every training piece (immunization, the breaker's simulated
    fine-tunes, the attacks) runs on 2 processes; the main process alone evaluates, scans and writes, once."""
    args = ["bench", "--preset", "tiny", "--methods", "none,immunizer", "--out", str(tmp_path / "bench")]
    proc = launch(*args)
    summary = json.loads(proc.stdout)  # one summary, from the main process
    assert set(summary["harmful_score"]) == {"none", "immunizer"}
    out = tmp_path / "bench"
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["method_seeds"] == {"none": 1, "immunizer": 1}
    manifest = json.loads((out / "methods" / "immunizer" / "seed0" / "manifest.json").read_text())
    assert manifest["parallel"]["world_size"] == 2
    assert manifest["breaker"]["parallel"]["world_size"] == 2  # calibrated by both processes
    cases = (out / "methods" / "immunizer" / "seed0" / "calibration" / "cases.jsonl").read_text().splitlines()
    assert len(cases) == len({json.loads(c)["key"] for c in cases}) > 0  # each simulated run recorded once
    for method in ("none", "immunizer"):
        run = json.loads((out / "runs" / method / "seed0" / "harmful-sft" / "run.json").read_text())
        assert run["parallel"]["world_size"] == 2
        samples = (out / "runs" / method / "seed0" / "harmful-sft" / "curve" / "step1.samples.jsonl.gz")
        assert samples.is_file() and not samples.with_suffix("").exists()  # evaluated once, packed once

    # Launched again: every piece is on disk, so nothing trains or evaluates again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if not p.name.startswith("report")}
    launch(*args)
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # An error in the main process alone (here: the folder holds another configuration) stops both processes with
    # its message instead of leaving the other waiting for a result.
    failed = subprocess.run(launch_command(*args, "--set", "eval.n_task=2"), capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert failed.returncode != 0
    assert "holds a bench run with another configuration" in failed.stderr
    assert "the main process stopped" in failed.stderr  # what the other process says


def test_a_launched_bench_refuses_methods_that_train_in_one_process(tmp_path):
    proc = launch("bench", "--preset", "tiny", "--methods", "none,vaccine", "--out", str(tmp_path / "bench"), check=False)
    assert proc.returncode != 0
    assert "vaccine train in one process" in proc.stderr and "--prebuilt METHOD=DIR" in proc.stderr
    assert not (tmp_path / "bench").exists()
    sharded = launch("bench", "--preset", "tiny", "--methods", "none,immunizer", "--out", str(tmp_path / "bench"),
                     check=False, fsdp=True)
    assert sharded.returncode != 0 and "(harmful-sft-lora) do not run under FSDP" in sharded.stderr
    assert not (tmp_path / "bench").exists()
    uneven = launch("bench", "--preset", "tiny", "--methods", "none,immunizer", "--out", str(tmp_path / "bench"),
                    "--set", "attacks.harmful-mix.batch_size=3", check=False)
    assert uneven.returncode != 0
    assert "harmful-mix's batch_size 3 (--set attacks.harmful-mix.batch_size=N); use multiples of 2" in uneven.stderr
    assert not (tmp_path / "bench").exists()
