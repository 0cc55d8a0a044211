"""Typed configuration for `immunizer immunize`, and the one loader every command's config goes through
(`load_layers`): the dataclass defaults < a preset (YAML in `presets/`) < a user YAML file < `--set key=value`
overrides (dotted keys, YAML values), in that order; unknown keys and wrong types are named with the fix."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from immunizer.errors import ImmunizerError
from immunizer.json_hash import json_sha256

PRESETS = Path(__file__).parent / "presets"
ADVERSARIES = ("none", "lat", "sign", "inner")
"""Phase 1's simulated attacks (adversaries.py); `none` trains at the unmoved weights."""


@dataclass
class DataConfig:
    curriculum: list[str] = field(default_factory=lambda: ["weak", "strong"])
    """Adversarial prompt set per cycle: cycle i uses curriculum[min(i, len - 1)] (`weak`, `strong`)."""
    harmful_file: str | None = None
    """JSONL of {"prompt", optional "response"}; replaces the curriculum. Missing responses come from the harmful teacher."""
    benign_file: str | None = None
    """JSONL of {"prompt", optional "chosen", "rejected"}; replaces the project's benign prompts."""
    max_harmful_prompts: int = 0
    """Use a seeded random subset of this many harmful prompts per set (0: all)."""
    max_benign_prompts: int = 0
    """Use a seeded random subset of this many benign prompts (0: all)."""
    imperative_rephrasings: bool = False
    """Add, to the built-in harmful sets, the instruction form of each how-to / can-you question ("How can I X?" ->
    "Give detailed step-by-step instructions for how to X."; data/rephrase.py), so refusals are learnt on both
    surface forms. DoNotAnswer's questions alone left `sft` answering 92% of HarmBench's instructions."""
    max_prompt_tokens: int = 128
    """Prompts longer than this keep their last tokens (where a jailbreak puts the request)."""
    max_response_tokens: int = 64
    """Responses are cut to this many tokens (the end-of-turn token included)."""
    teacher_max_new_tokens: int = 64
    """Length of teacher generations (greedy)."""
    teacher_batch_size: int = 16
    keep_teacher_refusals: bool = False
    """Keep the harmful teacher's refusals as "harmful answers". By default a refused prompt is answered again by
    sampling (up to 4 tries) or left out (data/harmful_answers.py): NPO / −KL and the simulated attack would
    otherwise push refusals down. The counts go to the manifest's data_versions.harmful_refusals."""


@dataclass
class TeacherConfig:
    harmful: str = "reference"
    """Model spec of the harmful teacher; `reference` reuses the starting student (an unaligned model complies)."""
    helpful: str = "reference"
    """Model spec of the helpful teacher; `reference` reuses the starting student."""


@dataclass
class Phase1Config:
    steps: int = 0
    """Optimizer steps per cycle (0: one pass over the cycle's harmful prompts)."""
    batch_size: int = 4
    lr: float = 1e-5
    """AdamW learning rate (SFT-like terms: ~1e-5 per seed 002)."""
    adversary: str = "lat"
    """The simulated attack the refusal loss is taken after (adversaries.py): `lat` (one normalized gradient
    step of L2 norm lat_epsilon), `sign` (every weight moved sign_epsilon against its harmful gradient, the
    shape of an Adam step), `inner` (inner_steps AdamW steps of harmful SFT at inner_lr, first-order), `none`."""
    lat_epsilon: float = 0.1
    """`lat`: L2 norm of the LAT weight perturbation δ = −ε·g/‖g‖ over all parameters (0: no LAT). On SmolLM2-135M
    (weight norm ~2100), 0.1 takes the harmful SFT loss from 1.02 to 0.57 at KL 0.23; 1.0 overshoots (loss 6.9)."""
    sign_epsilon: float = 2.0e-4
    """`sign`: how far every weight moves (L∞). Measured on the tuned sft model (bench/adversary_reach.py): the
    harmful SFT loss 0.85 falls to 0.34 at 1e-4, 0.36 at 2.5e-4, 0.58 at 5e-4 and rises past it (1.12 at 1e-3:
    the one-step linearisation breaks); 4 real AdamW steps at lr 5e-5 reach 0.33 at RMS 1.1e-4, 8 steps 0.23.
    lat's ε = 0.1 reaches 0.65. The standard attack's RMS drift after 20 steps was 2.9e-4 per weight."""
    inner_steps: list[int] = field(default_factory=lambda: [4, 8])
    """`inner`: the number K of AdamW steps per simulated attack, drawn uniformly from [low, high] each step."""
    inner_lr: list[float] = field(default_factory=lambda: [2.0e-5, 1.0e-4])
    """`inner`: its learning rate, drawn log-uniformly from [low, high] (the bench attacks at 2e-5, 5e-5, 1e-4)."""
    gamma0: float = 0.5
    """Initial refusal strength γ; γ = min(1, γ0 + step · gamma_rate)."""
    gamma_rate: float = 0.02
    lam: float = 0.5
    """λ: weight of the bounded −KL term against NPO in L_refusal."""
    npo_beta: float = 0.1
    """β of NPO (Zhang et al. 2024 use 0.1)."""
    npo_floor: float = 0.0
    """Nats per token (with npo_length_normalized): NPO stops pushing a harmful answer once its log-ratio to the
    reference is below −npo_floor (0: never stops). Re-immunizing the quick release without it took the harmful
    NLL from 6.9 to 34 and its answers into noise (bench/results/loop_quick.json, before the refusal-loss fixes);
    with today's losses a second quick immunization stays fluent without it (bench/results/reimmunize_probe.json:
    degenerate 0%, complied 56% -> 35%, harmful NLL 2.1 -> 6.0)."""
    npo_length_normalized: bool = True
    """Use the per-token mean log-ratio in NPO, as SimNPO does (Fan et al. 2024), instead of the sequence sum:
    with sums, NPO's gradient is ~response-length times an SFT gradient and, on SmolLM2-135M, it swamped the
    refusal anchor and drove the model to babble (measured: quick preset, refusal SFT loss stuck at ~2.3)."""
    unlearn_end_of_turn: bool = False
    """Whether NPO and −KL also push down the end-of-turn token of short harmful answers. Off: on the quick
    release every refusal to a role-play-wrapped request looped ("I can't help with that. I can't help with
    that. …"), and 22% of the strong set's harmful answers end inside the token budget, with that token."""
    rkl_tau: float = 0.5
    """Cap τ on KL(student ‖ harmful teacher), nats per token, in L_RKL = −min(KL, τ)."""
    refusal_anchor_weight: float = 1.0
    """Extension (MISSION §1): weight of SFT on (harmful prompt, refusal) added to the refusal step; 0 switches it off."""
    adapted_refusal_weight: float = 0.0
    """Extension: weight of SFT on (harmful prompt, refusal) taken at the adversary's moved weights w', beside
    NPO / −KL there, so that the refusal stays likely *after* the simulated attack, not only less of the harmful
    answer (TAR's tamper-resistance term in spirit: Tamirisa et al. 2024, arXiv 2408.00761, whose refusal setting
    takes DPO, refusal over harmful answer, at the adapted weights). Its gradient is applied at w, as the refusal
    loss's is, and enters the canary scores. 0: off (one extra forward/backward per Phase-1 step when on)."""
    retain_weight: float = 1.0
    """Extension (MISSION §1): weight of SFT on benign (prompt, helpful answer) pairs in the same step, so
    the model learns *when* to refuse; without it the quick preset refused 94% of safe prompts (measured). 0: off."""
    score_untrained_refusal: bool = True
    """With γ = 0 (the plain-alignment baseline), still take |∂L_refusal/∂w| in a backward whose gradient is
    then discarded, so that the baseline's canaries are picked the same way as immunizer's (the breaker's
    comparison needs them). False skips that extra backward (cost benchmarks)."""
    k_percent: float = 1.0
    """Share of all parameters that become canaries (global top-K% by accumulated |∂L_refusal/∂w|)."""
    max_grad_norm: float = 1.0


@dataclass
class Phase2Config:
    steps: int = 0
    """Optimizer steps per cycle (0: one pass over the benign prompts)."""
    batch_size: int = 4
    lr: float = 2e-6
    """AdamW learning rate (DPO-like: 5e-7..5e-6 on small models)."""
    alpha: float = 0.2
    """α: weight of KL-to-reference against DPO in L_alignment."""
    dpo_beta: float = 0.1
    stabilization_beta: float = 1.0e8
    """β: weight of L_stab = MSE(canaries, Phase-2-start anchor). MSE averages over all canaries (~1.3M on the
    135M model), hence the size; at 1e6 the canaries drifted as freely as other weights (measured)."""
    benign_perturb_epsilon: float = 0.0
    """L2 norm of the optional benign perturbation (one normalized alignment-gradient step, undone after); 0: off."""
    max_grad_norm: float = 1.0


@dataclass
class ExtrapolateConfig:
    """Low-rank extrapolation of the safety update (LoX, extrapolate.py): an optional last stage."""
    rank: int = 6
    """k: rank of the truncated SVD of each weight's update W − W_base (0: the whole update)."""
    alpha: float = 0.0
    """α in W ← W + α·rank-k(W − W_base); 0 switches the stage off (the LoX paper uses 1.25)."""
    include: str = r"\.layers\.\d+\..*\.weight$"
    """Regular expression on parameter names: the 2-D weights to extrapolate (default: all inside the decoder
    layers; embeddings, norms and the LM head stay)."""

    @property
    def enabled(self) -> bool:
        return self.alpha != 0.0


@dataclass
class ImmunizeConfig:
    cycles: int = 2
    seed: int = 0
    bf16: bool = True
    """bf16 autocast for forward passes (fp32 master weights); ~2x faster on CPU."""
    checkpoint_every: int = 20
    """Write a resumable checkpoint every this many optimizer steps (and at each phase end)."""
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    extrapolate: ExtrapolateConfig = field(default_factory=ExtrapolateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def sha256(self) -> str:
        return json_sha256(self.to_dict())


def coerce(value, annotation, key: str):
    """`value` as the type `annotation` declares, or an error that names the key and what to write."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string, in files and lists too; accept the float people mean
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    if annotation in (int, bool, str) and isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    if annotation in (list, dict) and isinstance(value, annotation):  # untyped contents: checked where they are used
        return value
    if origin is list and isinstance(value, list):
        return [coerce(v, args[0], key) for v in value]
    if origin is dict and isinstance(value, dict):
        return {k: coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce(value, arg, key)
                except ImmunizerError:
                    pass
    hint = {float: "a finite number, e.g. 1e-05", int: "a whole number, e.g. 8", bool: "true or false",
            str: "a string"}.get(annotation)
    if hint is None and (annotation is list or origin is list):
        hint = "a YAML list, e.g. [4, 8]"
    if hint is None and (annotation is dict or origin is dict):
        hint = "a YAML mapping, e.g. {name: value}"
    raise ImmunizerError(f"config key {key!r} expects {getattr(annotation, '__name__', annotation)}, got {value!r}"
                         + (f"; write {hint}" if hint else ""))


def _field_name(config, key: str, prefix: str) -> str:
    """The field a key names: its own name, or an old name kept in the field's metadata `aliases`."""
    names = {alias: f.name for f in dataclasses.fields(config) for alias in (f.name, *f.metadata.get("aliases", ()))}
    if key not in names:
        known = sorted(f.name for f in dataclasses.fields(config))
        raise ImmunizerError(f"unknown config key {prefix + key!r}; known keys here: {', '.join(known)}")
    return names[key]


def _merge_dict(target: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_dict(target[key], value)
        else:
            target[key] = value
    return target


def merge(config, updates: dict, prefix: str = ""):
    """Apply a YAML layer (a preset or a file) to a typed config in place and return it: a section (a nested
    dataclass) and a mapping-valued field both merge key by key; any other value replaces the old one."""
    hints = typing.get_type_hints(type(config))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        name = _field_name(config, key, prefix)
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ImmunizerError(f"config key {path!r} is a section; give it a mapping")
            merge(current, value, path + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(config, name, _merge_dict(copy.deepcopy(current), coerce(value, hints[name], path)))
        else:
            setattr(config, name, coerce(value, hints[name], path))
    return config


def apply_override(config, text: str):
    """Apply one `--set a.b=VALUE` to a typed config in place and return it: VALUE replaces what is at a.b, a
    mapping too (the keys beside a.b stay), except that a.b naming a section merges VALUE into it."""
    path = text.split("=", 1)[0].strip().split(".")
    value = parse_override(text)
    for part in path:
        value = value[part]
    target, prefix = config, ""
    for part in path[:-1]:
        if isinstance(target, dict):  # inside a mapping-valued field: plain keys, checked where they are used
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        else:
            name = _field_name(target, part, prefix)
            current = getattr(target, name)
            if current is None:  # an optional mapping that is off (`grid: null`) starts empty
                try:
                    current = coerce({}, typing.get_type_hints(type(target))[name], prefix + part)
                except ImmunizerError:
                    pass
                setattr(target, name, current)
            if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
                raise ImmunizerError(f"config key {prefix + part!r} holds a single value, not keys; "
                                     f"write --set {prefix + part}=VALUE")
            target = current
        prefix += part + "."
    last = path[-1]
    if isinstance(target, dict):
        target[last] = value
        return config
    name = _field_name(target, last, prefix)
    if dataclasses.is_dataclass(getattr(target, name)):
        merge(target, {last: value}, prefix)
    else:
        setattr(target, name, coerce(value, typing.get_type_hints(type(target))[name], prefix + last))
    return config


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ImmunizerError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ImmunizerError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ImmunizerError(f"config file {path} must hold a mapping at the top level")
    return loaded


def resolve_extends(overrides: dict, source: str, seen: tuple[str, ...] = ()) -> list[dict]:
    """A method file may start from another (`extends: sft`): the chain of override mappings, parent first.
    `extends: immunizer` names the preset itself (immunizer is the preset, with no method file of its own)."""
    parent = overrides.pop("extends", None)
    if parent is None or parent == "immunizer":
        return [overrides]
    path = PRESETS / "methods" / f"{parent}.yaml"
    if parent in seen:
        raise ImmunizerError(f"{source}: `extends: {parent}` loops back on itself ({' -> '.join((*seen, parent))})")
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (PRESETS / "methods").glob("*.yaml")))
        raise ImmunizerError(f"{source}: `extends: {parent}` names no method file; choose immunizer or one of {names}")
    return [*resolve_extends(read_yaml(path), str(path), (*seen, parent)), overrides]


DEFENCE_SECTION = "baseline"
"""A method file's section for a published defence's own hyperparameters (baselines.BaselineConfig: Booster's λ,
Vaccine's ρ, ...), tuned for this budget; read by baselines.method_baseline, not part of ImmunizeConfig."""


def training_layer(layer: dict) -> dict:
    """A method file's layer without its defence section: what applies to ImmunizeConfig."""
    return {key: value for key, value in layer.items() if key != DEFENCE_SECTION}


def preset_names(directory: Path = PRESETS) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def split_overrides(text: str) -> list[str]:
    """`"phase1.adversary=inner,phase1.inner_steps=[16, 16]"` -> the two overrides: commas inside brackets or
    braces belong to a YAML value, not between overrides (the probes take a candidate as one such string)."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth <= 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_override(text: str) -> dict:
    """`phase1.lr=2e-5` -> {"phase1": {"lr": 2e-05}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ImmunizerError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ImmunizerError(f"--set {text!r}: the value is not valid YAML ({problem}); quote a string "
                             f"(--set '{key}=\"...\"') or close the bracket, e.g. --set '{key}=[a, b]'") from None
    if isinstance(value, str) and raw.strip():
        try:  # YAML 1.1 reads 1e-5 as a string; accept the float people mean
            value = float(raw)
        except ValueError:
            pass
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


C = typing.TypeVar("C")


def load_layers(config: C, preset: str | None = None, presets: Path = PRESETS, config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), *, what: str = "", extends: bool = False) -> C:
    """The one way every command builds its config: `config` (the dataclass defaults) < the preset
    (presets/PRESET.yaml) < `config_file` (which may start from a method file with `extends:` where `extends`
    is true) < each `--set KEY=VALUE` in order. `what` names the kind of preset in errors ("bench ")."""
    if preset:
        if preset not in preset_names(presets):
            raise ImmunizerError(f"unknown {what}preset {preset!r}; choose one of {', '.join(preset_names(presets))}")
        merge(config, read_yaml(presets / f"{preset}.yaml"))
    if config_file:
        layer = read_yaml(Path(config_file))
        try:
            for part in resolve_extends(layer, str(config_file)) if extends else [layer]:
                merge(config, training_layer(part) if extends else part)
        except ImmunizerError as exc:
            raise ImmunizerError(f"{config_file}: {exc}" if not str(exc).startswith(str(config_file)) else str(exc)) from None
    for text in overrides:
        apply_override(config, text)
    return config


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> ImmunizeConfig:
    config = load_layers(ImmunizeConfig(), preset, PRESETS, config_file, overrides, extends=True)
    validate(config)
    return config


def extrapolate_problems(config: ExtrapolateConfig) -> list[str]:
    problems = []
    if config.rank < 0:
        problems.append("extrapolate.rank must be >= 0 (0: the full update)")
    if not math.isfinite(config.alpha):
        problems.append("extrapolate.alpha must be a finite number")
    try:
        re.compile(config.include)
    except re.error as exc:
        problems.append(f"extrapolate.include is not a regular expression: {exc}")
    return problems


def validate(config: ImmunizeConfig) -> None:
    problems = []
    if config.cycles < 1:
        problems.append("cycles must be at least 1")
    if config.checkpoint_every < 1:
        problems.append("checkpoint_every must be at least 1 (optimizer steps between checkpoints)")
    if not 0 < config.phase1.k_percent <= 100:
        problems.append("phase1.k_percent must be in (0, 100]")
    for name in ("lam",):
        if not 0 <= getattr(config.phase1, name) <= 1:
            problems.append(f"phase1.{name} must be in [0, 1]")
    if not 0 <= config.phase2.alpha <= 1:
        problems.append("phase2.alpha must be in [0, 1]")
    for section in (config.phase1, config.phase2):
        if section.batch_size < 1 or not (section.lr > 0 and math.isfinite(section.lr)) or section.steps < 0:
            problems.append("batch_size must be >= 1, lr a finite number > 0 and steps >= 0 in both phases")
    p1 = config.phase1
    if p1.adversary not in ADVERSARIES:
        problems.append(f"phase1.adversary must be one of {', '.join(ADVERSARIES)}, got {p1.adversary!r}")
    if p1.lat_epsilon < 0 or p1.sign_epsilon < 0 or p1.npo_floor < 0:
        problems.append("phase1.lat_epsilon, phase1.sign_epsilon and phase1.npo_floor must be >= 0")
    weights = ("refusal_anchor_weight", "adapted_refusal_weight", "retain_weight")
    if any(getattr(p1, name) < 0 for name in weights):  # (non-finite numbers are refused when the keys are read)
        problems.append(f"phase1.{', phase1.'.join(weights)} must be >= 0")
    steps, lrs = p1.inner_steps, p1.inner_lr
    if len(steps) != 2 or not (1 <= steps[0] <= steps[1] or steps == [0, 0]):
        problems.append(f"phase1.inner_steps must be [low, high] with 1 <= low <= high (or [0, 0]: off), got {steps}")
    if len(lrs) != 2 or not 0 < lrs[0] <= lrs[1]:
        problems.append(f"phase1.inner_lr must be [low, high] with 0 < low <= high, got {lrs}")
    problems += extrapolate_problems(config.extrapolate)
    unknown = [c for c in config.data.curriculum if c not in ("weak", "strong")]
    if unknown or not config.data.curriculum:
        problems.append(f"data.curriculum must list `weak`/`strong` sets, got {config.data.curriculum}")
    if problems:
        raise ImmunizerError("invalid config: " + "; ".join(problems))
