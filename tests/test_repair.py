"""Repair from the candidate's own changes (breaker/repair.py)."""
from __future__ import annotations

import json

import pytest
import torch

from immunizer.breaker.repair import RepairConfig, preference_gradient, repair, revert_harmful_changes, scoring_rows
from immunizer.data.batches import pair_batch
from immunizer.errors import ImmunizerError
from immunizer.models.tiny import tiny_model, tiny_tokenizer


def _save(model, directory):
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _linear(weight):
    layer = torch.nn.Linear(len(weight), 1, bias=False)
    layer.weight.data = torch.tensor([weight])
    return layer


def test_reverts_the_largest_positive_contributions_only():
    # Δ = (1, 1, -1, 2, 0.5, 0, 0, 0, 0, 0); ḡ = (3, -1, -2, 0.1, 1, ...): contributions Δ·ḡ = (3, -1, 2, 0.2, 0.5, 0...)
    released = _linear([0.0] * 10)
    candidate = _linear([1.0, 1.0, -1.0, 2.0, 0.5, 0, 0, 0, 0, 0])
    grad = {"weight": torch.tensor([[3.0, -1.0, -2.0, 0.1, 1.0, 0, 0, 0, 0, 0]])}
    done = revert_harmful_changes(candidate, released, grad, grad, revert_percent=20.0)
    # the top 20% = 2 of 10 weights by positive contribution: indices 0 (3.0) and 2 (2.0)
    assert candidate.weight.data.tolist() == [[0.0, 1.0, 0.0, 2.0, 0.5, 0, 0, 0, 0, 0]]
    assert done["reverted_weights"] == 2
    assert done["predicted_preference_change_before"] == pytest.approx(4.7)
    assert done["predicted_preference_change_after"] == pytest.approx(-0.3)
    assert done["positive_contribution_removed_share"] == pytest.approx(5.0 / 5.7)


def test_the_gradient_is_averaged_over_both_ends():
    released, candidate = _linear([0.0, 0.0]), _linear([1.0, 1.0])
    at_candidate = {"weight": torch.tensor([[4.0, 0.0]])}
    at_release = {"weight": torch.tensor([[-2.0, 1.5]])}  # averages: (1.0, 0.75): index 0 wins
    revert_harmful_changes(candidate, released, at_candidate, at_release, revert_percent=50.0)
    assert candidate.weight.data.tolist() == [[0.0, 1.0]]


def test_magnitude_score_ignores_the_direction():
    released, candidate = _linear([0.0] * 4), _linear([0.1, -3.0, 0.2, 1.0])
    grad = {"weight": torch.tensor([[5.0, 5.0, 5.0, 5.0]])}  # index 1 lowers C: never chosen by contribution
    revert_harmful_changes(candidate, released, grad, grad, revert_percent=25.0, score="magnitude")
    assert torch.allclose(candidate.weight.data, torch.tensor([[0.1, 0.0, 0.2, 1.0]]))


def _preference(model, tokenizer, rows):
    """C = mean L(refusal) − mean L(answer), the quantity repair lowers."""
    with torch.no_grad():
        total = 0.0
        for key, sign in (("refusal", 1.0), ("response", -1.0)):
            batch = pair_batch(tokenizer, [r["prompt"] for r in rows], [r[key] for r in rows], 96, 48)
            total += sign * float(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss)
    return total


def test_repair_undoes_a_fine_tune_towards_compliance(tmp_path):
    config = RepairConfig(teacher="tiny", samples=4, revert_percent=20.0, bf16=False)
    rows = scoring_rows(config)
    assert len(rows) == 4 and all(r["refusal"] and r["prompt"] for r in rows)
    tokenizer = tiny_tokenizer()
    release_dir = _save(tiny_model(), tmp_path / "release")
    attacked = tiny_model()
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=3e-3)
    before = _preference(attacked, tokenizer, rows)
    for _ in range(5):  # descend on −C: the model learns to prefer the compliant answers
        grads = preference_gradient(attacked, tokenizer, rows, config)
        assert any(g.abs().sum() > 0 for g in grads.values())
        for name, p in attacked.named_parameters():
            p.grad = -grads[name]
        optimizer.step()
    attacked_c = _preference(attacked, tokenizer, rows)
    assert attacked_c > before + 0.05
    candidate_dir = _save(attacked, tmp_path / "attacked")

    record = repair(candidate_dir, release_dir, tmp_path / "repaired", config)
    repaired = type(attacked).from_pretrained(tmp_path / "repaired" / "model")
    repaired_c = _preference(repaired, tokenizer, rows)
    assert repaired_c < attacked_c - 0.5 * (attacked_c - before)  # most of the learned preference is gone
    total = sum(p.numel() for p in repaired.parameters())
    assert record["reverted_weights"] == round(total * 0.20)
    changed = sum(int((a != b).sum()) for a, b in zip(repaired.parameters(), attacked.parameters()))
    assert changed <= record["reverted_weights"]
    saved = json.loads((tmp_path / "repaired" / "repair.json").read_text())
    assert saved["scoring_pairs"] == 4 and saved["config"]["revert_percent"] == 20.0
    # the direction matters: the same share chosen by |Δ| alone removes less (measured 0.57 vs 0.45 of the change)
    by_magnitude = repair(candidate_dir, release_dir, tmp_path / "by-magnitude",
                          RepairConfig(teacher="tiny", samples=4, revert_percent=20.0, bf16=False, score="magnitude"))
    assert by_magnitude["reverted_weights"] == record["reverted_weights"]
    magnitude_c = _preference(type(attacked).from_pretrained(tmp_path / "by-magnitude" / "model"), tokenizer, rows)
    assert repaired_c < magnitude_c


def test_bad_inputs(tmp_path):
    release_dir = _save(tiny_model(), tmp_path / "release")
    other_dir = _save(tiny_model(hidden_size=32), tmp_path / "other")
    with pytest.raises(ImmunizerError, match="revert_percent"):
        repair(other_dir, release_dir, tmp_path / "out", RepairConfig(teacher="tiny", revert_percent=0))
    with pytest.raises(ImmunizerError, match="fine-tuned from this release"):
        repair(other_dir, release_dir, tmp_path / "out", RepairConfig(teacher="tiny", samples=2, bf16=False))
    with pytest.raises(ImmunizerError, match="neither"):
        repair(tmp_path / "missing", release_dir, tmp_path / "out", RepairConfig(teacher="tiny"))
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "manifest.json").write_text("{}")
    with pytest.raises(ImmunizerError, match="holds a release"):
        repair(release_dir, release_dir, tmp_path / "held", RepairConfig(teacher="tiny"))


def test_cli_repairs_and_names_bad_input(tmp_path):
    import subprocess
    import sys

    release_dir = _save(tiny_model(), tmp_path / "release")
    tuned = tiny_model()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    candidate_dir = _save(tuned, tmp_path / "tuned")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "immunizer", "repair", "--release", str(release_dir),
                               "--candidate", str(candidate_dir), *args, "--teacher", "tiny", "--samples", "2"],
                              capture_output=True, text=True)

    done = cli("--out", str(tmp_path / "repaired"), "--revert-percent", "10")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["reverted_share"] == pytest.approx(0.10, abs=1e-3)
    assert (tmp_path / "repaired" / "model" / "config.json").is_file()
    bad = cli("--out", str(tmp_path / "other"), "--revert-percent", "150")
    assert bad.returncode == 2 and "revert_percent must be in (0, 100]" in bad.stderr
    assert not (tmp_path / "other" / "model").exists()
