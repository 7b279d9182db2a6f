"""Human-readable evaluation outputs: eval.md (models side by side), margins.png, samples.md.

    write_report(result, rows_by_model, out_dir)   # result = eval.json's dict, rows = per-pair rows
    print(markdown_table(result))

Called by cpo_ray.eval.scorer.evaluate_models; also usable to re-render from eval.json + pairs_*.jsonl.
"""

from __future__ import annotations

import io

from cpo_ray.contract import EVAL_MD, MARGINS_PNG, SAMPLES_MD
from cpo_ray.storage import Location


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def ci_text(c: dict) -> str:
    """A comparison's accuracy difference and its bootstrap 95% interval, in percentage points."""
    lo, hi = c["diff_ci95"]
    return f"{100 * c['accuracy_diff']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def mcnemar_text(c: dict) -> str:
    return f"{c['mcnemar_p']:.2g} ({c['only_model_correct']} won / {c['only_baseline_correct']} lost)"


def markdown_table(result: dict) -> str:
    """Rows = metrics, columns = models (baseline first)."""
    models = list(result["models"])
    metrics = [
        ("accuracy (logp chosen > rejected)", "accuracy", True),
        ("accuracy, length-normalised", "accuracy_length_normalised", True),
        ("mean margin (nats)", "mean_margin", False),
        ("median margin (nats)", "median_margin", False),
        ("pairs/s", "pairs_per_s", False),
    ]
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    if any((result["models"][m].get("rejected_per_prompt") or 1) > 1 for m in models):
        metrics.insert(1, ("accuracy per (chosen, rejected) pair", "pair_accuracy", True))
    for label, key, pct in metrics:
        lines.append(f"| {label} | " + " | ".join(_fmt(result["models"][m].get(key), pct) for m in models) + " |")
    lines.append("| n | " + " | ".join(str(result["models"][m]["n"]) for m in models) + " |")
    comps = result.get("comparisons") or {}
    if comps:
        lines.append(
            "| accuracy vs baseline (95% CI) | - | " + " | ".join(ci_text(comps[m]) for m in models[1:]) + " |"
        )
        lines.append(
            "| McNemar p (pairs won / lost) | - | " + " | ".join(mcnemar_text(comps[m]) for m in models[1:]) + " |"
        )
    return "\n".join(lines + generation_lines(result, models))


def diff_text(c: dict, pct: bool) -> str:
    """A paired difference and its bootstrap 95% interval (percentage points or metric points)."""
    k = 100 if pct else 1
    lo, hi = c["ci95"]
    return f"{k * c['diff']:+.1f} [{k * lo:+.1f}, {k * hi:+.1f}]"


def judge_text(j: dict) -> str:
    lo, hi = j["ci95"]
    return f"{100 * j['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({j['wins']}/{j['ties']}/{j['losses']}, p {j['sign_test_p']:.2g})"


def generation_lines(result: dict, models: list[str]) -> list[str]:
    """The generation scores as more rows of the same table (greedy answers vs the chosen responses)."""
    gen = result.get("generation")
    if not gen:
        return []
    per = [gen["models"][m] for m in models]
    lines = []
    for label, key, pct in (("greedy exact match", "exact_match", True), ("greedy chrF", "chrf", False),
                            ("greedy BLEU", "bleu", False), ("user score", "user", False)):  # fmt: skip
        if key in per[0]["greedy"]:
            lines.append(f"| {label} | " + " | ".join(_fmt(p["greedy"][key], pct) for p in per) + " |")
    if "samples" in per[0]:
        n = per[0]["samples"]["n"]
        lines.append(f"| best-of-{n} exact match | " + " | ".join(_fmt(p["samples"]["best_of_n_exact_match"], True) for p in per) + " |")  # fmt: skip
    comps = gen.get("comparisons") or {}
    if comps:
        lines.append("| exact match vs baseline (95% CI) | - | " + " | ".join(diff_text(comps[m]["exact_match"], True) for m in models[1:]) + " |")  # fmt: skip
    judge = gen.get("judge") or {}
    if judge:
        lines.append("| judge win rate vs baseline (W/T/L, sign p) | - | " + " | ".join(judge_text(judge[m]) for m in models[1:]) + " |")  # fmt: skip
    return lines


def plot_margins(rows_by_model: dict[str, list[dict]], path) -> None:
    """Overlaid histograms of margin = logp(chosen) - logp(rejected), one per model, shared bins."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt
    import numpy as np

    margins = {m: np.array([r["margin"] for r in rows]) for m, rows in rows_by_model.items()}
    allm = np.concatenate(list(margins.values()))
    bins = np.linspace(allm.min(), allm.max(), 41) if allm.size and np.ptp(allm) > 0 else 20
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, values in margins.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{model} (acc {np.mean(values > 0):.1%})")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set(xlabel="margin = logp(chosen) - logp(rejected)  [nats]", ylabel="pairs", title="Held-out preference margins")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    Location(path).write_bytes(png.getvalue())


def samples_markdown(samples: list[dict]) -> str:
    parts = ["# Greedy samples\n"]
    for i, s in enumerate(samples):
        parts.append(f"## Prompt {i}\n\n```\n{s['prompt']}\n```\n\nreference (chosen): `{s['chosen']}`\n")
        for model, text in s["outputs"].items():
            parts.append(f"- **{model}**: `{text!r}`")
        parts.append("")
    return "\n".join(parts)


def write_report(result: dict, rows_by_model: dict[str, list[dict]], out_dir) -> None:
    """eval.md, margins.png and samples.md into a folder or storage Location."""
    out = Location(out_dir)
    header = f"# Held-out preference evaluation\n\nendpoint: `{result['endpoint']}`, pairs: {result['n_pairs']}\n\n"
    (out / EVAL_MD).write_text(header + markdown_table(result) + "\n")
    plot_margins(rows_by_model, out / MARGINS_PNG)
    if result.get("samples"):
        (out / SAMPLES_MD).write_text(samples_markdown(result["samples"]))
