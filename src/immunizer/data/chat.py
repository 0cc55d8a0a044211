"""Chat-formatted prompts as token ids, cut to a budget without losing the chat template's turn markers."""
from __future__ import annotations

from immunizer.errors import ImmunizerError

PROMPT_FIT = "template-kept"
"""How a prompt longer than its budget is cut (see `fit_prompt_ids`). Recorded wherever answers or training data
depend on it (the teacher cache, evaluations' `prompt_template`, the bench's configuration), so answers from
different cuts never mix. The cut before it kept the last tokens of the formatted prompt, which dropped the
template's opening markers (and the system prompt) from every long prompt: the model saw a headless fragment."""


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def template_length(tokenizer) -> int:
    """The chat template's own tokens around a user request (30 for SmolLM2: its system prompt and turn markers)."""
    return len(chat_prompt_ids(tokenizer, ""))


def _frame(ids: list[int], empty: list[int]) -> tuple[int, int]:
    """How many leading and trailing tokens of `ids` are the template's own: the prefix and suffix it shares
    with the same template around an empty request (found from the tokens, so any chat template works)."""
    head = 0
    while head < min(len(ids), len(empty)) and ids[head] == empty[head]:
        head += 1
    tail = 0
    while tail < min(len(ids), len(empty)) - head and ids[-1 - tail] == empty[-1 - tail]:
        tail += 1
    return head, tail


def fit_prompt_ids(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """The chat-formatted prompt in at most `max_tokens` tokens. A longer one keeps the template's opening (system
    prompt, user turn marker) and closing (end of turn, assistant header) and the end of the request's text: a
    jailbreak wrapper puts the request last, and the model must still see a well-formed conversation."""
    ids = chat_prompt_ids(tokenizer, prompt)
    if len(ids) <= max_tokens:
        return ids
    head, tail = _frame(ids, chat_prompt_ids(tokenizer, ""))
    keep = max_tokens - head - tail
    if keep < 1:
        raise ImmunizerError(f"a prompt budget of {max_tokens} tokens does not hold the chat template's own "
                             f"{head + tail} tokens; raise data.max_prompt_tokens (or max_prompt_tokens) above "
                             f"{head + tail}")
    return ids[:head] + ids[len(ids) - tail - keep:len(ids) - tail] + ids[len(ids) - tail:]
