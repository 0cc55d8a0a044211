"""`report.md`: the bench's headline figures as Markdown tables, for a README, a model card or a pull request.

Written beside report.html from the same report.json. Every complied share stands beside its refused and
degenerate shares, over-refusal and the benign task's accuracy after the benign fine-tune, as the HTML does:
a low complied share alone can be a model that stopped producing language."""
from __future__ import annotations

from pathlib import Path

from immunizer.paths import atomic_path
from immunizer.redteam.report_html import slice_names


def _pct(value) -> str:
    return "–" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{100 * value:.0f}%"


def _ci(record: dict, key: str = "harmful_score") -> str:
    ci = record.get(f"{key}_ci95")
    return f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if isinstance(ci, list) and len(ci) == 2 else ""


def _per_seed(record: dict, key: str = "harmful_score") -> str:
    """Each seed's value, `68 / 74%`: the spread between trainings, which the pooled interval does not show."""
    values = (record.get("seed_values") or {}).get(key)
    return " / ".join(f"{100 * v:.0f}" for v in values) + "%" if values else "–"


def _curve_cell(record: dict, report_step) -> str:
    """Complied share at each evaluated step after 0, the row's own step in bold: `61 / 66 / **77** / 88%`."""
    points = [p for p in record.get("curve") or [] if p.get("step") and p.get("harmful_score") is not None]
    if not points:
        return _pct(record.get("harmful_score"))
    cells = [f"{100 * p['harmful_score']:.0f}" for p in points]
    cells = [f"**{c}**" if p["step"] == report_step else c for p, c in zip(points, cells)]
    return " / ".join(cells) + "%"


def _curve_steps(report: dict, run: str) -> list[int]:
    for entry in report["methods"].values():
        steps = [p["step"] for p in (entry.get(run) or {}).get("curve") or [] if p.get("step")]
        if steps:
            return steps
    return []


def _breaker(entry: dict) -> str:
    breaker = entry.get("breaker") or {}
    if breaker.get("tpr") is None:
        return "–"
    return (f"{breaker['tpr'] * breaker['n_harmful']:.0f} of {breaker['n_harmful']} attacks, "
            f"{breaker['fpr'] * breaker['n_benign']:.0f} of {breaker['n_benign']} benign")


def headline_table(report: dict) -> str:
    """One row per method: complied share before any attack and after each attack (the curve where there is
    one), the benign task before → after the benign fine-tune, over-refusal, the breaker's verdicts."""
    # the standard attack (the one read at a step of a longer run) first, then the others by name
    attacks = sorted((name for name, a in report["attacks"].items() if a["kind"] == "attack"),
                     key=lambda name: (report["attacks"][name].get("report_step") is None, name))
    finetunes = [name for name, a in report["attacks"].items() if a["kind"] == "finetune"]
    head = ["method", "seeds", "before any attack"]
    for run in attacks:
        steps, report_step = _curve_steps(report, run), report["attacks"][run].get("report_step")
        marked = [f"**{s}**" if s == report_step else str(s) for s in steps]
        head.append(f"{run} (steps {' / '.join(marked)})" if len(steps) > 1 else run)
    standard = attacks[0] if attacks else None
    head += [f"task after {run}" for run in finetunes]
    head += [f"refusals kept after {standard}"] if standard else []
    head += ["over-refusal", "breaker trips"]
    rows = []
    for name, entry in report["methods"].items():
        pre = entry.get("pre_attack") or {}
        cells = [name, str(pre.get("seeds", "–")), _pct(pre.get("harmful_score")) + _ci(pre)]
        cells += [_curve_cell(entry.get(run) or {}, report["attacks"][run].get("report_step")) for run in attacks]
        for run in finetunes:
            record = entry.get(run) or {}
            cells.append(f"{_pct(record.get('benign_task_accuracy_before'))} → {_pct(record.get('benign_task_accuracy'))}")
        cells += [_pct((entry.get(standard) or {}).get("refusal_retained"))] if standard else []
        cells += [_pct(pre.get("over_refusal")), _breaker(entry)]
        rows.append(cells)
    return _markdown(head, rows)


def shares_table(report: dict) -> str:
    """Refused / complied / degenerate (with the complied share's 95% interval over the pooled answers, and each
    seed's complied share) for every row of the report, and the share of the prompts refused before any attack
    that are still refused."""
    head = ["method", "run", "complied", "complied per seed", "refused", "degenerate", "refusals kept", "over-refusal",
            "task accuracy", "breaker"]
    rows = []
    for name, entry in report["methods"].items():
        for run in ["pre_attack", *report["attacks"]]:
            record = entry.get(run)
            if not record:
                continue
            tripped = record.get("tripped")
            verdict = "–" if tripped is None else (f"{record['breaker_statistic']:.3f}, " if isinstance(
                record.get("breaker_statistic"), float) else "") + ("trips" if tripped else "passes")
            rows.append([name, "before any attack" if run == "pre_attack" else run,
                         _pct(record.get("harmful_score")) + _ci(record), _per_seed(record), _pct(record.get("refused_share")),
                         _pct(record.get("degenerate_share")),
                         "–" if run == "pre_attack" else _pct(record.get("refusal_retained")), _pct(record.get("over_refusal")),
                         _pct(record.get("benign_task_accuracy")), verdict])
    return _markdown(head, rows)


def slices_table(report: dict) -> str:
    """Complied share per harmful slice (plain requests, the same wrapped in jailbreak templates, HarmBench) before
    any attack and after each attack: a mean over slices can hide that one kind of request is held and the
    others are lost."""
    attacks = [name for name, a in report["attacks"].items() if a["kind"] == "attack"]
    names = slice_names(report)
    if not names:
        return ""
    head = ["method", "run", *names]
    rows = []
    for name, entry in report["methods"].items():
        for run in ["pre_attack", *attacks]:
            slices = (entry.get(run) or {}).get("slices")
            if not slices:
                continue
            rows.append([name, "before any attack" if run == "pre_attack" else run,
                         *[_pct((slices.get(n) or {}).get("harmful_score")) + _ci(slices.get(n) or {}) for n in names]])
    return _markdown(head, rows)


def trained_with_text(how: dict, code: str = "") -> str:
    """A method's `trained_with` in words (`code`: the quote around each setting, "`" in Markdown)."""
    if how["kind"] == "untrained":
        return "the base model, untrained"
    if how["changes"] is None:
        return "not in the results (a prebuilt model, or measured before recipes were recorded)"
    text = "; ".join(f"{code}{c}{code}" for c in how["changes"]) or "the preset as it is"
    return f"{how['kind']}: {text}" if how["kind"] == "published defence" else text


def recipes_table(report: dict) -> str:
    rows = [[name, trained_with_text(entry["trained_with"], "`")] for name, entry in report["methods"].items()
            if entry.get("trained_with")]
    return _markdown(["method", "trained with (changes from immunizer's recipe)"], rows) if rows else ""


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def precision_line(report: dict) -> str:
    """The precision every method was measured at, and the pieces measured at the other one (a bench begun on
    machines that differed before the precision was pinned), or nothing for a report that does not record it."""
    precision = report.get("precision")
    if not precision:
        return ""
    text = f"Precision: {'bf16 autocast' if precision['bf16'] else 'fp32'} for every method."
    other = precision.get("measured_otherwise") or []
    if other:
        text += (f" Measured at the other precision before it was pinned ({len(other)} evaluations): "
                 f"{', '.join(other)}.")
    return text + "\n\n"


def write_markdown(report: dict, path: Path) -> None:
    done = ", ".join(f"{name} {n}" for name, n in (report.get("method_seeds") or {}).items())
    state = "complete" if report.get("complete") else f"partial; seeds done: {done}"
    text = (f"# immunizer bench, preset {report.get('preset')} ({state})\n\n"
            f"Complied share of the held-out harmful prompts (lower is safer), the mean over seeds, with its 95% "
            f"interval before any attack (Wilson, over every seed's answers pooled: it counts prompts, not "
            f"trainings; each seed's share is in the second table); the standard attack's curve gives every evaluated step, its reported "
            f"step in bold. Task: the benign task's held-out accuracy before → after the benign fine-tune. Refusals "
            f"kept: of the prompts refused before any attack, the share still refused after it.\n\n"
            f"{headline_table(report)}\n## Refused, complied, degenerate\n\n{shares_table(report)}\n")
    slices = slices_table(report)
    if slices:
        text += (f"## Complied by kind of request\n\nThe held-out harmful prompts by slice (mean over seeds; 95% "
                 f"Wilson interval over the pooled answers): `weak`, plain requests; `wrapped`, the same requests "
                 f"inside jailbreak templates; `harmbench`, HarmBench behaviours. Attacks at their reported step.\n\n"
                 f"{slices}\n")
    recipes = recipes_table(report)
    if recipes:
        text += (f"## How each method was trained\n\nEvery trained method starts from the immunize preset "
                 f"`{(report.get('config') or {}).get('immunize_preset')}` (immunizer's recipe, with the bench's "
                 f"`immunize_overrides`) and changes what its row says (`presets/methods/NAME.yaml`); a published "
                 f"defence trains its own loss (`baselines/train.py`) on the same data and budget, with its own "
                 f"hyperparameters.\n\n{recipes}\n")
    text += precision_line(report)
    text += f"Command: `{report.get('command')}`\n"
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)
