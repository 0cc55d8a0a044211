"""`immunizer immunize` end to end on the tiny model, through the CLI as a user runs it:
outputs, manifest consistency, what changed, resume after kill -9, and bad inputs."""
import json
from pathlib import Path
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from immunizer import immunize, load_config, load_manifest
from immunizer.models import model_dir_sha256, resolve_model

from helpers import CLI, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "immunized"
    proc = run_cli("immunize", "--model", "tiny", "--out", str(out), "--preset", "tiny")
    return out, json.loads(proc.stdout)


def test_writes_the_contract_files(tiny_run):
    out, summary = tiny_run
    for name in ("model/config.json", "canaries.safetensors", "manifest.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists()
    assert summary["num_canaries"] > 0
    assert resolve_model(out) == out / "model"  # an output directory stands for its model everywhere


def test_manifest_matches_the_saved_model(tiny_run):
    out, _ = tiny_run
    manifest = load_manifest(out)
    meta = manifest.meta
    assert meta["model_sha256"] == model_dir_sha256(out / "model")
    assert meta["num_parameters"] == sum(p.numel() for p in load_model_params(out / "model").values())
    assert meta["num_canaries"] == round(meta["num_parameters"] * meta["k_percent"] / 100)
    weights = load_model_params(out / "model")
    for name, idx in manifest.indices.items():
        assert torch.equal(weights[name].reshape(-1)[idx].float(), manifest.values[name])
    assert meta["config"]["phase1"]["steps"] == 3 and len(meta["config_sha256"]) == 64
    assert {"weak", "strong", "benign", "refusals"} <= set(meta["data_versions"])


def load_model_params(model_dir):
    tensors = {}
    for f in model_dir.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    return tensors


def test_training_changed_the_weights_and_logged_each_step(tiny_run):
    out, _ = tiny_run
    before = load_model_params(resolve_model("tiny"))
    after = load_model_params(out / "model")
    assert any(not torch.equal(before[n], after[n]) for n in after)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and "event" not in r]
    assert len(steps) == 2 * (3 + 3)  # two cycles of 3 + 3 steps
    assert {r["set"] for r in steps if r["phase"] == 1} == {"weak", "strong"}  # the curriculum
    phase1 = [r for r in steps if r["phase"] == 1]
    assert all(r["gamma"] <= 1 and "npo" in r and "rkl" in r and "refusal_sft" in r and "retain_sft" in r
               for r in phase1)
    assert [r["gamma"] for r in phase1] == sorted(r["gamma"] for r in phase1)  # annealed upwards
    phase2 = [r for r in steps if r["phase"] == 2]
    assert all("dpo" in r and "stabilization_loss" in r for r in phase2)
    assert records[-1]["event"] == "finished"
    assert records[-1]["device"] == "cpu" and records[-1]["peak_memory_bytes"] > 10 * 2**20  # a process's peak RSS


def test_the_device_is_the_gpu_if_any_unless_immunizer_device_says_otherwise(monkeypatch):
    from immunizer.errors import ImmunizerError
    from immunizer.models import runtime_device

    def device(value):
        monkeypatch.setenv("IMMUNIZER_DEVICE", value)
        runtime_device.cache_clear()
        try:
            return runtime_device()
        finally:
            runtime_device.cache_clear()

    assert device("") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert device("cpu") == torch.device("cpu")
    with pytest.raises(ImmunizerError, match="'gpu0' is not a device; use cpu, cuda"):
        device("gpu0")
    with pytest.raises(ImmunizerError, match="runs on cpu or cuda"):
        device("meta")
    with pytest.raises(ImmunizerError, match="usable CUDA device"):
        device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU, on any machine


def test_verify_command(tiny_run, tmp_path):
    out, _ = tiny_run
    ok = json.loads(run_cli("verify", "--manifest", str(out)).stdout)
    assert ok["model_matches_manifest"] is True
    # a changed model is reported (exit 3), not mistaken for the released one
    changed = tmp_path / "changed"
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(str(out / "model"))
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(changed)
    proc = run_cli("verify", "--manifest", str(out), "--model", str(changed), check=False)
    assert proc.returncode == 3 and json.loads(proc.stdout)["model_matches_manifest"] is False


def test_stabilization_holds_canaries_tighter_than_other_weights(tmp_path):
    """With a strong β the canaries move less in Phase 2 than the other weights (RMS per element)."""
    config = load_config("tiny", None, ["cycles=1", "phase2.steps=6", "phase2.stabilization_beta=1e9"])
    result = immunize("tiny", tmp_path / "run", config, progress=False)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phase2 = [r for r in records if r.get("phase") == 2 and "canary_rms_drift" in r]
    assert all(r["canary_rms_drift"] < r["sample_rms_drift"] / 2 for r in phase2[1:])
    loose = immunize("tiny", tmp_path / "loose", load_config("tiny", None, ["cycles=1", "phase2.steps=6",
                                                                             "phase2.stabilization_beta=0"]), progress=False)
    records = [json.loads(l) for l in (loose.out_dir / "metrics.jsonl").read_text().splitlines()]
    unheld = [r for r in records if r.get("phase") == 2 and "canary_rms_drift" in r]
    assert unheld[-1]["canary_rms_drift"] > 2 * phase2[-1]["canary_rms_drift"]


def test_plain_alignment_still_picks_canaries_by_the_refusal_gradient(tmp_path):
    """γ = 0 trains no refusal term, but the canary scores are still |∂L_refusal/∂w| (measured and
    discarded), not all-zero ties that would fall back to the lowest (name, index). The tiny random teacher
    answers with an empty string (only the end-of-turn token, which the refusal loss leaves alone), so the
    harmful answers are written here."""
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"do bad thing {i}", "response": f"sure, step {i} is"}) + "\n"
                               for i in range(6)))
    plain = Path(__file__).parents[1] / "src/immunizer/presets/methods/sft.yaml"
    result = immunize("tiny", tmp_path / "plain", load_config("tiny", plain, ["cycles=1", f"data.harmful_file={harmful}"]),
                      progress=False)
    indices = load_manifest(result.out_dir).indices
    assert len(indices) > 3
    first = indices[sorted(indices)[0]]
    assert not torch.equal(first, torch.arange(first.numel()))
    records = [json.loads(l) for l in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("phase") == 1 and r.get("npo", 0) != 0 for r in records)


def test_resume_after_kill_9_gives_the_same_model(tmp_path):
    common = ["--model", "tiny", "--preset", "tiny", "--set", "phase1.steps=40", "--set", "phase2.steps=40",
              "--set", "checkpoint_every=5"]
    reference = tmp_path / "uninterrupted"
    run_cli("immunize", "--out", str(reference), *common)

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([*CLI, "immunize", "--out", str(out), *common], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 900  # generous: a loaded CI machine is slow, and the loop ends as soon as it can kill
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint" / "state.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) > 60:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()

    again = run_cli("immunize", "--out", str(out), *common, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to overwrite silently
    run_cli("immunize", "--out", str(out), *common, "--resume")
    assert load_manifest(out).meta["model_sha256"] == load_manifest(reference).meta["model_sha256"]
    records = [json.loads(l) for l in metrics.read_text().splitlines()]
    step_keys = [(r["cycle"], r["phase"], r["step"]) for r in records if "step" in r and "event" not in r]
    assert len(step_keys) == len(set(step_keys)) == 2 * 80  # nothing lost, nothing logged twice


def test_bad_inputs_are_explained(tmp_path):
    cases = [
        (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "neither `smollm2`"),
        (["--model", "tiny", "--out", str(tmp_path / "b"), "--resume"], "holds no checkpoint"),
        (["--model", "tiny", "--out", str(tmp_path / "c"), "--set", "phase1.k_percent=0"], "k_percent"),
        (["--model", "tiny", "--out", str(tmp_path / "d"), "--config", str(tmp_path / "missing.yaml")], "does not exist"),
    ]
    bert = tmp_path / "bert"
    from transformers import BertConfig

    cfg = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16)
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(bert)
    cases.append((["--model", str(bert), "--out", str(tmp_path / "e")], "not a causal language model"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((["--model", "tiny", "--out", str(tmp_path / "f"), "--preset", "tiny", "--set",
                   f"data.harmful_file={empty}"], "holds no examples"))
    for args, message in cases:
        proc = run_cli("immunize", *args, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_user_jsonl_files_replace_the_built_in_sets(tmp_path):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"do bad thing {i}", "response": f"sure {i}"}) + "\n" for i in range(4)))
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": f"help {i}", "chosen": f"ok {i}", "rejected": "no"}) + "\n" for i in range(4)))
    config = load_config("tiny", None, ["cycles=1", f"data.harmful_file={harmful}", f"data.benign_file={benign}"])
    result = immunize("tiny", tmp_path / "run", config, progress=False)
    assert set(result.manifest["data_versions"]) == {"harmful_file", "benign_file", "refusals"}


def test_resume_from_a_cycle_boundary(tmp_path, monkeypatch):
    """Interrupted right as cycle 2 begins: the checkpoint holds no canary scores yet."""
    from immunizer.immunize import Run

    config = load_config("tiny")
    original = Run.phase1

    def interrupted(self, cycle, start, optimizer, scores):
        if cycle == 1:
            raise KeyboardInterrupt
        return original(self, cycle, start, optimizer, scores)

    monkeypatch.setattr(Run, "phase1", interrupted)
    with pytest.raises(KeyboardInterrupt):
        immunize("tiny", tmp_path / "run", config, progress=False)
    monkeypatch.setattr(Run, "phase1", original)
    from immunizer.errors import ImmunizerError

    with pytest.raises(ImmunizerError, match="different config"):
        immunize("tiny", tmp_path / "run", load_config("tiny", None, ["phase1.lr=0.5"]), resume=True, progress=False)
    resumed = immunize("tiny", tmp_path / "run", config, resume=True, progress=False)
    straight = immunize("tiny", tmp_path / "straight", config, progress=False)
    assert resumed.manifest["model_sha256"] == straight.manifest["model_sha256"]
    with pytest.raises(ImmunizerError, match="already finished"):
        immunize("tiny", tmp_path / "run", config, resume=True, progress=False)


def test_a_checkpoint_never_runs_code(tmp_path):
    """Checkpoints load with weights_only=True: a pickled callable is refused with the fix, not executed."""
    from immunizer.checkpoint import STATE_FILE, load_checkpoint, rng_state, set_rng_state
    from immunizer.errors import ImmunizerError

    (tmp_path / "checkpoint").mkdir()
    torch.save({"step": 1, "hook": os.system}, tmp_path / "checkpoint" / STATE_FILE)
    with pytest.raises(ImmunizerError, match="could run code .*GLOBAL posix.system.*delete"):
        load_checkpoint(tmp_path)
    torch.save({"step": 1, "rng": rng_state()}, tmp_path / "checkpoint" / STATE_FILE)  # what a run saves loads
    import numpy as np
    state = load_checkpoint(tmp_path)
    expected = np.random.random()
    set_rng_state(state["rng"])
    assert np.random.random() == expected  # numpy's generator comes back exactly


def test_a_stop_asked_for_writes_a_checkpoint_at_once_and_resume_gives_the_same_model(tmp_path):
    from immunizer.stopping import Stopped

    config = load_config("tiny", None, ["checkpoint_every=1000", "phase1.steps=4"])  # no periodic checkpoint to rely on
    asked = []

    def stop():  # asked after phase 1's second step
        asked.append(1)
        return "test" if len(asked) == 2 else None
    with pytest.raises(Stopped, match=r"test: immunization stopped before cycle 1, phase 1, step 3, whose checkpoint "
                                      r"is in .*run; the same command with --resume continues it"):
        immunize("tiny", tmp_path / "run", config, progress=False, stop=stop)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {**records[-1], "event": "stopped", "by": "test", "cycle": 0, "phase": 1, "step": 2}
    assert (tmp_path / "run" / "checkpoint" / "state.pt").is_file() and not (tmp_path / "run" / "manifest.json").exists()

    # asked at a phase's end: the phase boundary's checkpoint is the one kept
    boundary = []

    def stop_after_phase_1():
        boundary.append(1)
        return "again" if len(boundary) == 2 else None  # resumed at step 3 of 4: it asks once, then at the boundary
    with pytest.raises(Stopped, match="before cycle 1, phase 2, step 1"):
        immunize("tiny", tmp_path / "run", config, resume=True, progress=False, stop=stop_after_phase_1)
    resumed = immunize("tiny", tmp_path / "run", config, resume=True, progress=False)
    straight = immunize("tiny", tmp_path / "straight", config, progress=False)
    assert resumed.manifest["model_sha256"] == straight.manifest["model_sha256"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["cycle"], r["phase"], r["step"]) for r in records if "step" in r and "event" not in r]
    assert len(steps) == len(set(steps)) == 2 * (4 + 3)  # nothing lost, nothing done twice


def test_ctrl_c_stops_immunize_with_a_checkpoint_and_exit_130(tmp_path, monkeypatch):
    from immunizer.immunize import Run

    logged, real_log = [], Run.log

    def log_then_interrupt(self, record):
        real_log(self, record)
        logged.append(record)
        if record.get("phase") == 1 and record.get("step") == 1 and "event" not in record:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Run, "log", log_then_interrupt)
    proc = run_cli("immunize", "--model", "tiny", "--preset", "tiny", "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 130 and "stopped: SIGINT: immunization stopped before cycle 1, phase 1, step 3" in proc.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(Run, "log", real_log)
    done = run_cli("immunize", "--model", "tiny", "--preset", "tiny", "--out", str(tmp_path / "run"), "--resume")
    assert json.loads(done.stdout)["num_canaries"] > 0


def test_a_stop_file_stops_immunize_like_ctrl_c(tmp_path, monkeypatch):
    from immunizer.immunize import Run

    out, real_log = tmp_path / "run", Run.log
    out.mkdir()
    (out / "STOP").touch()
    os.utime(out / "STOP", (time.time() - 60, time.time() - 60))  # a finished job's: ignored

    def log_then_touch(self, record):
        real_log(self, record)
        if record.get("phase") == 2 and record.get("step") == 0 and "event" not in record:
            (out / "STOP").touch()  # `touch OUT/STOP` from another shell
    monkeypatch.setattr(Run, "log", log_then_touch)
    proc = run_cli("immunize", "--model", "tiny", "--preset", "tiny", "--out", str(out), check=False)
    assert proc.returncode == 130 and f"stopped: {out / 'STOP'}: immunization stopped before cycle 1, phase 2, step 2" in proc.stderr
    monkeypatch.setattr(Run, "log", real_log)
    run_cli("immunize", "--model", "tiny", "--preset", "tiny", "--out", str(out), "--resume")  # the older file is ignored
    assert (out / "manifest.json").is_file() and not (out / "STOP").exists()  # and not left in the release
