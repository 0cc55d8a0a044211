"""Drift statistics on every kind of candidate: a live module, safetensors on disk (file and
directory), a PEFT LoRA adapter read without merging; and the bad inputs."""
import json

import pytest
import torch
from safetensors.torch import save_file

from immunizer.breaker.drift import DriftSums, drift_ratio, layer_of
from immunizer.breaker.reference import REFERENCE_FILE, SAMPLE_SHARE, load_reference, sample_indices, write_reference
from immunizer.breaker.sources import lora_delta_at, scan_module, scan_path
from immunizer.errors import ImmunizerError
from immunizer.manifest import load_manifest


def test_drift_sums_by_hand():
    """Canary deltas (3, 4) give RMS √((9+16)/2) = 3.536; other deltas (1, 1, 1, 1) give 1; ratio 3.536."""
    s = DriftSums()
    s.add(torch.tensor([3.0, 4.0]), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert s.canary_drift == pytest.approx(12.5 ** 0.5) and s.other_drift == pytest.approx(1.0)
    assert s.ratio == pytest.approx(12.5 ** 0.5) and s.canary_max == 4.0
    assert drift_ratio(0.0, 0.0) == 0.0 and drift_ratio(1e-3, 0.0) > 1e6


def test_layer_groups():
    assert layer_of("model.layers.11.mlp.up_proj.weight") == "layers.11"
    assert layer_of("model.embed_tokens.weight") == "embedding"
    assert layer_of("lm_head.weight") == "lm_head" and layer_of("model.norm.weight") == "other"


def test_sample_excludes_canaries_and_is_reproducible():
    canaries = torch.arange(0, 10_000, 7)
    a = sample_indices(10_000, canaries, 0.05, 0, "w")
    assert torch.equal(a, sample_indices(10_000, canaries, 0.05, 0, "w"))
    assert not torch.isin(a, canaries).any() and bool((a[1:] > a[:-1]).all()) and a.numel() == 500
    assert not torch.equal(a, sample_indices(10_000, canaries, 0.05, 0, "other-name"))


def test_unchanged_model_has_zero_drift(release):
    directory, model = release
    _, reference = load_reference(directory)
    for report in (scan_module(reference, model), scan_path(reference, directory / "model"), scan_path(reference, directory)):
        assert report.statistic == 0.0 and report.canary_drift == 0.0 and report.other_drift == 0.0
    assert set(report.layers) == {"embedding", "layers.0", "layers.1", "other"}


def test_canary_only_edit_vs_uniform_noise(release):
    directory, model = release
    _, reference = load_reference(directory)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, idx in reference.canary_index.items():
            params[name].view(-1)[idx] += 0.01
    edited = scan_module(reference, model)
    assert edited.canary_drift == pytest.approx(0.01, rel=1e-3) and edited.other_drift == 0.0 and edited.statistic > 1e6
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    noisy = scan_module(reference, model)  # the same noise everywhere: ratio near 1
    assert 0.8 < noisy.statistic < 1.25


def test_file_and_module_agree_and_the_file_is_streamed(release, tmp_path):
    directory, model = release
    _, reference = load_reference(directory)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "tuned")
    from_file = scan_path(reference, tmp_path / "tuned" / "model.safetensors")
    from_dir = scan_path(reference, tmp_path / "tuned")
    live = scan_module(reference, model)
    assert from_file.statistic == pytest.approx(live.statistic, rel=1e-6) == from_dir.statistic
    assert from_file.kind == "safetensors" and live.kind == "module"


def test_reference_is_written_into_the_manifest_and_verified(release):
    directory, _ = release
    load_reference(directory, write=True)
    meta = load_manifest(directory).meta
    assert meta["reference"]["file"] == REFERENCE_FILE and meta["reference"]["num_samples"] > 0
    data = (directory / REFERENCE_FILE).read_bytes()
    (directory / REFERENCE_FILE).write_bytes(data[:-10])
    with pytest.raises(ImmunizerError, match="does not match the sha256"):
        load_reference(directory)


def test_sample_harm_ratio_reads_the_sample_along_its_own_harmful_signs(release):
    """The sample's harmful signs survive the file round trip. Every sampled weight moved by 0.01 along its sign
    reads mean drift = RMS drift, so 1.0 (the canaries, unmoved, read 0); against its sign −1.0. A reference without
    the signs reads 0, which no `above` bound trips on; signs of the wrong length are refused."""
    directory, model = release
    _, reference = load_reference(directory, write=True)
    assert reference.sample_direction is None and scan_module(reference, model).value("sample_harm_ratio") == 0.0
    gen = torch.Generator().manual_seed(0)
    reference.sample_direction = {n: torch.where(torch.rand(i.numel(), generator=gen) < 0.5, -1.0, 1.0)
                                  for n, i in reference.sample_index.items() if i.numel()}
    write_reference(directory, reference, SAMPLE_SHARE, 0)
    _, reread = load_reference(directory)
    assert reread.sample_direction.keys() == reference.sample_direction.keys()
    assert all(torch.equal(reread.sample_direction[n], s) for n, s in reference.sample_direction.items())
    params = dict(model.named_parameters())
    for sign, expected in ((1.0, 1.0), (-2.0, -1.0)):  # the second edit leaves each weight 0.01 against its sign
        with torch.no_grad():
            for name, idx in reread.sample_index.items():
                params[name].view(-1)[idx] += sign * 0.01 * reread.sample_direction[name]
        report = scan_module(reread, model)
        assert report.value("sample_harm_ratio") == pytest.approx(expected, rel=1e-4)
        assert report.value("harm_drift_ratio") == 0.0
    name = next(iter(reference.sample_direction))
    reference.sample_direction[name] = reference.sample_direction[name][:-1]
    write_reference(directory, reference, SAMPLE_SHARE, 0)
    with pytest.raises(ImmunizerError, match="direction at the sample does not match"):
        load_reference(directory)


def _lora(model, rank=4, seed=0, **kwargs):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0, **kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():  # B starts at zero; give the adapter a real update
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def test_lora_delta_at_matches_the_dense_product():
    a, b = torch.randn(3, 7), torch.randn(5, 3)
    dense = 2.0 * b @ a
    idx = torch.tensor([0, 6, 7, 20, 34])
    assert torch.allclose(lora_delta_at(a, b, 2.0, idx, 7), dense.reshape(-1)[idx], atol=1e-6)
    assert torch.allclose(lora_delta_at(a, b, 2.0, idx, 5, transposed=True), dense.T.reshape(-1)[idx], atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_without_merging_equals_the_merged_model(release, tmp_path, rslora):
    directory, model = release
    _, reference = load_reference(directory)
    peft_model = _lora(model, use_rslora=rslora)
    live = scan_module(reference, peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = scan_path(reference, tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    full = scan_path(reference, tmp_path / "merged")
    assert adapter.kind == "lora" and live.kind == "lora-live"
    assert full.statistic > 0
    assert adapter.statistic == pytest.approx(full.statistic, rel=1e-4) == live.statistic
    assert adapter.canary_drift == pytest.approx(full.canary_drift, rel=1e-4)
    assert adapter.layers.keys() == full.layers.keys()


def test_bad_candidates_are_explained(release, tmp_path):
    directory, model = release
    _, reference = load_reference(directory)
    with pytest.raises(ImmunizerError, match="does not exist"):
        scan_path(reference, tmp_path / "nowhere")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = {k: v for k, v in state.items() if "layers.1." not in k}
    save_file(dropped, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ImmunizerError, match="missing .* canary parameters"):
        scan_path(reference, tmp_path / "partial.safetensors")
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4)}, str(tmp_path / "gpt2.safetensors"))
    with pytest.raises(ImmunizerError, match="wrong architecture"):
        scan_path(reference, tmp_path / "gpt2.safetensors")
    from immunizer.models.tiny import tiny_model

    tiny_model(hidden_size=32).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ImmunizerError, match="another shape"):
        scan_path(reference, tmp_path / "narrow")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ImmunizerError, match="not a readable safetensors"):
        scan_path(reference, tmp_path / "broken.safetensors")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ImmunizerError, match="not a .safetensors file"):
        scan_path(reference, tmp_path / "model.bin")


def test_bad_adapters_are_explained(release, tmp_path):
    directory, model = release
    _, reference = load_reference(directory)
    _lora(model, use_dora=True).save_pretrained(tmp_path / "dora")
    with pytest.raises(ImmunizerError, match="DoRA"):
        scan_path(reference, tmp_path / "dora")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ImmunizerError, match="'IA3' adapter"):
        scan_path(reference, tmp_path / "ia3")
    (tmp_path / "nofile").mkdir()
    (tmp_path / "nofile" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ImmunizerError, match="no adapter_model.safetensors"):
        scan_path(reference, tmp_path / "nofile")


def test_reference_from_a_separate_base(release, tmp_path):
    directory, model = release
    moved = tmp_path / "released-model"
    (directory / "model").rename(moved)
    with pytest.raises(ImmunizerError, match="no reference sample .* missing"):
        load_reference(directory)
    _, reference = load_reference(directory, base=moved)
    assert scan_module(reference, model).statistic == 0.0
    from immunizer.models.tiny import tiny_model

    tiny_model(seed=7).save_pretrained(tmp_path / "other")
    with pytest.raises(ImmunizerError, match="not the released model"):
        load_reference(directory, base=tmp_path / "other")
