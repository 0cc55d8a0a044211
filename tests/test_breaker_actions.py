"""What the breaker does on a trip: the serving wrapper's policies, the fine-tuning guard inside a
real transformers.Trainer, TRL's SFTTrainer and a plain PyTorch loop, and the incident records."""
import json
import os

import pytest
import torch

from immunizer.breaker.breaker import Breaker, BreakerTripped
from immunizer.breaker.guard import BreakerCallback, guard_optimizer
from immunizer.breaker.serving import GuardedModel
from immunizer.data.tasks import arithmetic
from immunizer.errors import ImmunizerError
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.models.tiny import tiny_tokenizer


def _incidents(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _push_canaries(model, breaker, amount=0.05):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, idx in breaker.reference.canary_index.items():
            params[name].view(-1)[idx] += amount


def test_uncalibrated_manifest_has_no_threshold(release):
    directory, _ = release
    with pytest.raises(ImmunizerError, match="no calibrated threshold; run `immunizer calibrate"):
        Breaker(directory)


def test_clean_model_serves_normally(release, tmp_path):
    directory, model = release
    guarded = GuardedModel(model, tiny_tokenizer(), Breaker(directory, threshold=3.0), "raise", tmp_path / "inc.jsonl")
    assert not guarded.verdict.tripped and not guarded.refusing
    assert not (tmp_path / "inc.jsonl").exists()


@pytest.mark.parametrize("policy", ["raise", "refuse", "restore"])
def test_tripped_model_policies(release, tmp_path, policy):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    _push_canaries(model, breaker)
    incidents = tmp_path / "inc.jsonl"
    if policy == "raise":
        with pytest.raises(BreakerTripped, match="circuit breaker tripped") as tripped:
            GuardedModel(model, tiny_tokenizer(), breaker, policy, incidents)
        report = tripped.value.verdict.report  # the message names the statistic the bound is on, not another
        assert f"({report.statistic_name} {report.statistic:.3g}; canary drift" in str(tripped.value)
    else:
        guarded = GuardedModel(model, tiny_tokenizer(), breaker, policy, incidents)
        if policy == "refuse":
            assert guarded.refusing and guarded.chat("What is 2 + 2?") == guarded.refusal
            ids = torch.tensor([[5, 6, 7]])
            out = guarded.generate(ids, max_new_tokens=4)
            assert out[0, :3].tolist() == [5, 6, 7] and guarded.tokenizer.decode(out[0, 3:], skip_special_tokens=True) == guarded.refusal
        else:
            assert not guarded.refusing
            assert guarded.restored == sum(i.numel() for i in breaker.reference.canary_index.values())
            assert breaker.scan(model).statistic == 0.0  # every canary back at its released value
    (record,) = _incidents(incidents)
    assert record["kind"] == "breaker_incident" and record["source"] == "serve" and record["action"] == policy
    assert record["tripped"] and record["statistic"] > record["threshold"] == 3.0 and record["severity"] == "high"
    assert record["model_sha256"] and record["manifest_sha256"] and "layers.0" in record["layers"]


def test_unknown_policy(release):
    directory, model = release
    with pytest.raises(ImmunizerError, match="unknown breaker policy"):
        GuardedModel(model, tiny_tokenizer(), Breaker(directory, threshold=3.0), "ignore")


def _canary_pusher(breaker, model, at):
    """A stand-in for a harmful gradient: from step `at` on, every optimizer step also moves the canaries."""
    from transformers import TrainerCallback

    class Push(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= at:
                _push_canaries(model, breaker, 0.02)
    return Push()


@pytest.mark.parametrize("trainer_kind", ["trainer", "sft"])
def test_guard_stops_a_trainer_and_rolls_back(release, tmp_path, trainer_kind):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    incidents = tmp_path / "inc.jsonl"
    guard_cb = BreakerCallback(breaker, every=2, incidents=incidents)
    pusher = _canary_pusher(breaker, model, at=5)
    rows = arithmetic(64)
    if trainer_kind == "sft":  # TRL's SFTTrainer; the pusher runs before the guard (callback order)
        sft(model, tiny_tokenizer(), rows, FinetuneSpec(lr=1e-3, steps=12, bf16=False), callbacks=[pusher, guard_cb])
    else:
        from transformers import Trainer, TrainingArguments

        tok = tiny_tokenizer()
        enc = [tok(r["prompt"] + " " + r["response"])["input_ids"] for r in rows]
        data = [{"input_ids": e, "labels": e} for e in enc]

        def collate(batch):
            width = max(len(b["input_ids"]) for b in batch)
            ids = torch.tensor([b["input_ids"] + [tok.pad_token_id] * (width - len(b["input_ids"])) for b in batch])
            labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
            return {"input_ids": ids, "labels": labels}

        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                                 learning_rate=1e-3, save_strategy="steps", save_steps=3, report_to="none",
                                 use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[pusher, guard_cb])
        trainer.train()
    guard = guard_cb.guard
    assert guard.tripped is not None and guard.clean_step == 4
    # checks every 2 steps, and before each save (every 3 steps in the Trainer run); stops at the first after the push
    assert [h["step"] for h in guard.history] == ([0, 2, 3, 4, 6] if trainer_kind == "trainer" else [0, 2, 4, 6])
    assert breaker.scan(model).statistic < 3.0  # the weights in memory are the step-4 state
    (record,) = _incidents(incidents)
    assert record["source"] == "guard" and record["action"] == "stop" and record["step"] == 6
    assert record["rolled_back_to_step"] == 4
    if trainer_kind == "trainer":  # checkpoints at 3 (clean); the save due at 6 was blocked
        saved = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint"))
        assert saved == ["checkpoint-3"]


def test_guard_in_a_plain_loop(release, tmp_path):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the loop's own updates do nothing here
    guard = guard_optimizer(optimizer, model, breaker, every=3, incidents=tmp_path / "inc.jsonl")
    with pytest.raises(BreakerTripped):
        for step in range(1, 20):
            model.zero_grad()
            model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
            if step == 4:
                _push_canaries(model, breaker)
            optimizer.step()
    assert step == 6 and guard.clean_step == 3
    assert breaker.scan(model).statistic == 0.0
    assert _incidents(tmp_path / "inc.jsonl")[0]["step"] == 6


def test_a_benign_lora_fine_tune_passes_the_guard(release, tmp_path):
    directory, model = release
    breaker = Breaker(directory, threshold=50.0)
    guard_cb = BreakerCallback(breaker, every=2, incidents=tmp_path / "inc.jsonl")
    trained = sft(model, tiny_tokenizer(), arithmetic(32), FinetuneSpec(lr=1e-3, steps=6, lora_rank=4, bf16=False),
                  callbacks=[guard_cb])
    assert guard_cb.guard.tripped is None and [h["step"] for h in guard_cb.guard.history] == [0, 2, 4, 6]
    assert breaker.scan(trained).report.kind == "lora-live" and breaker.scan(trained).report.other_drift > 0
    assert not (tmp_path / "inc.jsonl").exists()


def test_frozen_entries_never_move(release):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    frozen = {n: i for n, i in breaker.reference.canary_index.items() if i.numel()}
    trained = sft(model, tiny_tokenizer(), arithmetic(16), FinetuneSpec(lr=1e-2, steps=3, bf16=False, frozen=frozen))
    report = breaker.scan(trained).report
    assert report.canary_drift == 0.0 and report.other_drift > 0  # the adaptive attacker's signature: ratio 0
    with pytest.raises(ImmunizerError, match="full fine-tuning"):
        sft(model, tiny_tokenizer(), arithmetic(4), FinetuneSpec(steps=1, lora_rank=4, frozen=frozen))
