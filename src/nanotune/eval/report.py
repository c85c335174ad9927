"""report.html: one self-contained page (inline CSS, PNG plots embedded as base64).

matplotlib is optional (`pip install nanotune[report]`): without it the page still has every
table and says how to get the plots. Plots use the Agg canvas directly, never pyplot, so no
global backend state changes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from nanotune.errors import NanotuneError
from nanotune.eval.compare import compare_rows, fmt, verdict

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37}.worse{color:#c62828}pre{background:#f7f7f7;padding:.8em;overflow:auto}
td.text{white-space:pre-wrap;max-width:28em;font-family:ui-monospace,monospace;font-size:.85em}
.note{color:#666;font-style:italic}img{max-width:100%}
"""


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


def curves(records: list[dict[str, Any]]) -> tuple[dict[str, list], dict[str, list]]:
    """(training, evaluation) series {name: [(step, value)]} from metrics records.

    Training: `loss` (or `train_loss`). Evaluation: numeric keys starting with `eval` or `val`.
    """
    train: dict[str, list] = {}
    evals: dict[str, list] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in r.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in ("loss", "train_loss"):
                train.setdefault("train loss", []).append((step, value))
            elif key.startswith(("eval", "val")):
                evals.setdefault(key, []).append((step, value))
    return train, evals


def _plot(series: dict[str, list], title: str, log_y: bool = False) -> bytes:
    """PNG bytes of the series, one subplot per name unless they share a scale (losses)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(series)
    fig = Figure(figsize=(7, 3.2 * len(names)) if len(names) > 1 else (7, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        steps, values = zip(*series[name], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(f"{title}: {name}" if len(names) > 1 else f"{title}")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if log_y and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _metric_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = ["<tr><th>metric</th><th>before</th><th>after</th><th>delta</th></tr>"]
    for name, b, a, d in compare_rows(before, after):
        cls = verdict(name, d)
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class=num>{fmt(b)}</td><td class=num>{fmt(a)}</td>"
            f'<td class="num {cls}">{fmt(d, signed=True)}</td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


def _confusion(title: str, confusion: dict[str, Any]) -> str:
    labels = [html.escape(str(x)) for x in confusion["labels"]]
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{x}</th>" for x in labels) + "</tr>"
    body = "".join(
        f"<tr><th>{labels[i]}</th>" + "".join(f"<td class=num>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(confusion["matrix"])
    )
    return f"<h3>{html.escape(title)}</h3><table>{head}{body}</table>"


def _samples_table(samples: list[dict[str, Any]]) -> str:
    columns = [
        c for c in ("prompt", "reference", "before", "after") if any(c in s for s in samples)
    ]
    columns += [c for s in samples for c in s if c not in columns]
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join(
        "<tr>"
        + "".join(f"<td class=text>{html.escape(str(s.get(c, '')))}</td>" for c in columns)
        + "</tr>"
        for s in samples
    )
    return f"<table>{head}{body}</table>"


def render_report(
    config: dict[str, Any],
    records: list[dict[str, Any]],
    before: dict[str, Any],
    after: dict[str, Any],
    samples: list[dict[str, Any]],
    title: str = "nanotune run report",
) -> str:
    """The report page as an HTML string."""
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    parts.append("<h2>Run configuration</h2>")
    # Through JSON first so paths, tuples and other non-YAML values render as plain text.
    plain = json.loads(json.dumps(config, default=str))
    cfg_text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False)
    parts.append(f"<pre>{html.escape(cfg_text)}</pre>")
    parts.append("<h2>Metrics before and after fine-tuning</h2>")
    parts.append(
        _metric_table(before, after)
        if before or after
        else "<p class=note>No evaluation metrics.</p>"
    )
    for label, m in (("before", before), ("after", after)):
        if isinstance(m.get("confusion"), dict):
            parts.append(_confusion(f"Confusion matrix ({label})", m["confusion"]))

    parts.append("<h2>Training curves</h2>")
    train, evals = curves(records)
    if not train and not evals:
        parts.append("<p class=note>No training metrics were logged.</p>")
    else:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parts.append("<p class=note>Plots need matplotlib: pip install 'nanotune[report]'</p>")
        else:
            if train:
                parts.append(_img(_plot(train, "training loss"), "training loss curve"))
            if evals:
                parts.append(_img(_plot(evals, "evaluation"), "evaluation curve"))

    parts.append("<h2>Sample generations</h2>")
    parts.append(_samples_table(samples) if samples else "<p class=note>No samples.</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(
    run_dir: str | os.PathLike,
    config: dict[str, Any],
    metrics_jsonl_path: str | os.PathLike | None,
    before: dict[str, Any],
    after: dict[str, Any],
    samples: list[dict[str, Any]],
) -> Path:
    """Write `run_dir/report.html` atomically (temp file, then rename) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    page = render_report(config, read_metrics(metrics_jsonl_path), before, after, samples)
    target = run_dir / "report.html"
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".report.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
