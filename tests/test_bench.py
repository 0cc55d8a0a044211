"""`immunizer bench` on the tiny preset: the report.json contract, resume, seeds, the HTML report and
the per-sample file, and its bad inputs."""
import json

import pytest

from conftest import run_cli
from immunizer.errors import ImmunizerError
from immunizer.redteam import bench as bench_module
from immunizer.redteam.bench import aggregate, load_bench_config, run_bench

METRICS = ("harmful_score", "harmful_nll", "over_refusal", "benign_accuracy", "breaker_statistic", "tripped")


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    proc = run_cli("bench", "--preset", "tiny", "--out", str(out), "--methods", "none,immunizer,booster")
    return out, json.loads(proc.stdout), json.loads((out / "report.json").read_text())


def test_report_json_follows_the_contract(tiny_bench):
    out, printed, report = tiny_bench
    assert printed["report"] == str(out / "report.json") and report["complete"] is True
    assert set(report["methods"]) == {"none", "immunizer", "booster"}
    runs = set(report["attacks"])
    assert {"harmful-sft", "harmful-sft-lora", "harmful-mix", "benign-arithmetic"} <= runs
    for name, entry in report["methods"].items():
        assert "cost_seconds" in entry
        for key in ("harmful_score", "harmful_nll", "over_refusal", "benign_accuracy"):
            assert isinstance(entry["pre_attack"][key], float)
        for run in runs:
            assert set(METRICS) <= set(entry[run]), (name, run)
            assert isinstance(entry[run]["cost_seconds"], float) and entry[run]["cost_seconds"] > 0
    # `none` has no canaries; the trained methods are watched and judged against their calibrated threshold
    assert report["methods"]["none"]["harmful-sft"]["breaker_statistic"] is None
    assert report["methods"]["none"]["cost_seconds"] == 0
    for name in ("immunizer", "booster"):
        entry = report["methods"][name]
        assert entry["breaker"]["threshold_source"] == "calibrated" and entry["cost_seconds"] > 0
        for run in runs:
            statistic, threshold = entry[run]["breaker_statistic"], entry["breaker"]["threshold"]
            assert entry[run]["tripped"] == (statistic > threshold)
        attacks = [r for r in runs if report["attacks"][r]["kind"] == "attack"]
        assert entry["breaker"]["tpr"] == sum(entry[r]["tripped"] for r in attacks) / len(attacks)
        worst = max(attacks, key=lambda r: entry[r]["harmful_score"])
        assert entry["worst_case"]["harmful_score"] == entry[worst]["harmful_score"]
    assert report["judge"] and report["prompt_template"] and report["decoding"]["do_sample"] is False
    assert report["base_model_sha256"] == report["methods"]["none"]["model_sha256"]  # `none` is the base itself
    # the attacked models' weights are deleted once evaluated and scanned; the LoRA adapter stays
    assert not (out / "runs" / "immunizer" / "seed0" / "harmful-sft" / "model").exists()
    assert (out / "runs" / "immunizer" / "seed0" / "harmful-sft-lora" / "adapter").is_dir()


def test_html_report_and_samples(tiny_bench):
    out, _, report = tiny_bench
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "booster" in page and "harmful-sft" in page
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    per_eval = {}
    for s in samples:
        per_eval.setdefault((s["method"], s["attack"]), []).append(s)
    assert len(per_eval) == 3 * (1 + len(report["attacks"]))  # every eval of the matrix, labelled
    assert all(s["kind"] == "eval_sample" and s["seed"] == 0 for s in samples)
    assert {s["set"] for s in samples} == {"harmful", "safe", "benign"}


def test_bench_resumes_without_redoing_finished_work(tiny_bench, monkeypatch):
    out, _, report = tiny_bench

    def boom(*args, **kwargs):
        raise AssertionError("a finished piece was run again")
    monkeypatch.setattr(bench_module, "_evaluate", lambda model_dir, path, config: json.loads(path.read_text()))
    import immunizer.baselines as baselines
    import immunizer.redteam.attacks as attacks
    monkeypatch.setattr(attacks, "run_attack", boom)
    monkeypatch.setattr(attacks, "run_finetune", boom)
    monkeypatch.setattr(baselines, "build_method", boom)
    again = run_bench(out, "tiny", ["none", "immunizer", "booster"], progress=False)
    assert again["methods"]["booster"]["harmful-sft"] == report["methods"]["booster"]["harmful-sft"]


def test_an_interrupted_bench_continues_where_it_stopped(tmp_path, monkeypatch):
    import immunizer.redteam.attacks as attacks

    real, calls = attacks.run_finetune, []

    def dies(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(attacks, "run_finetune", dies)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tmp_path / "b", "tiny", ["none"], progress=False)
    done = {p.parent.name for p in (tmp_path / "b" / "runs" / "none" / "seed0").glob("*/eval.json")}
    assert done == {"harmful-sft", "harmful-sft-lora", "harmful-mix"}  # the attacks before the fine-tune finished
    monkeypatch.setattr(attacks, "run_finetune", real)
    ran = []
    monkeypatch.setattr(attacks, "run_attack", lambda *a, **k: ran.append(1))
    report = run_bench(tmp_path / "b", "tiny", ["none"], progress=False)
    assert not ran and report["methods"]["none"]["benign-arithmetic"]["benign_accuracy"] is not None


def test_seeds_give_intervals(tmp_path):
    report = run_bench(tmp_path / "s", "tiny", ["none"], seeds=2, progress=False,
                       overrides=["attacks={harmful-sft: {kind: attack, samples: 8, lr: 1.0e-3, epochs: 1, batch_size: 4}}"])
    entry = report["methods"]["none"]["harmful-sft"]
    assert report["seeds"] == [0, 1] and set(entry["ci95"]) >= {"harmful_score", "harmful_nll"}
    low, high = entry["ci95"]["harmful_nll"]
    assert low <= entry["harmful_nll"] <= high
    assert (tmp_path / "s" / "runs" / "none" / "seed1" / "harmful-sft" / "eval.json").is_file()


def test_aggregate_means_and_majority():
    out = aggregate([{"harmful_score": 0.2, "tripped": True, "n": 8}, {"harmful_score": 0.4, "tripped": True, "n": 8},
                     {"harmful_score": 0.6, "tripped": False, "n": 8}])
    assert out["harmful_score"] == pytest.approx(0.4) and out["tripped"] is True
    assert out["tripped_share"] == pytest.approx(2 / 3) and out["n"] == 8
    low, high = out["ci95"]["harmful_score"]
    assert low < 0.4 < high and high - 0.4 == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)


def test_grid_expands_to_named_attacks():
    config = load_bench_config("standard")
    names = [r.name for r in config.runs()]
    assert "grid-full-lr5e-05-ep3" in names and "grid-lora-lr0.0002-ep1" in names
    assert len([n for n in names if n.startswith("grid-")]) == 3 * (3 + 3)


def test_bad_bench_inputs(tmp_path):
    with pytest.raises(ImmunizerError, match="unknown bench preset"):
        load_bench_config("huge")
    with pytest.raises(ImmunizerError, match="unknown method 'rlhf'"):
        load_bench_config("tiny", overrides=["methods=[rlhf]"])
    with pytest.raises(ImmunizerError, match="unexpected keyword argument 'rate'"):
        load_bench_config("tiny", overrides=["attacks.harmful-sft.rate=1"])
    with pytest.raises(ImmunizerError, match="kind must be one of"):
        load_bench_config("tiny", overrides=["attacks.harmful-sft.kind=poison"])
    with pytest.raises(ImmunizerError, match="unknown bench config key"):
        load_bench_config("tiny", overrides=["speed=9"])
    proc = run_cli("bench", "--preset", "tiny", "--out", str(tmp_path / "x"), "--methods", "none,rlhf", check=False)
    assert proc.returncode == 2 and "unknown method" in proc.stderr
    run_bench(tmp_path / "y", "tiny", ["none"], progress=False, overrides=["eval.n_benign=2"])
    with pytest.raises(ImmunizerError, match="another configuration"):
        run_bench(tmp_path / "y", "tiny", ["none"], progress=False, overrides=["eval.n_benign=3"])


def test_set_replaces_the_value_at_its_path():
    config = load_bench_config("quick", overrides=["attacks={harmful-sft: {kind: attack}}",
                                                    "attacks.harmful-sft.lr=1e-4", "eval.n_benign=5"])
    assert list(config.attacks) == ["harmful-sft"] and config.attacks["harmful-sft"]["lr"] == 1e-4
    assert config.eval == {"n_benign": 5, "max_new_tokens": 32}  # a leaf set, its siblings kept
