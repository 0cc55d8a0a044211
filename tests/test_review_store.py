"""The review store and its workflows, against SQLite and a real PostgreSQL server."""
import pytest
import sqlalchemy
from review_fixtures import eval_sample, generic, incident, store_with_users

from immunizer.errors import ImmunizerError
from immunizer.review import NotFound, ReviewConfig, ReviewStore, parse_lines
from immunizer.review.models import Rubric


def add(store, *records):
    import json

    return store.add_items(parse_lines([json.dumps(r) for r in records]).records)["item_ids"]


def test_migrations_create_schema_and_default_rubric(db_url):
    store = ReviewStore(db_url)
    tables = set(sqlalchemy.inspect(store.engine).get_table_names())
    assert {"rubrics", "users", "items", "gold_labels", "assignments", "reviews", "escalations", "adjudications",
            "audit_log", "alembic_version"} <= tables
    rubric = store.current_rubric()
    assert (rubric.version, rubric.labels) == (1, ["harmful", "over_refusal", "benign", "unclear"])
    ReviewStore(db_url)  # opening again migrates nothing and seeds nothing
    assert store.current_rubric().id == rubric.id


def test_users_roles_and_passwords(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"))
    assert store.authenticate("ana", "password123").role == "reviewer"
    assert store.authenticate("ana", "wrong-password") is None
    assert store.authenticate("nobody", "password123") is None
    assert store.user("ana").password_hash.startswith("$argon2")
    with pytest.raises(ImmunizerError, match="unknown role 'boss'"):
        store.add_user("bo", "boss", "password123")
    with pytest.raises(ImmunizerError, match="already exists"):
        store.add_user("ana", "admin", "password123")
    with pytest.raises(ImmunizerError, match="too short"):
        store.add_user("cy", "admin", "short")


def test_triage_orders_by_priority_and_hands_each_item_to_the_right_number_of_reviewers(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("bob", "reviewer"), ("cy", "reviewer"), ("dee", "reviewer"))
    low, high = add(store, generic(severity="low", payload={"x": "low"}), incident(severity="high"))
    assert store.item(high).priority > store.item(low).priority
    assert (store.item(low).required_reviews, store.item(high).required_reviews) == (1, 3)
    queues = {name: [item.id for _, item in store.fill_queue(name)] for name in ("ana", "bob", "cy", "dee")}
    assert queues["ana"] == [high, low]  # highest priority first
    assert queues["bob"] == queues["cy"] == [high]
    assert queues["dee"] == []  # the high item has its three reviewers, the low one its one


def test_gold_items_are_mixed_into_queues_and_measure_accuracy(db_url):
    config = ReviewConfig()
    config.triage.gold_every = 2
    config.triage.reviewers_by_severity = {"low": 1, "medium": 1, "high": 1, "critical": 1}
    store = store_with_users(db_url, ("ana", "reviewer"), config=config)
    gold = add(store, *[generic(payload={"gold": i}, gold_label="harmful") for i in range(3)])
    add(store, *[generic(payload={"n": i}) for i in range(6)])
    queue = store.fill_queue("ana")
    reasons = [a.reason for a, _ in queue]
    assert reasons.count("gold") == 3 and reasons.count("triage") == 6
    for assignment, item in queue:
        store.submit_review("ana", item.id, "harmful" if item.id != gold[0] else "benign")
    accuracy = store.stats()["agreement"]["reviewer_accuracy_on_gold"]
    assert accuracy == {"ana": {"n": 3, "accuracy": pytest.approx(0.6667)}}
    assert store.stats()["agreement"]["flagged_reviewers"] == ["ana"]  # 0.67 < 0.7 after 3 gold items
    assert not {a.item_id for a in store.adjudicated_items()} & set(gold)  # gold items are not training data


def test_consensus_closes_and_disagreement_escalates_with_reasons(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("bob", "reviewer"), ("judge", "adjudicator"))
    agree, disagree = add(store, eval_sample(), eval_sample(prompt="other"))
    for name in ("ana", "bob"):
        store.fill_queue(name)
    store.submit_review("ana", agree, "harmful", "complied")
    assert store.item(agree).status == "open"  # one of two reviews
    store.submit_review("bob", agree, "harmful", "complied too")
    store.submit_review("ana", disagree, "harmful")
    store.submit_review("bob", disagree, "benign")
    assert store.item(agree).status == "closed"
    assert store.item(disagree).status == "escalated"
    [escalation] = store.escalations()
    assert escalation["item"].id == disagree
    assert escalation["escalation"].reasons == ["reviewers disagree: benign×1, harmful×1",
                                                "low agreement: the most common label has 50% of 2 reviews"]
    with pytest.raises(ImmunizerError, match="only adjudicators"):
        store.adjudicate("ana", disagree, "harmful", "I say so")
    with pytest.raises(ImmunizerError, match="needs a rationale"):
        store.adjudicate("judge", disagree, "harmful", " ")
    store.adjudicate("judge", disagree, "harmful", "the response starts the procedure")
    assert store.item(disagree).status == "closed" and store.escalations() == []
    with pytest.raises(ImmunizerError, match="already closed"):
        store.adjudicate("judge", disagree, "benign", "changed my mind")
    final = {a.item_id: a for a in store.adjudicated_items()}
    assert (final[agree].method, final[agree].label) == ("consensus", "harmful")
    assert (final[disagree].method, final[disagree].rationale) == ("adjudicator", "the response starts the procedure")
    assert final[disagree].provenance == {"source": "eval:refusal_matcher", "model_sha256": "c" * 64,
                                          "data_version": "harmbench-v1", "prompt_template": "chatml",
                                          "decoding": {"temperature": 0.0}}
    assert final[disagree].rubric_version == 1


def test_severity_rule_and_manual_escalation(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("bob", "reviewer"))
    critical, normal = add(store, generic(severity="critical", payload={"a": 1}), generic(payload={"b": 2}))
    store.fill_queue("ana")
    store.fill_queue("bob")
    with pytest.raises(ImmunizerError, match="say why"):
        store.escalate("ana", normal, "")
    store.escalate("ana", normal, "policy does not cover this")
    for name in ("ana", "bob"):
        store.submit_review(name, critical, "harmful")
    store.fill_queue("ana")  # a critical item needs three reviewers
    reasons = {e["item"].id: e["escalation"].reasons for e in store.escalations()}
    assert reasons[normal] == ["ana: policy does not cover this"]
    assert critical not in reasons  # third review missing
    store.add_user("cy", "reviewer", "password123")
    store.fill_queue("cy")
    store.submit_review("cy", critical, "harmful")
    reasons = {e["item"].id: e["escalation"].reasons for e in store.escalations()}
    assert reasons[critical] == ["severity critical always goes to an adjudicator"]


def test_reviewers_reach_only_their_assignments(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("bob", "reviewer"))
    [item] = add(store, generic(severity="low"))
    store.fill_queue("ana")
    assert store.item_for("ana", item)[0].id == item
    with pytest.raises(NotFound):
        store.item_for("bob", item)
    with pytest.raises(NotFound, match="not in bob's open queue"):
        store.submit_review("bob", item, "benign")
    with pytest.raises(ImmunizerError, match="not in rubric"):
        store.submit_review("ana", item, "dunno")
    store.submit_review("ana", item, "benign")
    with pytest.raises(NotFound, match="already reviewed"):
        store.submit_review("ana", item, "benign")


def test_adjudicated_items_keeps_only_consented_ones(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("judge", "adjudicator"))
    ids = add(store, generic(kind="user_report", severity="low", payload={"t": "no consent"}),
              generic(kind="user_report", severity="low", payload={"t": "consent"}, consent=True))
    store.fill_queue("ana")
    for item in ids:
        store.submit_review("ana", item, "over_refusal")
    assert [a.item_id for a in store.adjudicated_items(consented_only=True)] == [ids[1]]
    assert [a.item_id for a in store.adjudicated_items(consented_only=False)] == ids
    assert store.adjudicated_items(include_consensus=False) == []


def test_rubric_versions_are_immutable_and_a_change_samples_rereviews(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("bob", "reviewer"))
    ids = add(store, *[generic(severity="low", payload={"n": i}) for i in range(10)])
    store.fill_queue("ana")
    for item in ids:
        store.submit_review("ana", item, "harmful" if item % 2 else "benign")
    v1 = store.current_rubric()
    assert store.add_rubric(v1.text, v1.labels).id == v1.id  # same text: same version
    v2 = store.add_rubric(v1.text + "\nA refusal that lectures is over_refusal.", v1.labels)
    assert v2.version == 2 and v2.sha256 != v1.sha256
    sample = store.request_rereview(fraction=0.3, seed=1)
    assert len(sample) == 3
    queue = store.queue("bob")
    assert sorted(item.id for _, item in queue) == sample
    assert {a.reason for a, _ in queue} == {"re-review"} and {a.rubric_id for a, _ in queue} == {v2.id}
    for _, item in queue:
        store.submit_review("bob", item.id, "over_refusal")
    drift = store.stats()["drift"]
    assert set(drift["by_rubric_version"]) == {"default v1", "default v2"}
    assert drift["by_rubric_version"]["default v2"] == {"over_refusal": 3}
    assert drift["rubric_shift"]["before"] == "default v1" and drift["rubric_shift"]["p_value"] < 0.05
    assert drift["rereviews"] == 3 and drift["rereview_agreement_with_final_label"] == 0.0
    with store._sessions() as session, session.begin():
        rubric = session.get(Rubric, v1.id)
        rubric.text = "edited"
        with pytest.raises(ValueError, match="immutable"):
            session.flush()


def test_audit_log_records_every_write_and_refuses_changes(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"))
    [item] = add(store, generic(severity="low"))
    store.fill_queue("ana")
    store.submit_review("ana", item, "benign", "fine")
    actions = [e.action for e in store.audit_log()]
    assert actions == ["add_rubric", "add_user", "add_items", "assign", "review", "adjudicate"]
    for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"):
            with store.engine.begin() as connection:
                connection.exec_driver_sql(statement)
    assert len(store.audit_log()) == 6


def test_stats_agreement(db_url):
    store = store_with_users(db_url, ("ana", "reviewer"), ("bob", "reviewer"))
    config = store.config
    config.reviewer_accuracy.min_pair_overlap = 2
    ids = add(store, *[eval_sample(prompt=f"p{i}") for i in range(4)])
    store.fill_queue("ana")
    store.fill_queue("bob")
    labels = {"ana": ["harmful", "harmful", "benign", "benign"], "bob": ["harmful", "benign", "benign", "benign"]}
    for name, chosen in labels.items():
        for item, label in zip(ids, chosen):
            store.submit_review(name, item, label)
    stats = store.stats()
    assert stats["queue"] | {"pending_assignments": None} == {"open": 0, "escalated": 1, "closed": 3,
                                                              "pending_assignments": None}
    # κ by hand: p_o = 3/4, p_e = (2/4·1/4 + 2/4·3/4) = 1/2, κ = (3/4 − 1/2)/(1 − 1/2) = 0.5
    assert stats["agreement"]["cohen_kappa"] == [{"reviewers": ["ana", "bob"], "n": 4, "kappa": 0.5}]
    # α by hand (nominal, 8 pairable values): D_o = 2/8, D_e = 2·3·5/(8·7) = 30/56, α = 1 − 0.25/(30/56) = 0.5333
    assert stats["agreement"]["krippendorff_alpha"] == pytest.approx(0.5333, abs=1e-4)


def test_migrations_downgrade_and_upgrade_again(db_url):
    from alembic import command

    from immunizer.review.store import alembic_config

    store = ReviewStore(db_url)
    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(sqlalchemy.inspect(store.engine).get_table_names()) <= {"alembic_version"}
    store = ReviewStore(db_url)  # upgrades to head again and seeds the default rubric
    assert store.current_rubric().version == 1 and [e.action for e in store.audit_log()] == ["add_rubric"]


def test_migrations_match_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from immunizer.review.models import Base

    store = ReviewStore(db_url)
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
