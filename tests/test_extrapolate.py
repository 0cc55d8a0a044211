"""Low-rank extrapolation (LoX): the formula on matrices whose answer is known, then on tiny releases through
the API, the CLI and immunize's last stage, and the inputs it refuses."""
import json

import pytest
import torch

from immunizer import immunize, load_config, load_manifest
from immunizer.baselines import extrapolation_parent, method_config, method_names
from immunizer.config import ExtrapolateConfig, ImmunizeConfig
from immunizer.errors import ImmunizerError
from immunizer.extrapolate import extrapolate_, extrapolate_release, low_rank, retuned_alpha
from immunizer.models import load_model

from helpers import make_release, run_cli


def test_low_rank_keeps_the_top_singular_directions():
    """A = 3·u1v1ᵀ + 1·u2v2ᵀ (orthonormal u, v): rank 2 is A itself; rank 1 drops exactly 1·u2v2ᵀ, whose
    Frobenius norm is the second singular value, 1 (Eckart–Young)."""
    u, _ = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(1)))
    a = 3 * torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, 1], v[:, 1])
    assert torch.allclose(low_rank(a, 2), a, atol=1e-5)
    assert torch.allclose(low_rank(a, 0), a) and torch.allclose(low_rank(a, 9), a)
    assert float((a - low_rank(a, 1)).norm()) == pytest.approx(1.0, abs=1e-5)


def test_extrapolation_moves_matching_layer_weights_away_from_the_base_and_nothing_else():
    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 2), "model.embed_tokens.weight": torch.zeros(5, 2),
            "model.layers.0.input_layernorm.weight": torch.ones(2)}
    aligned = {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 2), "model.embed_tokens.weight": torch.ones(5, 2),
               "model.layers.0.input_layernorm.weight": 2 * torch.ones(2)}
    changed = extrapolate_(aligned, base, ExtrapolateConfig(rank=0, alpha=0.5))
    assert torch.allclose(aligned["model.layers.0.mlp.up_proj.weight"], torch.full((3, 2), 1.5))  # W + α(W − W_b)
    assert torch.equal(aligned["model.embed_tokens.weight"], torch.ones(5, 2))  # outside the layers
    assert torch.equal(aligned["model.layers.0.input_layernorm.weight"], 2 * torch.ones(2))  # not 2-D
    assert list(changed) == ["model.layers.0.mlp.up_proj.weight"]
    assert changed["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.5 / 1.5)


@pytest.mark.parametrize("rank", [0, 2])
def test_an_extrapolation_can_be_retuned_or_undone_without_its_source(rank):
    """Extrapolating with α = 1.25 and then with retuned_alpha(1.25, t) lands where extrapolating the source
    with t would have (t = 0: the source itself), for a truncated and a whole update."""
    generator = torch.Generator().manual_seed(3)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = {name: torch.randn(8, 6, generator=generator, dtype=torch.float64)}
    source = {name: base[name] + 0.1 * torch.randn(8, 6, generator=generator, dtype=torch.float64)}
    released = {name: source[name].clone()}
    extrapolate_(released, base, ExtrapolateConfig(rank=rank, alpha=1.25))
    for target in (0.0, 0.5, 2.0):
        direct = {name: source[name].clone()}
        if target:
            extrapolate_(direct, base, ExtrapolateConfig(rank=rank, alpha=target))
        retuned = {name: released[name].clone()}
        extrapolate_(retuned, base, ExtrapolateConfig(rank=rank, alpha=retuned_alpha(1.25, target)))
        assert torch.allclose(retuned[name], direct[name], atol=1e-10)
    with pytest.raises(ImmunizerError, match="negative α cannot be re-tuned exactly"):
        retuned_alpha(-0.5, 0.5)


def test_a_base_without_the_weight_is_refused():
    with pytest.raises(ImmunizerError, match="the base model has no weight of shape"):
        extrapolate_({"model.layers.0.q.weight": torch.ones(2, 2)}, {"model.layers.0.q.weight": torch.ones(3, 2)},
                     ExtrapolateConfig(alpha=1.0))


def test_extrapolate_release_writes_a_new_release_with_fresh_canary_values(tmp_path):
    from immunizer.manifest import update_manifest

    make_release(tmp_path / "release", seed=1)  # tiny weights of seed 1; the `tiny` base is seed 0
    update_manifest(tmp_path / "release", {"breaker": {"threshold": 0.2}, "reference": {"sha256": "x"},
                                           "method": "sft", "data_sha256": "d" * 64})
    meta = extrapolate_release(tmp_path / "release", tmp_path / "lox", ExtrapolateConfig(rank=2, alpha=1.0), base="tiny")
    manifest = load_manifest(tmp_path / "lox")
    model, _ = load_model(tmp_path / "lox" / "model")
    weights = dict(model.named_parameters())
    for name, idx in manifest.indices.items():
        assert torch.equal(weights[name].detach().reshape(-1)[idx].float(), manifest.values[name])
    old = dict(load_model(tmp_path / "release" / "model")[0].named_parameters())
    name = next(n for n in weights if ".layers.0." in n and weights[n].ndim == 2)
    assert not torch.equal(weights[name], old[name])
    assert torch.equal(weights["model.embed_tokens.weight"], old["model.embed_tokens.weight"])
    assert meta["extrapolation"]["rank"] == 2 and meta["extrapolation"]["base_model"] == "tiny"
    assert meta["extrapolation"]["weights"] > 0
    assert "breaker" not in meta and "reference" not in meta  # calibrations of the old weights are dropped
    assert meta["method"] == "sft+lox" and meta["data_sha256"] == "d" * 64 and meta["base_model"] == "tiny"


def test_extrapolate_release_refuses_what_it_cannot_do_well(tmp_path, monkeypatch):
    make_release(tmp_path / "release", seed=1)
    with pytest.raises(ImmunizerError, match="names no base model; pass --base"):
        extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=1.0))
    with pytest.raises(ImmunizerError, match="--alpha is 0"):
        extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=0.0), base="tiny")
    with pytest.raises(ImmunizerError, match="is the release itself"):
        extrapolate_release(tmp_path / "release", tmp_path / "release", ExtrapolateConfig(alpha=1.0), base="tiny")
    with pytest.raises(ImmunizerError, match="extrapolate.rank must be >= 0"):
        extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=1.0, rank=-1), base="tiny")
    from immunizer.manifest import update_manifest
    from immunizer.models import model_dir_sha256, resolve_model
    update_manifest(tmp_path / "release", {"base_model_sha256": "0" * 64})
    with pytest.raises(ImmunizerError, match="is not the model .* was trained from"):
        extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=1.0), base="tiny")
    update_manifest(tmp_path / "release", {"base_model_sha256": model_dir_sha256(resolve_model("tiny"))})
    with pytest.raises(ImmunizerError, match="matches no 2-D weight|no 2-D weight matches"):
        extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=1.0, include="nothing$"),
                            base="tiny")
    from immunizer.manifest import seal
    meta_path = tmp_path / "release" / "manifest.json"
    meta_path.write_text(json.dumps(seal(json.loads(meta_path.read_text()), b"k3y")))  # the publisher signs it
    with pytest.raises(ImmunizerError, match="is signed; pass its key"):
        extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=1.0), base="tiny")
    meta = extrapolate_release(tmp_path / "release", tmp_path / "out", ExtrapolateConfig(alpha=1.0), base="tiny",
                               hmac_key=b"k3y")
    assert "hmac" in meta and load_manifest(tmp_path / "out", hmac_key=b"k3y", require_hmac=True)


def test_extrapolate_command(tmp_path):
    make_release(tmp_path / "release", seed=1)
    proc = run_cli("extrapolate", "--release", str(tmp_path / "release"), "--out", str(tmp_path / "lox"),
                   "--base", "tiny", "--rank", "3", "--alpha", "0.5")
    summary = json.loads(proc.stdout)
    assert summary["rank"] == 3 and summary["alpha"] == 0.5 and (tmp_path / "lox" / "model").is_dir()
    run_cli("verify", "--manifest", str(tmp_path / "lox"))
    bad = run_cli("extrapolate", "--release", str(tmp_path / "release"), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "pass --base" in bad.stderr
    # re-tuned back to α 0: the source's weights again, recorded as such
    proc = run_cli("extrapolate", "--release", str(tmp_path / "lox"), "--out", str(tmp_path / "undone"),
                   "--base", "tiny", "--rank", "3", "--from-alpha", "0.5", "--alpha", "0")
    summary = json.loads(proc.stdout)
    assert summary["alpha"] == 0 and summary["retuned_from_alpha"] == 0.5 and summary["step_alpha"] == pytest.approx(-1 / 3)
    source = dict(load_model(tmp_path / "release" / "model")[0].named_parameters())
    undone = dict(load_model(tmp_path / "undone" / "model")[0].named_parameters())
    assert all(torch.allclose(undone[n], source[n], atol=1e-5) for n in source)
    assert load_manifest(tmp_path / "undone").meta["method"] == load_manifest(tmp_path / "release").meta.get("method", "release")
    bad = run_cli("extrapolate", "--release", str(tmp_path / "lox"), "--out", str(tmp_path / "x"), "--base", "tiny",
                  "--from-alpha", "0.5", "--alpha", "0.5", check=False)
    assert bad.returncode == 2 and "already that extrapolation" in bad.stderr
    bad = run_cli("extrapolate", "--release", str(tmp_path / "release"), "--out", str(tmp_path / "x"), "--base", "tiny",
                  "--include", "(unclosed", check=False)
    assert bad.returncode == 2 and "not a regular expression" in bad.stderr


def test_immunize_extrapolates_last_and_reads_the_canaries_after(tmp_path):
    plain = immunize("tiny", tmp_path / "plain", load_config("tiny", overrides=["cycles=1"]), progress=False)
    config = load_config("tiny", overrides=["cycles=1", "extrapolate.alpha=1.0", "extrapolate.rank=2"])
    result = immunize("tiny", tmp_path / "run", config, progress=False)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage = [e for e in events if e.get("event") == "extrapolated"]
    assert len(stage) == 1 and stage[0]["weights"] > 0
    manifest = load_manifest(tmp_path / "run")
    weights = dict(load_model(result.model_dir)[0].named_parameters())
    for name, idx in manifest.indices.items():
        assert torch.equal(weights[name].detach().reshape(-1)[idx].float(), manifest.values[name])
    # the same training without the stage, extrapolated by hand, is what was saved
    trained = dict(load_model(plain.model_dir)[0].named_parameters())
    base = dict(load_model("tiny")[0].named_parameters())
    extrapolate_(trained, base, config.extrapolate)
    assert all(torch.allclose(trained[n], weights[n], atol=1e-6) for n in weights)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], dict(load_model(plain.model_dir)[0].named_parameters())["model.layers.0.mlp.up_proj.weight"])


def test_lox_is_sft_plus_extrapolation():
    assert "lox" in method_names()
    lox, sft = method_config("lox", ImmunizeConfig()), method_config("sft", ImmunizeConfig())
    assert lox.extrapolate.alpha > 0 and sft.extrapolate.alpha == 0
    assert lox.phase1 == sft.phase1 and lox.phase2 == sft.phase2


def test_immunizer_lox_is_the_preset_plus_extrapolation():
    """`extends: immunizer` is the preset itself: the derived method differs from immunizer only in its last stage,
    so the bench extrapolates immunizer's build instead of training again."""
    assert "immunizer-lox" in method_names() and extrapolation_parent("immunizer-lox") == "immunizer"
    derived, preset = method_config("immunizer-lox", ImmunizeConfig()), method_config("immunizer", ImmunizeConfig())
    assert 0 < derived.extrapolate.alpha < 1.25 and preset.extrapolate.alpha == 0
    derived.extrapolate = preset.extrapolate
    assert derived == preset


def test_a_config_file_may_extend_a_method(tmp_path):
    lox = load_config("tiny", tmp_path / "lox.yaml") if (tmp_path / "lox.yaml").write_text("extends: lox\n") else None
    assert lox.extrapolate.alpha > 0 and lox.phase1.adversary == "none"  # lox's own file, and sft's under it
    (tmp_path / "loop.yaml").write_text("extends: nothing\n")
    with pytest.raises(ImmunizerError, match="names no method file; choose immunizer or one of .*lox.*sft"):
        load_config("tiny", tmp_path / "loop.yaml")


def test_bad_extrapolation_settings_are_named():
    with pytest.raises(ImmunizerError, match="extrapolate.rank must be >= 0"):
        load_config("tiny", overrides=["extrapolate.rank=-1"])
    with pytest.raises(ImmunizerError, match="extrapolate.include is not a regular expression"):
        load_config("tiny", overrides=["extrapolate.include=(unclosed"])
