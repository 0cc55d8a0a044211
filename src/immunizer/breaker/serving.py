"""Load-time and serving check: scan a model before it answers anything, and act by policy.

Policies: `raise` (refuse to load), `refuse` (answer every request with a refusal), `released`
(serve the released model the manifest was written for instead of the candidate), `restore` (write the
released values back into the canaries, re-scan, serve only if the re-scan passes). Every trip is
recorded as an incident.

`restore` does not repair a harmfully fine-tuned model: the harm lives outside the canaries (issue 15
measured 96% of held-out harmful prompts still answered after restoring). Under a calibration with
two-sided bounds the restored model (canaries back at zero drift, the other weights moved) trips again,
so `restore` ends up refusing; it is kept for manifests calibrated before those bounds. The wrapper only protects deployments that load models through it: whoever holds the
weights can load them without it (docs/threat-model.md)."""
from __future__ import annotations

from pathlib import Path

import torch

from immunizer.breaker.breaker import Breaker, BreakerTripped, Verdict
from immunizer.breaker.incidents import record_incident
from immunizer.data.prompts import refusal_responses
from immunizer.data.chat import chat_prompt_ids
from immunizer.errors import ImmunizerError
from immunizer.models.hashing import model_dir_sha256
from immunizer.models.loading import load_model

POLICIES = ("raise", "refuse", "released", "restore")


class GuardedModel:
    """A causal LM that was scanned when it was wrapped. `generate` and `chat` answer normally
    when the model is clean (or restored) and with a refusal under the `refuse` policy."""

    def __init__(self, model: torch.nn.Module, tokenizer, breaker: Breaker, policy: str = "raise",
                 incidents: str | Path | None = None, name: str = "model"):
        if policy not in POLICIES:
            raise ImmunizerError(f"unknown breaker policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.model, self.tokenizer, self.breaker, self.policy = model, tokenizer, breaker, policy
        self.refusing = False
        self.verdict: Verdict = breaker.scan(model)
        self.restored = 0
        if not self.verdict.tripped:
            return
        extra = {"candidate": name}
        if policy == "raise":
            record_incident(self.verdict, source="serve", action="raise", path=incidents, extra=extra)
            raise BreakerTripped(self.verdict, name)
        if policy == "refuse":
            self.refusing = True
            record_incident(self.verdict, source="serve", action="refuse", path=incidents, extra=extra)
            return
        if policy == "released":
            self.model = released_model(breaker, model)
            record_incident(self.verdict, source="serve", action="released", path=incidents, extra=extra)
            return
        self.restored = breaker.restore(model)
        after = breaker.scan(model)
        record_incident(self.verdict, source="serve", action="restore", path=incidents,
                        extra={**extra, "restored_canaries": self.restored, "statistic_after_restore": after.statistic,
                               "tripped_after_restore": after.tripped})
        if after.tripped:  # restoring did not bring the model back under the threshold: do not serve it
            self.refusing = True

    @property
    def refusal(self) -> str:
        return refusal_responses()[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """`model.generate`, or (refusing) the prompt followed by the refusal and EOS, right-padded."""
        if not self.refusing:
            return self.model.generate(input_ids=input_ids, **kwargs)
        answer = self.tokenizer(self.refusal, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        tail = torch.tensor(answer, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, tail.expand(input_ids.shape[0], -1)], dim=1)

    def chat(self, prompt: str, max_new_tokens: int = 64) -> str:
        if self.refusing:
            return self.refusal
        ids = torch.tensor([chat_prompt_ids(self.tokenizer, prompt)], device=next(self.model.parameters()).device)
        out = self.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def released_model(breaker: Breaker, candidate: torch.nn.Module) -> torch.nn.Module:
    """The released model of `breaker`'s manifest, checked against the manifest's model hash, on the candidate's
    device and dtype: what the `released` policy serves in place of a tripped candidate."""
    directory = Path(breaker.manifest.directory) / breaker.manifest.meta.get("model_dir", "model")
    if not directory.is_dir() or model_dir_sha256(directory) != breaker.manifest.meta.get("model_sha256"):
        raise ImmunizerError(f"the `released` policy needs the released model in {directory}, matching the manifest's "
                             "model_sha256; restore the published release there, or use the `refuse` policy")
    released, _ = load_model(directory, with_tokenizer=False)
    reference = next(candidate.parameters())
    return released.to(device=reference.device, dtype=reference.dtype).eval()


def load_guarded(model: str | Path, manifest_dir: str | Path, policy: str = "raise",
                 incidents: str | Path | None = None, threshold: float | None = None,
                 hmac_key: bytes | str | None = None, require_hmac: bool | None = None) -> GuardedModel:
    """Load a model directory (or anything `load_model` understands) and scan it against the manifest
    (verified with `hmac_key`, default $IMMUNIZER_MANIFEST_KEY; `require_hmac` default $IMMUNIZER_REQUIRE_HMAC)."""
    breaker = Breaker(manifest_dir, threshold=threshold, hmac_key=hmac_key, require_hmac=require_hmac)
    loaded, tokenizer = load_model(model)
    return GuardedModel(loaded, tokenizer, breaker, policy, incidents, name=str(model))
