"""The methods the harness compares, all trained from the same base model under the same budget:

- `none`: the base model, no safety training;
- `sft`: plain safety SFT + DPO with immunizer's data and steps (presets/methods/sft.yaml);
- `lox`: `sft` followed by low-rank extrapolation of its update (LoX, presets/methods/lox.yaml);
- `immunizer`, and its ablations `immunizer-no-lat`, `-no-refusal`, `-no-stab`, `-no-anchor`
  (presets/methods/*.yaml switch one term off);
- `vaccine`, `repnoise`, `booster`: the published defences (losses.py, train.py)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from immunizer.baselines.train import METHODS as PUBLISHED
from immunizer.baselines.train import BaselineConfig, train_baseline
from immunizer.config import DEFENCE_SECTION, PRESETS, ImmunizeConfig, merge, read_yaml, resolve_extends, training_layer
from immunizer.errors import ImmunizerError
from immunizer.immunize import immunize
from immunizer.models.loading import resolve_model

METHOD_CONFIGS = PRESETS / "methods"


def method_names() -> list[str]:
    """Every method the harness can build; a published defence with its own file (its tuned recipe) is listed once."""
    variants = sorted(p.stem for p in METHOD_CONFIGS.glob("*.yaml") if p.stem not in PUBLISHED)
    return ["none", "immunizer", *variants, *PUBLISHED]


@dataclass
class BuiltMethod:
    name: str
    model_dir: Path
    """The model the attacks start from."""
    release_dir: Path | None
    """The immunize-style output directory (manifest + canaries) the breaker watches; None for `none`."""
    cost_seconds: float


def method_config(name: str, base: ImmunizeConfig) -> ImmunizeConfig:
    """immunizer's config with the method's overrides (sft, ablations, a published defence's tuned budget such as
    its learning rate) applied on a copy. A method file may start from another's (`extends: sft`), whose overrides
    apply first."""
    config = copy.deepcopy(base)
    path = METHOD_CONFIGS / f"{name}.yaml"
    if path.is_file():
        for overrides in resolve_extends(read_yaml(path), str(path), (name,)):
            merge(config, training_layer(overrides))
    return config


def method_baseline(name: str, overrides: dict | None = None) -> BaselineConfig:
    """A published defence's own hyperparameters: its paper's values (BaselineConfig), then its method file's
    `baseline:` section (tuned for this budget, e.g. presets/methods/booster.yaml), then `overrides` (a bench's
    `baseline:` mapping or a tuning candidate), each key replacing the one before."""
    config = BaselineConfig()
    path = METHOD_CONFIGS / f"{name}.yaml"
    layers = resolve_extends(read_yaml(path), str(path), (name,)) if path.is_file() else []
    for layer in [*(part.get(DEFENCE_SECTION) or {} for part in layers), overrides or {}]:
        if not isinstance(layer, dict):
            raise ImmunizerError(f"{path}: `{DEFENCE_SECTION}:` must be a mapping of BaselineConfig's fields")
        merge(config, layer, f"{DEFENCE_SECTION}.")
    return config


def extrapolation_parent(name: str) -> str | None:
    """The method `name` is its parent plus the extrapolation stage and nothing else (`lox` = `sft` + LoX), so
    a harness that has built the parent derives it without training again; None for any other method."""
    path = METHOD_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        return None
    overrides = read_yaml(path)
    return overrides.get("extends") if set(overrides) == {"extends", "extrapolate"} else None


def build_method(name: str, model: str | Path, out_dir: Path, config: ImmunizeConfig,
                 baseline: BaselineConfig | None = None, progress: bool = True, resume: bool = False,
                 stop=None) -> BuiltMethod:
    """Train `name` from `model` into `out_dir` (an immunize-style directory), or return the base for `none`.
    `resume=True` continues an interrupted training from the checkpoint in `out_dir`; `stop` (a reason to stop,
    or None) stops the training after its current step with a checkpoint (`immunizer.stopping.Stopped`)."""
    if name not in method_names():
        raise ImmunizerError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    if name == "none":
        return BuiltMethod(name, resolve_model(model), None, 0.0)
    if name in PUBLISHED:
        result = train_baseline(name, model, out_dir, method_config(name, config), baseline or method_baseline(name),
                                progress=progress, resume=resume, stop=stop)
    else:
        result = immunize(model, out_dir, method_config(name, config), progress=progress, resume=resume, stop=stop)
    return BuiltMethod(name, result.model_dir, result.out_dir, result.seconds)


__all__ = ["BaselineConfig", "BuiltMethod", "build_method", "extrapolation_parent", "method_baseline", "method_config",
           "method_names", "train_baseline"]
