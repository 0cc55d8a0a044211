"""Concurrent review writers: N processes submitting reviews to one store at once.

Used by the concurrency test (no review lost or duplicated) and by bench/review_throughput.py
(reviews per second). Each item needs two reviews and its two reviews go to different writer
processes at about the same moment, so the last review of a round always races another.
"""
from __future__ import annotations

import multiprocessing
import time

from immunizer.review.config import ReviewConfig
from immunizer.review.importer import ItemRecord
from immunizer.review.store import ReviewStore

LABELS = ("harmful", "benign")


def prepare(url: str, n_reviews: int = 2000, n_reviewers: int = 16) -> list[tuple[str, int, str]]:
    """Users, items (two reviews each) and assignments; returns the (reviewer, item id, label) tasks
    in submission order: both reviews of an item next to each other."""
    store = ReviewStore(url, ReviewConfig())
    reviewers = [f"writer{i:02d}" for i in range(n_reviewers)]
    for name in reviewers:
        store.add_user(name, "reviewer", password="throughput-test")
    records = [ItemRecord(kind="redteam_finding", payload={"prompt": f"finding {i}"}, severity="medium",
                          source="throughput", consent=True) for i in range(n_reviews // 2)]
    item_ids = store.add_items(records)["item_ids"]
    tasks = []
    for k, item_id in enumerate(item_ids):
        pair = (reviewers[(2 * k) % n_reviewers], reviewers[(2 * k + 1) % n_reviewers])
        # every fifth item gets a disagreement, so escalations are exercised too
        labels = (LABELS[0], LABELS[1]) if k % 5 == 0 else (LABELS[k % 2], LABELS[k % 2])
        tasks += [(pair[0], item_id, labels[0]), (pair[1], item_id, labels[1])]
    store.assign_many([(name, item_id) for name, item_id, _ in tasks])
    store.close()
    return tasks


def _writer(url: str, tasks: list, barrier, errors) -> None:
    store = ReviewStore(url, migrate=False)
    store.current_rubric()  # connect before the clock starts
    barrier.wait()
    for name, item_id, label in tasks:
        try:
            store.submit_review(name, item_id, label, rationale="throughput")
        except Exception as exc:  # reported to the parent, which fails the run
            errors.put(f"{name} item {item_id}: {exc.__class__.__name__}: {exc}")
    store.close()


def run_writers(url: str, tasks: list, n_writers: int = 8) -> dict:
    """Submit `tasks` from `n_writers` processes (task k goes to writer k mod n); time from the
    moment all writers are connected to the last one finishing."""
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(n_writers + 1), context.Queue()
    processes = [context.Process(target=_writer, args=(url, tasks[w::n_writers], barrier, errors))
                 for w in range(n_writers)]
    for process in processes:
        process.start()
    barrier.wait(timeout=300)
    start = time.perf_counter()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - start
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    return {"writers": n_writers, "reviews": len(tasks), "seconds": round(seconds, 3),
            "reviews_per_second": round(len(tasks) / seconds, 1), "errors": failures,
            "exit_codes": [p.exitcode for p in processes]}
