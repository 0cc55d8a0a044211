"""`immunizer cycle`: one turn of the feedback loop, from reviewed items to a release decision.

    select        adjudicated, consented, de-duplicated items     OUT/selection/{examples.jsonl, manifest.json}
    refresh       the next cycle's data files                      OUT/refresh/{harmful,benign,preferences,sft,
                                                                      calibration_cases}.jsonl, refresh.json
    sft           SFT refresh of the last release (TRL)            OUT/refresh/sft/
    reward_model  Bradley–Terry reward-model refresh (TRL)         OUT/refresh/reward_model/
    immunize      from the (SFT-refreshed) last release            OUT/candidate/
    calibrate     the candidate's breaker, reviewed incidents      OUT/candidate/calibration/
                  replayed among the simulated runs (when the bench preset calibrates)
    regression    the bench on the candidate                       OUT/bench/report.json
    gate          the policy on the report vs the last release's   OUT/verdict.json (+ the store's audit log)
    promote       PASS: a new release, current.json moves to it; FAIL: nothing moves (the rollback)

A stage writes its outputs, then is marked done in OUT/cycle.json; rerunning the same command skips
finished stages and continues (immunize and the bench also resume inside their stage). A stop asked for
(a first Ctrl-C or SIGTERM, or `touch OUT/STOP`) takes effect between stages, at the immunize stage's next step
(checkpointed) or after the bench's piece in progress. Settings per
preset live in presets/cycle/*.yaml.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from immunizer.config import PRESETS, load_layers
from immunizer.errors import ImmunizerError
from immunizer.finetuning import FinetuneSpec
from immunizer.loop.policy import Policy, RelativeBound, load_policy
from immunizer.loop.select import SelectionConfig
from immunizer.paths import write_json_atomic
from immunizer.stopping import Stopped

CYCLE_PRESETS = PRESETS / "cycle"
STATE_FILE = "cycle.json"


@dataclass
class CycleConfig:
    immunize_preset: str = "quick"
    """immunize preset of the candidate (presets/*.yaml); the cycle points its data at the refresh files."""
    immunize_overrides: list[str] = field(default_factory=list)
    bench_preset: str = "quick"
    """bench preset of the regression checks; keep it the one the last release's report.json was made with."""
    bench_overrides: list[str] = field(default_factory=list)
    teacher: str | None = None
    """Harmful and helpful teacher (default: the root base model the release's manifest names)."""
    sft: FinetuneSpec = field(default_factory=lambda: FinetuneSpec(lr=1e-5))
    """SFT refresh of the last release on sft.jsonl; `steps: 0` and `epochs: 0` switch it off."""
    sft_warm_start: bool = True
    """Immunize from the SFT-refreshed release (true) or from the release as it is (false)."""
    reward: FinetuneSpec = field(default_factory=lambda: FinetuneSpec(lr=1e-5, max_length=256))
    """Reward-model refresh on preferences.jsonl; `steps: 0` and `epochs: 0` switch it off."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seed: int = 0


def load_cycle_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CycleConfig:
    """The preset (presets/cycle/*.yaml) < each `--set KEY=VALUE`, as every command loads its config."""
    return load_layers(CycleConfig(), preset, CYCLE_PRESETS, overrides=overrides, what="cycle ")


def _trains(spec: FinetuneSpec) -> bool:
    return spec.steps > 0 or spec.epochs > 0


def comparison_methods(policy: Policy) -> list[str]:
    """Methods other than the judged one whose figures the policy compares with."""
    names = []
    for check in policy.checks:
        if isinstance(check.bound, RelativeBound):
            names.append(check.bound.method)
        elif check.comparison in ("below", "above"):
            names += list(check.bound)
    return [n for n in dict.fromkeys(names) if n != policy.method]


def root_teacher(manifest: dict) -> str:
    """The unaligned base model the release descends from: an explicit teacher in its config, else its base."""
    teachers = (manifest.get("config") or {}).get("teachers") or {}
    if teachers.get("harmful") not in (None, "reference"):
        return teachers["harmful"]
    if manifest.get("base_model"):
        return manifest["base_model"]
    raise ImmunizerError("the release's manifest does not name its base model; say which model answers prompts "
                         "with --set teacher=SPEC (e.g. smollm2)")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Cycle:
    """One turn of the loop in OUT; `run()` does (or resumes) every stage and returns the summary."""

    def __init__(self, store_url: str, release: str | Path, out_dir: str | Path, preset: str = "quick",
                 policy: str | Path = "release", overrides: list[str] | tuple[str, ...] = (), progress: bool = True,
                 bench=None, stop: Callable[[], str | None] | None = None):
        from immunizer.loop.releases import resolve_release
        from immunizer.review.store import redact_url

        self.out, self.progress, self.store_url = Path(out_dir), progress, store_url
        self.config = load_cycle_config(preset, overrides)
        self.policy = load_policy(policy)
        if self.policy.method != "immunizer":
            raise ImmunizerError(f"a cycle judges its candidate as `immunizer`; policy {self.policy.name} judges "
                                 f"{self.policy.method!r}")
        self._bench = bench
        self._stop = stop or (lambda: None)  # read between stages, and at each step of the immunize and bench stages
        inputs = {"release_argument": str(Path(release).resolve()), "store": redact_url(store_url), "preset": preset,
                  "config": dataclasses.asdict(self.config), "policy": self.policy.describe()}
        self.state = self._load_state(inputs)
        if self.state is None:
            found = resolve_release(release)
            self.release = found
            meta = json.loads((found.directory / "manifest.json").read_text())
            self.teacher = self.config.teacher or root_teacher(meta)
            self.state = {"inputs": {**inputs, "release": str(found.directory), "releases_home": str(found.home),
                                     "release_model_sha256": meta["model_sha256"], "pointer": found.pointer,
                                     "teacher": self.teacher},
                          "started_at": _now(), "stages": {}, "status": "running"}
        else:  # resuming: the release this cycle started from, even if it has promoted its candidate since
            from immunizer.loop.releases import Release

            recorded = self.state["inputs"]
            self.release = Release(Path(recorded["release"]), Path(recorded["releases_home"]), recorded["pointer"])
            self.teacher = recorded["teacher"]
        self.baseline = self._baseline()

    # -- bookkeeping
    def _load_state(self, inputs: dict) -> dict | None:
        path = self.out / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        before = {k: state["inputs"].get(k) for k in inputs}
        if before != inputs:
            changed = sorted(k for k in inputs if before[k] != inputs[k])
            raise ImmunizerError(f"{self.out} holds a cycle started with other inputs ({', '.join(changed)} differ); "
                                 "rerun with the same --store/--release/--preset/--policy/--set to resume it, or "
                                 "choose another --out")
        return state

    def _save(self) -> None:
        write_json_atomic(self.out / STATE_FILE, self.state)

    def _baseline(self) -> dict | None:
        from immunizer.loop.gate import GateInputError, gate, load_report

        if self.release.report is None:
            return None
        baseline = load_report(self.release.report, "the last release's report")
        if self.policy.method in baseline["methods"]:
            # The policy must be answerable before hours of training are spent on it: its paths are tried
            # on the last release's report, whose own entry stands in for methods the cycle will bench.
            judged = baseline["methods"][self.policy.method]
            probe = {**baseline, "methods": {**{m: judged for m in comparison_methods(self.policy)}, **baseline["methods"]}}
            try:
                gate(probe, self.policy, probe)
            except GateInputError as exc:
                raise ImmunizerError(f"policy {self.policy.name} cannot judge the last release's report "
                                     f"({self.release.report}): {exc}") from None
        return baseline

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def preset_config(self):
        from immunizer.config import load_config

        return load_config(self.config.immunize_preset, overrides=self.config.immunize_overrides)

    def immunize_config(self):
        """The candidate's immunize config: the preset, pointed at the refresh files."""
        from immunizer.config import validate

        config = self.preset_config()
        refresh = self.state["stages"].get("refresh", {})
        config.seed = self.config.seed
        config.teachers.harmful = config.teachers.helpful = self.teacher
        config.data.max_harmful_prompts = config.data.max_benign_prompts = 0
        config.data.harmful_file = str(self.path("refresh", "harmful.jsonl").resolve())
        config.data.benign_file = str(self.path("refresh", "benign.jsonl").resolve())
        # every reviewed example is seen at least once a cycle: Phase steps grow to cover the new rows
        for section, rows in ((config.phase1, refresh.get("harmful_rows", 0)), (config.phase2, refresh.get("benign_rows", 0))):
            if section.steps and section.steps * section.batch_size < rows:
                section.steps = math.ceil(rows / section.batch_size)
        validate(config)
        return config

    # -- stages
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self._save()
        bar = tqdm(STAGES, desc="cycle", unit="stage", disable=not self.progress)
        for stage, step in bar:
            if stage in self.state["stages"]:
                continue  # finished in an earlier run of this command
            asked = self._stop()
            if asked:
                raise Stopped(f"{asked}: the cycle stopped before its {stage} stage; {self.out} keeps the finished "
                              "stages and the same command continues it")
            bar.set_postfix_str(stage)
            started = time.perf_counter()
            record = step(self)
            self.state["stages"][stage] = {**record, "seconds": round(time.perf_counter() - started, 1),
                                           "finished_at": _now()}
            self._save()
        bar.close()
        verdict = self.state["stages"]["gate"]
        self.state["status"] = "passed" if verdict["passed"] else "failed"
        self.state["finished_at"] = _now()
        self._save()
        return self.summary()

    def summary(self) -> dict:
        s = self.state["stages"]
        return {"out": str(self.out), "passed": s["gate"]["passed"], "verdict": s["gate"]["summary"],
                "selected": s["select"]["counts"], "dataset_version": s["select"]["dataset_version"],
                "candidate_model_sha256": s["immunize"]["model_sha256"], "promote": s["promote"],
                "state": str(self.path(STATE_FILE))}

    def stage_select(self) -> dict:
        from immunizer.loop.select import select_from_store, write_selection
        from immunizer.review import ReviewStore

        store = ReviewStore(self.store_url)
        selection = select_from_store(store, dataclasses.replace(self.config.selection,
                                                                 heldout_files=list(self.heldout_files())))
        if not selection.examples:
            left_out = ", ".join(f"{reason}: {len(ids)}" for reason, ids in selection.excluded.items()) or "none closed"
            raise ImmunizerError(f"nothing to learn from: the review store holds no adjudicated, consented item that "
                                 f"makes a training example ({left_out}); review and adjudicate items first")
        manifest = write_selection(selection, self.path("selection"), self.policy.describe(), self.store_url)
        store.record_event("cycle", "select_training_data", "dataset", None, dataset_version=manifest["dataset_version"],
                           content_sha256=manifest["content_sha256"], source_item_ids=manifest["source_item_ids"],
                           counts=manifest["counts"], rubrics=manifest["rubrics"], policy=manifest["policy"],
                           cycle=str(self.out.resolve()))
        trained = self.release.directory / "dataset.json"  # what the last release learnt from, if the loop made it
        before = set(json.loads(trained.read_text())["source_item_ids"]) if trained.is_file() else set()
        return {"dataset_version": manifest["dataset_version"], "content_sha256": manifest["content_sha256"],
                "counts": manifest["counts"], "items": len(manifest["source_item_ids"]),
                "new_since_last_release": len(set(manifest["source_item_ids"]) - before),
                "excluded": {reason: len(ids) for reason, ids in manifest["excluded"].items()},
                "rubrics": manifest["rubrics"]}

    def stage_refresh(self) -> dict:
        from immunizer.data.teacher import Teacher
        from immunizer.loop.refresh import RefreshPlan, refresh_data
        from immunizer.loop.select import load_examples

        examples = load_examples(self.path("selection"))
        config = self.preset_config()
        new_harmful = sum(e["role"] == "adversarial" for e in examples)
        new_benign = sum(e["role"] == "over_refusal" for e in examples) + sum(
            len(e.get("examples") or []) for e in examples if e["role"] == "breaker_false_positive")

        def top_up(section, limit: int, sets: int, new: int) -> int:
            # built-in rows so that one cycle trains on what the preset would, reviewed rows first
            budget = section.steps * section.batch_size if section.steps else limit * sets
            return max(0, budget - new) if budget else 1_000_000  # 0: the preset takes every prompt

        curriculum = tuple(dict.fromkeys(config.data.curriculum))
        plan = RefreshPlan(top_up(config.phase1, config.data.max_harmful_prompts, len(curriculum), new_harmful),
                           top_up(config.phase2, config.data.max_benign_prompts, 1, new_benign),
                           curriculum, self.config.seed, self.heldout_files())
        teacher = Teacher(self.teacher, config.data.teacher_max_new_tokens, config.bf16)
        record = refresh_data(examples, self.path("refresh"), teacher, teacher, plan,
                              inputs={"dataset_version": self.state["stages"]["select"]["dataset_version"],
                                      "teacher": self.teacher, "teacher_sha256": teacher.sha256})
        return {"files": {k: {"rows": v["rows"], "from_review": v["from_review"], "sha256": v["sha256"]}
                          for k, v in record["files"].items()},
                "harmful_rows": record["files"]["harmful"]["rows"], "benign_rows": record["files"]["benign"]["rows"]}

    def stage_sft(self) -> dict:
        from immunizer.loop.post_training import sft_refresh
        from immunizer.loop.refresh import training_rows

        rows = training_rows(self.path("refresh", "sft.jsonl"), ("prompt", "response"))
        if not rows or not _trains(self.config.sft):
            return {"skipped": "no SFT rows" if not rows else "switched off (sft.steps and sft.epochs are 0)"}
        spec = dataclasses.replace(self.config.sft, seed=self.config.seed)
        return sft_refresh(self.release.directory, rows, self.path("refresh", "sft"), spec, self.progress)

    def stage_reward_model(self) -> dict:
        from immunizer.loop.post_training import reward_refresh
        from immunizer.loop.refresh import training_rows

        pairs = training_rows(self.path("refresh", "preferences.jsonl"), ("prompt", "chosen", "rejected"))
        if not pairs or not _trains(self.config.reward):
            return {"skipped": "no preference pairs" if not pairs else "switched off (reward.steps and reward.epochs are 0)"}
        last = self.release.directory / "reward_model"
        start = last if (last / "config.json").is_file() else self.release.directory / "model"
        spec = dataclasses.replace(self.config.reward, seed=self.config.seed)
        return reward_refresh(start, pairs, self.path("refresh", "reward_model"), spec, self.progress)

    def stage_immunize(self) -> dict:
        from immunizer.checkpoint import load_checkpoint
        from immunizer.immunize import immunize
        from immunizer.models import model_dir_sha256, resolve_model

        sft = self.state["stages"]["sft"]
        start = Path(sft["model"]) if self.config.sft_warm_start and "model" in sft else resolve_model(self.release.directory)
        candidate = self.path("candidate")
        config = self.immunize_config()
        if (candidate / "manifest.json").is_file() and load_checkpoint(candidate) is None:
            meta = json.loads((candidate / "manifest.json").read_text())  # finished before the last run stopped
        else:
            try:
                meta = immunize(start, candidate, config, resume=load_checkpoint(candidate) is not None,
                                progress=self.progress, stop=self._stop).manifest
            except Stopped as exc:  # immunize's own message names its --resume; a cycle resumes by rerunning itself
                raise Stopped(f"{str(exc).split(';')[0]}; the same cycle command continues it") from None
        return {"start_model": str(start), "start_model_sha256": model_dir_sha256(resolve_model(start)),
                "model_sha256": meta["model_sha256"], "config_sha256": config.sha256,
                "data_versions": meta.get("data_versions"), "num_canaries": meta["num_canaries"]}

    def heldout_files(self) -> tuple[str, ...]:
        """`selection.heldout_files` and every prompt file the regression bench evaluates or attacks with: none
        of their prompts may become training data (loop/heldout.py), whether or not the user listed them."""
        bench = self._bench_config()
        named = [bench.eval.get("prompts"), bench.eval.get("safe_prompts"),
                 *(spec.get("data") for spec in bench.attacks.values())]
        found = [str(p) for p in named if p and Path(str(p)).is_file()]  # `data: extraction` names a generated task
        return tuple(dict.fromkeys([*self.config.selection.heldout_files, *found]))

    def _bench_config(self):
        from immunizer.redteam.bench import load_bench_config

        return load_bench_config(self.config.bench_preset, overrides=self.config.bench_overrides)

    def stage_calibrate(self) -> dict:
        from immunizer.breaker.calibrate import calibrate, load_calibration_config
        from immunizer.paths import read_jsonl

        cases = read_jsonl(self.path("refresh", "calibration_cases.jsonl"))
        replayable = [c for c in cases if c["rows"]]
        bench = self._bench_config()
        if not bench.calibration:
            return {"skipped": f"bench preset {self.config.bench_preset} uses a fixed threshold ({bench.breaker_threshold})",
                    "incident_cases": len(cases), "replayable": len(replayable)}
        entry = calibrate(self.path("candidate"), load_calibration_config(bench.calibration), teacher=bench.model,
                          progress=self.progress, extra_cases=replayable)
        return {"preset": bench.calibration, "incident_cases": entry["incident_cases"],
                **{k: entry[k] for k in ("statistic", "threshold", "tpr", "fpr", "auroc", "n_benign", "n_harmful")}}

    def stage_regression(self) -> dict:
        bench = self._bench
        if bench is None:
            from immunizer.redteam.bench import run_bench as bench
        have = set(self.baseline["methods"]) if self.baseline else set()
        methods = ["immunizer", *[m for m in comparison_methods(self.policy) if m not in have]]
        report = bench(self.path("bench"), preset=self.config.bench_preset, methods=methods, seeds=1,
                       prebuilt={"immunizer": self.path("candidate")}, overrides=self.config.bench_overrides,
                       progress=self.progress, stop=self._stop)
        if report.get("stopped"):  # its finished pieces are on disk; the rerun's bench reads them back
            raise Stopped(f"{report['stopped'].get('by') or report['stopped'].get('reason')}: the cycle's regression "
                          f"bench stopped after its piece in progress; the same cycle command continues it")
        judged = report["methods"]["immunizer"].get("model_sha256")
        expected = self.state["stages"]["immunize"]["model_sha256"]
        if judged != expected:
            raise ImmunizerError(f"the bench judged a model with hash {judged}, not the candidate ({expected}); "
                                 f"delete {self.path('bench')} and rerun the cycle")
        immunizer = report["methods"]["immunizer"]
        return {"report": str(self.path("bench", "report.json")), "methods": methods,
                "pre_attack": immunizer.get("pre_attack"), "worst_case": immunizer.get("worst_case"),
                "breaker": {k: (immunizer.get("breaker") or {}).get(k) for k in ("threshold", "tpr", "fpr")}}

    def stage_gate(self) -> dict:
        from immunizer.loop.gate import gate, load_report, record_verdict
        from immunizer.review import ReviewStore

        report = load_report(self.path("bench", "report.json"))
        verdict = gate(report, self.policy, self.baseline)
        select, refresh = self.state["stages"]["select"], self.state["stages"]["refresh"]
        verdict["judged"].update(
            report=str(self.path("bench", "report.json")),
            training_data={"dataset_version": select["dataset_version"], "content_sha256": select["content_sha256"],
                           "rubrics": select["rubrics"],
                           "refresh_files": {k: v["sha256"] for k, v in refresh["files"].items()}},
            release={"candidate": str(self.path("candidate")), "last_release": str(self.release.directory),
                     "last_release_model_sha256": self.state["inputs"]["release_model_sha256"]})
        if verdict["judged"]["baseline"] is not None:
            verdict["judged"]["baseline"]["report"] = str(self.release.report)
        write_json_atomic(self.path("verdict.json"), verdict)
        record_verdict(ReviewStore(self.store_url), verdict, actor="cycle")
        return {"passed": verdict["passed"], "summary": verdict["summary"], "failed": verdict["failed"],
                "verdict": str(self.path("verdict.json"))}

    def stage_promote(self) -> dict:
        from immunizer.loop.releases import POINTER, promote
        from immunizer.review import ReviewStore

        verdict = json.loads(self.path("verdict.json").read_text())
        pointer_file = self.release.home / POINTER
        if not verdict["passed"]:
            return {"promoted": False, "current_release": str(self.release.directory),
                    "reason": f"{verdict['summary']}; {pointer_file} unchanged: the last release stays current "
                              f"(rolled back), the rejected candidate stays in {self.path('candidate')}"}
        extras = {"report.json": self.path("bench", "report.json"), "verdict.json": self.path("verdict.json"),
                  "dataset.json": self.path("selection", "manifest.json"), "refresh.json": self.path("refresh", "refresh.json"),
                  "reward_model": self.path("refresh", "reward_model")}
        pointer = promote(self.release, self.path("candidate"), extras, verdict)
        release_dir = self.release.home / pointer["release"]
        ReviewStore(self.store_url).record_event("cycle", "promote_release", "release", None, release=str(release_dir),
                                                 model_sha256=pointer["model_sha256"], previous=str(self.release.directory),
                                                 policy=verdict["policy"])
        return {"promoted": True, "release": str(release_dir), "pointer": str(pointer_file),
                "previous_release": str(self.release.directory)}


STAGES = (("select", Cycle.stage_select), ("refresh", Cycle.stage_refresh), ("sft", Cycle.stage_sft),
          ("reward_model", Cycle.stage_reward_model), ("immunize", Cycle.stage_immunize),
          ("calibrate", Cycle.stage_calibrate), ("regression", Cycle.stage_regression), ("gate", Cycle.stage_gate),
          ("promote", Cycle.stage_promote))
"""The stages in order, each with the method that does it; cycle.json records them under these names."""


def run_cycle(store_url: str, release: str | Path, out_dir: str | Path, preset: str = "quick",
              policy: str | Path = "release", overrides: list[str] | tuple[str, ...] = (), progress: bool = True,
              bench=None, stop: Callable[[], str | None] | None = None) -> dict:
    """One turn of the loop (or the rest of an interrupted one); returns the summary. `bench` replaces
    `immunizer.redteam.bench.run_bench` in the regression stage (same signature). `stop` (a callable returning a
    reason or None) is read between stages and passed to immunize and the bench; when it answers, the cycle
    raises `Stopped` with its work saved."""
    return Cycle(store_url, release, out_dir, preset, policy, overrides, progress, bench, stop).run()
