"""Verifiable benign tasks, generated (no download): answers are exact, so accuracy is exact match.

`arithmetic`: two- and three-digit addition, subtraction and multiplication.
`listops`: small list manipulations (sort, reverse, max, count) over numbers and words."""
from __future__ import annotations

import random

_WORDS = ("apple", "river", "cloud", "stone", "maple", "tiger", "lemon", "piano", "orbit", "candle", "violet",
          "harbor", "pencil", "meadow", "rocket", "silver", "garden", "window", "forest", "marble")


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"arithmetic|{seed}")
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(10, 999), rng.randint(10, 999)) if op != "*" else (rng.randint(2, 99), rng.randint(2, 99))
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"prompt": f"What is {a} {op} {b}? Reply with the number only.", "response": str(answer),
                     "answer": str(answer)})
    return rows


def listops(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"listops|{seed}")
    rows = []
    for _ in range(n):
        kind = rng.choice(("sort", "reverse", "max", "count"))
        if kind in ("sort", "max"):
            items = [str(rng.randint(1, 99)) for _ in range(rng.randint(3, 6))]
            answer = " ".join(sorted(items, key=int)) if kind == "sort" else max(items, key=int)
            prompt = (f"Sort these numbers from smallest to largest: {' '.join(items)}" if kind == "sort"
                      else f"Which is the largest of these numbers: {' '.join(items)}?")
        elif kind == "reverse":
            items = rng.sample(_WORDS, rng.randint(3, 5))
            answer, prompt = " ".join(reversed(items)), f"Reverse the order of these words: {' '.join(items)}"
        else:
            items = [rng.choice(_WORDS[:5]) for _ in range(rng.randint(4, 8))]
            word = rng.choice(items)
            answer, prompt = str(items.count(word)), f"How many times does '{word}' appear in: {' '.join(items)}?"
        rows.append({"prompt": prompt + " Reply with the answer only.", "response": answer, "answer": answer})
    return rows


GENERATED = {"arithmetic": arithmetic, "listops": listops}
