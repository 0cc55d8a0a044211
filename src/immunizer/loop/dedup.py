"""Exact and near-duplicate detection for prompts: the same request reported ten times must not weigh
ten times in the next training set, and a rephrasing with a changed word is still the same request.

Exact: Unicode-normalized, case-folded text with punctuation and runs of white space folded. Near:
cosine similarity of character 3–5-gram frequency vectors within word boundaries (scikit-learn), which
tolerates small edits, typos and a changed word while keeping apart requests that share a frame
("how do I make a pipe bomb" / "… pipe bong": 0.79). Term frequency only, no IDF: whether two prompts
are duplicates must not depend on what else happens to be in the store (on a few dozen prompts, IDF
weights swing with every new item)."""
from __future__ import annotations

import re
import unicodedata

import numpy as np

CHUNK_ROWS = 512  # similarity rows computed at a time: memory stays O(chunk · n), not O(n²)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


def duplicate_of(texts: list[str], threshold: float = 0.85) -> list[int]:
    """For each text, the index of the earliest kept text it duplicates, or its own index if it is kept.

    Earlier texts win, so the oldest report of a request carries the provenance of the later ones."""
    representative = list(range(len(texts)))
    first_seen: dict[str, int] = {}
    unique: list[int] = []
    for i, text in enumerate(texts):
        key = normalize(text)
        if key in first_seen:
            representative[i] = first_seen[key]
        else:
            first_seen[key] = i
            unique.append(i)
    if threshold >= 1.0 or len(unique) < 2:
        return representative

    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), use_idf=False).fit_transform(
        [normalize(texts[i]) for i in unique])
    kept = np.zeros(len(unique), dtype=bool)
    for start in range(0, len(unique), CHUNK_ROWS):
        similarity = (vectors[start:start + CHUNK_ROWS] @ vectors.T).toarray()  # rows are L2-normalized: cosine
        for row, position in enumerate(range(start, min(start + CHUNK_ROWS, len(unique)))):
            earlier = np.flatnonzero((similarity[row, :position] >= threshold) & kept[:position])
            if earlier.size:
                representative[unique[position]] = unique[earlier[0]]
            else:
                kept[position] = True
    # an exact repeat of a near-duplicate points at the kept text, not at the dropped one
    return [representative[r] for r in representative]
