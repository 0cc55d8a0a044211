"""Tokenize (prompt, response) pairs with the chat template and collate them into padded batches.
Labels are -100 on prompt and padding tokens, so every loss sees response tokens only."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from immunizer.data.chat import fit_prompt_ids
from immunizer.losses import IGNORE


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def encode_pair(tokenizer, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int):
    # a long (jailbreak-wrapped) prompt keeps the template's markers and its text's end, where the request is
    prompt_ids = fit_prompt_ids(tokenizer, prompt, max_prompt_tokens)
    response_ids = (tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_response_tokens]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return Batch(input_ids, attention, labels)


def pair_batch(tokenizer, prompts, responses, max_prompt_tokens: int, max_response_tokens: int) -> Batch:
    return collate([encode_pair(tokenizer, p, r, max_prompt_tokens, max_response_tokens)
                    for p, r in zip(prompts, responses)], tokenizer.pad_token_id)
