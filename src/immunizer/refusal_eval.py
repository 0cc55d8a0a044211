"""Moved to redteam/refusal_eval.py. This name stays importable for `immunizer compare` (cli.py) and for
judge specs written `immunizer.refusal_eval:is_refusal`."""
from immunizer.redteam.refusal_eval import REFUSAL_PHRASES, RefusalRates, is_refusal, refusal_rates

__all__ = ["REFUSAL_PHRASES", "RefusalRates", "is_refusal", "refusal_rates"]
