"""The run report: one self-contained HTML file (images inlined) that a person reads top to bottom.

    write_report(cfg) -> <output_dir>/report.html (also copied to local_dir when output_dir is in storage)

Sections: the result through the endpoint (base vs tuned, the paired test, the margins histogram), sample
generations side by side, training (curves, resumes), data (per split: rows read/kept/rejected by reason with
file:line examples, token-length percentiles, truncation), stage timings and the resolved config. Reads what
the stages left where cpo_ray.contract.RunPaths puts it (data.output_dir and eval.output_dir included).
"""

from __future__ import annotations

import base64
import html
import io
import json

from cpo_ray.contract import RunPaths
from cpo_ray.eval.render import ci_text, diff_text, judge_text, mcnemar_text
from cpo_ray.storage import Location

CURVES = [
    ("loss", "loss (CPO + cpo_alpha * NLL)"),
    ("nll_loss", "chosen NLL (per token)"),
    ("rewards/accuracies", "train preference accuracy"),
    ("rewards/margins", "train reward margin"),
    ("eval/accuracy", "held-out accuracy (in training)"),
    ("tokens_per_s", "tokens/s (all workers)"),
]
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:1em 1.5em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #d4d4d4;padding:4px 10px;vertical-align:top} th{background:#f3f3f3;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} .best{font-weight:600;color:#0a6b2c}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;white-space:pre-wrap;margin:0}
td pre{background:none;padding:0;font-size:.92em} details{margin:.6em 0} summary{cursor:pointer;color:#245}
img{max-width:100%} .note{color:#555;font-size:.93em}
"""


def read_jsonl(path) -> list[dict]:
    loc = Location(path)
    if not loc.is_file():
        return []
    return [json.loads(ln) for ln in loc.read_text().splitlines() if ln.strip()]


def plot_curves(rows: list[dict], switch: int = 0) -> bytes | None:
    """The training curves; a dashed line at `switch` (train.sft_steps) marks where SFT hands over to CPO."""
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
        if switch:
            ax.axvline(switch, color="grey", ls="--", lw=1, label="SFT -> CPO")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    return png.getvalue()


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = "{:,.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _eval_section(paths: RunPaths) -> list[str]:
    if not paths.eval_json.is_file():
        return ["<h2>Held-out pairs through the endpoint</h2><p>(not evaluated yet)</p>"]
    res = json.loads(paths.eval_json.read_text())
    models, comps = list(res["models"]), res.get("comparisons", {})
    best = max(models, key=lambda m: res["models"][m].get("accuracy") or 0)
    metrics = [
        ("accuracy (log p(chosen) > log p(rejected))", "accuracy", _pct),
        ("accuracy, length-normalised", "accuracy_length_normalised", _pct),
        ("mean margin (nats)", "mean_margin", _num),
        ("median margin (nats)", "median_margin", _num),
        ("pairs scored", "n", lambda x: f"{x:,}"),
        ("pairs/s", "pairs_per_s", lambda x: _num(x, "{:,.1f}")),
    ]
    if any((res["models"][m].get("rejected_per_prompt") or 1) > 1 for m in models):
        metrics.insert(1, ("accuracy per (chosen, rejected) pair", "pair_accuracy", _pct))
    rows = [[label, *(fn(res["models"][m].get(key)) for m in models)] for label, key, fn in metrics]
    rows[0] = [
        rows[0][0],
        *(f"<span class=best>{v}</span>" if m == best else v for m, v in zip(models, rows[0][1:], strict=True)),
    ]
    if comps:
        rows.append(["accuracy vs baseline (bootstrap 95% CI)", "-", *(ci_text(comps[m]) for m in models[1:])])
        rows.append(["McNemar exact p (pairs won / lost)", "-", *(mcnemar_text(comps[m]) for m in models[1:])])
    note = (
        f"<p class=note>{res['n_pairs']:,} held-out pairs scored through <code>{html.escape(res['endpoint'])}</code> "
        f"(prompt log-probs of the real response tokens, {res.get('pairs_per_request', '?')} pairs per request); "
        f"the first column is the baseline.</p>"
    )
    return [
        "<h2>Held-out pairs through the endpoint</h2>",
        note,
        _table(["", *models], rows, set(range(1, len(models) + 1))),
        _img(paths.margins_png.read_bytes() if paths.margins_png.is_file() else None, "margins histogram"),
        *_generation_section(paths, res, models),
        *_samples(res, models),
    ]


GENERATION_METRICS = [
    ("exact match", "exact_match", _pct),
    ("chrF", "chrf", lambda x: _num(x, "{:.1f}")),
    ("BLEU", "bleu", lambda x: _num(x, "{:.1f}")),
    ("user score", "user", _num),
]
EXAMPLES = 8  # prompts shown side by side with their verdicts


def _generation_section(paths: RunPaths, res: dict, models: list[str]) -> list[str]:
    """Greedy answers scored against the chosen responses, the paired comparisons, the judge, and examples."""
    gen = res.get("generation")
    if not gen:
        return []
    per = {m: gen["models"][m] for m in models}
    rows = [[f"greedy {label}", *(fn(per[m]["greedy"].get(key)) for m in models)]
            for label, key, fn in GENERATION_METRICS if key in per[models[0]]["greedy"]]  # fmt: skip
    if "samples" in per[models[0]]:
        s = per[models[0]]["samples"]
        rows.append([f"{s['n']} samples at T={s['temperature']}: exact match", *(_pct(per[m]["samples"]["exact_match"]) for m in models)])  # fmt: skip
        rows.append([f"best of {s['n']}: exact match", *(_pct(per[m]["samples"]["best_of_n_exact_match"]) for m in models)])  # fmt: skip
    rows.append(["generated tokens/s", *(_num(per[m]["generated_tokens_per_s"], "{:,.0f}") for m in models)])
    comps = gen.get("comparisons") or {}
    if comps:
        rows.append(["exact match vs baseline (bootstrap 95% CI)", "-", *(diff_text(comps[m]["exact_match"], True) + " pts" for m in models[1:])])  # fmt: skip
        rows.append(["McNemar exact p (prompts won / lost)", "-", *(f"{comps[m]['exact_match']['mcnemar_p']:.2g} ({comps[m]['exact_match']['only_model']} / {comps[m]['exact_match']['only_baseline']})" for m in models[1:])])  # fmt: skip
        rows.append(["chrF vs baseline (bootstrap 95% CI)", "-", *(diff_text(comps[m]["chrf"], False) for m in models[1:])])  # fmt: skip
    judge = gen.get("judge") or {}
    if judge:
        rows.append([f"judge win rate vs baseline ({html.escape(next(iter(judge.values()))['judge'])}; wins/ties/losses, sign test)", "-", *(judge_text(judge[m]) for m in models[1:])])  # fmt: skip
    note = (f"<p class=note>{gen['n_prompts']:,} held-out prompts; each model's greedy answer (stopping at its end of "
            "turn) against the chosen response; exact match after normalising case, spaces and final punctuation; "
            "chrF and BLEU are sacrebleu's. The judge sees each pair twice with the answers swapped.</p>")  # fmt: skip
    return ["<h2>Generations on held-out prompts</h2>", note,
            _table(["", *models], rows, set(range(1, len(models) + 1))), *_examples(paths, models, judge)]  # fmt: skip


def _examples(paths: RunPaths, models: list[str], judge: dict) -> list[str]:
    from cpo_ray.contract import generations_file

    per = {m: read_jsonl(paths.eval_dir / generations_file(m))[:EXAMPLES] for m in models}
    if not per[models[0]]:
        return []
    pre = lambda s: f"<pre>{html.escape(s)}</pre>"  # noqa: E731
    mark = lambda r: "✓ " if r["exact_match"] else "✗ "  # noqa: E731
    verdict = {1.0: "model wins", 0.5: "tie", 0.0: "baseline wins"}
    rows = []
    for i, first in enumerate(per[models[0]]):
        cells = [pre(first["prompt"][-300:]), pre(first["reference"])]
        cells += [mark(per[m][i]) + pre(per[m][i]["response"]) for m in models]
        if judge:
            cells.append("<br>".join(f"{m}: {verdict[judge[m]['verdicts'][i]['outcome']]}" for m in models[1:]
                                     if i < len(judge[m]["verdicts"])))  # fmt: skip
        rows.append(cells)
    head = ["prompt (end)", "reference (chosen)", *models, *(["judge"] if judge else [])]
    return [f"<h3>Examples (first {len(rows)})</h3>", _table(head, rows)]


def _samples(res: dict, models: list[str]) -> list[str]:
    if res.get("generation"):  # the scored generations' examples already show them
        return []
    samples = res.get("samples") or []
    if not samples:
        return []
    pre = lambda s: f"<pre>{html.escape(s)}</pre>"  # noqa: E731
    rows = [[pre(s["prompt"][-600:]), pre(s["chosen"]), *(pre(s["outputs"][m]) for m in models)] for s in samples]
    return ["<h2>Sample generations (greedy)</h2>", _table(["prompt (end)", "reference (chosen)", *models], rows)]


def _train_section(paths: RunPaths, sft_steps: int = 0) -> list[str]:
    rows = read_jsonl(paths.metrics)
    steps = [r for r in rows if "loss" in r and not r.get("final")]
    evals = [r for r in rows if "eval/accuracy" in r]
    out = ["<h2>Training</h2>"]
    if not rows:
        return [*out, "<p>(no training metrics)</p>"]
    line = f"{len(steps):,} optimizer steps logged"
    if evals:
        line += f"; in-training held-out accuracy {evals[0]['eval/accuracy']:.3f} (step {evals[0]['step']}) → {evals[-1]['eval/accuracy']:.3f} (step {evals[-1]['step']})"
    if steps and "elapsed_s" in steps[-1]:
        secs = steps[-1]["elapsed_s"]
        line += f"; {secs:,.0f} s of training, {sum(r.get('tokens', 0) for r in steps) / max(secs, 1e-9):,.0f} tokens/s"
    out.append(f"<p>{line}.</p>")
    out.append(_img(plot_curves(rows, sft_steps), "training curves"))
    selected = [e for e in read_jsonl(paths.events) if e.get("event") == "selected"]
    if selected:
        e = selected[-1]
        out.append(f"<p><b>final/ is the model of step {e['step']}</b>, picked by train.select_by: {html.escape(e['metric'])} "
                   f"= {e['value']:.4f}, the {e['mode']} over the run's held-out evaluations (not the last step's).</p>")  # fmt: skip
    resumes = [e for e in read_jsonl(paths.events) if e.get("event") == "resume"]
    if resumes:

        def changed(e: dict) -> str:
            return ", ".join(f"{k} {a} → {b}" for k, (a, b) in (e.get("changed") or {}).items()) or "-"

        rows = [[e["step"], e["epoch"], html.escape(changed(e)), len(e.get("replayed", []))] for e in resumes]
        out.append(_table(["resumed at step", "epoch", "settings changed", "steps trained again"], rows, {0, 1, 3}))
    return out


def _data_section(paths: RunPaths) -> list[str]:
    if not paths.prepare_report.is_file():
        return []
    prep = json.loads(paths.prepare_report.read_text())
    out = [
        "<h2>Data</h2>",
        f"<p class=note>Tokenized with <code>{html.escape(str(prep.get('model')))}</code>, max_length {prep.get('max_length')} tokens per sequence.</p>",
    ]
    head = ["split", "rows read", "kept", "rejected", "truncated", "boundary merges"]
    rows = [
        [
            n,
            f"{s['rows_read']:,}",
            f"{s['rows_kept']:,}",
            f"{s['rows_rejected']:,}",
            f"{s['truncated']:,}",
            f"{s.get('boundary_merges', 0):,}",
        ]
        for n, s in prep["splits"].items()
    ]
    out.append(_table(head, rows, {1, 2, 3, 4, 5}))
    for name, s in prep["splits"].items():
        lengths = [
            [part, *(f"{s['tokens'][part].get(k, '-')}" for k in ("mean", "p50", "p95", "max"))]
            for part in ("prompt", "chosen", "rejected")
            if s["tokens"].get(part)
        ]
        if lengths:
            out.append(
                f"<h3>{html.escape(name)}: token lengths</h3>"
                + _table(["", "mean", "p50", "p95", "max"], lengths, {1, 2, 3, 4})
            )
        if s["rejected_by_reason"]:
            rej = [
                [html.escape(r), f"{n:,}", "<br>".join(html.escape(x) for x in s["examples"].get(r, []))]
                for r, n in s["rejected_by_reason"].items()
            ]
            out.append(
                f"<h3>{html.escape(name)}: rejected rows</h3>"
                + _table(["reason", "rows", "examples (file:line: message)"], rej, {1})
            )
    return out


def write_report(cfg) -> Location:
    """report.html into the run's output_dir (and a copy in local_dir when that is elsewhere); returns it."""
    import yaml

    paths = RunPaths.of(cfg)
    timings = json.loads(paths.timings.read_text()) if paths.timings.is_file() else {}
    tc, model_cfg = cfg.train, cfg.model
    adapter = f"LoRA r{model_cfg.lora.r}" if model_cfg.lora.enabled else "full fine-tune"
    sub = f"{html.escape(model_cfg.name_or_path)} · {adapter} · loss {tc.loss_type}, β {tc.beta}, cpo_alpha {tc.cpo_alpha} · {tc.num_workers} worker(s), ZeRO-{tc.zero_stage}"
    parts = [
        "<!doctype html><html lang=en><meta charset='utf-8'>",
        f"<title>cpo-ray report: {html.escape(cfg.name)}</title><style>{STYLE}</style>",
        f"<h1>cpo-ray run: {html.escape(cfg.name)}</h1><p class=sub>{sub}</p>",
        *_eval_section(paths),
        *_train_section(paths, cfg.train.sft_steps),
        *_data_section(paths),
    ]
    if timings:
        parts += [
            "<h2>Stage wall times</h2>",
            _table(["stage", "seconds"], [[html.escape(k), f"{v:,.1f}"] for k, v in timings.items()], {1}),
        ]
    config = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    parts += [
        "<h2>Configuration</h2>",
        f"<details><summary>resolved config ({len(config.splitlines())} lines)</summary><pre>{html.escape(config)}</pre></details>",
    ]
    text = "\n".join(parts) + "\n</html>\n"
    paths.report_html.write_text(text)
    local = Location(paths.local_dir) / paths.report_html.name
    if local != paths.report_html:  # the person at the driver gets a copy on their own disk
        local.write_text(text)
    return paths.report_html
