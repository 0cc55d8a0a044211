"""One training loop for the published alignment-stage defences (`vaccine`, `repnoise`, `booster`),
under immunizer's budget: the same training data (harmful prompts with refusals, benign prompts with
helpful answers, the harmful teacher's answers where a method needs harmful data), the same number
of optimizer steps (cycles × (Phase-1 + Phase-2 steps)), batch size and Phase-1 learning rate.

    for each step:
        align batch   = harmful prompts → refusals  +  benign prompts → helpful answers   (f, the alignment loss)
        harmful batch = harmful prompts → harmful teacher answers                         (h, where used)
        gradient from the method's step (losses.py), clipped, one AdamW step
    score canaries on the result (|∂L_refusal/∂w|, as the plain-alignment baseline does), so the breaker
    can watch every method the same way; write OUT/model + manifest.json like `immunizer immunize`."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from immunizer import __version__
from immunizer.adversaries import apply_perturbation, normalized_perturbation
from immunizer.baselines.losses import booster_gradient, gaussian_mmd, repnoise_loss, vaccine_perturbation
from immunizer.canaries import CanaryScores, select_top_percent
from immunizer.checkpoint import load_checkpoint, seed_everything
from immunizer.config import ImmunizeConfig
from immunizer.data.batches import Batch, pair_batch
from immunizer.data.teacher import autocast
from immunizer.data.training_sets import build_training_data, pick_refusal
from immunizer.errors import ImmunizerError
from immunizer.immunize import ImmunizeResult, batches_for, harmful_set_for_cycle, phase1_refusal_loss
from immunizer.losses import IGNORE, sft_loss
from immunizer.manifest import write_release
from immunizer.models import load_model, model_dir_sha256, resolve_model, runtime_device
from immunizer.stopping import Stopped
from immunizer.training_state import TrainingState

METHODS = ("vaccine", "repnoise", "booster")


@dataclass
class BaselineConfig:
    """Each defence's own hyperparameters, at the values its paper recommends."""
    vaccine_rho: float = 2.0
    """Vaccine's perturbation radius ρ (the paper's default, §5.1)."""
    repnoise_alpha: float = 1.0
    """RepNoise's weight α on the MMD-to-noise term (paper defaults: α = 1, β = 0.001)."""
    repnoise_beta: float = 0.001
    """RepNoise's weight β on gradient ascent over harmful answers."""
    repnoise_ascent_cap: float = 10.0
    """Cap (nats per token) on the ascent term, see losses.repnoise_loss."""
    booster_lambda: float = 5.0
    """Booster's regularizer weight λ (paper §5.1: λ = 5)."""
    booster_alpha: float = 0.1
    """Booster's simulated harmful step size α (paper §5.1: α = 0.1)."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks whose outputs are the 'hidden embeddings' Vaccine perturbs."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module):
            return module
    raise ImmunizerError(f"{type(model).__name__}: found no decoder layer list (a ModuleList named '*layers'); "
                         "vaccine needs a decoder-only transformer")


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _sft(model, batch: Batch, bf16: bool, **kwargs):
    with autocast(bf16):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    return sft_loss(out.logits, batch.labels), out


# ---------------------------------------------------------------- one step per method (writes p.grad)

def vaccine_step(model, params, align: Batch, harmful: Batch, hp: BaselineConfig, bf16: bool) -> dict:
    """Vaccine Algorithm 1: take ∇ of the alignment loss w.r.t. every layer's output, then the
    gradient of the alignment loss with each layer's output shifted by ε_l (harmful data unused)."""
    layers = decoder_layers(model)
    hiddens: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, i, o: hiddens.append(_hidden(o))) for layer in layers]
    try:
        loss, _ = _sft(model, align, bf16)
    finally:
        for h in handles:
            h.remove()
    epsilon = vaccine_perturbation(list(torch.autograd.grad(loss, hiddens)), hp.vaccine_rho)

    def shift(index):
        return lambda m, i, o: _with_hidden(o, _hidden(o) + epsilon[index].to(_hidden(o).dtype))
    handles = [layer.register_forward_hook(shift(k)) for k, layer in enumerate(layers)]
    try:
        perturbed, _ = _sft(model, align, bf16)
        perturbed.backward()
    finally:
        for h in handles:
            h.remove()
    return {"align_loss": loss.item(), "perturbed_loss": perturbed.item()}


def repnoise_step(model, params, align: Batch, harmful: Batch, hp: BaselineConfig, bf16: bool) -> dict:
    """RepNoise eq. (3): harmless SFT + α·MMD(harmful-answer representations at every layer, N(0, I))
    − β·(capped) harmful SFT."""
    harmless, _ = _sft(model, align, bf16)
    harmful_loss, out = _sft(model, harmful, bf16, output_hidden_states=True)
    mask = harmful.labels != IGNORE
    layers = out.hidden_states[1:]
    mmd = sum(gaussian_mmd(h[mask], torch.randn_like(h[mask], dtype=torch.float32)) for h in layers) / len(layers)
    loss = repnoise_loss(harmless, harmful_loss, mmd, hp.repnoise_alpha, hp.repnoise_beta, hp.repnoise_ascent_cap)
    loss.backward()
    return {"align_loss": harmless.item(), "harmful_loss": harmful_loss.item(), "mmd": mmd.item()}


def booster_step(model, params, align: Batch, harmful: Batch, hp: BaselineConfig, bf16: bool) -> dict:
    """Booster Algorithm 1: ∇f(w) + λ·(∇h(w) − ∇h(w − α·∇h/‖∇h‖))."""
    align_loss, _ = _sft(model, align, bf16)
    align_loss.backward()
    harmful_loss, _ = _sft(model, harmful, bf16)
    harmful_grads = torch.autograd.grad(harmful_loss, params, allow_unused=True)
    delta = normalized_perturbation(list(harmful_grads), hp.booster_alpha, sign=-1.0)
    apply_perturbation(params, delta, +1.0)
    try:
        after, _ = _sft(model, harmful, bf16)
        after_grads = torch.autograd.grad(after, params, allow_unused=True)
    finally:
        apply_perturbation(params, delta, -1.0)
    for p, g_h, g_after in zip(params, harmful_grads, after_grads):
        if g_h is None or g_after is None:
            continue
        p.grad = booster_gradient(p.grad if p.grad is not None else torch.zeros_like(p), g_h, g_after, hp.booster_lambda)
    return {"align_loss": align_loss.item(), "harmful_loss": harmful_loss.item(),
            "harmful_drop": harmful_loss.item() - after.item()}


STEPS = {"vaccine": vaccine_step, "repnoise": repnoise_step, "booster": booster_step}


# ---------------------------------------------------------------- the loop

def score_canaries(student, reference, tokenizer, prompts, responses, config: ImmunizeConfig, device) -> dict:
    """One pass of |∂L_refusal/∂w| over the harmful pairs, measured and thrown away (as the
    plain-alignment baseline does), then the global top-K%: the weights the breaker watches."""
    scores = CanaryScores(student)
    dc, bs = config.data, config.phase1.batch_size
    for start in range(0, len(prompts), bs):
        batch = pair_batch(tokenizer, prompts[start:start + bs], responses[start:start + bs],
                           dc.max_prompt_tokens, dc.max_response_tokens).to(device)
        loss, _ = phase1_refusal_loss(student, reference, reference, batch, 1.0, config.phase1, config.bf16,
                                      tokenizer.eos_token_id)
        loss.backward()
        scores.accumulate(student)
        student.zero_grad(set_to_none=True)
    return select_top_percent(scores.shards(), config.phase1.k_percent)


def _resume_state(out_dir: Path, method: str, fingerprint: str, resume: bool) -> dict | None:
    if (out_dir / "manifest.json").exists():
        raise ImmunizerError(f"{out_dir} already holds a finished run; choose another output directory")
    state = load_checkpoint(out_dir)
    if state is None:  # nothing to resume (killed before the first checkpoint): start from the beginning
        return None
    if not resume:
        raise ImmunizerError(f"{out_dir} holds an interrupted {state['method']} run; resume it or choose another "
                             "output directory")
    if state["method"] != method or state["fingerprint"] != fingerprint:
        raise ImmunizerError(f"the interrupted run in {out_dir} was started with another method, config or "
                             "hyperparameters; pass the same ones to resume, or delete it to start over")
    return state


def train_baseline(method: str, model: str | Path, out_dir: str | Path, config: ImmunizeConfig,
                   hp: BaselineConfig | None = None, progress: bool = True, resume: bool = False,
                   stop: Callable[[], str | None] | None = None) -> ImmunizeResult:
    """Align `model` with a published defence under immunizer's budget; writes OUT/{model/,
    manifest.json, canaries.safetensors, metrics.jsonl}. Checkpoints every `config.checkpoint_every`
    steps; `resume=True` continues an interrupted run from its last checkpoint. `stop` (a reason, or None),
    asked after every step: a reason writes a checkpoint at once and raises `immunizer.stopping.Stopped`."""
    if method not in STEPS:
        raise ImmunizerError(f"unknown baseline {method!r}; choose one of {', '.join(STEPS)}")
    hp = hp or BaselineConfig()
    out_dir = Path(out_dir)
    fingerprint = json.dumps({"config": config.sha256, "baseline": asdict(hp)}, sort_keys=True)
    saved = _resume_state(out_dir, method, fingerprint, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = TrainingState(out_dir, saved)
    started = time.perf_counter() - (saved["seconds"] if saved else 0.0)
    seed_everything(config.seed)
    device = runtime_device()
    base_dir = resolve_model(model)
    base_sha = model_dir_sha256(base_dir)
    student, tokenizer = load_model(base_dir)
    reference, _ = load_model(base_dir, with_tokenizer=False)
    student.to(device)
    reference.to(device).requires_grad_(False)
    data = build_training_data(config, tokenizer, reference, reference, base_sha, base_sha)
    seed_everything(config.seed)  # again: a cold cache (model conversion, teachers) draws from the RNG, a warm one not
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.phase1.lr, weight_decay=0.0)
    dc, bs = config.data, config.phase1.batch_size

    def batch(prompts, responses) -> Batch:
        return pair_batch(tokenizer, prompts, responses, dc.max_prompt_tokens, dc.max_response_tokens).to(device)

    # Immunizer's budget: per cycle, its Phase-1 steps over that cycle's harmful set + its Phase-2 steps.
    plan = []
    for cycle in range(config.cycles):
        set_name = harmful_set_for_cycle(data, config, cycle)
        n_benign_steps = len(batches_for(len(data.benign.prompts), config.phase2.batch_size, config.phase2.steps, 0))
        n_steps = len(batches_for(len(data.harmful[set_name].prompts), bs, config.phase1.steps, 0)) + n_benign_steps
        plan += [(set_name, idx) for idx in batches_for(len(data.harmful[set_name].prompts), bs, n_steps,
                                                        config.seed * 1000 + cycle)]
    if state.resumed:  # back to the checkpoint: weights, optimizer moments and random generators
        state.restore(student, optimizer)
    else:
        state.log({"event": "started", "method": method, "baseline": asdict(hp), "config": config.to_dict(),
                   "base_model_sha256": base_sha, "data_sha256": data.sha256})
    first = saved["step"] if saved else 0
    student.train()
    bar = tqdm(range(first, len(plan)), initial=first, total=len(plan), desc=f"{method} alignment", unit="step",
               disable=not progress)
    for step in bar:
        set_name, idx = plan[step]
        t0 = time.perf_counter()
        pairs = data.harmful[set_name]
        prompts = [pairs.prompts[i] for i in idx]
        picks = [(step * bs + i) % len(data.benign.prompts) for i in range(bs)]
        align = batch(prompts + [data.benign.prompts[i] for i in picks],
                      [pick_refusal(p, data.refusals) for p in prompts] + [data.benign.chosen[i] for i in picks])
        harmful = batch(prompts, [pairs.responses[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        parts = STEPS[method](student, params, align, harmful, hp, config.bf16)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.phase1.max_grad_norm))
        optimizer.step()
        state.log({"step": step, "set": set_name, "grad_norm": grad_norm, "seconds": time.perf_counter() - t0, **parts})
        bar.set_postfix(align=f"{parts['align_loss']:.3f}")
        asked = stop() if stop is not None and step + 1 < len(plan) else None
        if asked:
            state.log({"event": "stopped", "by": asked, "next_step": step + 1})
        if asked or (step + 1) % config.checkpoint_every == 0 and step + 1 < len(plan):
            state.save(student, optimizer, method=method, fingerprint=fingerprint, step=step + 1,
                       seconds=time.perf_counter() - started)
        if asked:
            raise Stopped(f"{asked}: {method} stopped before step {step + 2}, whose checkpoint is in {out_dir}; "
                          "the same command continues it")
    last = data.harmful[plan[-1][0]]
    canaries = score_canaries(student, reference, tokenizer, last.prompts, last.responses, config, device)
    seconds = time.perf_counter() - started
    model_dir, meta = write_release(
        out_dir, student, tokenizer, canaries, k_percent=config.phase1.k_percent,
        extra={"immunizer_version": __version__, "method": method, "baseline": asdict(hp), "base_model": str(model),
               "base_model_sha256": base_sha, "config_sha256": config.sha256, "config": config.to_dict(),
               "data_sha256": data.sha256, "data_versions": data.versions, "cycles": config.cycles})
    state.log({"event": "finished", "seconds": seconds, "model_sha256": meta["model_sha256"],
               "num_canaries": meta["num_canaries"]})
    state.finish()
    return ImmunizeResult(out_dir, model_dir, meta, seconds)
