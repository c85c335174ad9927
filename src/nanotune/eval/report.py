"""report.html: one self-contained page (inline CSS, PNG plots embedded as base64, no JS).

Top to bottom: the result (before/after metrics, run figures), the curves, sample generations,
then the configuration folded away. matplotlib is optional (`pip install nanotune[report]`):
without it the page still has every table and says how to get the plots. Plots use the Agg
canvas directly, never pyplot, so no global backend state changes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanotune.errors import NanotuneError
from nanotune.eval.compare import compare_rows, fmt, verdict
from nanotune.files.atomic import atomic_write

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.8em 0 .6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}h3{font-size:1em;margin:1em 0 .3em}
.sub{color:#555;margin:0 0 1.2em}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
table{border-collapse:collapse}td,th{border:1px solid #d6d6d6;padding:.3em .65em;
vertical-align:top;text-align:left}th{background:#f3f3f3;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.result{font-size:1.05em}table.result td.num{min-width:5.5em}
.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}
.facts th{background:none;color:#555;font-weight:normal}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1em}
.plots img{width:100%;border:1px solid #eee}
.sample{margin:0 0 1.2em}.sample table{width:100%;table-layout:fixed}
.prompt,.gen{white-space:pre-wrap;font:.85em/1.4 ui-monospace,monospace;margin:0}
.prompt{background:#f7f7f7;padding:.5em .7em;border:1px solid #e4e4e4;border-bottom:0;
max-height:9em;overflow:auto;color:#444}
details{margin-top:2em}summary{cursor:pointer;font-weight:600}
pre.config{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.note{color:#666;font-style:italic}
"""

# Fewer points than this are drawn as markers alone: a line through two evaluations suggests a
# trend that was never measured.
_FEW_POINTS = 5


@dataclass
class RunSummary:
    """What report.html shows. Training figures (wall time, tokens/s, trainable parameters,
    padding) are read from `metrics_path` (the run's metrics.jsonl), when there is one."""

    config: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any] = field(default_factory=dict)
    """Empty for an evaluation of one model: the table then has one column."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    metrics_path: str | os.PathLike | None = None
    data_stats: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Per split: rows, examples, skipped_bad_row, dropped_too_long (`Datasets.stats`)."""
    data_sources: list[dict[str, Any]] = field(default_factory=list)
    """data.sources: each source's rows, examples and examples an epoch (`Datasets.sources`)."""
    title: str = "nanotune run report"


def read_metrics(path: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Records of a run's metrics.jsonl (empty when there is none)."""
    if path is None or not Path(path).exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if not line.endswith("\n"):
                    break  # the last line, cut short by a kill while it was being written
                raise NanotuneError(
                    f"{path}:{line_no}: not valid JSON ({e.msg}); fix or remove the line"
                ) from e
    return records


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Training-step series of preference runs, drawn beside their evaluation counterparts.
PREFERENCE_SERIES = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")
# And of GRPO runs (training/grpo.py), with every reward function's mean (`rewards/<name>/mean`).
GRPO_SERIES = ("reward", "kl", "clip_fraction", "completion_length_mean", "zero_std_fraction")


def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """{name: [(step, value)]} from metrics records: `loss` (training), `lr`, the preference
    and GRPO metrics of training steps (`PREFERENCE_SERIES`, `GRPO_SERIES`, each reward's
    mean) and every numeric key starting with `eval` or `val`."""
    out: dict[str, list] = {}
    for r in records:
        step = r.get("step")
        if not _number(step):
            continue
        for key, value in r.items():
            if not _number(value):
                continue
            if key == "train_loss":
                key = "loss"
            grpo = key in GRPO_SERIES or (key.startswith("rewards/") and key.endswith("/mean"))
            if key in ("loss", "lr", *PREFERENCE_SERIES) or grpo or key.startswith(("eval", "val")):
                out.setdefault(key, []).append((step, value))
    return out


def training_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time, tokens/s, parameter counts, compute precision and mean padding efficiency of a
    run's records.

    `elapsed_s` restarts in a resumed process, so wall time sums the segments; tokens/s is the
    time-weighted mean of the logged windows.
    """
    figures: dict[str, Any] = {}
    wall = tokens = prev = 0.0
    padding = []
    for r in records:
        if _number(r.get("elapsed_s")):
            dt = r["elapsed_s"] - prev if r["elapsed_s"] >= prev else r["elapsed_s"]
            prev = r["elapsed_s"]
            wall += dt
            tokens += r.get("tokens_per_s", 0.0) * dt
        if _number(r.get("padding_efficiency")):
            padding.append(r["padding_efficiency"])
        for key in ("trainable_params", "total_params"):
            if _number(r.get(key)):
                figures[key] = r[key]  # the last process's counts
        if isinstance(r.get("precision"), str):
            figures["precision"] = r["precision"]
        if _number(r.get("loss")):
            figures["steps"] = r["step"]
    if wall > 0:
        figures |= {"wall_s": wall, "tokens_per_s": tokens / wall}
    if padding:
        figures["padding_efficiency"] = sum(padding) / len(padding)
    return figures


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return (
        f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
    )


def _plot(
    name: str, points: list[tuple[float, float]], extra: Any = None, title: str | None = None
) -> bytes:
    """PNG bytes of one series against the step; `extra` = (label, points) on the same axes;
    the title is the series' name unless given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    series = [(name, points, "C0")] + ([(extra[0], extra[1], "C1")] if extra else [])
    for label, pts, color in series:
        steps, values = zip(*pts, strict=True)
        if len(pts) < _FEW_POINTS:
            ax.plot(steps, values, "o", color=color, markersize=6, label=label)
            for x, y in pts:
                ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(5, 5))
        else:
            marker = "o" if len(pts) < 30 else None
            ax.plot(steps, values, color=color, marker=marker, markersize=3, label=label)
    ax.set_title(title or ("learning rate" if name == "lr" else name))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.15)
    if name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if extra:
        ax.legend(frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _result_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    if not after:  # one model evaluated
        rows = ["<tr><th>metric</th><th>value</th></tr>"]
        for name, b, _, _ in compare_rows(before, {}):
            rows.append(f"<tr><td>{html.escape(name)}</td><td class=num>{fmt(b)}</td></tr>")
        return "<table class=result>" + "".join(rows) + "</table>"
    rows = ["<tr><th>metric</th><th>before</th><th>after</th><th>change</th><th></th></tr>"]
    for name, b, a, d in compare_rows(before, after):
        cls = verdict(name, d)
        mark = {"better": "▲ better", "worse": "▼ worse"}.get(cls, "")
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class=num>{fmt(b)}</td>"
            f"<td class=num>{fmt(a)}</td>"
            f'<td class="num {cls}">{fmt(d, signed=True)}</td><td class={cls or "same"}>{mark}</td>'
            "</tr>"
        )
    return "<table class=result>" + "".join(rows) + "</table>"


def _data_lines(stats: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str]]:
    if not stats:
        return []
    kept = " · ".join(f"{name} {c.get('examples', 0):,}" for name, c in stats.items())
    left = []
    for name, c in stats.items():
        parts = [
            f"{c[k]:,} {what}"
            for k, what in (
                ("skipped_bad_row", "bad rows skipped"),
                ("dropped_too_long", "too long"),
            )
            if c.get(k)
        ]
        if parts:
            left.append(f"{name}: {', '.join(parts)}")
    return [("examples", kept), ("rows left out", "; ".join(left) or "none")]


def _sources_line(sources: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The training mix: each source's examples an epoch and their share."""
    if not sources:
        return []
    total = sum(s["per_epoch"] for s in sources) or 1
    shown = " · ".join(
        f"{s['source']} {s['per_epoch']:,} ({100 * s['per_epoch'] / total:.1f}%, of "
        f"{s['examples']:,} examples)"
        for s in sources
    )
    return [("training sources, an epoch", shown)]


def _facts_table(
    figures: dict[str, Any],
    stats: Mapping[str, Mapping[str, int]],
    sources: list[dict[str, Any]] = (),
) -> str:
    lines: list[tuple[str, str]] = []
    if "steps" in figures:
        lines.append(("optimizer steps", f"{figures['steps']:,}"))
    if "wall_s" in figures:
        lines.append(("training time", f"{_duration(figures['wall_s'])} (evaluations included)"))
        lines.append(("throughput", f"{figures['tokens_per_s']:,.0f} tokens/s"))
    if "trainable_params" in figures and "total_params" in figures:
        t, n = figures["trainable_params"], figures["total_params"]
        lines.append(("trainable parameters", f"{t:,} of {n:,} ({100 * t / max(n, 1):.2f}%)"))
    if "precision" in figures:
        lines.append(("compute precision", figures["precision"]))
    lines += _data_lines(stats)
    lines += _sources_line(list(sources))
    if "padding_efficiency" in figures:
        share = f"{100 * figures['padding_efficiency']:.1f}%"
        lines.append(("padding efficiency", f"{share} of computed tokens are real"))
    if not lines:
        return ""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in lines)
    return f"<table class=facts>{rows}</table>"


def _subtitle(config: dict[str, Any], stats: Mapping[str, Mapping[str, int]]) -> str:
    """'model X · method Y · evaluated on the Z split (N examples)', from what the config has."""
    parts = []
    for section in ("model", "method"):
        value = config.get(section)
        value = value.get("name") if isinstance(value, dict) else value
        if value:
            parts.append(f"{section} <b>{html.escape(str(value))}</b>")
    ev = config.get("eval")
    if isinstance(ev, dict) and ev.get("split"):
        text = f"evaluated on the <b>{html.escape(str(ev['split']))}</b> split"
        n = stats.get(ev["split"], {}).get("examples")
        if n:
            n = min(n, ev["max_examples"]) if ev.get("max_examples") else n
            text += f" ({n:,} examples)"
        parts.append(text)
    return f"<p class=sub>{' · '.join(parts)}</p>" if parts else ""


def _confusion(title: str, confusion: dict[str, Any]) -> str:
    labels = [html.escape(str(x)) for x in confusion["labels"]]
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{x}</th>" for x in labels) + "</tr>"
    body = "".join(
        f"<tr><th>{labels[i]}</th>" + "".join(f"<td class=num>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(confusion["matrix"])
    )
    return f"<div><h3>{html.escape(title)}</h3><table>{head}{body}</table></div>"


def _sample(s: dict[str, Any]) -> str:
    """The prompt above its reference and generations, side by side."""
    columns = [c for c in s if c != "prompt"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cells = "".join(f"<td><pre class=gen>{html.escape(str(s[c]))}</pre></td>" for c in columns)
    prompt = f"<pre class=prompt>{html.escape(str(s['prompt']))}</pre>" if "prompt" in s else ""
    return f"<div class=sample>{prompt}<table><tr>{head}</tr><tr>{cells}</tr></table></div>"


def _curves_section(records: list[dict[str, Any]]) -> str:
    series = curves(records)
    if not series:
        return "<p class=note>No training metrics were logged.</p>"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "<p class=note>Plots need matplotlib: pip install 'nanotune[report]'</p>"
    eval_loss = next((k for k in ("eval_loss", "val_loss") if k in series), None)
    imgs = []
    if "loss" in series:
        extra = (eval_loss, series[eval_loss]) if eval_loss else None
        imgs.append(_img(_plot("loss", series["loss"], extra), "training and evaluation loss"))
    elif eval_loss:
        imgs.append(_img(_plot(eval_loss, series[eval_loss]), "evaluation loss"))
    if "lr" in series:
        imgs.append(_img(_plot("lr", series["lr"]), "learning rate"))
    shown = {"loss", "lr", eval_loss}
    # Preference runs: each training step's reward accuracy and margin with the evaluations',
    # and the chosen and rejected responses' log-probs on one plot.
    for name in ("reward_accuracy", "reward_margin"):
        if name in series:
            ev = f"eval_{name}"
            extra = (ev, series[ev]) if ev in series else None
            what = name.replace("_", " ")
            imgs.append(_img(_plot(name, series[name], extra), f"training and evaluation {what}"))
            shown |= {name, ev}
    if "logps_chosen" in series and "logps_rejected" in series:
        extra = ("logps_rejected", series["logps_rejected"])
        png = _plot("logps_chosen", series["logps_chosen"], extra, "response log-probs")
        imgs.append(_img(png, "chosen and rejected response log-probs"))
        shown |= {"logps_chosen", "logps_rejected"}
    for name, points in series.items():
        if name not in shown:
            imgs.append(_img(_plot(name, points), f"{name} curve"))
    return f"<div class=plots>{''.join(imgs)}</div>"


def render_report(summary: RunSummary, records: list[dict[str, Any]]) -> str:
    """The report page as an HTML string."""
    title = html.escape(summary.title)
    before, after = summary.before, summary.after
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>",
        _subtitle(summary.config, summary.data_stats),
    ]
    heading = "Before and after fine-tuning" if after else "Metrics"
    result = (
        _result_table(before, after)
        if before or after
        else "<p class=note>No evaluation metrics.</p>"
    )
    facts = _facts_table(training_figures(records), summary.data_stats, summary.data_sources)
    parts.append(
        f"<div class=row><div><h3>{heading}</h3>{result}</div>"
        + (f"<div><h3>The run</h3>{facts}</div>" if facts else "")
        + "</div>"
    )
    confusions = [
        _confusion(f"Confusion matrix ({label})", m["confusion"])
        for label, m in (("before", before), ("after", after))
        if isinstance(m.get("confusion"), dict)
    ]
    if confusions:
        parts.append(f"<div class=row>{''.join(confusions)}</div>")

    if records:
        parts.append("<h2>Training curves</h2>")
        parts.append(_curves_section(records))

    parts.append("<h2>Sample generations</h2>")
    samples = summary.samples
    parts.append("".join(map(_sample, samples)) if samples else "<p class=note>No samples.</p>")

    # Through JSON first so paths, tuples and other non-YAML values render as plain text.
    plain = json.loads(json.dumps(summary.config, default=str))
    cfg_text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False)
    parts.append(
        "<details><summary>Resolved configuration</summary>"
        f"<pre class=config>{html.escape(cfg_text)}</pre></details>"
    )
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(run_dir: str | os.PathLike, summary: RunSummary) -> Path:
    """Write `run_dir/report.html` atomically and return its path."""
    page = render_report(summary, read_metrics(summary.metrics_path))
    return atomic_write(Path(run_dir) / "report.html", page)
