"""Review store write throughput: 8 writer processes submitting 2,000 reviews, SQLite and PostgreSQL.

    python bench/review_throughput.py [--reviews 2000] [--writers 8] [--repeats 3] [--backends sqlite,postgresql]

Each repeat uses a fresh database: a SQLite file (WAL, synchronous=FULL, the defaults the store
sets) in a temporary folder, or a database in a throwaway PostgreSQL 15 cluster on loopback
(default settings, fsync on). Every item needs two reviews and its two reviews are submitted by
different processes at about the same moment, so each review is a full workflow step: lock the
item, insert the review, close the assignment, append to the audit log, and for every second
review decide consensus or escalation. The clock runs from the moment all writers are connected
to the last one finishing. Writes bench/results/review_throughput.json; prints medians.
"""
import argparse
import contextlib
import json
import platform
import statistics
import tempfile
from pathlib import Path

from immunizer.review.throughput import prepare, run_writers
from immunizer.review.throwaway_pg import throwaway_postgres

HERE = Path(__file__).parent


def measure(new_database, args) -> list[dict]:
    runs = []
    for _ in range(args.repeats):
        url = new_database()
        result = run_writers(url, prepare(url, n_reviews=args.reviews), n_writers=args.writers)
        if result["errors"]:
            raise SystemExit(f"writers failed: {result['errors'][:3]}")
        runs.append(result)
        print(f"  {result['reviews']} reviews in {result['seconds']} s = {result['reviews_per_second']} reviews/s")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    results = {"reviews": args.reviews, "writers": args.writers, "repeats": args.repeats,
               "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", "backends": {}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for backend in args.backends.split(","):
            print(backend)
            if backend == "sqlite":
                counter = iter(range(10**6))
                runs = measure(lambda: str(Path(tmp) / f"review{next(counter)}.db"), args)
            else:
                cluster = stack.enter_context(throwaway_postgres(fsync=True))
                runs = measure(cluster.create_database, args)
            rates = [r["reviews_per_second"] for r in runs]
            results["backends"][backend] = {"median_reviews_per_second": statistics.median(rates),
                                            "reviews_per_second": rates,
                                            "seconds": [r["seconds"] for r in runs]}
            print(f"{backend}: median {statistics.median(rates)} reviews/s over {len(runs)} runs")
    out = HERE / "results" / "review_throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
