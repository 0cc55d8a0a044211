"""Many writers at once (SQLite and PostgreSQL): 8 processes submit 2,000 reviews, none lost,
none duplicated, every item's round closed exactly once; a queue filler that read an item before
another took its last slot does not take it again (a barrier makes the race happen every time); two
tabs inserting the same gold assignment both get their queue."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg

import pytest
import sqlalchemy
from review_fixtures import generic, store_with_users

from immunizer.review import ReviewConfig, ReviewStore, parse_lines
from immunizer.review.throughput import prepare, run_writers

pytestmark = pytest.mark.slow


def test_eight_writers_2000_reviews(db_url):
    tasks = prepare(db_url, n_reviews=2000)
    result = run_writers(db_url, tasks, n_writers=8)
    assert result["errors"] == [] and result["exit_codes"] == [0] * 8
    store = ReviewStore(db_url)
    with store.engine.connect() as connection:
        def scalar(sql):
            return connection.exec_driver_sql(sql).scalar()

        assert scalar("SELECT COUNT(*) FROM reviews") == 2000
        assert scalar("SELECT COUNT(*) FROM (SELECT DISTINCT item_id, user_id FROM reviews) AS pairs") == 2000
        assert scalar("SELECT COUNT(*) FROM assignments WHERE completed_at IS NULL") == 0
        # every item was decided exactly once: consensus or escalation, never both, never twice
        assert scalar("SELECT COUNT(*) FROM items WHERE status = 'open'") == 0
        assert scalar("SELECT COUNT(*) FROM adjudications") + scalar("SELECT COUNT(*) FROM escalations") == 1000
        assert scalar("SELECT COUNT(*) FROM escalations") == 200  # every fifth item was a disagreement
        assert scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'review'") == 2000
    assert store.stats()["agreement"]["reviews"] == 2000
    print(f"{'postgresql' if db_url.startswith('postgresql') else 'sqlite'}: {result['reviews_per_second']} reviews/s")


def test_duplicate_review_is_refused_by_the_database(db_url):
    store = ReviewStore(db_url)
    tasks = prepare(db_url, n_reviews=2, n_reviewers=2)
    store.submit_review(*tasks[0][:2], "harmful")
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with store.engine.begin() as connection:  # bypassing the API: the unique constraint still holds
            connection.exec_driver_sql("INSERT INTO reviews (item_id, user_id, rubric_id, label, rationale, created_at) "
                                       "SELECT item_id, user_id, rubric_id, label, rationale, created_at FROM reviews")


def wait_for_lock_wait(store, locktype: str) -> None:
    """Poll until some connection waits for a lock of this type (deterministic, no sleeps to tune)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with store.engine.connect() as connection:
            if connection.exec_driver_sql(f"SELECT COUNT(*) FROM pg_locks WHERE locktype = '{locktype}' "
                                          "AND NOT granted").scalar():
                return
        time.sleep(0.05)
    raise AssertionError(f"nobody waited for a {locktype} lock within 60 s")


def test_a_queue_fill_that_read_before_another_committed_never_takes_the_last_slot(pg_cluster):
    """The race: filler A's statement reads an item with one free slot, filler B takes that slot and
    commits, then A locks the row (no longer held) and, on the count it read, takes the slot again.
    A barrier holds A inside its statement at that item: a row-level security policy that waits for
    an advisory lock, applied to A's database role only."""
    url = pg_cluster.create_database()
    store = store_with_users(url, ("r0", "reviewer"), ("r1", "reviewer"), ("r2", "reviewer"))
    [item] = store.add_items(parse_lines([json.dumps(generic())]).records)["item_ids"]  # medium: two reviews
    store.fill_queue("r0")
    role = "slow_" + url.rsplit("/", 1)[1]
    with store.engine.begin() as connection:
        for sql in (f"CREATE ROLE {role} LOGIN", f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
                    f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
                    f"""CREATE FUNCTION wait_at(item_id int) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN
                        IF item_id = {item} AND current_user = '{role}' THEN
                          PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242);
                        END IF; RETURN true; END $$""",
                    "ALTER TABLE items ENABLE ROW LEVEL SECURITY",  # the owner (postgres) is not subject to it
                    "CREATE POLICY barrier ON items USING (wait_at(id)) WITH CHECK (true)"):
            connection.exec_driver_sql(sql)
    slow = ReviewStore(url.replace("postgres@", f"{role}@"), migrate=False)
    with psycopg.connect(url, autocommit=True) as barrier:
        barrier.execute("SELECT pg_advisory_lock(4242)")
        with ThreadPoolExecutor(1) as pool:
            filling = pool.submit(slow.fill_queue, "r2")
            wait_for_lock_wait(store, "advisory")  # r2's filler has read the item and waits at it
            assert [i.id for _, i in store.fill_queue("r1")] == [item]  # r1 takes the last slot, commits
            barrier.execute("SELECT pg_advisory_unlock(4242)")
            r2_queue = filling.result(timeout=60)
    assert r2_queue == []
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql(f"SELECT COUNT(*) FROM assignments WHERE item_id = {item}").scalar() == 2


def test_two_tabs_adding_the_same_gold_assignment_both_get_the_queue(pg_cluster):
    """Two tabs of one reviewer fill the queue at once and both pick the same gold item: the second
    insert hits the unique constraint. It must get the queue, not an error page."""
    url = pg_cluster.create_database()
    config = ReviewConfig()
    config.triage.gold_every, config.triage.queue_size = 1, 2
    store = store_with_users(url, ("ana", "reviewer"), config=config)
    lines = [json.dumps(generic()), json.dumps(generic(payload={"prompt": "gold"}, gold_label="harmful"))]
    triage_item, gold = store.add_items(parse_lines(lines).records)["item_ids"]
    with psycopg.connect(url) as other_tab:  # the first tab's transaction, not yet committed
        other_tab.execute("INSERT INTO assignments (item_id, user_id, rubric_id, reason, created_at) SELECT %s, "
                          "users.id, rubrics.id, 'gold', now() FROM users, rubrics WHERE users.name = 'ana'",
                          (gold,))
        with ThreadPoolExecutor(1) as pool:
            filling = pool.submit(store.fill_queue, "ana")
            wait_for_lock_wait(store, "transactionid")  # the second tab waits on the unique index
            other_tab.commit()
            queue = filling.result(timeout=60)
    assert sorted(i.id for _, i in queue) == [triage_item, gold]


def test_concurrent_queue_fills_never_over_assign(db_url):
    names = [f"r{i}" for i in range(8)]
    store = store_with_users(db_url, *[(name, "reviewer") for name in names])
    store.add_items(parse_lines([json.dumps(generic(payload={"n": i})) for i in range(30)]).records)  # 2 reviews each
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(store.fill_queue, names))
    for name in names:
        store.fill_queue(name)
    with store.engine.connect() as connection:
        assert sorted(n for _, n in connection.exec_driver_sql(
            "SELECT item_id, COUNT(*) FROM assignments GROUP BY item_id").all()) == [2] * 30
