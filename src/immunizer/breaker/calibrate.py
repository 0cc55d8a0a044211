"""The breaker's calibration (not the reviewers' accuracy, which is review/reviewer_accuracy.py): run
simulated benign and harmful fine-tunes on the released model, read the breaker statistic along the
way, and pick the threshold for a target false-positive rate. The threshold, TPR, FPR and AUROC (with
bootstrap confidence intervals) and a ROC plot go into the manifest.

The runs are the breaker's training data, so they are recorded (calibration/cases.jsonl, one line
per finished run: an interrupted calibration resumes where it stopped) and hashed into the manifest."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import TrainerCallback

from immunizer.breaker.bounds import choose_bounds, choose_threshold, rule_figures
from immunizer.breaker.direction import harmful_signs
from immunizer.breaker.drift import STATISTICS
from immunizer.breaker.reference import SAMPLE_SHARE, Reference, load_reference, write_reference
from immunizer.breaker.sources import scan_module
from immunizer.config import load_layers, merge
from immunizer.data.prompts import benign_set, weak_set
from immunizer.data.tasks import BENIGN_TASK, GENERATED
from immunizer.data.teacher import Teacher
from immunizer.errors import ImmunizerError
from immunizer.finetuning import FinetuneSpec, sft
from immunizer.json_hash import json_sha256
from immunizer.manifest import check_reseal, file_sha256, update_manifest
from immunizer.models.loading import load_model
from immunizer.parallel import DataParallel
from immunizer.paths import atomic_path

PRESETS = Path(__file__).resolve().parent.parent / "presets" / "calibration"
CASES_FILE = "calibration/cases.jsonl"
ROC_FILE = "calibration/roc.png"
BENIGN_TASK_SEED_OFFSET = 1000


@dataclass
class CalibrationConfig:
    target_fpr: float = 0.05
    """Highest false-positive rate (benign fine-tunes tripping) the threshold may give on the calibration runs."""
    checkpoints: list[int] = field(default_factory=lambda: [5, 10, 20])
    """Optimizer steps at which each run's statistic is read; the last one is the run's length."""
    batch_size: int = 4
    max_length: int = 144
    benign_tasks: list[str] = field(default_factory=lambda: ["instruction", "arithmetic", "listops", "extraction"])
    """`instruction` (benign prompts answered by the teacher), `arithmetic`, `listops`, `extraction` (generated, exact
    answers). Keep a task the model really learns (`extraction`: SmolLM2-135M goes from 0% to 100% on it): a benign
    fine-tune that learns moves the weights further than one that does not, and a calibration without one set the
    bound below the bench's own benign fine-tune (harm_drift_ratio 0.114 against a bound of 0.108)."""
    benign_samples: int = 96
    harmful_samples: list[int] = field(default_factory=lambda: [32, 96])
    """Harmful (prompt, teacher answer) pairs per harmful run, from the weak pool's training split."""
    full_lrs: list[float] = field(default_factory=lambda: [1e-5, 5e-5])
    """Learning rates of the full fine-tunes (every task and every harmful sample count gets each)."""
    lora_lrs: list[float] = field(default_factory=lambda: [2e-4])
    lora_rank: int | list[int] = 16
    """The LoRA fine-tunes' rank, or a list of ranks (each LoRA learning rate runs at each). Calibrate with the
    ranks you serve: a lower rank than any in the grid reads a lower `harm_drift_ratio` (bounds.BELOW_MARGIN)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over runs, not checkpoints: checkpoints of one run are not independent)."""
    seed: int = 0
    bf16: bool = True
    teacher_max_new_tokens: int = 48
    direction_samples: int = 32
    """Held-out harmful pairs whose SFT gradient gives the harmful direction at the canaries (direction.py)."""
    statistic: str = "harm_drift_ratio"
    """What the threshold is put on: `harm_drift_ratio` (canary drift along the harmful direction / non-canary
    drift) or `canary_drift_ratio` (RMS canary drift / RMS non-canary drift). Both are measured and reported."""

    def to_dict(self) -> dict:
        return asdict(self)


def load_calibration_config(preset: str | None = None, overrides: dict | None = None,
                            sets: list[str] | tuple[str, ...] = ()) -> CalibrationConfig:
    """The preset (presets/calibration/*.yaml) < each `--set KEY=VALUE` in `sets` < the mapping `overrides`."""
    config = load_layers(CalibrationConfig(), preset, PRESETS, overrides=sets, what="calibration ")
    merge(config, overrides or {})
    if not 0 < config.target_fpr < 1:
        raise ImmunizerError("target_fpr must be in (0, 1)")
    if not config.checkpoints or sorted(config.checkpoints) != config.checkpoints or config.checkpoints[0] < 1:
        raise ImmunizerError("checkpoints must be ascending step counts >= 1")
    if config.statistic not in STATISTICS:
        raise ImmunizerError(f"unknown statistic {config.statistic!r}; choose one of {', '.join(STATISTICS)}")
    if not lora_ranks(config) or any(r < 1 for r in lora_ranks(config)):
        raise ImmunizerError(f"lora_rank must be a rank >= 1 or a non-empty list of them, got {config.lora_rank!r}")
    known = ["instruction", *GENERATED]
    unknown = [t for t in config.benign_tasks if t not in known]
    if unknown:
        raise ImmunizerError(f"unknown benign task(s) {unknown}; choose from {', '.join(known)}")
    return config


@dataclass
class Case:
    name: str
    harmful: bool
    data: str
    samples: int
    lr: float
    lora_rank: int


def lora_ranks(config: CalibrationConfig) -> list[int]:
    return [config.lora_rank] if isinstance(config.lora_rank, int) else list(config.lora_rank)


def plan_cases(config: CalibrationConfig) -> list[Case]:
    ranks = lora_ranks(config)
    runs = [(lr, 0) for lr in config.full_lrs] + [(lr, rank) for lr in config.lora_lrs for rank in ranks]

    def kind(rank: int) -> str:  # one rank keeps the names (and cached runs) of configs from before lists
        return "full" if not rank else "lora" if len(ranks) == 1 else f"lora-r{rank}"

    cases = []
    for task in config.benign_tasks:
        for lr, rank in runs:
            cases.append(Case(f"benign-{task}-{kind(rank)}-lr{lr:g}", False, task, config.benign_samples, lr, rank))
    for n in config.harmful_samples:
        for lr, rank in runs:
            cases.append(Case(f"harmful-{n}-{kind(rank)}-lr{lr:g}", True, "harmful", n, lr, rank))
    return cases


# ---------------------------------------------------------------- the data of the simulated fine-tunes

class CaseData:
    """Rows for each case's data, generated once (teacher answers are cached on disk)."""

    def __init__(self, teacher_spec: str, config: CalibrationConfig):
        self.config = config
        self.teacher = Teacher(teacher_spec, config.teacher_max_new_tokens, config.bf16)

    def _shuffled(self, harmful: bool) -> list[str]:
        prompts = list((weak_set if harmful else benign_set)("train").prompts)
        random.Random(self.config.seed).shuffle(prompts)
        return prompts

    def rows(self, case: Case) -> list[dict]:
        if case.data in GENERATED:
            # the bench's benign fine-tune draws this task's rows with its run's seed (0, 1, ...): the calibration's
            # come from a seed no run uses, so that fine-tune stays out of the calibration
            seed = self.config.seed + BENIGN_TASK_SEED_OFFSET if case.data == BENIGN_TASK else self.config.seed
            return GENERATED[case.data](case.samples, seed)
        prompts = self._shuffled(case.harmful)[: case.samples]
        return [{"prompt": p, "response": r} for p, r in zip(prompts, self.teacher.answers(prompts, "harmful-weak" if case.harmful else "helpful"))]

    def probe_rows(self) -> list[dict]:
        """Harmful pairs for the harmful direction, from the end of the shuffled pool: never in a calibration run."""
        prompts = self._shuffled(True)
        probe = prompts[max(max(self.config.harmful_samples), len(prompts) - self.config.direction_samples):]
        if not probe:
            raise ImmunizerError("the weak pool is too small to hold out prompts for the harmful direction; "
                                 "lower harmful_samples or direction_samples")
        return [{"prompt": p, "response": r} for p, r in zip(probe, self.teacher.answers(probe, "harmful-weak"))]


class DriftRecorder(TrainerCallback):
    """Reads the breaker statistic of the model being trained at the given steps."""

    def __init__(self, reference: Reference, steps: list[int]):
        self.reference, self.steps, self.readings = reference, set(steps), []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            report = scan_module(self.reference, model)
            self.readings.append({"step": state.global_step, **{name: report.value(name) for name in STATISTICS},
                                  "canary_drift": report.canary_drift, "harm_drift": report.overall.harm_drift,
                                  "other_drift": report.other_drift, "max_layer_ratio": report.max_layer_ratio})


# ---------------------------------------------------------------- from readings to a threshold

def _rates(benign: np.ndarray, harmful: np.ndarray, threshold: float) -> tuple[float, float]:
    return float((harmful > threshold).mean()), float((benign > threshold).mean())


def detection_figures(records: list[dict], target_fpr: float, bootstrap: int, seed: int,
                      statistic: str = "canary_drift_ratio") -> dict:
    """Threshold, TPR, FPR and AUROC over every reading, with 95% bootstrap intervals that resample
    whole runs (a run's checkpoints move together)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    benign_runs = [[r[statistic] for r in rec["readings"]] for rec in records if not rec["harmful"]]
    harmful_runs = [[r[statistic] for r in rec["readings"]] for rec in records if rec["harmful"]]
    if not benign_runs or not harmful_runs:
        raise ImmunizerError("calibration needs at least one benign and one harmful run")
    benign, harmful = np.array(sum(benign_runs, [])), np.array(sum(harmful_runs, []))
    threshold = choose_threshold(benign.tolist(), target_fpr)
    tpr, fpr = _rates(benign, harmful, threshold)
    labels = np.r_[np.zeros(len(benign)), np.ones(len(harmful))]
    scores = np.r_[benign, harmful]
    auroc = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    boot = {"tpr": [], "fpr": [], "auroc": [], "threshold": []}
    for _ in range(bootstrap):
        b = np.concatenate([benign_runs[i] for i in rng.integers(0, len(benign_runs), len(benign_runs))])
        h = np.concatenate([harmful_runs[i] for i in rng.integers(0, len(harmful_runs), len(harmful_runs))])
        t, f = _rates(b, h, threshold)  # the chosen threshold, on resampled runs
        boot["tpr"].append(t)
        boot["fpr"].append(f)
        boot["threshold"].append(choose_threshold(b.tolist(), target_fpr))
        boot["auroc"].append(float(roc_auc_score(np.r_[np.zeros(len(b)), np.ones(len(h))], np.r_[b, h])))
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in boot.items()}
    per_step = {}
    for rec in records:
        for r in rec["readings"]:
            per_step.setdefault(str(r["step"]), {"benign": [], "harmful": []})["harmful" if rec["harmful"] else "benign"].append(r[statistic])
    fpr_curve, tpr_curve, _ = roc_curve(labels, scores)
    return {
        "statistic": statistic,
        "threshold": float(threshold), "target_fpr": target_fpr,
        "tpr": tpr, "fpr": fpr, "auroc": auroc,
        "tpr_ci95": ci["tpr"], "fpr_ci95": ci["fpr"], "auroc_ci95": ci["auroc"], "threshold_ci95": ci["threshold"],
        "n_benign": int(len(benign)), "n_harmful": int(len(harmful)),
        "benign_runs": len(benign_runs), "harmful_runs": len(harmful_runs),
        **{f"{rate}_by_step": {s: float((np.array(v[kind]) > threshold).mean()) if v[kind] else None
                               for s, v in sorted(per_step.items(), key=lambda kv: int(kv[0]))}
           for rate, kind in (("tpr", "harmful"), ("fpr", "benign"))},
        "benign_max": float(benign.max()), "harmful_min": float(harmful.min()),
        "roc": {"fpr": [float(x) for x in fpr_curve], "tpr": [float(x) for x in tpr_curve]},
    }


def plot_roc(figures: dict[str, dict], primary: str, records: list[dict], path: Path, title: str) -> None:
    """Left: ROC of each statistic (the thresholded one bold, its operating point marked). Right: the
    thresholded statistic along every run, benign green and harmful red, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, fig_data in figures.items():
        left.plot(fig_data["roc"]["fpr"], fig_data["roc"]["tpr"], lw=2.5 if name == primary else 1.2,
                  label=f"{name} (AUROC {fig_data['auroc']:.3f})")
    chosen = figures[primary]
    left.plot([0, 1], [0, 1], color="grey", ls=":")
    left.scatter([chosen["fpr"]], [chosen["tpr"]], color="black", zorder=3, label="threshold")
    left.set(xlabel="false-positive rate (benign fine-tunes)", ylabel="true-positive rate (harmful fine-tunes)", title="ROC")
    left.legend(loc="lower right", fontsize=8)
    seen = set()
    for rec in records:
        kind = "harmful" if rec["harmful"] else "benign"
        right.plot([r["step"] for r in rec["readings"]], [r[primary] for r in rec["readings"]], marker="o", ms=3, lw=1,
                   color="tab:red" if rec["harmful"] else "tab:green", alpha=0.7, label=None if kind in seen else kind)
        seen.add(kind)
    right.axhline(chosen["threshold"], color="black", ls="--", label="threshold")
    right.set(xlabel="fine-tuning step", ylabel=primary, title="statistic along each run")
    right.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------- the command

GRID = ("benign_tasks", "harmful_samples", "full_lrs", "lora_lrs", "lora_rank")
"""Which runs the grid holds; each run's own task, samples, lr and rank are in its Case."""


def _case_key(case: Case, config: CalibrationConfig, reference_sha: str, legacy: bool = False) -> str:
    """What a finished run is cached under: the run and the settings it ran with. Widening the grid (another
    rank or lr) keeps the runs already done. `legacy`: the key before that, which hashed the grid as well."""
    left_out = ("bootstrap", "target_fpr") if legacy else ("bootstrap", "target_fpr", "statistic", *GRID)
    run = asdict(case) if legacy else {k: v for k, v in asdict(case).items() if k != "name"}
    payload = {"case": run, "config": {k: v for k, v in config.to_dict().items() if k not in left_out},
               "reference": reference_sha}
    return json_sha256(payload)[:16]


def _done(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: that run is simply run again
        if isinstance(rec, dict) and "key" in rec and all(n in r for r in rec.get("readings", []) for n in STATISTICS):
            done[rec["key"]] = rec  # runs read before a statistic existed are run again
    return done


def ensure_direction(directory: Path, config: CalibrationConfig, teacher: str | None = None,
                     hmac_key: bytes | str | None = None) -> tuple:
    """Give the manifest in `directory` its reference sample and harmful direction (at the canaries and at the
    sample) if it lacks them (a gradient pass over held-out harmful pairs); returns (manifest, reference, CaseData)."""
    manifest, reference = load_reference(Path(directory), hmac_key=hmac_key, write=True)
    teacher = teacher or manifest.meta.get("base_model") or "smollm2"
    data = CaseData(teacher, config)
    if reference.direction is None or reference.sample_direction is None:
        check_reseal(manifest.meta, directory, hmac_key)  # before the gradient pass, not after it
        model, tokenizer = load_model(Path(directory) / manifest.meta.get("model_dir", "model"))
        probe = data.probe_rows()
        direction, reference.sample_direction = harmful_signs(model, tokenizer, probe,
                                                              [reference.canary_index, reference.sample_index],
                                                              bf16=config.bf16)
        # a reference from before the sample's signs keeps its canaries' signs: its recorded readings stay valid
        reference.direction = reference.direction or direction
        write_reference(Path(directory), reference, SAMPLE_SHARE, 0, hmac_key=hmac_key,
                        direction_meta={"direction_pairs": len(probe), "direction_teacher": teacher})
        manifest, reference = load_reference(Path(directory), hmac_key=hmac_key)
    return manifest, reference, data


def incident_case(name: str, harmful: bool, rows: list[dict], config: CalibrationConfig) -> Case:
    """A reviewed breaker incident replayed as a calibration run: its fine-tune's rows at the first full lr."""
    digest = json_sha256(rows)[:16]
    return Case(name, harmful, f"rows:{digest}", len(rows), config.full_lrs[0], 0)


def calibrate(model_dir: str | Path, config: CalibrationConfig | None = None, teacher: str | None = None,
              progress: bool = True, hmac_key: bytes | str | None = None, extra_cases: list[dict] = ()) -> dict:
    """Calibrate the breaker of an `immunizer immunize` output directory; returns the manifest's new
    `breaker` entry (also written into the manifest, which is re-sealed). `extra_cases` ({name, harmful,
    rows}: reviewed incidents from the feedback loop) join the simulated runs on their side."""
    directory = Path(model_dir)
    config = config or CalibrationConfig()
    # Launched (`accelerate launch --multi_gpu`), every process takes its share of each fine-tune's batches; the
    # main process alone writes the direction, the runs, the plot and the manifest.
    dp = DataParallel.from_environment()
    if dp.sharded:
        raise ImmunizerError("calibration reads the weights at every checkpoint of its fine-tunes and does not run under "
                             "FSDP; launch it data-parallel (`accelerate launch --multi_gpu ...`) or in one process")
    if dp.active:  # the main process writes the direction (its errors reach every process); then all read it
        dp.on_main(lambda: ensure_direction(directory, config, teacher, hmac_key) and None)
    manifest, reference, data = ensure_direction(directory, config, teacher, hmac_key)
    check_reseal(manifest.meta, directory, hmac_key)  # refuse now, not after every fine-tune has run
    teacher = data.teacher.spec
    released = directory / manifest.meta.get("model_dir", "model")
    cases_path = directory / CASES_FILE
    done = dp.on_main(_done, cases_path)
    records = []
    cases = plan_cases(config)
    given_rows = {}
    for extra in extra_cases:
        cases.append(incident_case(extra["name"], bool(extra["harmful"]), extra["rows"], config))
        given_rows[extra["name"]] = extra["rows"]
    bar = tqdm(cases, desc="calibrating", unit="run", disable=not (progress and dp.is_main))
    for case in bar:
        key = _case_key(case, config, manifest.meta["reference"]["sha256"])
        cached = done.get(key) or done.get(_case_key(case, config, manifest.meta["reference"]["sha256"], legacy=True))
        if cached:
            records.append({**cached, **asdict(case), "key": key})
            continue
        bar.set_postfix_str(case.name)
        rows = dp.on_main(lambda: given_rows.get(case.name) or data.rows(case))  # the teacher answers once
        model, tokenizer = load_model(released)
        recorder = DriftRecorder(reference, config.checkpoints)
        spec = FinetuneSpec(lr=case.lr, steps=config.checkpoints[-1], batch_size=config.batch_size,
                            lora_rank=case.lora_rank, max_length=config.max_length, seed=config.seed, bf16=config.bf16)
        sft(model, tokenizer, rows, spec, callbacks=[recorder])
        record = {"key": key, **asdict(case), "readings": recorder.readings}
        dp.on_main(_append_case, cases_path, record)  # every process read the same weights, so the same readings
        records.append(record)
    return dp.on_main(_seal_calibration, directory, config, records, cases_path, teacher, data.teacher.sha256,
                      extra_cases, hmac_key, dp.describe())


def _append_case(path: Path, record: dict) -> None:
    """One line per finished run; a torn last line is run again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _seal_calibration(directory: Path, config: CalibrationConfig, records: list[dict], cases_path: Path, teacher: str,
                      teacher_sha256: str, extra_cases: list[dict], hmac_key: bytes | str | None, parallel: dict) -> dict:
    """The bounds from the runs' readings, the ROC plot, the runs file and the manifest's `breaker` entry."""
    # Four bounds (each statistic, both sides) share the target FPR; the primary one is `threshold`.
    bounds = choose_bounds([r for rec in records if not rec["harmful"] for r in rec["readings"]], config.statistic,
                           config.target_fpr)
    share = config.target_fpr / len(bounds)
    every = {name: detection_figures(records, share, config.bootstrap, config.seed, name) for name in STATISTICS}
    figures = every[config.statistic]
    rule = rule_figures(records, bounds, config.bootstrap, config.seed)
    plot_roc(every, config.statistic, records, directory / ROC_FILE,
             f"{directory.name}: threshold {figures['threshold']:.3g}; all {len(bounds)} bounds: TPR {rule['tpr']:.0%} "
             f"at FPR {rule['fpr']:.0%}")
    # The file the manifest hashes keeps exactly this configuration's runs (stale ones from other configs go).
    with atomic_path(cases_path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    brief = ("threshold", "tpr", "tpr_ci95", "fpr", "fpr_ci95", "auroc", "auroc_ci95")
    entry = {**{k: v for k, v in figures.items() if k != "roc"}, **rule, "target_fpr": config.target_fpr,
             "primary": {k: figures[k] for k in ("threshold", "target_fpr", "tpr", "tpr_ci95", "fpr", "fpr_ci95")},
             "bounds": [b.to_json() for b in bounds], "config": config.to_dict(),
             "other_statistics": {n: {k: f[k] for k in brief} for n, f in every.items() if n != config.statistic},
             "teacher": teacher, "teacher_sha256": teacher_sha256, "parallel": parallel,
             "cases_file": CASES_FILE, "cases_sha256": file_sha256(cases_path),
             "incident_cases": [c["name"] for c in extra_cases],
             "roc_plot": ROC_FILE, "roc_plot_sha256": file_sha256(directory / ROC_FILE)}
    update_manifest(directory, {"breaker": entry}, hmac_key=hmac_key)
    return entry
