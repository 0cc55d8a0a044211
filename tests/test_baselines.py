"""The published defences (vaccine, repnoise, booster): their losses against hand-worked values, and
their training loop on the tiny model under immunizer's budget."""
import json

import pytest
import torch
from safetensors.torch import load_file

from immunizer.baselines import build_method, method_config, method_names
from immunizer.baselines.losses import booster_gradient, gaussian_mmd, repnoise_loss, vaccine_perturbation
from immunizer.config import load_config
from immunizer.errors import ImmunizerError
from immunizer.manifest import load_manifest


def test_vaccine_perturbation_has_norm_rho_over_all_layers():
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    eps = vaccine_perturbation(grads, rho=2.0)
    assert torch.allclose(eps[0], torch.tensor([[1.2, 0.0]])) and torch.allclose(eps[1], torch.tensor([[0.0, 1.6]]))
    assert torch.sqrt(sum((e ** 2).sum() for e in eps)).item() == pytest.approx(2.0)


def test_mmd_is_zero_for_the_same_sample_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    assert gaussian_mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    near, far = gaussian_mmd(x, x + 0.5), gaussian_mmd(x, x + 3.0)
    assert 0 < near.item() < far.item()


def test_repnoise_loss_caps_the_ascent_term():
    harmless, mmd = torch.tensor(1.0), torch.tensor(0.5)
    assert repnoise_loss(harmless, torch.tensor(3.0), mmd, 2.0, 0.1, 10.0).item() == pytest.approx(1.0 + 1.0 - 0.3)
    capped = torch.tensor(50.0, requires_grad=True)
    loss = repnoise_loss(harmless, capped, mmd, 2.0, 0.1, 10.0)
    assert loss.item() == pytest.approx(2.0 - 1.0)
    loss.backward()
    assert capped.grad.item() == 0  # past the cap the ascent stops pulling


def test_booster_gradient_is_align_plus_lambda_times_the_harmful_gradient_difference():
    out = booster_gradient(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.25, 1.0]), lam=4.0)
    assert torch.allclose(out, torch.tensor([2.0, 0.0]))


def test_method_names_cover_the_published_defences_and_ablations():
    names = method_names()
    for name in ("none", "sft", "immunizer", "vaccine", "repnoise", "booster", "immunizer-no-lat", "immunizer-no-stab"):
        assert name in names
    base = load_config("tiny")
    assert method_config("sft", base).phase1.lat_epsilon == 0 and base.phase1.lat_epsilon > 0  # a copy, base untouched
    assert method_config("immunizer-inner", base).phase1.adversary == "inner" and base.phase1.adversary == "lat"
    assert method_config("immunizer-sign", base).phase1.adversary == "sign"
    with pytest.raises(ImmunizerError, match="unknown method"):
        build_method("rlhf", "tiny", None, base)


def test_a_method_file_tunes_a_defences_own_hyperparameters_and_explicit_settings_win(tmp_path, monkeypatch):
    import immunizer.baselines as baselines
    from immunizer.baselines import BaselineConfig, method_baseline
    from immunizer.baselines.train import BaselineConfig as Paper

    base = load_config("tiny")
    assert method_baseline("booster").booster_lambda == 1.0 != Paper().booster_lambda  # booster.yaml's tuned λ
    assert method_config("booster", base).phase1.lr == 2e-4  # its training layer applies, its `baseline:` is not a key
    assert load_config("tiny", baselines.METHOD_CONFIGS / "booster.yaml").phase1.lr == 2e-4  # --config takes it too
    assert method_baseline("booster", {"booster_lambda": 3}).booster_lambda == 3  # a bench's `baseline:` wins
    assert method_baseline("vaccine") == BaselineConfig()  # no file: the paper's values
    monkeypatch.setattr(baselines, "METHOD_CONFIGS", tmp_path)
    (tmp_path / "vaccine.yaml").write_text("baseline:\n  vaccine_radius: 3\n")
    with pytest.raises(ImmunizerError, match="baseline.vaccine_radius"):
        method_baseline("vaccine")
    (tmp_path / "vaccine.yaml").write_text("baseline: 3\n")
    with pytest.raises(ImmunizerError, match="must be a mapping"):
        method_baseline("vaccine")


@pytest.mark.parametrize("method", ["vaccine", "repnoise", "booster"])
def test_baseline_trains_under_immunizers_budget_and_writes_a_release(method, tmp_path):
    config = load_config("tiny")
    built = build_method(method, "tiny", tmp_path / method, config, progress=False)
    manifest = load_manifest(built.release_dir)  # verifies hashes against the written model
    assert manifest.meta["method"] == method and manifest.meta["num_canaries"] > 0
    lines = [json.loads(line) for line in (built.release_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "step" in r]
    # immunizer's budget on `tiny`: cycles x (Phase-1 + Phase-2 steps)
    assert len(steps) == config.cycles * (config.phase1.steps + config.phase2.steps)
    assert lines[-1]["event"] == "finished" and built.cost_seconds > 0
    if method == "vaccine":  # the perturbation is the worst case in its ball: it raises the alignment loss
        assert all(r["perturbed_loss"] > r["align_loss"] for r in steps)
    if method == "booster":  # the simulated harmful step does lower the harmful loss (what the regularizer attenuates)
        assert all(r["harmful_drop"] > 0 for r in steps)
    if method == "repnoise":
        assert all(r["mmd"] > 0 for r in steps)
    from immunizer.models.tiny import tiny_model

    before = tiny_model().state_dict()
    after = load_file(str(built.model_dir / "model.safetensors"))
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in after if k in before)


def test_baseline_refuses_a_finished_output_dir(tmp_path):
    config = load_config("tiny")
    build_method("booster", "tiny", tmp_path / "b", config, progress=False)
    with pytest.raises(ImmunizerError, match="already holds"):
        build_method("booster", "tiny", tmp_path / "b", config, progress=False)


def test_an_interrupted_baseline_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    from immunizer.baselines import train

    config = load_config("tiny")  # checkpoints every 2 steps
    whole = build_method("repnoise", "tiny", tmp_path / "whole", config, progress=False)  # repnoise draws noise: RNG matters

    real, calls = train.STEPS["repnoise"], []

    def dies_at_step_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setitem(train.STEPS, "repnoise", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        build_method("repnoise", "tiny", tmp_path / "cut", config, progress=False)
    monkeypatch.setitem(train.STEPS, "repnoise", real)
    assert (tmp_path / "cut" / "checkpoint").is_dir() and not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(ImmunizerError, match="interrupted repnoise run"):
        build_method("repnoise", "tiny", tmp_path / "cut", config, progress=False)
    with pytest.raises(ImmunizerError, match="another method"):
        build_method("booster", "tiny", tmp_path / "cut", config, progress=False, resume=True)

    resumed = build_method("repnoise", "tiny", tmp_path / "cut", config, progress=False, resume=True)
    assert not (tmp_path / "cut" / "checkpoint").exists()
    a = load_file(str(whole.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "step" in r] == list(range(config.cycles * (config.phase1.steps + config.phase2.steps)))


def test_a_stop_asked_for_checkpoints_a_baseline_at_once_and_it_resumes_to_the_same_weights(tmp_path):
    from immunizer.stopping import Stopped

    config = load_config("tiny", None, ["checkpoint_every=1000"])  # the stop's checkpoint is the only one
    whole = build_method("repnoise", "tiny", tmp_path / "whole", config, progress=False)
    asked = []

    def stop():
        asked.append(1)
        return "test" if len(asked) == 3 else None
    with pytest.raises(Stopped, match=r"test: repnoise stopped before step 4, whose checkpoint is in .*cut"):
        build_method("repnoise", "tiny", tmp_path / "cut", config, progress=False, stop=stop)
    assert (tmp_path / "cut" / "checkpoint").is_dir()
    resumed = build_method("repnoise", "tiny", tmp_path / "cut", config, progress=False, resume=True)
    a = load_file(str(whole.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "stopped", "by": "test", "next_step": 3}.items() <= next(r for r in records if r.get("event") == "stopped").items()
