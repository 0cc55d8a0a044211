"""Human review: a store of items (breaker incidents, failed evals, red-team findings, guard
flags, user reports) with triage, escalation, calibration, rubric drift and adjudication, and a
reviewer web page (`immunizer review serve`)."""
from immunizer.review.config import ReviewConfig, load_review_config
from immunizer.review.importer import ItemRecord, parse_file, parse_lines
from immunizer.review.store import AdjudicatedItem, Forbidden, NotFound, ReviewStore

__all__ = ["AdjudicatedItem", "Forbidden", "ItemRecord", "NotFound", "ReviewConfig", "ReviewStore",
           "load_review_config", "parse_file", "parse_lines"]
