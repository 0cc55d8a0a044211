"""Low-rank extrapolation of the safety update (LoX; Perin et al., COLM 2025, arXiv 2506.15606):

    for every 2-D weight W inside the decoder layers:
        Δ = W_aligned − W_base
        W_aligned ← W_aligned + α · (rank-k truncated SVD of Δ)      (k = 0: the whole Δ)

The published setting is k = 6, α = 1.25 (Llama-2-7B: Pure-Bad ASR 63% → 9%). Training-free; what it costs
is measured, not assumed: on this project's quick release it cut the standard attack's answered share from
67% to 46% but refused 84% of safe-but-scary prompts before any attack (docs/immunize.md). Written here
because no maintained library applies it to a Hugging Face state dict; the formula is the paper's."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from immunizer import __version__
from immunizer.config import ExtrapolateConfig, extrapolate_problems
from immunizer.errors import ImmunizerError
from immunizer.manifest import HMAC_ENV, load_manifest, signing_key, write_release
from immunizer.models import load_model, model_dir_sha256, resolve_model


def low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of a matrix (Eckart–Young); `rank` 0 or ≥ min(shape) returns it whole."""
    if rank <= 0 or rank >= min(delta.shape):
        return delta.clone()
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(delta.dtype)


@torch.no_grad()
def extrapolate_(aligned: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 config: ExtrapolateConfig) -> dict[str, float]:
    """Apply LoX in place to the tensors of `aligned` (a state dict or `named_parameters()` dict). Returns, per
    extrapolated weight, the Frobenius norm of the added update relative to the weight's own norm. A pattern
    that matches no 2-D weight is an error: the caller asked for a change that would not happen."""
    pattern = re.compile(config.include)
    changed: dict[str, float] = {}
    for name, weight in aligned.items():
        if weight.ndim != 2 or not pattern.search(name):
            continue
        if name not in base or base[name].shape != weight.shape:
            raise ImmunizerError(f"{name}: the base model has no weight of shape {tuple(weight.shape)}; "
                                 "extrapolation needs the model the release was trained from (--base)")
        update = config.alpha * low_rank(weight - base[name].to(weight.device, weight.dtype), config.rank)
        weight.add_(update)
        changed[name] = float(update.norm() / weight.norm().clamp_min(1e-12))
    if not changed:
        raise ImmunizerError(f"extrapolate.include (--include) {config.include!r} matches no 2-D weight of this model; "
                             "nothing was extrapolated")
    return changed


def retuned_alpha(applied: float, target: float) -> float:
    """The α that takes a release already extrapolated with `applied` (same rank and weights) to `target`, as if
    its source had been extrapolated with `target` directly; 0 recovers the source. Exact: with E = W − W_base
    = Δ + a·S_k(Δ), S_k(E) = (1 + a)·S_k(Δ) (the top k singular values scale, the directions stay), so adding
    ((t − a)/(1 + a))·S_k(E) leaves Δ + t·S_k(Δ). Lets α be re-tuned without the weights before extrapolation.
    A negative `applied` is refused: it shrinks the top k singular values, which may then no longer be the top k."""
    if applied < 0:
        raise ImmunizerError(f"--from-alpha {applied:g}: a release extrapolated with a negative α cannot be re-tuned "
                             "exactly (its k strongest directions may have changed); re-tune from its source")
    return (target - applied) / (1 + applied)


def summary(changed: dict[str, float]) -> dict:
    """What an extrapolation did, for metrics and manifests: how many weights, and the median relative update."""
    return {"weights": len(changed), "median_relative_update": sorted(changed.values())[len(changed) // 2]}


# Manifest fields not carried over: those write_manifest computes itself, and the calibrations (breaker
# thresholds, reference direction) that describe the old weights.
_NOT_CARRIED = {"format", "k_percent", "num_canaries", "num_parameters", "model_sha256", "canary_file", "sha256",
                "parameters", "manifest_sha256", "hmac", "model_dir", "breaker", "reference"}


def extrapolate_release(release: str | Path, out_dir: str | Path, config: ExtrapolateConfig, *,
                        base: str | Path | None = None, hmac_key: bytes | str | None = None,
                        record: dict | None = None, from_alpha: float | None = None) -> dict:
    """Extrapolate an immunize-style release (OUT/model + manifest) away from its base model and write a new
    release to `out_dir`: the same canary indices, their values re-read from the new weights, the breaker's
    calibration dropped (it described the old weights; run `immunizer calibrate --release OUT` again). `record`
    is added to the manifest's `extrapolation` entry. `from_alpha`: the release was already extrapolated with
    this α (same rank and weights); the result is then its source extrapolated with `config.alpha` instead
    (retuned_alpha; `config.alpha` 0 recovers the source). Returns the new manifest."""
    started = time.perf_counter()
    release, out_dir = Path(release), Path(out_dir)
    target = config.alpha  # where the weights end up; config.alpha becomes the step this call adds
    if from_alpha is not None:
        if from_alpha == target:
            raise ImmunizerError(f"--alpha equals --from-alpha ({from_alpha:g}): the release is already that extrapolation")
        config = replace(config, alpha=retuned_alpha(from_alpha, target))
    elif not config.enabled:
        raise ImmunizerError("--alpha is 0: extrapolation would change nothing; the paper's setting is --rank 6 --alpha 1.25")
    problems = extrapolate_problems(config)
    if problems:
        raise ImmunizerError("invalid extrapolation: " + "; ".join(problems))
    if out_dir.resolve() == release.resolve():
        raise ImmunizerError(f"--out {out_dir} is the release itself; write the extrapolated release elsewhere")
    manifest = load_manifest(release, hmac_key=hmac_key)
    if "hmac" in manifest.meta and signing_key(hmac_key) is None:
        raise ImmunizerError(f"{release}/manifest.json is signed; pass its key (--hmac-key-file or ${HMAC_ENV}) "
                             "so that the extrapolated release is signed too")
    base_spec = base or manifest.meta.get("base_model")
    if not base_spec:
        raise ImmunizerError(f"{release}/manifest.json names no base model; pass --base")
    base_dir = resolve_model(base_spec)
    expected = manifest.meta.get("base_model_sha256")
    if expected and model_dir_sha256(base_dir) != expected:
        raise ImmunizerError(f"{base_spec} is not the model {release} was trained from (its weights hash differs from "
                             "the manifest's base_model_sha256); pass --base with that model")
    model, tokenizer = load_model(release / manifest.meta.get("model_dir", "model"))
    base_model, _ = load_model(base_dir, with_tokenizer=False)
    changed = extrapolate_(dict(model.named_parameters()), dict(base_model.named_parameters()), config)
    extra = {k: v for k, v in manifest.meta.items() if k not in _NOT_CARRIED}
    extra["immunizer_version"] = __version__
    source_method = manifest.meta.get("method", "release")
    extra["method"] = (f"{source_method}+lox" if from_alpha is None
                       else source_method.removesuffix("+lox") + ("+lox" if target else ""))
    extra.setdefault("base_model", str(base_spec))
    retuned = {} if from_alpha is None else {"alpha": target, "step_alpha": config.alpha, "retuned_from_alpha": from_alpha}
    extra["extrapolation"] = {**(record or {}), **asdict(config), "source_release": str(release), "base_model": str(base_spec),
                              **summary(changed), "seconds": time.perf_counter() - started, **retuned}
    _, meta = write_release(out_dir, model, tokenizer, manifest.indices, k_percent=manifest.meta.get("k_percent", 0.0),
                            extra=extra, hmac_key=hmac_key)
    return meta
