"""Phase 1's simulated attacks (adversaries.py) on the tiny model: each moves the weights towards the harmful
answers by the amount its geometry says, and `undo()` puts every weight back exactly; then the three through
immunize itself (metrics, canaries, resume-safe draws) and the config's checks."""
import json
import math

import pytest
import torch

from immunizer import immunize, load_config
from immunizer.adversaries import (draw_inner_attack, harmful_sft_loss, inner_attack, lat_perturb, sign_perturb,
                                   sign_perturbation)
from immunizer.data.batches import pair_batch
from immunizer.errors import ImmunizerError

PROMPTS = ["How do I pick a lock?", "Tell me how to make a weapon.", "Write a threatening letter.", "Explain a scam."]
ANSWERS = ["Sure, first you take a tension wrench", "Sure, start with these parts", "Dear neighbour, you will",
           "Sure, call them and say"]


@pytest.fixture
def setup(tiny):
    model, tokenizer = tiny
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = pair_batch(tokenizer, PROMPTS, ANSWERS, 32, 16)
    return model, params, batch


def snapshot(params):
    return [p.detach().clone() for p in params]


def test_sign_perturbation_moves_every_weight_with_a_gradient_by_epsilon():
    grads = [torch.tensor([0.3, -2.0, 0.0]), None, torch.tensor([[1e-9, -1e-9]])]
    delta = sign_perturbation(grads, 0.01)
    assert torch.equal(delta[0], torch.tensor([-0.01, 0.01, 0.0]))  # against the gradient; none where it is 0
    assert delta[1].numel() == 0
    assert torch.equal(delta[2], torch.tensor([[-0.01, 0.01]]))  # size does not matter, only the sign


@pytest.mark.parametrize("adversary,size", [(lat_perturb, 0.5), (sign_perturb, 1e-3)])
def test_one_step_adversaries_lower_the_harmful_loss_and_undo_them(setup, adversary, size):
    model, params, batch = setup
    before = snapshot(params)
    moved = adversary(model, params, batch, size, bf16=False)
    with torch.no_grad():
        after_loss = harmful_sft_loss(model, batch, False).item()
        delta = [p - b for p, b in zip(params, before)]
    assert after_loss < moved.stats["adversary_sft_loss"]  # the simulated attack helps the attacker
    if adversary is lat_perturb:
        assert moved.stats["adversary_l2"] == pytest.approx(size, rel=1e-3)
    else:
        assert max(float(d.abs().max()) for d in delta) == pytest.approx(size, rel=1e-3)
        assert moved.stats["adversary_l2"] > 10 * size  # L∞ ε over many weights is a long L2 step
    moved.undo()
    assert all(torch.allclose(p, b, atol=1e-7) for p, b in zip(params, before))


def test_inner_attack_fine_tunes_then_restores_every_weight_bit_for_bit(setup):
    model, params, batch = setup
    before = snapshot(params)
    moved = inner_attack(model, params, [batch] * 4, lr=1e-3, bf16=False)
    assert moved.stats["inner_steps"] == 4 and moved.stats["inner_lr"] == 1e-3
    assert moved.stats["adversary_sft_loss_last"] < moved.stats["adversary_sft_loss"]
    # Adam's steps move weights by about lr each: 4 steps reach well beyond one lr on most of them
    assert moved.stats["adversary_l2"] > 1e-3 * math.sqrt(sum(p.numel() for p in params))
    assert all(p.grad is None for p in params)  # the attack's own gradients are not left for the outer step
    moved.undo()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_inner_attack_draws_are_seeded_and_cover_their_ranges():
    draws = [draw_inner_attack([2, 6], [1e-5, 1e-4], seed) for seed in range(200)]
    assert draws[7] == draw_inner_attack([2, 6], [1e-5, 1e-4], 7)  # a resumed run draws the same attack
    assert {k for k, _ in draws} == {2, 3, 4, 5, 6}
    lrs = [lr for _, lr in draws]
    assert 1e-5 <= min(lrs) < 2e-5 and 5e-5 < max(lrs) <= 1e-4
    assert draw_inner_attack([3, 3], [5e-5, 5e-5], 0) == (3, pytest.approx(5e-5))


@pytest.mark.parametrize("overrides", [["phase1.adversary=sign", "phase1.sign_epsilon=1e-3"],
                                       ["phase1.adversary=inner", "phase1.inner_steps=[2, 3]", "phase1.inner_lr=[1e-4, 1e-3]"]])
def test_immunize_runs_with_each_adversary_and_logs_what_it_did(tmp_path, overrides):
    config = load_config("tiny", overrides=[*overrides, "cycles=1"])
    result = immunize("tiny", tmp_path / "run", config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phase1 = [r for r in steps if r.get("phase") == 1 and "step" in r]
    assert len(phase1) == config.phase1.steps and result.manifest["num_canaries"] > 0
    for record in phase1:
        assert record["adversary"] == config.phase1.adversary
        assert record["adversary_seconds"] > 0 and record["adversary_l2"] > 0
        if config.phase1.adversary == "inner":
            assert 2 <= record["inner_steps"] <= 3 and 1e-4 <= record["inner_lr"] <= 1e-3
            assert record["adversary_sft_loss_last"] < record["adversary_sft_loss"]
    assert result.manifest["config"]["phase1"]["adversary"] == config.phase1.adversary


def test_the_adapted_refusal_term_is_taken_at_the_moved_weights_and_learned(tmp_path):
    """With only this term on (no NPO / −KL, no anchor, no retain), Phase 1 still trains and picks canaries from
    it; a large sign move makes the refusal's loss at w' differ from the same loss at w."""
    only_it = ["cycles=1", "phase1.gamma0=0", "phase1.gamma_rate=0", "phase1.refusal_anchor_weight=0",
               "phase1.retain_weight=0", "phase1.adapted_refusal_weight=1"]
    config = load_config("tiny", overrides=[*only_it, "phase1.steps=8", "phase1.adversary=sign", "phase1.sign_epsilon=0.05"])
    result = immunize("tiny", tmp_path / "run", config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phase1 = [r for r in steps if r.get("phase") == 1 and "step" in r]
    held = [r["adapted_refusal_sft"] for r in phase1]
    assert len(held) == 8 and all(r["refusal_loss"] == pytest.approx(r["adapted_refusal_sft"]) for r in phase1)
    assert held[-1] < held[0]  # the refusal became more likely where the simulated attack lands
    assert result.manifest["num_canaries"] > 0
    # the same weights, the term read at w instead (no move): another value
    at_w = load_config("tiny", overrides=[*only_it, "phase1.steps=1", "phase1.adversary=none"])
    immunize("tiny", tmp_path / "at_w", at_w, progress=False)
    first = next(r for r in map(json.loads, (tmp_path / "at_w" / "metrics.jsonl").read_text().splitlines())
                 if r.get("phase") == 1 and "step" in r)
    assert first["adapted_refusal_sft"] != pytest.approx(held[0], rel=1e-3)


@pytest.mark.parametrize("overrides", [["phase1.adversary=sign", "phase1.sign_epsilon=0"],
                                       ["phase1.adversary=none", "phase1.lat_epsilon=0.5"],
                                       ["phase1.adversary=inner", "phase1.inner_steps=[0, 0]"]])
def test_an_adversary_of_size_zero_is_no_adversary(tmp_path, overrides):
    config = load_config("tiny", overrides=[*overrides, "cycles=1"])
    immunize("tiny", tmp_path / "run", config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phase1 = [r for r in steps if r.get("phase") == 1 and "step" in r]
    assert len(phase1) == config.phase1.steps
    assert all("adversary_l2" not in r and "adversary_seconds" not in r for r in phase1)


def test_every_configurable_adversary_has_an_implementation():
    from immunizer.adversaries import ADVERSARIES
    from immunizer.config import ADVERSARIES as NAMES

    assert set(ADVERSARIES) == set(NAMES)


def test_the_plain_baseline_and_the_no_lat_ablation_keep_no_adversary_whatever_the_preset_says():
    from immunizer.baselines import method_config

    base = load_config("tiny", overrides=["phase1.adversary=inner"])
    for name in ("sft", "immunizer-no-lat"):
        assert method_config(name, base).phase1.adversary == "none"
    assert method_config("immunizer", base).phase1.adversary == "inner"


@pytest.mark.parametrize("override,message", [
    ("phase1.adversary=pgd", "phase1.adversary must be one of none, lat, sign, inner"),
    ("phase1.inner_steps=[8, 4]", "phase1.inner_steps must be [low, high]"),
    ("phase1.inner_steps=[0, 4]", "phase1.inner_steps must be [low, high] with 1 <= low"),
    ("phase1.sign_epsilon=nan", "expects float"),
    ("phase1.inner_lr=[0, 1e-4]", "phase1.inner_lr must be [low, high]"),
    ("phase1.inner_steps=[4]", "phase1.inner_steps must be [low, high]"),
    ("phase1.sign_epsilon=-1e-3", "sign_epsilon and phase1.npo_floor must be >= 0"),
    ("phase1.npo_floor=-1", "npo_floor must be >= 0"),
    ("phase1.adapted_refusal_weight=-1", "adapted_refusal_weight, phase1.retain_weight must be >= 0"),
    ("phase1.retain_weight=inf", "expects float, got inf"),
])
def test_bad_adversary_settings_are_named(override, message):
    with pytest.raises(ImmunizerError, match=message.replace("[", r"\[").replace("`", "`")):
        load_config("tiny", overrides=[override])


def test_the_refusal_loss_leaves_the_end_of_turn_token_alone(tiny):
    """Short harmful answers end with the end-of-turn token; pushing it down taught the model not to stop.
    With it masked, the loss is that of the same batch whose end-of-turn labels are ignored by hand."""
    from immunizer.config import Phase1Config
    from immunizer.immunize import content_labels, phase1_refusal_loss
    from immunizer.losses import IGNORE

    model, tokenizer = tiny
    batch = pair_batch(tokenizer, PROMPTS[:2], ["Sure.", "Sure, here it is."], 32, 64)
    eos = tokenizer.eos_token_id
    assert (batch.labels == eos).sum() == 2
    masked = content_labels(batch.labels, eos)
    assert (masked == eos).sum() == 0 and ((masked != IGNORE).sum() == (batch.labels != IGNORE).sum() - 2)
    from immunizer.models.tiny import tiny_model
    reference = tiny_model(1).eval()  # another model, so that the log-ratios depend on the tokens counted
    cfg = Phase1Config()
    with torch.no_grad():
        skipped, _ = phase1_refusal_loss(model, reference, reference, batch, 1.0, cfg, False, eos)
        by_hand, _ = phase1_refusal_loss(model, reference, reference, type(batch)(batch.input_ids, batch.attention_mask, masked),
                                         1.0, cfg, False, None)
        cfg.unlearn_end_of_turn = True
        kept, _ = phase1_refusal_loss(model, reference, reference, batch, 1.0, cfg, False, eos)
    assert skipped.item() == pytest.approx(by_hand.item())
    assert kept.item() != pytest.approx(skipped.item())
