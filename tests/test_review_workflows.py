"""The workflow functions on their own: triage, escalation rules, reviewer accuracy and agreement, label shift."""
import datetime as dt

import pytest

from immunizer.review.escalation import EscalationRules, escalation_reasons, majority
from immunizer.review.label_shift import period_key, rereview_sample, shift_test
from immunizer.review.reviewer_accuracy import (ReviewerAccuracyConfig, cohen_kappa_pairs, flagged_reviewers,
                                                krippendorff_alpha, reviewer_accuracy)
from immunizer.review.triage import TriageConfig, novelty, priority, text_tokens


def test_priority_weights_severity_uncertainty_and_novelty():
    config = TriageConfig()
    # 0.6·0.75 + 0.2·(1 − 0.9) + 0.2·0.5 = 0.45 + 0.02 + 0.1
    assert priority("high", 0.9, 0.5, config) == pytest.approx(0.57)
    assert priority("low", None, 0.0, config) == pytest.approx(0.6 * 0.25 + 0.2)
    assert priority("critical", 1.0, 1.0, config) > priority("medium", 1.0, 1.0, config)


def test_novelty_is_one_minus_the_best_jaccard_similarity():
    a = text_tokens({"prompt": "How do I pick a lock", "x": ["Lock"]})
    assert a == {"prompt", "x", "how", "do", "i", "pick", "a", "lock"}
    assert novelty(a, []) == 1.0 and novelty(a, [a]) == 0.0
    b = frozenset({"how", "do", "i"})
    assert novelty(b, [a, frozenset({"zzz"})]) == pytest.approx(1 - 3 / 8)


def test_escalation_rules():
    rules = EscalationRules()
    assert escalation_reasons("medium", ["harmful", "harmful"], [], rules) == []
    assert escalation_reasons("critical", ["harmful"], [], rules) == ["severity critical always goes to an adjudicator"]
    assert escalation_reasons("low", ["a", "a", "b"], [], rules) == ["reviewers disagree: a×2, b×1"]
    lenient = EscalationRules(on_disagreement=False, min_majority_share=0.5)
    assert escalation_reasons("low", ["a", "a", "b"], [], lenient) == []
    assert escalation_reasons("low", ["a", "b"], [], lenient) == [
        "low agreement: the most common label has 50% of 2 reviews"]
    assert escalation_reasons("low", ["a", "a"], ["bob"], rules) == [
        "labelled by reviewers below the accuracy threshold on gold items: bob"]
    assert majority(["b", "a"]) == ("a", 0.5)  # ties go to the alphabetically first label


def test_accuracy_and_flagging():
    accuracy = reviewer_accuracy([("ana", "x", "x"), ("ana", "y", "x"), ("ana", "x", "x"), ("bob", "y", "x")])
    assert accuracy == {"ana": {"n": 3, "accuracy": 0.6667}, "bob": {"n": 1, "accuracy": 0.0}}
    assert flagged_reviewers(accuracy, ReviewerAccuracyConfig()) == ["ana"]  # bob has too few gold items yet


def test_krippendorff_alpha_matches_the_textbook_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example: α = 0.743
    rows = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
            "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
            "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
            "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]}
    units = {u: {r: str(v[u]) for r, v in rows.items() if v[u] is not None} for u in range(12)}
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=1e-3)
    assert krippendorff_alpha({1: {"a": "x", "b": "x"}}) is None  # one label throughout: undefined


def test_cohen_kappa_pairs_respect_the_overlap_minimum():
    ratings = {i: {"ana": "x" if i < 2 else "y", "bob": "x" if i < 3 else "y"} for i in range(4)}
    # p_o = 3/4; p_e = 2/4·3/4 + 2/4·1/4 = 1/2; κ = 0.5
    assert cohen_kappa_pairs(ratings, min_overlap=4) == [{"reviewers": ["ana", "bob"], "n": 4, "kappa": 0.5}]
    assert cohen_kappa_pairs(ratings, min_overlap=5) == []


def test_shift_test_and_rereview_sample():
    assert shift_test({"a": 50, "b": 50}, {"a": 50, "b": 50})["p_value"] == pytest.approx(1.0)
    shifted = shift_test({"a": 90, "b": 10}, {"a": 40, "b": 60})
    assert shifted["p_value"] < 1e-6 and shifted["dof"] == 1 and shifted["n_after"] == 100
    assert shift_test({"a": 3}, {}) is None
    sample = rereview_sample(list(range(100)), 0.1, seed=7)
    assert len(sample) == 10 and sample == rereview_sample(list(range(100)), 0.1, seed=7)
    assert sample != rereview_sample(list(range(100)), 0.1, seed=8)
    assert rereview_sample([5], 0.01, seed=0) == [5] and rereview_sample([], 0.5, 0) == []
    assert period_key(dt.datetime(2026, 11, 23)) == "2026-W48"


def test_review_config_loads_like_every_config(tmp_path):
    from immunizer.errors import ImmunizerError
    from immunizer.review.config import load_review_config

    path = tmp_path / "review.yaml"
    path.write_text("triage: {reviewers_by_severity: {low: 2}}\ncalibration: {accuracy_threshold: 0.8}\n")
    config = load_review_config(path)  # `calibration:` is the old name of reviewer_accuracy
    assert config.reviewer_accuracy.accuracy_threshold == 0.8
    assert config.triage.reviewers_by_severity == {"low": 2, "medium": 2, "high": 3, "critical": 3}
    path.write_text("reviewer_accuracy: {accuracy_threshold: high}\n")
    with pytest.raises(ImmunizerError, match="review.yaml: config key 'reviewer_accuracy.accuracy_threshold' expects float"):
        load_review_config(path)
    path.write_text("triage: {queue: 3}\n")
    with pytest.raises(ImmunizerError, match="unknown config key 'triage.queue'; known keys here: .*queue_size"):
        load_review_config(path)
