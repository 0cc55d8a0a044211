"""A bench stopped and continued: killed, past its time limit, asked to stop (Ctrl-C, OUT/STOP), in the middle
of an attack or of a method's training; the same call continues it without redoing finished work."""
import json

import pytest

from helpers import run_cli
from immunizer.redteam import bench as bench_module
from immunizer.redteam.bench import run_bench


def test_an_interrupted_bench_continues_where_it_stopped(tmp_path, monkeypatch):
    import immunizer.redteam.attacks as attacks

    real, calls = attacks.run_finetune, []

    def dies(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(attacks, "run_finetune", dies)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tmp_path / "b", "tiny", ["none"], progress=False)
    done = {p.parent.name for p in (tmp_path / "b" / "runs" / "none" / "seed0").glob("*/eval.json")}
    assert done == {"harmful-sft", "harmful-sft-lora", "harmful-mix"}  # the attacks before the fine-tune finished
    monkeypatch.setattr(attacks, "run_finetune", real)
    ran = []
    monkeypatch.setattr(attacks, "run_attack", lambda *a, **k: ran.append(1))
    report = run_bench(tmp_path / "b", "tiny", ["none"], progress=False)
    assert not ran and report["methods"]["none"]["benign-task"]["benign_task_accuracy"] is not None


def test_a_time_limit_stops_between_pieces_and_the_same_call_continues(tmp_path, monkeypatch):
    import immunizer.redteam.attacks as attacks

    now = [0.0]
    monkeypatch.setattr(bench_module, "_clock", lambda: now[0])
    real_attack, attacked = attacks.run_attack, []

    def attack_takes_an_hour(*args, **kwargs):
        attacked.append(args[1])
        now[0] += 3600
        return real_attack(*args, **kwargs)
    monkeypatch.setattr(attacks, "run_attack", attack_takes_an_hour)
    proc = run_cli("bench", "--preset", "tiny", "--out", str(tmp_path / "t"), "--methods", "none", "--time-limit", "30")
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert len(attacked) == 1 and "stopped at the 30-minute limit" in proc.stderr  # the attack in progress finished
    assert report["complete"] is False and report["stopped"]["time_limit_seconds"] == 1800 and report["methods"] == {}
    first = tmp_path / "t" / "runs" / "none" / "seed0" / "harmful-sft"
    assert (first / "eval.json").is_file() and (first / "curve" / "step1.json").is_file()  # with its evaluations
    assert not (tmp_path / "t" / "runs" / "none" / "seed0" / "harmful-sft-lora").exists()
    again = run_bench(tmp_path / "t", "tiny", ["none"], progress=False)
    assert again["complete"] is True and "stopped" not in again
    assert attacked.count(attacked[0]) == 1  # the finished attack was not run again


def test_a_stop_asked_for_ends_the_bench_after_the_piece_in_progress(tmp_path, monkeypatch):
    import os
    import signal
    import time

    import immunizer.redteam.attacks as attacks

    real_attack, attacked = attacks.run_attack, []

    def attack_interrupted(*args, **kwargs):  # Ctrl-C in the middle of the first attack
        attacked.append(args[1])
        if len(attacked) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_attack(*args, **kwargs)
    monkeypatch.setattr(attacks, "run_attack", attack_interrupted)
    out = tmp_path / "s"
    proc = run_cli("bench", "--preset", "tiny", "--out", str(out), "--methods", "none", check=False)
    report = json.loads((out / "report.json").read_text())
    assert len(attacked) == 1 and "stopped as asked (SIGINT)" in proc.stderr
    assert proc.returncode == 130  # interrupted, not done: `bench && next` does not go on
    assert report["stopped"] == {"reason": "stop requested", "by": "SIGINT"} and report["complete"] is False
    assert (out / "runs" / "none" / "seed0" / "harmful-sft" / "eval.json").is_file()  # the piece in progress finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the CLI leaves Ctrl-C as it found it

    # OUT/STOP, created while a call runs, stops it (and every shard of OUT); an older one is ignored
    monkeypatch.setattr(attacks, "run_attack", real_attack)
    stop_file = out / bench_module.STOP_FILE
    real_evaluate = bench_module._evaluate

    def evaluate_then_stop(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        stop_file.touch()
        return result
    monkeypatch.setattr(bench_module, "_evaluate", evaluate_then_stop)
    again = run_bench(out, "tiny", ["none"], progress=False)
    assert again["stopped"] == {"reason": "stop requested", "by": str(stop_file)} and again["complete"] is False
    monkeypatch.setattr(bench_module, "_evaluate", real_evaluate)
    os.utime(stop_file, (time.time() - 60, time.time() - 60))  # from before the next call
    assert run_bench(out, "tiny", ["none"], progress=False)["complete"] is True


def test_a_stop_during_a_training_checkpoints_it_and_the_same_call_continues_it(tmp_path, monkeypatch):
    import os
    import signal

    from immunizer.immunize import Run

    real_log = Run.log

    def log_then_interrupt(self, record):
        real_log(self, record)
        if record.get("cycle") == 0 and record.get("phase") == 2 and record.get("step") == 0 and "event" not in record:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Run, "log", log_then_interrupt)
    out, overrides = tmp_path / "t", ["attacks={harmful-sft: {kind: attack, samples: 8, lr: 1.0e-3, epochs: 1, batch_size: 4}}",
                                      "calibration=null"]
    proc = run_cli("bench", "--preset", "tiny", "--out", str(out), "--methods", "sft", *[f"--set={o}" for o in overrides],
                   check=False)
    assert proc.returncode == 130
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] == {"reason": "stop requested", "by": "SIGINT", "in": "sft seed 0's training"}
    assert "stopped as asked (SIGINT)" in proc.stderr
    release = out / "methods" / "sft" / "seed0"
    assert (release / "checkpoint" / "state.pt").is_file() and not (release / "manifest.json").exists()
    monkeypatch.setattr(Run, "log", real_log)
    again = run_bench(out, "tiny", ["sft"], progress=False, overrides=overrides)
    assert again["complete"] is True
    events = [json.loads(line).get("event") for line in (release / "metrics.jsonl").read_text().splitlines()]
    assert events.count("stopped") == 1 and events.count("resumed") == 1 and events[-1] == "finished"
