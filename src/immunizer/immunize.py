"""Cyclical immunization (MISSION §1): the one training loop a reader must understand.

    for each cycle:
        Phase 1 (refusal / canary sensitization), per batch of harmful (prompt, response):
            simulate the attack  w' = w + δ  (phase1.adversary, adversaries.py):
                                   lat    δ = −ε·g/‖g‖, g = ∇ SFT loss on the harmful pairs
                                   sign   δ = −ε·sign(g), every weight moved like an Adam step
                                   inner  K AdamW steps of harmful SFT from w
            refusal_loss         γ·((1−λ)·NPO + λ·(−min(KL(student‖harmful teacher), τ)))  at w'
                                 [+ adapted_refusal_weight · SFT on (prompt, refusal) at w', optional]
            accumulate_canary_scores   += |∂L_refusal/∂w| at w'
            restore              w ← w  (the refusal gradient from w' is applied at w: SAM-style / first order)
            (anchor step)        + SFT on (prompt, refusal) + SFT on (benign prompt, helpful answer), at w
                                 [switchable extensions: refusal_anchor_weight, retain_weight]
            the optimizer step
        select canaries: global top-K% of the accumulated scores
        Phase 2 (alignment / canary desensitization), per batch of benign (prompt, chosen, rejected):
            (benign perturbation, optional)
            alignment_loss       (1−α)·DPO + α·KL(student‖reference)
            stabilization_loss   MSE(canaries, their values at the start of Phase 2)
            step on              L_alignment + β·L_stab
    (optional) extrapolate  W ← W + α·rank-k SVD(W − W_base) per decoder-layer weight (LoX; extrapolate.py)
    write the model, canaries.safetensors and manifest.json (canary values read after the extrapolation)
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from immunizer import __version__
from immunizer.adversaries import (ADVERSARIES, Displacement, apply_perturbation, harmful_sft_loss, normalized_perturbation,
                                   take_gradients)
from immunizer.canaries import CanaryScores, gather_selection, select_top_percent
from immunizer.checkpoint import load_checkpoint, seed_everything
from immunizer.config import ImmunizeConfig
from immunizer.data.batches import Batch, pair_batch
from immunizer.data.teacher import autocast
from immunizer.data.training_sets import TrainingData, build_training_data, pick_refusal
from immunizer.errors import ImmunizerError
from immunizer.extrapolate import extrapolate_, summary as extrapolation_summary
from immunizer.losses import (IGNORE, alignment_loss, annealed_gamma, bounded_negative_kl, dpo_loss, npo_loss,
                              refusal_loss, sequence_logprob, sft_loss, stabilization_grad, sum_of_squares,
                              token_kl)
from immunizer.manifest import write_release
from immunizer.models import load_model, model_dir_sha256, resolve_model, runtime_device
from immunizer.launch import split_evenly
from immunizer.parallel import DataParallel
from immunizer.sharding import LocalRange, local
from immunizer.stopping import Stopped
from immunizer.training_state import Position, TrainingState


@dataclass
class ImmunizeResult:
    out_dir: Path
    model_dir: Path
    manifest: dict
    seconds: float


# ---------------------------------------------------------------- the two phases' losses

def content_labels(labels: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """The labels without the end-of-turn token: the refusal loss unlearns harmful content, not the act of
    stopping (pushed down after short harmful answers, it taught the model to keep talking: looping refusals)."""
    return labels if eos_id is None else labels.masked_fill(labels == eos_id, IGNORE)


def phase1_refusal_loss(student, reference, harmful_teacher, harmful: Batch, gamma: float, cfg, bf16: bool,
                        eos_id: int | None = None):
    labels = harmful.labels if cfg.unlearn_end_of_turn else content_labels(harmful.labels, eos_id)
    with autocast(bf16):
        logits = student(input_ids=harmful.input_ids, attention_mask=harmful.attention_mask).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=harmful.input_ids, attention_mask=harmful.attention_mask).logits
            teacher_logits = ref_logits if harmful_teacher is reference else harmful_teacher(
                input_ids=harmful.input_ids, attention_mask=harmful.attention_mask).logits
    policy_logp, ref_logp = sequence_logprob(logits, labels), sequence_logprob(ref_logits, labels)
    if cfg.npo_length_normalized:
        tokens = (labels[:, 1:] != IGNORE).sum(-1).clamp_min(1)
        policy_logp, ref_logp = policy_logp / tokens, ref_logp / tokens
    npo = npo_loss(policy_logp, ref_logp, cfg.npo_beta, cfg.npo_floor)
    rkl = bounded_negative_kl(logits, teacher_logits, labels, cfg.rkl_tau)
    return refusal_loss(npo, rkl, gamma, cfg.lam), {"npo": npo.item(), "rkl": rkl.item()}


def phase2_alignment_loss(student, reference, pairs: Batch, cfg, bf16: bool):
    """`pairs` holds the chosen answers in its first half and the rejected ones in its second."""
    half = pairs.input_ids.shape[0] // 2
    with autocast(bf16):
        logits = student(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask).logits
    policy = sequence_logprob(logits, pairs.labels)
    ref = sequence_logprob(ref_logits, pairs.labels)
    dpo = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], cfg.dpo_beta)
    kl = token_kl(logits[:half], ref_logits[:half], pairs.labels[:half]).mean()
    margin = ((policy[:half] - ref[:half]) - (policy[half:] - ref[half:])).mean().item()
    return alignment_loss(dpo, kl, cfg.alpha), {"dpo": dpo.item(), "kl": kl.item(), "reward_margin": margin}


def canary_tensors(named_params: dict[str, torch.Tensor], canaries: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The values at `canaries`: flat indices into each parameter, or under FSDP into this process's piece of it
    (`local_selection`)."""
    return [local(named_params[n]).reshape(-1)[idx] for n, idx in canaries.items()]


def local_selection(named_params: dict[str, torch.Tensor], selection: dict[str, torch.Tensor],
                    values: list[torch.Tensor] | None = None):
    """`selection`'s indices (and `values`, one tensor per entry) that live on this process, the indices made
    relative to its piece of each parameter (sharding.py); all of them outside FSDP."""
    ranges = [LocalRange.of(named_params[n]) for n in selection]
    here = [r.holds(idx) for r, idx in zip(ranges, selection.values())]
    indices = {n: idx[m] - r.start for (n, idx), r, m in zip(selection.items(), ranges, here)}
    return indices, None if values is None else [v[m.to(v.device)] for v, m in zip(values, here)]


def random_probe(named_params: dict[str, torch.Tensor], share: float, seed: int) -> dict[str, torch.Tensor]:
    """A fixed random sample of flat indices per parameter, to compare the canaries' drift with."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, p.numel(), (max(1, int(p.numel() * share)),), generator=g).to(p.device)
            for n, p in named_params.items()}


def mean_square(current: list[torch.Tensor], anchor: list[torch.Tensor], dp: DataParallel, count: int) -> float:
    """Mean of (current − anchor)² over `count` entries (under FSDP `current` and `anchor` are this process's
    share): the stabilization loss's value."""
    return float(dp.all_sum(sum_of_squares(current, anchor))) / max(count, 1)


def rms_drift(current: list[torch.Tensor], anchor: list[torch.Tensor], dp: DataParallel, count: int) -> float:
    return math.sqrt(mean_square(current, anchor, dp, count))


# ---------------------------------------------------------------- data order

def batches_for(n_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices, walking seeded permutations of the data (one pass when steps=0)."""
    steps = steps or math.ceil(n_items / batch_size)
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        perm = list(range(n_items))
        rng.shuffle(perm)
        order += perm
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def harmful_set_for_cycle(data: TrainingData, config: ImmunizeConfig, cycle: int) -> str:
    if "file" in data.harmful:
        return "file"
    return config.data.curriculum[min(cycle, len(config.data.curriculum) - 1)]


# ---------------------------------------------------------------- the run

def check_batch_sizes(config: ImmunizeConfig, world_size: int) -> None:
    """In a data-parallel job every batch is split evenly: refuse a batch size that does not split, before any
    model is loaded."""
    for phase in ("phase1", "phase2"):
        split_evenly(getattr(config, phase).batch_size, world_size, f"{phase}.batch_size", f"--set {phase}.batch_size=N")


class Run:
    """Holds the models, data and output files of one immunization run."""

    def __init__(self, model_spec: str, out_dir: Path, config: ImmunizeConfig, resume: bool, progress: bool,
                 stop: Callable[[], str | None] | None = None):
        self.config, self.out_dir, self.stop = config, Path(out_dir), stop
        # One process, or this one's place in an `accelerate launch` job (parallel.py).
        self.dp = DataParallel.from_environment(runtime_device())
        self.device = self.dp.device
        self.progress = progress and self.dp.is_main
        if self.device.type == "cuda":  # the peak reported at the end is this run's, not an earlier one's in the process
            torch.cuda.reset_peak_memory_stats(self.device)
        check_batch_sizes(config, self.dp.world_size)
        with self.dp.main_first():  # the main process converts the model and fills the teacher caches first
            saved = self._check_out_dir(resume)
            if self.dp.is_main:
                self._remove_stale_temporaries()
            self.state = TrainingState(self.out_dir, saved, writer=self.dp.is_main, dp=self.dp)
            seed_everything(config.seed)

            self.base_spec = model_spec
            self.base_dir = resolve_model(model_spec)
            self.base_sha256 = model_dir_sha256(self.base_dir)
            if saved is not None and saved["base_model_sha256"] != self.base_sha256:
                raise ImmunizerError(f"--resume: the run in {self.out_dir} started from another model; pass the same --model")
            self.student, self.tokenizer = load_model(self.base_dir)
            self.reference, _ = load_model(self.base_dir, with_tokenizer=False)
            self.student.to(self.device)
            self.reference.to(self.device).requires_grad_(False)
            self.harmful_teacher, harmful_sha = self._teacher(config.teachers.harmful)
            self.helpful_teacher, helpful_sha = self._teacher(config.teachers.helpful)
            self.data = build_training_data(config, self.tokenizer, self.harmful_teacher, self.helpful_teacher,
                                            harmful_sha, helpful_sha)
        seed_everything(config.seed)  # again: a cold cache (model conversion, teachers) draws from the RNG, a warm one not
        # Under FSDP the models the steps use are sharded now, once the teachers have answered (parallel.py).
        del self.helpful_teacher  # it has answered: the data is built
        for model in {id(m): m for m in (self.student, self.reference, self.harmful_teacher)}.values():
            self.dp.prepare(model)  # in place
        self.loading_peak = {}
        if self.dp.sharded and self.device.type == "cuda":  # the peak reported at the end is the sharded training's
            self.loading_peak = {"loading_peak_memory_bytes": torch.cuda.max_memory_allocated(self.device)}
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.named = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())

    def _teacher(self, spec: str):
        if spec == "reference":
            return self.reference, self.base_sha256
        path = resolve_model(spec)
        model, _ = load_model(path, with_tokenizer=False)
        if model.config.vocab_size != self.student.config.vocab_size:
            raise ImmunizerError(f"teacher {spec} has a vocabulary of {model.config.vocab_size} tokens, the student "
                                 f"{self.student.config.vocab_size}; teachers must share the student's tokenizer")
        return model.to(self.device).requires_grad_(False), model_dir_sha256(path)

    def _check_out_dir(self, resume: bool) -> dict | None:
        state = load_checkpoint(self.out_dir)
        if resume:
            if state is None and (self.out_dir / "manifest.json").exists():
                raise ImmunizerError(f"--resume: the run in {self.out_dir} has already finished; nothing to resume")
            if state is None:
                raise ImmunizerError(f"--resume: {self.out_dir} holds no checkpoint to resume from; drop --resume to start")
            if state["config_sha256"] != self.config.sha256:
                raise ImmunizerError(
                    f"--resume: the run in {self.out_dir} was started with a different config (other --preset/--config/"
                    "--set values, or an immunizer version whose config had other fields); pass the same settings "
                    "with the same version, or start a new --out directory")
            return state
        if state is not None or (self.out_dir / "manifest.json").exists():
            raise ImmunizerError(f"{self.out_dir} already holds an immunization run; pass --resume to continue it "
                                 "or choose another --out directory")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return None

    def _remove_stale_temporaries(self) -> None:
        """A run killed while writing leaves `.NAME.xxxx` temporaries beside its outputs."""
        for stale in self.out_dir.glob(".*.*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    # -- bookkeeping
    def log(self, record: dict) -> None:
        """One line of metrics.jsonl, written by the main process (every process must call it: a step's figures
        are the processes' mean)."""
        record = self.dp.mean_figures(record)
        if self.dp.is_main:
            self.state.log(record)

    def checkpoint(self, position: Position, optimizer, scores: CanaryScores | None = None, **resume_with) -> None:
        """`optimizer`: the phase's (None at a phase's start). `resume_with`: what the phase at `position` needs
        besides the weights (the canary scores so far, or the canaries and their anchor values). Every process
        calls it; the main one writes (the weights and moments are the same on all of them, or under FSDP gathered
        from their pieces; the scores are joined from their slices first)."""
        if scores is not None:
            resume_with["scores"] = self.dp.gather_slices(scores.state_dict())
        self.state.save(self.student, optimizer, position, config_sha256=self.config.sha256,
                        base_model_sha256=self.base_sha256, **resume_with)
        self.dp.barrier()

    def checkpoint_or_stop(self, position: Position, optimizer, always: bool = False, **resume_with) -> None:
        """A checkpoint every `checkpoint_every` steps (at a phase's end `always`), and one at once when a stop was
        asked for, which then ends the run (Stopped). The stop is logged first, so that the checkpoint keeps it."""
        asked = None if self.stop is None else self.dp.broadcast(self.stop())  # the main process's answer
        if asked:
            self.log({"event": "stopped", "by": asked, **asdict(position)})
        if asked or always or position.step % self.config.checkpoint_every == 0:
            self.checkpoint(position, optimizer, **resume_with)
        if asked:
            raise Stopped(f"{asked}: immunization stopped before cycle {position.cycle + 1}, phase {position.phase}, "
                          f"step {position.step + 1}, whose checkpoint is in {self.out_dir}; the same command with "
                          "--resume continues it")

    def _batch(self, prompts, responses) -> Batch:
        dc = self.config.data
        return pair_batch(self.tokenizer, prompts, responses, dc.max_prompt_tokens, dc.max_response_tokens).to(self.device)

    # -- Phase 1
    def phase1(self, cycle: int, start_step: int, optimizer, scores: CanaryScores) -> dict[str, torch.Tensor]:
        cfg, bf16 = self.config.phase1, self.config.bf16
        set_name = harmful_set_for_cycle(self.data, self.config, cycle)
        pairs = self.data.harmful[set_name]
        plan = batches_for(len(pairs.prompts), cfg.batch_size, cfg.steps, self.config.seed * 1000 + cycle)
        self.student.train()
        bar = tqdm(range(start_step, len(plan)), desc=f"cycle {cycle + 1} phase 1 ({set_name})", unit="step",
                   disable=not self.progress, initial=start_step, total=len(plan))
        for step in bar:
            started = time.perf_counter()
            share = self.dp.share(plan[step])  # this process's part of the batch (all of it in one process)
            prompts = [pairs.prompts[i] for i in share]
            harmful = self._batch(prompts, [pairs.responses[i] for i in share])
            gamma = annealed_gamma(cycle * len(plan) + step, cfg.gamma0, cfg.gamma_rate)
            optimizer.zero_grad(set_to_none=True)

            moved = self.simulate_attack(pairs, cycle, step, harmful)
            loss, parts = torch.zeros(()), {"npo": 0.0, "rkl": 0.0}
            if gamma > 0:
                loss, parts = phase1_refusal_loss(self.student, self.reference, self.harmful_teacher, harmful, gamma, cfg, bf16,
                                                  self.tokenizer.eos_token_id)
            if cfg.adapted_refusal_weight > 0:  # the refusal still likely at w', after the simulated attack
                held = harmful_sft_loss(self.student, self._batch(prompts, self.refusals_for(prompts)), bf16, self.dp)
                loss = loss + cfg.adapted_refusal_weight * held
                parts["adapted_refusal_sft"] = held.item()
            if gamma > 0 or cfg.adapted_refusal_weight > 0:
                loss.backward()
                self.dp.average_gradients(self.params)
                scores.accumulate(self.student)  # |∂L_refusal/∂w| only: the anchor below is not a refusal signal
            else:  # γ = 0 and no adapted refusal term switch the refusal terms off: the plain-alignment baseline
                if cfg.score_untrained_refusal:  # measured for canary selection only, never trained on
                    measured, parts = phase1_refusal_loss(self.student, self.reference, self.harmful_teacher, harmful, 1.0, cfg,
                                                          bf16, self.tokenizer.eos_token_id)
                    measured.backward()
                    self.dp.average_gradients(self.params)
                    scores.accumulate(self.student)
                    optimizer.zero_grad(set_to_none=True)
            moved.undo()  # step from w with the refusal gradient taken at w' (SAM-style; first-order for `inner`)
            if cfg.refusal_anchor_weight > 0 or cfg.retain_weight > 0:
                parts.update(self.anchor_step(prompts, cycle * len(plan) + step, cfg, bf16))
                self.dp.average_gradients(self.params)  # the refusal part is averaged already: averaging is idempotent
            grad_norm = self.dp.clip_grad_norm(self.params, cfg.max_grad_norm)
            optimizer.step()

            record = {"cycle": cycle, "phase": 1, "step": step, "set": set_name, "gamma": gamma,
                      "batch_tokens": self.dp.total(harmful.attention_mask.sum()),
                      "refusal_loss": loss.item(), "grad_norm": grad_norm, "adversary": cfg.adversary,
                      "seconds": time.perf_counter() - started, **moved.stats, **parts}
            self.log(record)
            # what this run trains: the unlearning terms only where gamma weighs them, the adversary's loss where it runs
            shown = {"refusal": f"{parts['refusal_sft']:.2f}"} if "refusal_sft" in parts else {}
            if gamma:
                shown.update(npo=f"{parts['npo']:.3f}", rkl=f"{parts['rkl']:.3f}")
            if "adversary_sft_loss" in moved.stats:
                shown["attack_sft"] = f"{moved.stats['adversary_sft_loss']:.2f}"
            bar.set_postfix(shown)
            if step + 1 < len(plan):  # the phase's end has a checkpoint of its own
                self.checkpoint_or_stop(Position(cycle, 1, step + 1), optimizer, scores=scores)
        started = time.perf_counter()
        # Exact top-K% over every process's slice of the scores, then every process gets the whole selection.
        canaries = gather_selection(select_top_percent(scores.shards(), cfg.k_percent))
        self.log({"cycle": cycle, "phase": 1, "event": "canaries_selected", "k_percent": cfg.k_percent,
                  "num_canaries": sum(int(v.numel()) for v in canaries.values()),
                  "selection_seconds": time.perf_counter() - started})
        return canaries

    def simulate_attack(self, pairs, cycle: int, step: int, harmful: Batch) -> Displacement:
        """Move the student where the configured adversary's harmful fine-tune would take it (adversaries.py)."""
        cfg, started = self.config.phase1, time.perf_counter()

        def sample_batches(k: int, seed: int) -> list[Batch]:  # `inner`'s own batches of the cycle's harmful pairs
            rng, n = random.Random(f"{seed}:inner-batches"), len(pairs.prompts)
            picks = [self.dp.share(rng.sample(range(n), min(cfg.batch_size, n)), "inner attack batch") for _ in range(k)]
            return [self._batch([pairs.prompts[i] for i in idx], [pairs.responses[i] for i in idx]) for idx in picks]

        seed = (self.config.seed * 1000 + cycle) * 100_003 + step  # the same draws when a run resumes
        moved = ADVERSARIES[cfg.adversary](cfg, self.student, self.params, harmful, self.config.bf16, seed, sample_batches,
                                           self.dp)
        if moved.stats:
            moved.stats["adversary_seconds"] = time.perf_counter() - started
        return moved

    def refusals_for(self, harmful_prompts: list[str]) -> list[str]:
        return [pick_refusal(p, self.data.refusals) for p in harmful_prompts]

    def anchor_step(self, harmful_prompts: list[str], global_step: int, cfg, bf16: bool) -> dict:
        """Extensions to the refusal step, one forward over both: SFT on (harmful prompt, refusal), the
        refusal anchor, and SFT on (benign prompt, helpful answer), the retain term. In a data-parallel run
        `harmful_prompts` is this process's share, and so are the benign rows."""
        benign, batch_size = self.data.benign, len(harmful_prompts) * self.dp.world_size
        picks = self.dp.share([(global_step * batch_size + i) % len(benign.prompts) for i in range(batch_size)])
        prompts = harmful_prompts + [benign.prompts[i] for i in picks]
        answers = self.refusals_for(harmful_prompts) + [benign.chosen[i] for i in picks]
        batch = self._batch(prompts, answers)
        half = len(harmful_prompts)
        with autocast(bf16):
            logits = self.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        refusal_sft = sft_loss(logits[:half], batch.labels[:half], self.dp.token_normalizer(batch.labels[:half]))
        retain_sft = sft_loss(logits[half:], batch.labels[half:], self.dp.token_normalizer(batch.labels[half:]))
        (cfg.refusal_anchor_weight * refusal_sft + cfg.retain_weight * retain_sft).backward()
        return {"refusal_sft": refusal_sft.item(), "retain_sft": retain_sft.item()}

    # -- Phase 2
    def phase2(self, cycle: int, start_step: int, optimizer, canaries: dict[str, torch.Tensor],
               anchor: list[torch.Tensor]) -> None:
        cfg, bf16 = self.config.phase2, self.config.bf16
        triples = self.data.benign
        plan = batches_for(len(triples.prompts), cfg.batch_size, cfg.steps, self.config.seed * 1000 + 500 + cycle)
        self.student.train()
        # Under FSDP each process reads and writes the canaries that live in its pieces of the weights; the
        # figures are summed over the processes. `count`: how many there are in all.
        whole, whole_anchor = canaries, anchor  # what a checkpoint keeps (any process count resumes from it)
        count = sum(int(idx.numel()) for idx in canaries.values())
        canaries, anchor = local_selection(self.named, canaries, anchor)
        # Drift of the canaries vs. a random 1% of all weights since the Phase-2 anchor: what the breaker will see.
        probe = random_probe(self.named, 0.01, self.config.seed)
        probe_count = sum(int(idx.numel()) for idx in probe.values())
        probe, _ = local_selection(self.named, probe)
        probe_anchor = [t.detach().clone() for t in canary_tensors(self.named, probe)]
        bar = tqdm(range(start_step, len(plan)), desc=f"cycle {cycle + 1} phase 2 (benign)", unit="step",
                   disable=not self.progress, initial=start_step, total=len(plan))
        for step in bar:
            started = time.perf_counter()
            idx = self.dp.share(plan[step])
            prompts = [triples.prompts[i] for i in idx]
            pairs = self._batch(prompts + prompts, [triples.chosen[i] for i in idx] + [triples.rejected[i] for i in idx])
            optimizer.zero_grad(set_to_none=True)
            delta = []
            if cfg.benign_perturb_epsilon > 0:  # simulate a benign fine-tuning step, then train from there
                loss, _ = phase2_alignment_loss(self.student, self.reference, pairs, cfg, bf16)
                grads = take_gradients(loss, self.params, self.dp)
                delta = normalized_perturbation(grads, cfg.benign_perturb_epsilon, sign=-1.0, dp=self.dp)
                del grads
                apply_perturbation(self.params, delta, +1.0)
            align, parts = phase2_alignment_loss(self.student, self.reference, pairs, cfg, bf16)
            align.backward()
            self.dp.average_gradients(self.params)
            stab = self.add_stabilization_grad(canaries, anchor, cfg.stabilization_beta, count)
            apply_perturbation(self.params, delta, -1.0)
            grad_norm = self.dp.clip_grad_norm(self.params, cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                drift = rms_drift(canary_tensors(self.named, canaries), anchor, self.dp, count)
                sample_drift = rms_drift(canary_tensors(self.named, probe), probe_anchor, self.dp, probe_count)
            self.log({"cycle": cycle, "phase": 2, "step": step, "alignment_loss": align.item(),
                      "batch_tokens": self.dp.total(pairs.attention_mask.sum()),
                      "stabilization_loss": stab, "canary_rms_drift": drift, "sample_rms_drift": sample_drift,
                      "grad_norm": grad_norm,
                      "seconds": time.perf_counter() - started, **parts})
            bar.set_postfix(dpo=f"{parts['dpo']:.3f}", kl=f"{parts['kl']:.3f}", drift=f"{drift:.2e}")
            if step + 1 < len(plan):
                self.checkpoint_or_stop(Position(cycle, 2, step + 1), optimizer, canaries=whole, anchor=whole_anchor)

    @torch.no_grad()
    def add_stabilization_grad(self, canaries: dict[str, torch.Tensor], anchor: list[torch.Tensor],
                               beta: float, count: int) -> float:
        """grad += β·∂MSE(canaries, anchor)/∂w, written at the canary indices only (this process's, of `count`
        in all); returns the MSE."""
        if beta <= 0:
            return 0.0
        current = canary_tensors(self.named, canaries)
        for (name, idx), g in zip(canaries.items(), stabilization_grad(current, anchor, count)):
            p = self.named[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local(p.grad).view(-1).index_add_(0, idx, g.to(p.grad.dtype), alpha=beta)
        return mean_square(current, anchor, self.dp, count)

    def values_at(self, selection: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The weights' current values at `selection` (whole-parameter flat indices), joined from the processes'
        pieces under FSDP."""
        here, _ = local_selection(self.named, selection)
        return self.dp.join_pieces([t.detach().clone() for t in canary_tensors(self.named, here)])

    def optimizer(self, lr: float):
        return torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def begin(self) -> None:
        """Log the start, or go back to the checkpoint (weights, random generators) and log the resumption."""
        if self.state.resumed:
            self.state.restore(self.student)
            self.log({"event": "resumed", **asdict(self.state.position)})
        else:
            self.log({"event": "started", "config": self.config.to_dict(), "base_model_sha256": self.base_sha256,
                      "data_sha256": self.data.sha256, **self.dp.describe()})

    def train(self) -> dict[str, torch.Tensor]:
        """The cycles of the module docstring, from the start or from where the checkpoint stopped."""
        cfg, at = self.config, self.state.position
        self.begin()
        saved = self.state.saved or {}
        canaries, anchor = saved.get("canaries"), saved.get("anchor")  # set when the run stopped in Phase 2
        for cycle in range(at.cycle, cfg.cycles):
            if (cycle, 1) >= (at.cycle, at.phase):  # else the run stopped in this cycle's Phase 2
                optimizer = self.optimizer(cfg.phase1.lr)
                scores = CanaryScores(self.student, (self.dp.rank, self.dp.world_size))
                start = self.state.resume_step(cycle, 1, optimizer, self.student)
                if start:  # the scores accumulated up to the checkpoint (none yet at step 0)
                    scores.load_state_dict(saved["scores"])
                canaries = self.phase1(cycle, start, optimizer, scores)
                del scores
                anchor = self.values_at(canaries)
                # a phase's start keeps no optimizer: the phase begins with a fresh one (TrainingState.resume_step)
                self.checkpoint_or_stop(Position(cycle, 2, 0), None, always=True, canaries=canaries, anchor=anchor)
            optimizer = self.optimizer(cfg.phase2.lr)
            self.phase2(cycle, self.state.resume_step(cycle, 2, optimizer, self.student), optimizer, canaries, anchor)
            if cycle + 1 < cfg.cycles:
                self.checkpoint_or_stop(Position(cycle + 1, 1, 0), None, always=True)
        return canaries

    def trained_model(self) -> torch.nn.Module | None:
        """The model to release: the student, or under FSDP a whole copy of it gathered in CPU memory on the main
        process (None on the others). Every process calls it."""
        if not self.dp.sharded:
            return self.student
        weights = self.dp.whole_weights(self.student)
        if not self.dp.is_main:
            return None
        model, _ = load_model(self.base_dir, with_tokenizer=False)
        model.load_state_dict(weights)
        return model

    def extrapolate(self, model: torch.nn.Module | None) -> None:
        """The optional LoX stage on `model` (trained_model's); the canaries' released values are read after it
        (write_outputs). Under FSDP the main process extrapolates the gathered copy."""
        cfg = self.config.extrapolate
        if not cfg.enabled:
            return
        base = self.dp.whole_weights(self.reference) if self.dp.sharded else dict(self.reference.named_parameters())
        if model is None:
            return
        started = time.perf_counter()
        changed = extrapolate_({n: p for n, p in model.named_parameters() if n in self.named}, base, cfg)
        # Not self.log: under FSDP one process computed it, so there is nothing to average over the processes.
        self.state.log({"event": "extrapolated", "rank": cfg.rank, "alpha": cfg.alpha, **extrapolation_summary(changed),
                        "seconds": time.perf_counter() - started})

    def write_outputs(self, model: torch.nn.Module | None, canaries: dict[str, torch.Tensor], seconds: float,
                      hmac_key=None) -> ImmunizeResult:
        """The main process writes the release (`model`: trained_model's); every process returns it."""
        if self.dp.is_main:
            write_release(
                self.out_dir, model, self.tokenizer, canaries, k_percent=self.config.phase1.k_percent,
                extra={
                    "immunizer_version": __version__,
                    "method": "immunizer",
                    "base_model": self.base_spec,
                    "base_model_sha256": self.base_sha256,
                    "config_sha256": self.config.sha256,
                    "config": self.config.to_dict(),
                    "data_sha256": self.data.sha256,
                    "data_versions": self.data.versions,
                    "cycles": self.config.cycles,
                    "parallel": self.dp.describe(),
                },
                hmac_key=hmac_key,
            )
        self.dp.barrier()
        meta = json.loads((self.out_dir / "manifest.json").read_text())
        self.log({"event": "finished", "seconds": seconds, "model_sha256": meta["model_sha256"],
                  "num_canaries": meta["num_canaries"], **self.dp.describe(), **peak_memory(self.device),
                  **self.loading_peak})
        return ImmunizeResult(self.out_dir, self.out_dir / "model", meta, seconds)


def peak_memory(device: torch.device) -> dict:
    """Where the run happened and its peak memory: the accelerator's allocator peak on CUDA, else the process's
    peak resident set (which includes the Python runtime and every loaded model)."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    import resource  # Unix only: imported here so that the module still loads elsewhere

    return {"device": "cpu", "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def immunize(model: str | Path, out_dir: str | Path, config: ImmunizeConfig | None = None, *,
             resume: bool = False, progress: bool = True, hmac_key: bytes | str | None = None,
             stop: Callable[[], str | None] | None = None) -> ImmunizeResult:
    """Run cyclical immunization on `model` and write `out_dir/{model/, canaries.safetensors,
    manifest.json, metrics.jsonl}`. With `resume=True`, continue an interrupted run from its checkpoint.
    `stop`, called after every step (the CLI's first Ctrl-C): a reason to stop writes a checkpoint at once and
    raises `immunizer.stopping.Stopped`; `resume=True` continues from it. In a launched job every process must
    pass one (the main process's answer is broadcast at each step)."""
    started = time.perf_counter()
    run = Run(str(model), Path(out_dir), config or ImmunizeConfig(), resume, progress, stop)
    canaries = run.train()
    model = run.trained_model()
    run.extrapolate(model)
    result = run.write_outputs(model, canaries, time.perf_counter() - started, hmac_key)
    if run.dp.is_main:
        run.state.finish()
    return result
