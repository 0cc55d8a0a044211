"""`report.html`: the bench report as one self-contained page (plots inlined as PNG data URIs)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from immunizer.paths import atomic_path


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _runs(report: dict, kind: str) -> list[str]:
    return [name for name, a in report["attacks"].items() if a["kind"] == kind]


def _value(entry: dict, run: str, key: str):
    value = (entry.get(run) or {}).get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def harmful_score_plot(report: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    runs = ["pre_attack", *_runs(report, "attack")]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods) * len(runs) / 2), 3.6))
    for i, run in enumerate(runs):
        values = [_value(report["methods"][m], run, "harmful_score") for m in methods]
        xs = np.arange(len(methods)) + (i - (len(runs) - 1) / 2) * width
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=run.replace("pre_attack", "before any attack"))
        ci = [(report["methods"][m].get(run) or {}).get("ci95", {}).get("harmful_score") for m in methods]
        for x, v, c in zip(xs, values, ci):
            if c and v is not None:
                ax.errorbar(x, v, yerr=[[v - c[0]], [c[1] - v]], color="black", capsize=2, lw=1)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("harmful score (answered share)")
    ax.set_ylim(0, 1)
    ax.set_title("Harmful prompts answered, before and after each attack (lower is safer)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def curve_plot(report: dict) -> str | None:
    """Complied share (solid), refused (dashed) and degenerate (dotted) against attack steps: one panel per
    attack with a curve, one colour per method; with several seeds each seed's complied share is a faint line."""
    import matplotlib.pyplot as plt

    attacks = [a for a in _runs(report, "attack")
               if any((e.get(a) or {}).get("curve") for e in report["methods"].values())]
    if not attacks:
        return None
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.8), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, attack in zip(axes[0], attacks):
        for i, (name, entry) in enumerate(report["methods"].items()):
            curve = (entry.get(attack) or {}).get("curve") or []
            steps = [p["step"] for p in curve]
            colour = colours[i % len(colours)]
            for key, style, label in (("harmful_score", "-", name), ("refused_share", "--", None), ("degenerate_share", ":", None)):
                ys = [p.get(key) for p in curve]
                if steps and all(y is not None for y in ys):
                    ax.plot(steps, ys, style, color=colour, marker="o" if style == "-" else None, ms=3, label=label)
            for seed in (entry.get(attack) or {}).get("curve_seeds") or []:  # each seed, faint: the spread
                points = [(p["step"], p["harmful_score"]) for p in seed if p.get("harmful_score") is not None]
                if points:
                    ax.plot(*zip(*points), "-", color=colour, lw=0.7, alpha=0.35)
        ax.axhline(0.5, color="grey", lw=0.6)
        config = report["attacks"][attack]["config"]
        ax.set_title(f"{attack} (lr {config.get('lr', '?'):g})" if isinstance(config.get("lr"), (int, float)) else attack, fontsize=9)
        ax.set_xlabel("attack steps")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("share of harmful prompts")
    axes[0][0].legend(fontsize=7, title="complied (solid), refused (dashed),\ndegenerate (dotted)", title_fontsize=6)
    fig.suptitle("How many attack steps until the model complies", fontsize=10)
    return _png(fig)


def shares_plot(report: dict) -> str:
    """Refused / complied / degenerate shares, stacked, before any attack and after each attack."""
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    runs = ["pre_attack", *_runs(report, "attack")]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(methods) * len(runs)), 3.8))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = np.arange(len(methods)) + (i - (len(runs) - 1) / 2) * width
        bottom = np.zeros(len(methods))
        for key, colour in (("refused_share", "tab:green"), ("harmful_score", "tab:red"), ("degenerate_share", "tab:gray")):
            values = np.array([_value(report["methods"][m], run, key) or 0 for m in methods])
            ax.bar(xs, values, width * 0.95, bottom=bottom, color=colour, edgecolor="white", lw=0.3,
                   label={"refused_share": "refused", "harmful_score": "complied", "degenerate_share": "degenerate"}[key] if i == 0 else None)
            bottom += values
        for x in xs:
            ax.text(x, 1.01, str(i), ha="center", fontsize=6)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of harmful prompts")
    ax.set_title("Refused / complied / degenerate; bars numbered " + ", ".join(f"{i} = {r}" for i, r in enumerate(runs)), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    return _png(fig)


def slice_names(report: dict) -> list[str]:
    """The harmful slices the report's evaluations hold, in the evaluation set's order."""
    from immunizer.data.eval_prompts import HARMFUL_SLICES

    names = {n for entry in report["methods"].values() for record in entry.values() if isinstance(record, dict)
             for n in (record.get("slices") or {})}
    return sorted(names, key=lambda n: (HARMFUL_SLICES.index(n) if n in HARMFUL_SLICES else len(HARMFUL_SLICES), n))


def slices_plot(report: dict) -> str | None:
    """Complied share per slice of harmful prompts, before any attack (light) and after the standard attack (dark):
    one panel per slice. A mean over slices can hide that one kind of request is held and the others are lost."""
    import matplotlib.pyplot as plt

    names, attacks = slice_names(report), _runs(report, "attack")
    if not names or not attacks:
        return None
    # the standard attack: the one read at a step of a longer run, else the first
    standard = next((a for a in attacks if report["attacks"][a].get("report_step") is not None), attacks[0])
    methods = list(report["methods"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (run, shade) in enumerate((("pre_attack", 0.35), (standard, 1.0))):
            records = [((report["methods"][m].get(run) or {}).get("slices") or {}).get(name) or {} for m in methods]
            values = [r.get("harmful_score") for r in records]
            xs = np.arange(len(methods)) + (i - 0.5) * 0.4
            ax.bar(xs, [np.nan if v is None else v for v in values], 0.38, color="tab:red", alpha=shade,  # none: no bar
                   label="before any attack" if run == "pre_attack" else f"after {run}")
            for x, v, r in zip(xs, values, records):
                ci = r.get("harmful_score_ci95")
                if ci and v is not None:
                    ax.errorbar(x, v, yerr=[[v - ci[0]], [ci[1] - v]], color="black", capsize=2, lw=1)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("complied share")
    axes[0][len(names) // 2].legend(fontsize=7, loc="upper right")
    fig.suptitle("Complied by kind of request (weak: plain; wrapped: in jailbreak templates; harmbench)", fontsize=9)
    return _png(fig)


def tradeoff_plot(report: dict) -> str:
    import matplotlib.pyplot as plt

    benign = next(iter(_runs(report, "finetune")), None)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, entry in report["methods"].items():
        worst = (entry.get("worst_case") or {}).get("harmful_score")
        accuracy = _value(entry, benign, "benign_task_accuracy") if benign else _value(entry, "pre_attack", "benign_task_accuracy")
        if worst is not None and accuracy is not None:
            ax.scatter(worst, accuracy, s=40)
            ax.annotate(name, (worst, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("worst-case harmful score over the attacks")
    ax.set_ylabel(f"benign task accuracy after {benign}" if benign else "benign task accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("Cost and protection (want: left and high)")
    return _png(fig)


def breaker_plot(report: dict) -> str:
    import matplotlib.pyplot as plt

    methods = [m for m, e in report["methods"].items() if any(_value(e, r, "breaker_statistic") is not None for r in report["attacks"])]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods)), 3.6))
    for i, name in enumerate(methods):
        entry = report["methods"][name]
        for kind, color, label in (("attack", "tab:red", "harmful attack"), ("finetune", "tab:green", "benign fine-tune")):
            ys = [_value(entry, r, "breaker_statistic") for r in _runs(report, kind)]
            ys = [y for y in ys if y is not None]
            ax.scatter([i + (0.1 if kind == "attack" else -0.1)] * len(ys), ys, color=color,
                       label=label if i == 0 else None, s=25)
        threshold = (entry.get("breaker") or {}).get("threshold")
        if threshold is not None:
            ax.hlines(threshold, i - 0.3, i + 0.3, colors="black", linestyles="dashed", label="threshold" if i == 0 else None)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("breaker statistic")
    ax.set_title("Breaker statistic of every attacked / fine-tuned model")
    if methods:
        ax.legend(fontsize=7)
    return _png(fig)


def cost_plot(report: dict) -> str:
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    costs = [report["methods"][m].get("cost_seconds") or 0 for m in methods]
    fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(methods)), 3))
    ax.bar(methods, [c / 60 for c in costs], color="tab:gray")
    ax.set_ylabel("training minutes")
    ax.set_title(f"Cost of each defence ({report['machine'].get('device')})")
    return _png(fig)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "trips" if value else "passes"
    if isinstance(value, float):
        return f"{value:.3g}"
    return html.escape(str(value))


def _ci(record: dict, key: str) -> str:
    ci = record.get(f"{key}_ci95")
    return f"<br><small>[{ci[0]:.2f}, {ci[1]:.2f}]</small>" if isinstance(ci, list) and len(ci) == 2 else ""


def table(report: dict) -> str:
    runs = ["pre_attack", *report["attacks"], "worst_case"]
    keys = ("harmful_score", "refused_share", "degenerate_share", "refusal_retained", "harmful_nll", "repeated_sentence_share", "over_refusal",
            "benign_task_accuracy", "steps_to_half", "steps_to_75", "steps_to_90", "breaker_statistic", "tripped")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("method", "run", *keys, "cost_seconds"))
    rows = []
    for name, entry in report["methods"].items():
        for run in runs:
            record = entry.get(run) or {}
            label = f"{run} ({record['attack']})" if run == "worst_case" and record.get("attack") else run
            cells = "".join(f"<td>{_fmt(record.get(k))}{_ci(record, k)}</td>" for k in (*keys, "cost_seconds"))
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(label)}</td>{cells}</tr>")
        rows.append(f"<tr class='cost'><td>{html.escape(name)}</td><td>training</td>{'<td></td>' * len(keys)}"
                    f"<td>{_fmt(entry.get('cost_seconds'))}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def time_table(report: dict) -> str:
    spent = report.get("time")
    if not spent:
        return ""
    rows = [("training the defences", spent["training"]), ("evaluation (every eval and curve point)", spent["evaluation"]),
            *((f"run: {name}", seconds) for name, seconds in spent["runs"].items())]
    cells = "".join(f"<tr><td>{html.escape(name)}</td><td>{seconds / 60:.1f}</td>"
                    f"<td>{100 * seconds / spent['total'] if spent['total'] else 0:.0f}%</td></tr>" for name, seconds in rows)
    return (f"<h2>Where the time went</h2><table><tr><th>piece</th><th>minutes</th><th>share</th></tr>{cells}"
            f"<tr><td>total</td><td>{spent['total'] / 60:.1f}</td><td>100%</td></tr></table>")


def recipes_html(report: dict) -> str:
    """How each method was trained: its recipe's changes from immunizer's (report.md's section, as a table)."""
    from immunizer.redteam.report_markdown import trained_with_text

    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(trained_with_text(entry['trained_with']))}</td></tr>"
                   for name, entry in report["methods"].items() if entry.get("trained_with"))
    return (f"<h2>How each method was trained</h2><p>Changes from immunizer's recipe (the immunize preset "
            f"{html.escape(str((report.get('config') or {}).get('immunize_preset')))} with the bench's overrides).</p>"
            f"<table><tr><th>method</th><th>trained with</th></tr>{rows}</table>") if rows else ""


def write_html(report: dict, path: Path) -> None:
    from immunizer.redteam.report_markdown import precision_line  # it imports this module

    plots = [("Attack strength: complied share against attack steps", curve_plot),
             ("Refused, complied, degenerate", shares_plot), ("Complied by kind of request", slices_plot),
             ("Harmful score", harmful_score_plot),
             ("Protection vs benign task accuracy", tradeoff_plot), ("Breaker", breaker_plot), ("Cost", cost_plot)]
    rendered = [(title, fn(report)) for title, fn in plots]
    figures = "".join(f"<h2>{title}</h2><img alt='{title}' src='{uri}'>" for title, uri in rendered if uri)
    machine = ", ".join(f"{k}: {v}" for k, v in report["machine"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>immunizer bench: {html.escape(str(report['preset']))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
tr.cost td{{background:#f4f4f4}}img{{max-width:100%}}</style></head><body>
<h1>immunizer bench, preset {html.escape(str(report['preset']))}</h1>
<p>Base model {html.escape(str(report['base_model']))}; seeds {report['seeds']}; judge {html.escape(str(report['judge']))};
{report['seconds'] / 60:.1f} minutes. Machine: {html.escape(machine)}. {html.escape(precision_line(report))}<br>Command: <code>{html.escape(report['command'])}</code></p>
<p>Every answer to a held-out harmful prompt is refused, complied or degenerate (noise, loops, broken text).
harmful_score: the complied share (lower is safer), beside refused_share and degenerate_share, with 95% intervals.
refusal_retained: of the harmful prompts the model refused before any attack, the share it still refuses
(durability, apart from which prompts it refused to begin with). harmful_nll: mean token NLL of the harmful teacher's answers (higher is safer). repeated_sentence_share: answers
that repeat a sentence. over_refusal: share of safe-but-scary prompts refused. benign_task_accuracy: exact match
on the benign task's held-out test split (after a benign fine-tune: did the model still learn?). steps_to_half:
the first evaluated attack step at which half the harmful prompts are complied with (steps_to_75, steps_to_90: three
quarters, nine tenths; 0 where the model already complied that much before any attack). breaker_statistic: the
breaker's drift statistic of that model against the method's own canaries.</p>
{figures}<h2>All numbers</h2>{table(report)}{recipes_html(report)}{time_table(report)}</body></html>"""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(page)
