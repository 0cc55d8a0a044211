"""`immunizer calibrate` and `immunizer scan` end to end on a tiny immunized model, through the CLI:
the contract other tools rely on (JSON fields, exit 0 clean / 3 tripped / 2 bad input)."""
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli
from immunizer.breaker.calibrate import choose_threshold, detection_figures, load_calibration_config
from immunizer.breaker.reference import load_reference
from immunizer.errors import ImmunizerError
from immunizer.finetuning import sft as real_sft
from immunizer.manifest import MANIFEST_FILE, file_sha256, load_manifest

# the module itself: `immunizer.breaker.calibrate` as an attribute is the function the package exports
calibration = importlib.import_module("immunizer.breaker.calibrate")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("breaker") / "immunized"
    run_cli("immunize", "--model", "tiny", "--out", str(out), "--preset", "tiny")
    proc = run_cli("calibrate", "--model", str(out), "--preset", "tiny", "--teacher", "tiny")
    return out, json.loads(proc.stdout)


def test_calibration_is_written_into_the_manifest(calibrated):
    out, printed = calibrated
    meta = load_manifest(out).meta  # still verifies: the manifest was re-sealed
    entry = meta["breaker"]
    assert entry["threshold"] == printed["threshold"] and entry["statistic"] == "harm_drift_ratio"
    assert set(entry["other_statistics"]) == {"canary_drift_ratio", "moved_canary_drift_ratio", "sample_harm_ratio"}
    assert [(b["statistic"], b["side"]) for b in entry["bounds"]] == [
        ("harm_drift_ratio", "above"), ("harm_drift_ratio", "below"), ("canary_drift_ratio", "above"),
        ("moved_canary_drift_ratio", "below"), ("sample_harm_ratio", "above")]
    assert entry["bounds"][0]["value"] == entry["threshold"] == entry["primary"]["threshold"]
    assert meta["reference"]["direction"] is True and meta["reference"]["sample_direction"] is True
    for key in ("tpr", "fpr", "auroc"):
        low, high = entry[f"{key}_ci95"]
        assert 0 <= low <= entry[key] <= high <= 1
    assert entry["fpr"] <= entry["target_fpr"] == 0.05
    assert entry["n_benign"] == 8 and entry["n_harmful"] == 4  # 4 benign runs, 2 harmful, 2 readings each
    assert file_sha256(out / entry["roc_plot"]) == entry["roc_plot_sha256"]
    assert (out / entry["roc_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert file_sha256(out / entry["cases_file"]) == entry["cases_sha256"]
    assert meta["reference"]["num_samples"] > 0


def test_a_reference_from_before_the_sample_signs_gets_them_and_keeps_its_canary_signs(calibrated, tmp_path):
    """An older release has the canaries' harmful signs but none for the sample: the next calibration (or bench)
    adds the sample's from a real gradient pass and leaves the canaries' as they were, so that readings recorded
    against them stay valid."""
    import shutil

    from immunizer.breaker.reference import SAMPLE_SHARE, write_reference

    release = tmp_path / "release"
    shutil.copytree(calibrated[0], release)
    _, reference = load_reference(release)
    canary_signs = {n: s.clone() for n, s in reference.direction.items()}
    reference.direction = {n: -s for n, s in canary_signs.items()}  # unlike any recomputation
    reference.sample_direction = None
    write_reference(release, reference, SAMPLE_SHARE, 0)
    _, again, _ = calibration.ensure_direction(release, load_calibration_config("tiny"), teacher="tiny")
    assert all(torch.equal(again.direction[n], -s) for n, s in canary_signs.items())
    signs = torch.cat([again.sample_direction[n] for n in sorted(again.sample_direction)])
    assert signs.numel() == sum(i.numel() for i in again.sample_index.values())
    assert set(signs.unique().tolist()) <= {-1.0, 0.0, 1.0} and (signs != 0).float().mean() > 0.5
    assert load_manifest(release).meta["reference"]["sample_direction"] is True


def test_calibration_resumes_without_rerunning_finished_fine_tunes(calibrated, monkeypatch):
    out, printed = calibrated
    monkeypatch.setattr(calibration, "sft", lambda *a, **k: pytest.fail("a finished run was run again"))
    entry = calibration.calibrate(out, load_calibration_config("tiny"), teacher="tiny", progress=False)
    assert entry["threshold"] == printed["threshold"]
    assert entry["teacher_sha256"] == load_manifest(out).meta["breaker"]["teacher_sha256"] is not None


def test_scan_clean_tripped_and_adapter(calibrated, tmp_path):
    out, _ = calibrated
    clean = json.loads(run_cli("scan", "--manifest", str(out), "--candidate", str(out / "model")).stdout)
    for key in ("tripped", "statistic", "threshold", "canary_drift", "other_drift", "layers"):
        assert key in clean
    assert clean["tripped"] is False and clean["statistic"] == 0.0

    weights = load_file(str(out / "model" / "model.safetensors"))
    _, reference = load_reference(out)
    for name, signs in reference.direction.items():  # a step along the harmful direction at every canary
        weights[name].view(-1)[reference.canary_index[name]] += 0.05 * signs
    save_file(weights, str(tmp_path / "tampered.safetensors"))
    incidents = tmp_path / "incidents.jsonl"
    proc = run_cli("scan", "--manifest", str(out), "--candidate", str(tmp_path / "tampered.safetensors"),
                   "--incidents", str(incidents), check=False)
    assert proc.returncode == 3, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["tripped"] and verdict["statistic"] > verdict["threshold"]
    (record,) = [json.loads(line) for line in incidents.read_text().splitlines()]
    assert record["kind"] == "breaker_incident" and record["source"] == "scan" and record["candidate"].endswith("tampered.safetensors")
    # the review store takes the incident file as it is
    imported = run_cli("review", "import", "--db", str(tmp_path / "review.db"), str(incidents))
    assert "1" in imported.stdout

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(out / "model")),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    proc = run_cli("scan", "--manifest", str(out), "--candidate", str(tmp_path / "adapter"), "--no-incident", check=False)
    report = json.loads(proc.stdout)  # read unmerged as an adapter, and the exit code is the verdict's
    assert report["candidate_kind"] == "lora" and proc.returncode == (3 if report["tripped"] else 0)
    assert report["tripped"] == bool(report["reasons"])


def test_scan_bad_inputs_exit_2_with_the_reason(calibrated, tmp_path):
    out, _ = calibrated
    weights = load_file(str(out / "model" / "model.safetensors"))

    def scan(candidate, manifest=out):
        proc = run_cli("scan", "--manifest", str(manifest), "--candidate", str(candidate), check=False)
        assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
        return proc.stderr

    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, str(tmp_path / "gpt2.safetensors"))
    assert "wrong architecture" in scan(tmp_path / "gpt2.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0." not in k}, str(tmp_path / "partial.safetensors"))
    assert "missing" in scan(tmp_path / "partial.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    save_file({**weights, name: torch.zeros(3, 3)}, str(tmp_path / "reshaped.safetensors"))
    assert "another shape" in scan(tmp_path / "reshaped.safetensors")
    assert "does not exist" in scan(tmp_path / "nowhere")

    forged = tmp_path / "forged"
    forged.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (forged / f.name).write_bytes(f.read_bytes())
    meta = json.loads((forged / MANIFEST_FILE).read_text())
    meta["breaker"]["threshold"] = 1e9  # an attacker raising the threshold so nothing ever trips
    (forged / MANIFEST_FILE).write_text(json.dumps(meta))
    assert "was edited or corrupted" in scan(out / "model", manifest=forged)


def test_threshold_choice_by_hand():
    """Ten benign readings 1..10 at a 10% target: one may exceed the threshold, so it is 9."""
    assert choose_threshold([float(x) for x in range(1, 11)], 0.10) == 9.0
    assert choose_threshold([float(x) for x in range(1, 11)], 0.05) == 10.0
    records = [{"harmful": False, "readings": [{"step": 1, "statistic": s}]} for s in (1.0, 1.1, 1.2, 1.3)] + \
              [{"harmful": True, "readings": [{"step": 1, "statistic": s}]} for s in (2.0, 3.0)]
    records = [{**r, "readings": [{"step": 1, "canary_drift_ratio": x["statistic"]} for x in r["readings"]]} for r in records]
    fig = detection_figures(records, 0.05, bootstrap=20, seed=0, statistic="canary_drift_ratio")
    assert fig["threshold"] == 1.3 and fig["tpr"] == 1.0 and fig["fpr"] == 0.0 and fig["auroc"] == 1.0


def test_calibration_learns_a_task_the_bench_does_not_fine_tune_on():
    """The default and quick grids include `extraction` (a task the model really learns, so its fine-tunes move the
    weights as far as a useful benign fine-tune does), drawn from other rows than the bench's benign fine-tune."""
    from immunizer.data.tasks import BENIGN_TASK, GENERATED

    for config in (calibration.CalibrationConfig(), load_calibration_config("quick"), load_calibration_config("standard")):
        assert BENIGN_TASK in config.benign_tasks
        assert {c.name for c in calibration.plan_cases(config) if c.data == BENIGN_TASK} >= {"benign-extraction-full-lr5e-05"}
    config = load_calibration_config("quick")
    case = next(c for c in calibration.plan_cases(config) if c.data == BENIGN_TASK)
    rows = calibration.CaseData("tiny", config).rows(case)
    assert len(rows) == config.benign_samples and all(r["response"] == r["answer"] for r in rows)
    bench_rows = {r["prompt"] for seed in range(3) for r in GENERATED[BENIGN_TASK](64, seed, split="train")}
    assert not bench_rows & {r["prompt"] for r in rows}
    # the other generated tasks keep the rows (and cached runs) of earlier calibrations
    arithmetic = next(c for c in calibration.plan_cases(config) if c.data == "arithmetic")
    assert calibration.CaseData("tiny", config).rows(arithmetic) == GENERATED["arithmetic"](config.benign_samples, 0)


def test_calibration_config_errors():
    with pytest.raises(ImmunizerError, match="unknown calibration preset"):
        load_calibration_config("huge")
    with pytest.raises(ImmunizerError, match="unknown benign task"):
        load_calibration_config("tiny", {"benign_tasks": ["poetry"]})
    with pytest.raises(ImmunizerError, match="target_fpr"):
        load_calibration_config("tiny", {"target_fpr": 1.5})
    with pytest.raises(ImmunizerError, match="unknown config key"):
        load_calibration_config("tiny", {"learning_rate": 1.0})
    with pytest.raises(ImmunizerError, match="config key 'target_fpr' expects float, got 'low'"):
        load_calibration_config("tiny", sets=["target_fpr=low"])
    # preset < --set < the explicit flag (`--target-fpr`), as on the command line
    assert load_calibration_config("tiny", {"target_fpr": 0.1}, ["target_fpr=0.2", "full_lrs=[1e-4]"]).target_fpr == 0.1
    assert load_calibration_config("tiny", None, ["full_lrs=[1e-4]"]).full_lrs == [1e-4]


def test_calibration_grid_with_several_lora_ranks_keeps_the_runs_done(calibrated, monkeypatch):
    """`lora_rank: [4, 8]` runs each LoRA lr at each rank. Runs already done are not run again: neither those
    cached under the key of earlier versions (which hashed the whole grid) nor, after widening the grid, the
    old rank's: only the new rank's runs."""
    out, _ = calibrated
    reference_sha = load_manifest(out).meta["reference"]["sha256"]
    tiny = load_calibration_config("tiny")
    cases_file = out / calibration.CASES_FILE
    legacy = {calibration._case_key(c, tiny, reference_sha): calibration._case_key(c, tiny, reference_sha, legacy=True)
              for c in calibration.plan_cases(tiny)}
    records = [json.loads(line) for line in cases_file.read_text().splitlines()]
    cases_file.write_text("".join(json.dumps({**r, "key": legacy[r["key"]]}) + "\n" for r in records))
    monkeypatch.setattr(calibration, "sft", lambda *a, **k: pytest.fail("a run cached under the old key was run again"))
    calibration.calibrate(out, tiny, teacher="tiny", progress=False)

    config = load_calibration_config("tiny", sets=["lora_rank=[4, 8]"])
    assert [(c.name, c.lora_rank) for c in calibration.plan_cases(config) if c.lora_rank] == [
        ("benign-arithmetic-lora-r4-lr0.005", 4), ("benign-arithmetic-lora-r8-lr0.005", 8),
        ("benign-listops-lora-r4-lr0.005", 4), ("benign-listops-lora-r8-lr0.005", 8),
        ("harmful-8-lora-r4-lr0.005", 4), ("harmful-8-lora-r8-lr0.005", 8)]
    ran = []
    monkeypatch.setattr(calibration, "sft", lambda model, tokenizer, rows, spec, **k: ran.append(spec.lora_rank) or
                        real_sft(model, tokenizer, rows, spec, **k))
    entry = calibration.calibrate(out, config, teacher="tiny", progress=False)
    assert ran == [8, 8, 8]  # two benign tasks and one harmful run, at the new rank only
    assert entry["n_benign"] == 8 + 4 and entry["n_harmful"] == 4 + 2
    names = {json.loads(line)["name"] for line in cases_file.read_text().splitlines()}
    assert "benign-listops-lora-r4-lr0.005" in names  # the reused run is recorded under the grid's name for it
    with pytest.raises(ImmunizerError, match="lora_rank must be"):
        load_calibration_config("tiny", sets=["lora_rank=[]"])
    with pytest.raises(ImmunizerError, match="lora_rank must be"):
        load_calibration_config("tiny", {"lora_rank": 0})
