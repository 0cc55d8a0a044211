"""Human review: a store of items (breaker incidents, failed evals, red-team findings, guard
flags, user reports) with triage, escalation, reviewer accuracy, label shift (rubric drift) and
adjudication, and a reviewer web page (`immunizer review serve`).

Names are imported on first use, so `immunizer --help` does not pay for SQLAlchemy and friends."""
import importlib

_EXPORTS = {
    "ReviewConfig": "config", "load_review_config": "config",
    "ItemRecord": "importer", "parse_file": "importer", "parse_lines": "importer", "parse_records": "importer",
    "AdjudicatedItem": "store", "Forbidden": "store", "NotFound": "store", "ReviewStore": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'immunizer.review' has no attribute {name!r}")
    return getattr(importlib.import_module(f"immunizer.review.{_EXPORTS[name]}"), name)
