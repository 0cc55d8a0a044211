"""Importing items: the three record formats, strict validation with line numbers, all or nothing."""
import json

import pytest
from review_fixtures import eval_sample, generic, incident

from immunizer.errors import ImmunizerError
from immunizer.review import ReviewStore, parse_file, parse_lines, parse_records


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_breaker_incident_imports_without_conversion():
    [record] = parse_lines([json.dumps(incident(severity="medium"))]).records
    assert (record.kind, record.severity, record.source, record.consent) == ("breaker_incident", "medium",
                                                                             "breaker:serve", True)
    assert record.model_sha256 == "a" * 64 and record.payload == incident(severity="medium")
    assert record.judge_confidence == 1.0  # statistic 7.5 is far above the threshold 3.0
    [near] = parse_lines([json.dumps(incident(statistic=3.3))]).records
    assert near.judge_confidence == pytest.approx(0.1)  # |3.3 − 3| / 3: a borderline trip


def test_only_failed_eval_samples_become_items():
    parsed = parse_lines([json.dumps(eval_sample()), json.dumps(eval_sample(passed=True)),
                          json.dumps(eval_sample(passed=True, score=None))])
    assert parsed.skipped_passed_eval_samples == 2
    [record] = parsed.records
    assert (record.data_version, record.prompt_template, record.decoding) == ("harmbench-v1", "chatml",
                                                                              {"temperature": 0.0})
    assert record.judge_confidence == 0.8 and record.consent is True


def test_consent_defaults():
    kinds = ["redteam_finding", "guard_flag", "user_report"]
    records = parse_lines([json.dumps(generic(kind=k)) for k in kinds]
                          + [json.dumps(generic(kind="user_report", consent=True))]).records
    assert [r.consent for r in records] == [True, False, False, True]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    ("[1, 2]", "line 1: expected a JSON object"),
    (json.dumps({"payload": {}}), "line 1: missing field 'kind'"),
    (json.dumps(incident(severity="urgent")), "line 1: severity must be one of low, medium, high, critical"),
    (json.dumps(incident(tripped="yes")), "line 1: field 'tripped' must be true or false"),
    (json.dumps({k: v for k, v in incident().items() if k != "model_sha256"}), "missing field 'model_sha256'"),
    (json.dumps(eval_sample(passed=None)), "field 'passed' must be true or false"),
    (json.dumps(generic(payload={})), "payload is empty"),
    (json.dumps(generic(provenance={"model_sha256": "x"})), "missing field 'source'"),
    (json.dumps(generic(provenance={"source": "s", "who": 1})), "unknown provenance field(s) who"),
    (json.dumps(generic(colour="red")), "unknown field(s) colour"),
    (json.dumps(generic(kind="Bad Kind")), "kind must be lower_snake_case"),
    (json.dumps(generic(consent="yes")), "field 'consent' must be true or false"),
    (json.dumps(generic(judge_confidence=1.5)), "judge_confidence must be a number in [0, 1]"),
])
def test_malformed_lines_are_rejected_with_their_line_number(line, message):
    with pytest.raises(ImmunizerError) as info:
        parse_lines([line])
    assert message in str(info.value) and "nothing was imported" in str(info.value)


def test_every_bad_line_is_listed_and_nothing_partial_is_written(tmp_path, db_url):
    path = write_jsonl(tmp_path / "items.jsonl", [incident(), "", "{oops", eval_sample(), generic(severity="x")])
    store = ReviewStore(db_url)
    with pytest.raises(ImmunizerError) as info:
        store.add_items(parse_file(path).records)
    message = str(info.value)
    assert "2 malformed line(s)" in message and "line 3: not valid JSON" in message and "line 5: severity" in message
    assert store.stats()["queue"]["open"] == 0
    # a store-level failure in the middle of a batch (a gold label outside the rubric) rolls back too
    path = write_jsonl(tmp_path / "gold.jsonl", [incident(), generic(gold_label="nonsense")])
    with pytest.raises(ImmunizerError, match="gold label 'nonsense' is not in rubric"):
        store.add_items(parse_file(path).records)
    assert store.stats()["queue"]["open"] == 0 and [e.action for e in store.audit_log()] == ["add_rubric"]


def test_reimport_skips_duplicates_and_novelty_falls(tmp_path, db_url):
    store = ReviewStore(db_url)
    first = store.add_items(parse_lines([json.dumps(eval_sample())]).records)
    again = store.add_items(parse_lines([json.dumps(eval_sample()),
                                         json.dumps(eval_sample(response="Sure, first insert a tension wrench."
                                                                " Then rake the pins"))]).records)
    assert (first["added"], again["added"], again["duplicates_skipped"]) == (1, 1, 1)
    novel, similar = (store.item(first["item_ids"][0]), store.item(again["item_ids"][0]))
    assert novel.novelty == 1.0 and 0 < similar.novelty < 0.5 and similar.priority < novel.priority


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(ImmunizerError, match="does not exist"):
        parse_file(tmp_path / "nope.jsonl")


def test_the_readme_examples_import(tmp_path):
    from pathlib import Path

    examples = Path(__file__).parent.parent / "examples" / "review"
    store = ReviewStore(str(tmp_path / "review.db"))
    added = {name: store.add_items(parse_file(examples / name).records)["added"]
             for name in ("incidents.jsonl", "eval_samples.jsonl", "findings.jsonl")}
    assert added == {"incidents.jsonl": 3, "eval_samples.jsonl": 2, "findings.jsonl": 5}


def test_records_from_python_are_validated_the_same_way():
    parsed = parse_records([incident(), eval_sample(passed=True)])
    assert [r.kind for r in parsed.records] == ["breaker_incident"] and parsed.skipped_passed_eval_samples == 1
    with pytest.raises(ImmunizerError, match=r"(?s)1 malformed record\(s\).*record 2: severity must be one of"):
        parse_records([incident(), incident(severity=None)])


def test_a_file_that_is_not_utf8_names_the_fix(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(eval_sample()).encode() + b"\n" + '{"kind": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ImmunizerError, match=r"is not UTF-8 text \(line 2, .*save it as UTF-8"):
        parse_file(path)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_before_the_database_sees_them(db_url, constant):
    line = json.dumps(eval_sample()).replace('"score": 0.8', f'"score": {constant}')
    with pytest.raises(ImmunizerError, match=r"line 1: score is .*not valid JSON; write null or a number"):
        ReviewStore(db_url).add_items(parse_lines([line]).records)
    with pytest.raises(ImmunizerError, match=r"payload.x\[0\] is nan"):
        parse_records([generic(payload={"x": [float("nan")]})])
