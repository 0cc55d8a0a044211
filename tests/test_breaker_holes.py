"""The holes issue 15 found in the breaker, each tried the way an attacker or a careless operator would,
on a real tiny release and real files: non-finite weights, decoy files, hostile safetensors headers,
LoRA biases."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli
from immunizer.breaker.breaker import Breaker, BreakerTripped
from immunizer.breaker.guard import guard_optimizer
from immunizer.breaker.serving import GuardedModel
from immunizer.models.tiny import tiny_tokenizer


def _strict_json(text):
    """json.loads accepts bare NaN/Infinity; a consumer in another language would not."""
    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant} on stdout")
    return json.loads(text, parse_constant=refuse)


def _poison(weights, breaker, where):
    """Put one NaN into the first canary parameter: at a canary, or at a weight neither canary nor sampled."""
    name = next(n for n, i in breaker.reference.canary_index.items() if i.numel())
    flat = weights[name].view(-1)
    if where == "canary":
        flat[breaker.reference.canary_index[name][0]] = float("nan")
    else:
        seen = torch.cat([breaker.reference.canary_index[name], breaker.reference.sample_index[name]])
        unseen = next(i for i in range(flat.numel()) if i not in set(seen.tolist()))
        flat[unseen] = float("inf")
    return name


@pytest.mark.parametrize("where", ["canary", "unsampled"])
def test_non_finite_weights_trip_scan_with_valid_json(release, tmp_path, where):
    directory, _ = release
    breaker = Breaker(directory, threshold=3.0)
    weights = load_file(str(directory / "model" / "model.safetensors"))
    _poison(weights, breaker, where)
    save_file(weights, str(tmp_path / "poisoned.safetensors"))
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(tmp_path / "poisoned.safetensors"),
                   "--threshold", "3.0", "--no-incident", check=False)
    assert proc.returncode == 3, proc.stderr
    verdict = _strict_json(proc.stdout)
    assert verdict["tripped"] and verdict["non_finite_weights"] == 1
    assert any("NaN or infinite" in r for r in verdict["reasons"])
    assert all(isinstance(verdict[k], float) for k in ("statistic", "canary_drift", "other_drift"))


def test_non_finite_weights_trip_serving_even_after_restore(release, tmp_path):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    with torch.no_grad():
        _poison(dict(model.named_parameters()), breaker, "unsampled")
    guarded = GuardedModel(model, tiny_tokenizer(), breaker, "restore", tmp_path / "inc.jsonl")
    assert guarded.verdict.tripped and guarded.refusing  # restoring canaries cannot repair a NaN elsewhere
    with pytest.raises(BreakerTripped, match="NaN or infinite"):
        GuardedModel(model, tiny_tokenizer(), breaker, "raise", tmp_path / "inc.jsonl")
    records = [json.loads(line) for line in (tmp_path / "inc.jsonl").read_text().splitlines()]
    assert [r["severity"] for r in records] == ["high", "high"] and records[0]["non_finite_weights"] == 1


def test_the_guard_never_keeps_non_finite_weights_as_its_rollback_point(release, tmp_path):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = guard_optimizer(optimizer, model, breaker, every=2, incidents=tmp_path / "inc.jsonl")
    with pytest.raises(BreakerTripped, match="NaN or infinite"):
        for step in range(1, 10):
            model.zero_grad()
            model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
            if step == 3:  # a diverged step: the loss blew up
                with torch.no_grad():
                    _poison(dict(model.named_parameters()), breaker, "unsampled")
            optimizer.step()
    assert step == 4 and guard.clean_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # rolled back to the finite step-2 weights
    assert not breaker.scan(model).tripped


def _attacked(directory, tmp_path, breaker):
    """A copy of the released model with every canary pushed along +1: trips at threshold 3."""
    out = tmp_path / "attacked"
    out.mkdir()
    for f in (directory / "model").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(out / "model.safetensors"))
    for name, idx in breaker.reference.canary_index.items():
        weights[name].view(-1)[idx] += 0.05
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_decoy_weight_files_are_refused_not_averaged_in(release, tmp_path):
    directory, _ = release
    breaker = Breaker(directory, threshold=3.0)
    attacked = _attacked(directory, tmp_path, breaker)
    verdict = breaker.scan(attacked)
    assert verdict.tripped and verdict.report.files == [str(attacked / "model.safetensors")]
    for i in range(8):  # copies of the released weights beside the attacked ones
        (attacked / f"decoy-{i}.safetensors").write_bytes((directory / "model" / "model.safetensors").read_bytes())
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(attacked), "--threshold", "3", check=False)
    assert proc.returncode == 2 and "does not load: decoy-0.safetensors" in proc.stderr
    proc = run_cli("verify", "--manifest", str(directory), "--model", str(attacked), check=False)
    assert proc.returncode == 2 and "decoy-0.safetensors" in proc.stderr
    # the one file scanned on its own is still judged by what it holds
    assert breaker.scan(attacked / "model.safetensors").tripped


def test_shards_are_read_through_their_index_and_duplicates_refused(release, tmp_path):
    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    verdict = breaker.scan(tmp_path / "sharded")
    assert not verdict.tripped and verdict.report.files == [str(s) for s in shards]
    # a shard that also holds (another value of) a tensor of another shard
    first = load_file(str(shards[0]))
    name = next(iter(load_file(str(shards[1]))))
    save_file({**first, name: load_file(str(shards[1]))[name] + 1}, str(shards[0]), metadata={"format": "pt"})
    with pytest.raises(Exception, match=f"tensor {name} is in both"):
        breaker.scan(tmp_path / "sharded")


def test_a_directory_with_an_adapter_and_full_weights_is_refused(release, tmp_path):
    from peft import LoraConfig, get_peft_model

    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "mixed")
    (tmp_path / "mixed" / "model.safetensors").write_bytes(_attacked(directory, tmp_path, breaker).joinpath("model.safetensors").read_bytes())
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(tmp_path / "mixed"), "--threshold", "3", check=False)
    assert proc.returncode == 2 and "an adapter and other weight files (model.safetensors)" in proc.stderr


def _rewrite_header(source, target, edit, length=None):
    """Copy a .safetensors file with its JSON header changed by `edit(header)` (and its length field, if given)."""
    raw = source.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    text = edit(header) if callable(edit) else edit
    text = text if isinstance(text, str) else json.dumps(header)
    body = text.encode()
    target.write_bytes((length if length is not None else len(body)).to_bytes(8, "little") + body + raw[8 + size:])
    return target


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _second_tensor(header):
    return [k for k in header if k != "__metadata__"][1]


HOSTILE = {
    "negative offset": (lambda h: h[_first_tensor(h)].update(data_offsets=[-8, h[_first_tensor(h)]["data_offsets"][1] - 8]), "lie outside"),
    "offset past the end": (lambda h: h[_first_tensor(h)].update(data_offsets=[10**12, 10**12 + h[_first_tensor(h)]["data_offsets"][1] - h[_first_tensor(h)]["data_offsets"][0]]), "lie outside"),
    "overlap": (lambda h: h[_second_tensor(h)].update(data_offsets=[h[_first_tensor(h)]["data_offsets"][0], h[_first_tensor(h)]["data_offsets"][0] + h[_second_tensor(h)]["data_offsets"][1] - h[_second_tensor(h)]["data_offsets"][0]]), "overlap"),
    "shape too big for its bytes": (lambda h: h[_first_tensor(h)].update(shape=[10**9, 10**9]), "cannot hold"),
    "dtype of another width": (lambda h: h[_first_tensor(h)].update(dtype="F64"), "cannot hold"),
    "negative shape": (lambda h: h[_first_tensor(h)].update(shape=[-1]), "non-negative"),
    "unknown dtype": (lambda h: h[_first_tensor(h)].update(dtype="F8_E9"), "unsupported dtype"),
    "duplicate name": (lambda h: json.dumps(h)[:-1] + ", " + json.dumps({_first_tensor(h): h[_first_tensor(h)]})[1:], "listed twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_headers_are_refused_with_a_message(release, tmp_path, case):
    from immunizer.breaker.sources import scan_path
    from immunizer.errors import ImmunizerError

    directory, _ = release
    breaker = Breaker(directory, threshold=3.0)
    edit, message = HOSTILE[case]
    target = _rewrite_header(directory / "model" / "model.safetensors", tmp_path / "hostile.safetensors", edit)
    with pytest.raises(ImmunizerError, match=message):
        scan_path(breaker.reference, target)


def test_a_huge_header_length_is_refused_before_any_allocation(release, tmp_path):
    directory, _ = release
    target = _rewrite_header(directory / "model" / "model.safetensors", tmp_path / "huge.safetensors",
                             lambda h: None, length=2**62)
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(target), "--threshold", "3", check=False)
    assert proc.returncode == 2 and "header length 4611686018427387904" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_scan_and_breaker_require_a_verified_hmac_when_asked(release, tmp_path, monkeypatch):
    from immunizer.breaker.serving import load_guarded
    from immunizer.errors import ImmunizerError

    directory, _ = release  # an unsigned manifest
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(directory / "model"), "--threshold", "3",
                   "--require-hmac", check=False)
    assert proc.returncode == 2 and "carries no HMAC but one is required" in proc.stderr
    monkeypatch.setenv("IMMUNIZER_REQUIRE_HMAC", "1")
    with pytest.raises(ImmunizerError, match="carries no HMAC"):
        Breaker(directory, threshold=3.0)
    with pytest.raises(ImmunizerError, match="carries no HMAC"):
        load_guarded(directory / "model", directory, threshold=3.0)
    assert not Breaker(directory, threshold=3.0, require_hmac=False).scan(directory / "model").tripped
    (tmp_path / "empty.key").write_text("\n")
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(directory / "model"), "--threshold", "3",
                   "--hmac-key-file", str(tmp_path / "empty.key"), check=False)
    assert proc.returncode == 2 and "is empty" in proc.stderr


def test_calibrate_refuses_to_unsign_a_signed_manifest_before_any_work(release, monkeypatch):
    import importlib

    from immunizer.breaker.calibrate import load_calibration_config
    from immunizer.errors import ImmunizerError
    from immunizer.manifest import MANIFEST_FILE, seal

    calibration = importlib.import_module("immunizer.breaker.calibrate")
    directory, _ = release
    meta = json.loads((directory / MANIFEST_FILE).read_text())
    (directory / MANIFEST_FILE).write_text(json.dumps(seal(meta, "publisher-key")))
    monkeypatch.setattr(calibration, "sft", lambda *a, **k: pytest.fail("calibration ran before refusing"))
    with pytest.raises(ImmunizerError, match="is signed; re-sealing it without its key"):
        calibration.calibrate(directory, load_calibration_config("tiny"), teacher="tiny", progress=False)
    assert json.loads((directory / MANIFEST_FILE).read_text())["hmac"] and not (directory / "reference.safetensors").exists()


def _bias_only_adapter(model, path):
    """A LoRA adapter that trains only the biases of q_proj (lora_B.weight stays zero): ΔW = 0, Δbias ≠ 0."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                p.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    assert any(k.endswith("lora_B.bias") for k in load_file(str(path / "adapter_model.safetensors")))
    return peft_model


def test_a_bias_only_adapter_does_not_scan_as_zero(release, tmp_path):
    import warnings

    from immunizer.breaker.sources import scan_module

    directory, model = release  # the tiny Llama has no biases: the adapter's bias update is unwatchable
    breaker = Breaker(directory, threshold=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = _bias_only_adapter(model, tmp_path / "adapter")
    proc = run_cli("scan", "--manifest", str(directory), "--candidate", str(tmp_path / "adapter"), "--threshold", "3", check=False)
    assert proc.returncode == 2 and "trains a LoRA bias on" in proc.stderr, (proc.returncode, proc.stdout)
    with pytest.raises(Exception, match="trains a bias"):
        scan_module(breaker.reference, peft_model)


# PEFT's check for unsharded ZeRO-3 / FSDP saves takes any 1-D lora_B tensor for one; lora_B.bias is 1-D by design
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
def test_lora_biases_count_where_the_released_layer_has_a_bias(tmp_path):
    from transformers import LlamaForCausalLM

    from helpers import make_release
    from immunizer.breaker.reference import load_reference
    from immunizer.breaker.sources import scan_path
    from immunizer.models.tiny import tiny_model

    config = tiny_model().config
    config.attention_bias = True
    torch.manual_seed(0)
    make_release(tmp_path / "release", model=LlamaForCausalLM(config))
    _, reference = load_reference(tmp_path / "release")
    assert any(n.endswith("q_proj.bias") for n in reference.names)
    peft_model = _bias_only_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "release" / "model"), tmp_path / "adapter")
    adapter = scan_path(reference, tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = scan_path(reference, tmp_path / "merged")
    assert adapter.other_drift > 0 and adapter.other_drift == pytest.approx(merged.other_drift, rel=1e-5)
    assert adapter.canary_drift == pytest.approx(merged.canary_drift, rel=1e-5, abs=1e-9)


def test_the_sample_bound_sits_above_the_benign_readings_by_its_margin():
    """Benign sample_harm_ratio 0.01..0.08 (eight readings, target FPR 0.5 over five bounds = 0.1 each, so ⌊0.8⌋ = 0
    may pass: the highest, 0.08) gives a bound of 1.5 × 0.08 = 0.12: a benign run a little past the grid (0.09)
    passes, a harmful one (0.2) trips. Readings recorded before the statistic existed get no such bound."""
    from immunizer.breaker.bounds import choose_bounds

    benign = [{"harm_drift_ratio": 0.1, "canary_drift_ratio": 1.0, "moved_canary_drift_ratio": 1.0, "other_drift": 1.0,
               "sample_harm_ratio": 0.01 * (i + 1)} for i in range(8)]
    bounds = choose_bounds(benign, "harm_drift_ratio", 0.5)
    sample = [b for b in bounds if b.statistic == "sample_harm_ratio"]
    assert len(bounds) == 5 and len(sample) == 1 and sample[0].side == "above"
    assert sample[0].value == pytest.approx(0.12) and sample[0].fpr == 0.0
    reading = dict(benign[0], other_drift=2.0)
    assert not sample[0].violated(dict(reading, sample_harm_ratio=0.09))
    assert sample[0].violated(dict(reading, sample_harm_ratio=0.2))
    assert not sample[0].violated({k: v for k, v in reading.items() if k != "sample_harm_ratio"})
    older = [{k: v for k, v in r.items() if k != "sample_harm_ratio"} for r in benign]
    assert [b.statistic for b in choose_bounds(older, "harm_drift_ratio", 0.5)].count("sample_harm_ratio") == 0


def test_two_sided_bounds_by_hand():
    """Eight benign readings: harm ratio -0.2..0.5, canary ratio (and its moved-parameters variant) 1.0..1.7,
    other drift 1..8. Target FPR 0.5 over four bounds is 0.125 each: ⌊0.125·8⌋ = 1 reading may pass each
    bound, so each is the second-most extreme benign value (harm above 0.4, below -0.1; canary above 1.6,
    moved canary below 1.1), and a below-bound then moves out by half (harm below -0.15, moved canary below
    0.55); below-bounds apply once the other weights moved half the least benign drift (0.5)."""
    from immunizer.breaker.bounds import choose_bounds, rule_figures

    benign = [{"harm_drift_ratio": -0.2 + 0.1 * i, "canary_drift_ratio": 1.0 + 0.1 * i,
               "moved_canary_drift_ratio": 1.0 + 0.1 * i, "other_drift": 1.0 + i} for i in range(8)]
    bounds = choose_bounds(benign, "harm_drift_ratio", 0.5)
    got = {(b.statistic, b.side): round(b.value, 6) for b in bounds}
    assert got == {("harm_drift_ratio", "above"): 0.4, ("harm_drift_ratio", "below"): -0.15,
                   ("canary_drift_ratio", "above"): 1.6, ("moved_canary_drift_ratio", "below"): 0.55}
    assert bounds[0].statistic == "harm_drift_ratio" and bounds[0].side == "above"
    assert [b.fpr for b in bounds] == [0.125, 0.125, 0.125, 0.0]  # the lowest moved-canary reading (1.0) now passes
    assert all(b.min_other_drift == (0.5 if b.side == "below" else 0.0) for b in bounds)

    def trips(harm, canary, other, moved=None):
        reading = {"harm_drift_ratio": harm, "canary_drift_ratio": canary, "other_drift": other,
                   "moved_canary_drift_ratio": canary if moved is None else moved}
        return [f"{b.statistic} {b.side}" for b in bounds if b.violated(reading)]

    assert trips(0.0, 0.0, 0.0) == []  # the released model itself
    assert trips(0.0, 0.0, 3.0) == ["moved_canary_drift_ratio below"]  # frozen canaries
    assert trips(0.0, 0.0, 3.0, moved=1.3) == []  # LoRA: untouched parameters' canaries did not move, the rest did
    assert trips(-2.0, 1.3, 3.0) == ["harm_drift_ratio below"]  # pushed against the harmful direction
    assert trips(0.0, 0.9, 3.0) == []  # canaries moved a little less than any benign run's: within the margin
    assert trips(-0.12, 1.3, 3.0) == []  # under the benign quantile (-0.1) but within the margin
    assert trips(3.0, 3.0, 3.0) == ["harm_drift_ratio above", "canary_drift_ratio above"]
    records = [{"harmful": False, "readings": [dict(r, step=1)]} for r in benign] + \
              [{"harmful": True, "readings": [{"harm_drift_ratio": 1.0, "canary_drift_ratio": 1.3,
                                               "moved_canary_drift_ratio": 1.3, "other_drift": 2.0, "step": 1}]}]
    figures = rule_figures(records, bounds, bootstrap=10, seed=0)
    # the statistics move together here: the bounds trip on the same two benign readings
    assert figures["tpr"] == 1.0 and figures["fpr"] == 0.25 and figures["fpr_by_step"] == {"1": 0.25}


def test_frozen_canaries_read_zero_on_moved_parameters_only(release):
    from immunizer.breaker.sources import scan_module

    directory, model = release
    breaker = Breaker(directory, threshold=3.0)
    params = dict(model.named_parameters())
    torch.manual_seed(0)
    with torch.no_grad():  # a fine-tune of the attention weights only, every canary there held still
        for name, p in params.items():
            if "self_attn" in name:
                idx = breaker.reference.canary_index[name]
                kept = p.view(-1)[idx].clone()
                p.add_(torch.randn_like(p) * 0.01)
                p.view(-1)[idx] = kept
    report = scan_module(breaker.reference, model)
    assert report.overall.ratio == 0.0 and report.overall.moved_ratio == 0.0 and report.other_drift > 0
    with torch.no_grad():  # the same parameters with their canaries moving like the rest: ratio ~1
        for name, p in params.items():
            if "self_attn" in name:
                p.view(-1)[breaker.reference.canary_index[name]] += torch.randn(breaker.reference.canary_index[name].numel()) * 0.01
    report = scan_module(breaker.reference, model)
    assert 0.8 < report.overall.moved_ratio < 1.25 and report.overall.ratio < report.overall.moved_ratio


def test_restore_no_longer_serves_an_attacked_model_and_released_serves_the_release(release, tmp_path):
    from immunizer.manifest import update_manifest

    directory, model = release
    update_manifest(directory, {"breaker": {"threshold": 3.0, "statistic": "canary_drift_ratio", "bounds": [
        {"statistic": "canary_drift_ratio", "side": "below", "value": 0.5, "min_other_drift": 1e-4}]}})
    breaker = Breaker(directory)  # calibrated: the primary bound and a lower bound on canary drift
    released = {n: p.clone() for n, p in model.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():  # a fine-tune: every weight moved, the canaries most
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, idx in breaker.reference.canary_index.items():
            dict(model.named_parameters())[name].view(-1)[idx] += 0.1
    incidents = tmp_path / "inc.jsonl"
    guarded = GuardedModel(model, tiny_tokenizer(), breaker, "restore", incidents)
    assert guarded.verdict.tripped and guarded.restored and guarded.refusing  # canaries still, the rest moved: trips
    assert json.loads(incidents.read_text().splitlines()[-1])["tripped_after_restore"] is True
    guarded = GuardedModel(model, tiny_tokenizer(), breaker, "released", incidents)
    assert not guarded.refusing and guarded.model is not model
    assert all(torch.equal(guarded.model.state_dict()[n], released[n]) for n in released)
    assert isinstance(guarded.chat("What is 2 + 2?", max_new_tokens=4), str)
    assert json.loads(incidents.read_text().splitlines()[-1])["action"] == "released"


def test_count_non_finite_by_hand():
    """A sum overflowing to inf (4 × 3e38 in fp32) is not a non-finite weight; +inf and -inf summing to NaN are two."""
    from immunizer.breaker.sources import count_non_finite

    assert count_non_finite(torch.full((4,), 3e38)) == 0
    assert count_non_finite(torch.tensor([1.0, float("inf"), float("-inf")]), torch.tensor([float("nan")])) == 3
    assert count_non_finite(torch.ones(3, dtype=torch.bfloat16)) == 0


def test_unreadable_bounds_in_a_manifest_are_a_message():
    from immunizer.breaker.bounds import bounds_from_calibration
    from immunizer.errors import ImmunizerError

    for calibration in ({"threshold": "high"}, {"threshold": 1.0, "bounds": ["junk"]},
                        {"threshold": 1.0, "bounds": [{"statistic": "harm_drift_ratio", "side": "sideways", "value": 1}]},
                        {"threshold": float("nan")}):
        with pytest.raises(ImmunizerError):
            bounds_from_calibration(calibration)


def test_the_reader_maps_tensors_without_ever_writing_the_file(tmp_path):
    """Tensors come as views of the mapped file: exact values and dtypes (an empty tensor too), still valid after
    the reader is done, and writing to one changes this process's copy only, never the file."""
    from immunizer.breaker.safetensors_reader import safetensors_tensors

    path = tmp_path / "w.safetensors"
    saved = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
             "empty": torch.zeros(0, 4)}
    save_file(saved, path)
    before = path.read_bytes()
    read = dict(safetensors_tensors(path))
    assert set(read) == set(saved)
    for name, tensor in saved.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
    read["a"].add_(100)
    assert path.read_bytes() == before and torch.equal(load_file(path)["a"], saved["a"])
    assert dict(safetensors_tensors(path, {"a"}))["a"][0, 0] == 0  # a new read sees the file, not the write


def test_a_file_truncated_after_its_header_was_checked_is_refused(tmp_path, monkeypatch):
    """The header is checked against the file's size, then the file is mapped: a file that shrank in between would
    fault (SIGBUS) when its missing pages are touched. The reader compares the mapping with the header first."""
    from immunizer.breaker import safetensors_reader
    from immunizer.errors import ImmunizerError

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4096), "b": torch.ones(4096)}, path)
    checked = safetensors_reader.read_header

    def header_then_truncate(f):
        result = checked(f)
        with open(f, "r+b") as handle:
            handle.truncate(path.stat().st_size - 8192)
        return result

    monkeypatch.setattr(safetensors_reader, "read_header", header_then_truncate)
    with pytest.raises(ImmunizerError, match="truncated while being read"):
        list(safetensors_reader.safetensors_tensors(path))
