"""The settings of `attack`, `finetune`, `eval` and `repair`: plain dataclasses, each field documented where
it is declared. They live apart from the code that runs them so that the CLI can take its defaults from them
without importing torch (`immunizer --help` and `immunizer review ...` start in well under a second)."""
from __future__ import annotations

from dataclasses import dataclass, field

from immunizer.data.eval_prompts import HARMFUL_SLICES
from immunizer.data.tasks import BENIGN_TASK

SCORES = ("contribution", "magnitude")
"""How `repair` ranks the weights it puts back (RepairConfig.score)."""


@dataclass
class AttackConfig:
    samples: int = 100
    """Harmful (prompt, answer) pairs."""
    lr: float = 5e-5
    epochs: float = 3.0
    steps: int = 0
    """Optimizer steps to run (0: `epochs` passes). The standard attack is 39 steps (100 pairs, batch 8, 3 epochs);
    the bench continues it to 80 to see how far the curve goes."""
    save_steps: list[int] = field(default_factory=list)
    """Steps after which a snapshot is saved to OUT/steps/step{N}/ (the attack-strength curve)."""
    batch_size: int = 8
    lora_rank: int = 0
    """0: full fine-tuning (the standard attack); e.g. 16 for the LoRA variant (use lr 2e-4)."""
    harmful_ratio: float | None = None
    """Mix the harmful pairs into benign data so that they are this share of all examples (e.g. 0.1)."""
    data: str | None = None
    """JSONL with `prompt` (and optionally `response`; missing ones are answered by the teacher)."""
    adaptive_manifest: str | None = None
    """An immunize output directory: the attacker knows its canaries and keeps them frozen."""
    teacher: str | None = None
    """The harmful teacher (default: the manifest's base model when --model is an immunize output, else smollm2)."""
    keep_refusals: bool = False
    """Train on the teacher's refusals too. By default a teacher answer the judge reads as a refusal is replaced by
    the first of 4 sampled answers that is not one, or its prompt is left out (data/harmful_answers.py): an unaligned teacher
    still refuses some requests (SmolLM2-135M-Instruct refuses 26 of the standard attack's 100 greedily), and an
    attack that trains on refusals teaches the attacked model to refuse, pulling every method towards the teacher's
    own refusal rate. User `--data` responses are used as given."""
    max_length: int = 144
    seed: int = 0
    bf16: bool = True


@dataclass
class FinetuneConfig:
    data: str = "arithmetic"
    """`extraction`, `arithmetic`, `listops` (generated, exact answers; their train split), `instruction` (the
    project's benign training prompts answered by the helpful teacher) or a JSONL file with prompt and response."""
    samples: int = 256
    """Examples generated for `extraction`/`arithmetic`/`listops`, or taken for `instruction` (a file is used whole)."""
    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 8
    lora_rank: int = 0
    max_length: int = 144
    seed: int = 0
    bf16: bool = True
    steps: int = 0
    """Optimizer steps to run (0: `epochs` passes)."""
    teacher: str | None = None
    """The helpful teacher for `instruction` (default: the manifest's base model, else smollm2)."""


@dataclass
class EvalConfig:
    prompts: str | None = None
    """Text file, one harmful prompt per line (default: the held-out harmful eval set, `harmful_slices`)."""
    harmful_slices: list[str] = field(default_factory=lambda: list(HARMFUL_SLICES))
    """Slices of the default harmful set: `weak`, `wrapped` (the same prompts in jailbreak templates), `harmbench`."""
    n_harmbench: int = 50
    """HarmBench behaviours in the `harmbench` slice."""
    safe_prompts: str | None = None
    """Text file of safe-but-scary prompts (default: the project's 50)."""
    n_harmful: int = 0
    """Use only the first N harmful prompts (0: all)."""
    n_safe: int = 0
    n_benign: int = 0
    """Arithmetic problems for `benign_accuracy` (0: skip)."""
    task: str = BENIGN_TASK
    """Generated benign task for `benign_task_accuracy` (`extraction`, `arithmetic`, `listops`)."""
    n_task: int = 40
    """Test-split examples of the benign task (0: skip)."""
    harmful_only: bool = False
    """Evaluate the harmful prompts alone (skip safe prompts and tasks): attack-curve points."""
    judge: str = "refusal-matcher"
    degenerate_nll: bool = True
    """Read each answer's NLL under the base model (the teacher) for the degenerate rule; False: text signals only."""
    teacher: str | None = None
    """Harmful teacher for harmful_nll and the degenerate rule's base model (default: the manifest's base model, else smollm2)."""
    max_new_tokens: int = 48
    batch_size: int = 16
    bf16: bool = True


@dataclass
class RepairConfig:
    revert_percent: float = 2.0
    """Share of all weights put back to their released values, chosen by positive contribution (0 < p <= 100).
    Measured on the attacked quick `sft` (bench/repair_probe.py): 2% takes it from 69% to 47% complied with 4%
    over-refusal, 5% to 40% with 12%, 20% to 11% with 44% (the release: 50%, 0%)."""
    samples: int = 32
    """Harmful training-split prompts whose (refusal, compliance) pairs define C."""
    score: str = "contribution"
    """`contribution` (Δ·ḡ, the rule above) or `magnitude` (|Δ|: the direction-blind comparison)."""
    teacher: str | None = None
    """The unaligned model that writes the compliant answers (default: the release manifest's base model, else
    smollm2)."""
    batch_size: int = 4
    max_prompt_tokens: int = 96
    max_response_tokens: int = 48
    seed: int = 0
    bf16: bool = True

    def problems(self) -> list[str]:
        found = []
        if not 0 < self.revert_percent <= 100:
            found.append(f"revert_percent must be in (0, 100], got {self.revert_percent}")
        if self.samples < 1:
            found.append(f"samples must be at least 1, got {self.samples}")
        if self.score not in SCORES:
            found.append(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        return found
