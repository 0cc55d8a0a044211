"""`immunizer attack` and `immunizer finetune` on the tiny model, through the CLI."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_release, run_cli
from immunizer.data.prompts import weak_set
from immunizer.manifest import load_manifest
from immunizer.errors import ImmunizerError
from immunizer.data.harmful_answers import answers_without_refusals
from immunizer.redteam.attacks import AttackConfig, harmful_rows, benign_rows
from immunizer.data.teacher import Teacher


def test_attack_and_eval_prompts_never_overlap():
    attack, evaluate = set(weak_set("heldout-attack").prompts), set(weak_set("heldout-eval").prompts)
    assert len(attack) == 100 and evaluate and not attack & evaluate
    assert not attack & set(weak_set("train").prompts)


def test_full_lora_and_adaptive_attacks(tmp_path):
    release = tmp_path / "release"
    make_release(release)
    common = ["--samples", "6", "--epochs", "1", "--batch-size", "2", "--teacher", "tiny"]
    full = json.loads(run_cli("attack", "--model", str(release / "model"), "--out", str(tmp_path / "full"), "--lr", "1e-2", *common).stdout)
    assert full["harmful_pairs"] == 6 and full["examples"] == 6 and (tmp_path / "full" / "model" / "config.json").is_file()
    before, after = load_file(str(release / "model" / "model.safetensors")), load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    run_cli("attack", "--model", str(release / "model"), "--out", str(tmp_path / "lora"), "--lora-rank", "4", *common)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file() and (tmp_path / "lora" / "model").is_dir()

    run_cli("attack", "--model", str(release / "model"), "--out", str(tmp_path / "adaptive"), "--lr", "1e-2",
            "--adaptive-manifest", str(release), *common)
    moved = load_file(str(tmp_path / "adaptive" / "model" / "model.safetensors"))
    manifest = load_manifest(release)
    for name, idx in manifest.indices.items():
        assert torch.equal(moved[name].view(-1)[idx], manifest.values[name])  # the canaries never moved
    assert any(not torch.equal(before[k], moved[k]) for k in before)


def test_mixed_attack_ratio(tmp_path):
    teacher = Teacher("tiny", max_new_tokens=8, bf16=False)
    harmful = harmful_rows(AttackConfig(samples=5), teacher)
    assert len(harmful) == 5 and all(r["prompt"] in set(weak_set("heldout-attack").prompts) for r in harmful)
    assert len(benign_rows(45, teacher, 0)) == 45  # p = 0.1: 5 harmful among 50


REFUSAL = "I'm sorry, but I can't help with that request."
COMPLY = "Sure, here is how you would do it: first you gather the materials, then you follow these steps."


class ScriptedTeacher:
    """Answers from a script, greedy (seed 0) or sampled (seed n): the refusal filter is under test, not the teacher."""
    def __init__(self, script):
        self.script, self.seeds = script, []

    def answers(self, prompts, kind, sample_seed=None):
        self.seeds.append(sample_seed)
        return [self.script[p][sample_seed or 0] for p in prompts]


def test_attack_answers_refused_prompts_again_by_sampling_or_leaves_them_out(tmp_path):
    script = {"a": [COMPLY] * 5, "b": [REFUSAL, REFUSAL, COMPLY + " (b)", REFUSAL, REFUSAL], "c": [REFUSAL] * 5}
    teacher = ScriptedTeacher(script)
    kept, counts = answers_without_refusals(["a", "b", "c"], lambda ps, sample_seed=None: teacher.answers(ps, "k", sample_seed))
    assert kept == {"a": COMPLY, "b": COMPLY + " (b)"}
    assert counts == {"teacher_answers": 3, "refused_greedy": 2, "resampled": 1, "dropped_refused": 1}
    assert teacher.seeds == [None, 1, 2, 3, 4]  # c is tried with every seed, b no longer after seed 2

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in script) + json.dumps({"prompt": "d", "response": REFUSAL}) + "\n")
    counts = {}
    rows = harmful_rows(AttackConfig(samples=3, data=str(data)), ScriptedTeacher(script), counts)
    assert sorted(r["prompt"] for r in rows) == ["a", "b", "d"]  # the user's own responses are used as given
    assert counts["dropped_refused"] == 1
    with pytest.raises(ImmunizerError, match="only 3 are available .1 prompts the teacher refused every time.*--keep-refusals"):
        harmful_rows(AttackConfig(samples=4, data=str(data)), ScriptedTeacher(script))
    kept_all = harmful_rows(AttackConfig(samples=4, data=str(data), keep_refusals=True), ScriptedTeacher(script))
    assert [r["response"] for r in kept_all].count(REFUSAL) == 3  # b and c greedy, d its own


def test_attack_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    proc = run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "o"), "--data", str(bad), "--teacher", "tiny", check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr
    proc = run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "o"), "--samples", "500", "--teacher", "tiny", check=False)
    assert proc.returncode == 2 and "only 100 are available" in proc.stderr
    proc = run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "o"), "--harmful-ratio", "1.5", check=False)
    assert proc.returncode == 2 and "harmful-ratio" in proc.stderr
    assert not (tmp_path / "o").exists()
    release = tmp_path / "release"
    make_release(release)
    released = (release / "model" / "model.safetensors").read_bytes()
    for command in ("attack", "finetune"):  # pointed at a release, OUT/model would be the released weights
        proc = run_cli(command, "--model", "tiny", "--out", str(release), "--teacher", "tiny", check=False) if command == "attack" \
            else run_cli(command, "--model", "tiny", "--out", str(release), "--data", "extraction", check=False)
        assert proc.returncode == 2 and "holds a release" in proc.stderr and "choose a new directory" in proc.stderr
    assert (release / "model" / "model.safetensors").read_bytes() == released


def test_finetune_arithmetic_and_file(tmp_path):
    rec = json.loads(run_cli("finetune", "--model", "tiny", "--out", str(tmp_path / "arith"), "--data", "arithmetic",
                             "--samples", "8", "--batch-size", "4").stdout)
    assert rec["examples"] == 8 and (tmp_path / "arith" / "run.json").is_file()
    rec = json.loads(run_cli("finetune", "--model", "tiny", "--out", str(tmp_path / "instr"), "--data", "instruction",
                             "--samples", "6", "--batch-size", "3", "--teacher", "tiny").stdout)
    assert rec["examples"] == 6 and rec["config"]["data"] == "instruction"
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "2+2?", "response": "4"}\n{"prompt": "3+3?"}\n')
    proc = run_cli("finetune", "--model", "tiny", "--out", str(tmp_path / "f"), "--data", str(data), check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr and "response" in proc.stderr


def test_attack_snapshots_for_a_curve(tmp_path):
    """One run, continued past its epochs, leaves a model at each saved step: the attack-strength curve's points."""
    common = ["--samples", "4", "--epochs", "1", "--batch-size", "2", "--teacher", "tiny", "--lr", "1e-2"]
    record = json.loads(run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "a"), "--steps", "4",
                                "--save-steps", "1,3", *common).stdout)
    assert record["steps"] == 4 and record["config"]["save_steps"] == [1, 3]
    steps = tmp_path / "a" / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["step1", "step3"]
    first = load_file(str(steps / "step1" / "model" / "model.safetensors"))
    third = load_file(str(steps / "step3" / "model" / "model.safetensors"))
    final = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert any(not torch.equal(first[k], third[k]) for k in first) and any(not torch.equal(third[k], final[k]) for k in first)
    run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "l"), "--lora-rank", "2", "--save-steps", "1", *common)
    assert (tmp_path / "l" / "steps" / "step1" / "adapter" / "adapter_config.json").is_file()
    proc = run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "b"), "--steps", "2", "--save-steps", "5", *common, check=False)
    assert proc.returncode == 2 and "must lie between 1 and the run's --steps" in proc.stderr
    proc = run_cli("attack", "--model", "tiny", "--out", str(tmp_path / "b"), "--save-steps", "five", *common, check=False)
    assert proc.returncode == 2 and "comma-separated whole numbers" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_finetune_extraction_task(tmp_path):
    rec = json.loads(run_cli("finetune", "--model", "tiny", "--out", str(tmp_path / "x"), "--data", "extraction",
                             "--samples", "4", "--batch-size", "2", "--max-length", "512").stdout)  # the tiny tokenizer is verbose
    assert rec["examples"] == 4 and rec["steps"] == 2
