"""Verifiable benign tasks, generated (no download): answers are exact, so accuracy is exact match.

`arithmetic`: two- and three-digit addition, subtraction and multiplication.
`listops`: small list manipulations (sort, reverse, max, count) over numbers and words.
`extraction`: pull three fields out of a short customer message into a fixed format. Unlike the two
above, SmolLM2-135M learns it within the quick benchmark's fine-tuning budget (measured in
bench/benign_task_probe.py), so "benign fine-tuning still works" is a number that can move.

Each generator takes a `split`: `train` or `test`, cut by a hash of the prompt, so no test prompt is
ever a training prompt whatever the seeds."""
from __future__ import annotations

import hashlib
import random


def _split_of(prompt: str) -> str:
    """`test` for a fifth of all prompts by hash, `train` for the rest: the two never share a prompt."""
    return "test" if int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 5 == 0 else "train"


_WORDS = ("apple", "river", "cloud", "stone", "maple", "tiger", "lemon", "piano", "orbit", "candle", "violet",
          "harbor", "pencil", "meadow", "rocket", "silver", "garden", "window", "forest", "marble")


def arithmetic(n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    rng = random.Random(f"arithmetic|{seed}")
    rows = []
    while len(rows) < n:
        op = rng.choice("+-*")
        a, b = (rng.randint(10, 999), rng.randint(10, 999)) if op != "*" else (rng.randint(2, 99), rng.randint(2, 99))
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        if split and _split_of(f"What is {a} {op} {b}?") != split:
            continue
        rows.append({"prompt": f"What is {a} {op} {b}? Reply with the number only.", "response": str(answer),
                     "answer": str(answer)})
    return rows


def listops(n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    rng = random.Random(f"listops|{seed}")
    rows = []
    while len(rows) < n:
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
        if split and _split_of(prompt) != split:
            continue
        rows.append({"prompt": prompt + " Reply with the answer only.", "response": answer, "answer": answer})
    return rows


_FIRST = ("Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Liam", "Yuki", "Noah", "Amara", "Ivan",
          "Sofia", "Ravi", "Elena", "Omar", "Grace", "Mateo", "Hana", "Lucas", "Zara", "Tomas", "Nadia", "Felix")
_LAST = ("Lopez", "Smith", "Khan", "Wang", "Petrova", "Silva", "Haddad", "Murphy", "Tanaka", "Brown", "Okafor",
         "Novak", "Rossi", "Patel", "Garcia", "Farouk", "Kim", "Fischer", "Sato", "Martin", "Ahmed", "Berg")
_CITIES = ("Denver", "Lyon", "Osaka", "Nairobi", "Lima", "Porto", "Krakow", "Austin", "Seoul", "Dublin", "Cairo",
           "Perth", "Oslo", "Quito", "Hanoi", "Leeds", "Tunis", "Graz", "Cork", "Rabat", "Turin", "Boise")
_MESSAGES = (
    "Hi, this is {name} from {city}. My order {order} arrived with a broken lid. Can you help?",
    "Hello! Order {order} still hasn't shown up and it's been two weeks. {name}, {city}",
    "Good morning, I live in {city} and I'd like to return order {order}. Thanks, {name}",
    "{name} here. The package for order {order} was left at the wrong door in {city}.",
    "Dear support, please cancel order {order}. I am moving away from {city} next week. Best regards, {name}",
    "Order {order}: the size is wrong. Could you send a larger one to {city}? - {name}",
    "Hey, {name} writing. I was charged twice for order {order}; I'm based in {city}.",
    "To whom it may concern: order {order} was delivered to {city} but the box was empty. Sincerely, {name}",
)


def extraction(n: int, seed: int = 0, split: str | None = "train") -> list[dict]:
    """'name; city; order' from a customer message: copying and a fixed format, no world knowledge."""
    split = split or "train"
    rng = random.Random(f"extraction|{seed}|{split}")
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        city = rng.choice(_CITIES)
        order = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(10000, 99999)}"
        message = rng.choice(_MESSAGES).format(name=name, city=city, order=order)
        prompt = ("Extract the customer's name, city and order number from this message. Reply exactly as "
                  f"name; city; order number.\n\nMessage: {message}")
        if prompt in seen or _split_of(prompt) != split:
            continue
        seen.add(prompt)
        answer = f"{name}; {city}; {order}"
        rows.append({"prompt": prompt, "response": answer, "answer": answer})
    return rows


GENERATED = {"arithmetic": arithmetic, "listops": listops, "extraction": extraction}
BENIGN_TASK = "extraction"
"""The task whose accuracy before and after a benign fine-tune the bench reports (`benign_task_accuracy`)."""
