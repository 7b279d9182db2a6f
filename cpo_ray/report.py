"""The run report: training curves, held-out eval through the endpoint (base vs tuned), samples.

    write_report(cfg) -> <output_dir>/report.html (self-contained: PNGs inlined) + <output_dir>/report/*.png

Reads what the stages left where cpo_ray.contract.RunPaths puts it (data.output_dir and eval.output_dir
included): metrics.jsonl (train), eval.json, eval.md, margins.png and samples.md (evaluate),
prepare_report.json (prepare), timings.json.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cpo_ray.contract import RunPaths

CURVES = [
    ("loss", "loss (CPO + cpo_alpha * NLL)"),
    ("nll_loss", "chosen NLL (per token)"),
    ("rewards/accuracies", "train preference accuracy"),
    ("rewards/margins", "train reward margin"),
    ("eval/accuracy", "held-out accuracy (in training)"),
    ("tokens_per_s", "tokens/s (non-pad, all workers)"),
]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_curves(rows: list[dict], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        # the final row repeats the last step's training metrics; only its eval point is new
        pts = sorted(
            {r["step"]: r[key] for r in rows if key in r and (key.startswith("eval/") or not r.get("final"))}.items()
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, lw=1)
            if len(pts) > 20 and not key.startswith("eval/"):  # a running mean to see the trend
                k = max(5, len(pts) // 25)
                sm = [sum(ys[max(0, i - k) : i + 1]) / len(ys[max(0, i - k) : i + 1]) for i in range(len(ys))]
                ax.plot(xs, sm, lw=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _img(path: Path | None) -> str:
    if not path or not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _md_table_to_html(md: str) -> str:
    rows = [ln.strip().strip("|").split("|") for ln in md.splitlines() if ln.strip().startswith("|")]
    rows = [r for r in rows if not set("".join(r)) <= set("-: ")]
    if not rows:
        return f"<pre>{html.escape(md)}</pre>"
    head, *body = rows
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"


def write_report(cfg) -> Path:
    paths = RunPaths.of(cfg)
    run = paths.output_dir
    rows = read_metrics(paths.metrics)
    curves = plot_curves(rows, paths.report_assets / "training_curves.png")
    eval_md = paths.eval_md.read_text() if paths.eval_md.exists() else ""
    samples = paths.samples_md.read_text() if paths.samples_md.exists() else ""
    prep = json.loads(paths.prepare_report.read_text()) if paths.prepare_report.exists() else {}
    timings = json.loads(paths.timings.read_text()) if paths.timings.exists() else {}
    final = next((r for r in reversed(rows) if "eval/accuracy" in r), {})
    parts = [
        "<!doctype html><meta charset='utf-8'><title>cpo-ray report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto;white-space:pre-wrap}</style>",
        f"<h1>cpo-ray run: {html.escape(run.name)}</h1>",
        "<h2>Held-out pairs scored through the endpoint</h2>",
        _md_table_to_html(eval_md) if eval_md else "<p>(no eval yet)</p>",
        _img(paths.margins_png),
        "<h2>Training</h2>",
        f"<p>{len([r for r in rows if 'loss' in r and not r.get('final')])} steps logged; last in-training held-out accuracy "
        f"{final.get('eval/accuracy', float('nan')):.3f}, margin {final.get('eval/margin', float('nan')):.3f}.</p>",
        _img(curves),
    ]
    if prep:
        parts += [
            "<h2>Data</h2>",
            f"<p>{prep.get('rows_read')} rows read, {prep.get('rows_kept')} kept, {prep.get('rows_rejected')} rejected.</p>",
            f"<pre>{html.escape(json.dumps({k: {kk: v[kk] for kk in ('rows_read', 'rows_kept', 'rejected_by_reason', 'truncated', 'tokens')} for k, v in prep.get('splits', {}).items()}, indent=1))}</pre>",
        ]
    if samples:
        parts += ["<h2>Sample generations</h2>", f"<pre>{html.escape(samples)}</pre>"]
    if timings:
        parts += ["<h2>Stage wall times (s)</h2>", f"<pre>{html.escape(json.dumps(timings, indent=1))}</pre>"]
    out = paths.report_html
    out.write_text("\n".join(parts))
    return out
