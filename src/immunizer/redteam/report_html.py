"""`report.html`: the bench report as one self-contained page (plots inlined as PNG data URIs)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

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
    import numpy as np

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


def tradeoff_plot(report: dict) -> str:
    import matplotlib.pyplot as plt

    benign = next(iter(_runs(report, "finetune")), None)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, entry in report["methods"].items():
        worst = (entry.get("worst_case") or {}).get("harmful_score")
        accuracy = _value(entry, benign, "benign_accuracy") if benign else _value(entry, "pre_attack", "benign_accuracy")
        if worst is not None and accuracy is not None:
            ax.scatter(worst, accuracy, s=40)
            ax.annotate(name, (worst, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("worst-case harmful score over the attacks")
    ax.set_ylabel(f"benign accuracy after {benign}" if benign else "benign accuracy")
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


def table(report: dict) -> str:
    runs = ["pre_attack", *report["attacks"], "worst_case"]
    keys = ("harmful_score", "harmful_nll", "over_refusal", "benign_accuracy", "breaker_statistic", "tripped")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("method", "run", *keys, "cost_seconds"))
    rows = []
    for name, entry in report["methods"].items():
        for run in runs:
            record = entry.get(run) or {}
            label = f"{run} ({record['attack']})" if run == "worst_case" and record.get("attack") else run
            cells = "".join(f"<td>{_fmt(record.get(k))}</td>" for k in (*keys, "cost_seconds"))
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(label)}</td>{cells}</tr>")
        rows.append(f"<tr class='cost'><td>{html.escape(name)}</td><td>training</td>{'<td></td>' * len(keys)}"
                    f"<td>{_fmt(entry.get('cost_seconds'))}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_html(report: dict, path: Path) -> None:
    plots = [("Harmful score", harmful_score_plot), ("Protection vs benign accuracy", tradeoff_plot),
             ("Breaker", breaker_plot), ("Cost", cost_plot)]
    figures = "".join(f"<h2>{title}</h2><img alt='{title}' src='{fn(report)}'>" for title, fn in plots)
    machine = ", ".join(f"{k}: {v}" for k, v in report["machine"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>immunizer bench: {html.escape(str(report['preset']))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
tr.cost td{{background:#f4f4f4}}img{{max-width:100%}}</style></head><body>
<h1>immunizer bench, preset {html.escape(str(report['preset']))}</h1>
<p>Base model {html.escape(str(report['base_model']))}; seeds {report['seeds']}; judge {html.escape(str(report['judge']))};
{report['seconds'] / 60:.1f} minutes. Machine: {html.escape(machine)}.<br>Command: <code>{html.escape(report['command'])}</code></p>
<p>harmful_score: share of held-out harmful prompts answered (lower is safer). harmful_nll: mean token NLL of
the harmful teacher's answers (higher is safer). over_refusal: share of safe-but-scary prompts refused.
benign_accuracy: exact match on arithmetic. breaker_statistic: the breaker's drift statistic of that model
against the method's own canaries.</p>
{figures}<h2>All numbers</h2>{table(report)}</body></html>"""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(page)
