"""Human-readable evaluation outputs: eval.md (models side by side), margins.png, samples.md.

    write_report(result, rows_by_model, out_dir)   # result = eval.json's dict, rows = per-pair rows
    print(markdown_table(result))

Called by cpo_ray.eval.scorer.evaluate_models; also usable to re-render from eval.json + pairs_*.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from cpo_ray.contract import EVAL_MD, MARGINS_PNG, SAMPLES_MD


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
    return "\n".join(lines)


def plot_margins(rows_by_model: dict[str, list[dict]], path: Path) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_markdown(samples: list[dict]) -> str:
    parts = ["# Greedy samples\n"]
    for i, s in enumerate(samples):
        parts.append(f"## Prompt {i}\n\n```\n{s['prompt']}\n```\n\nreference (chosen): `{s['chosen']}`\n")
        for model, text in s["outputs"].items():
            parts.append(f"- **{model}**: `{text!r}`")
        parts.append("")
    return "\n".join(parts)


def write_report(result: dict, rows_by_model: dict[str, list[dict]], out_dir: str | Path) -> None:
    out = Path(out_dir)
    header = f"# Held-out preference evaluation\n\nendpoint: `{result['endpoint']}`, pairs: {result['n_pairs']}\n\n"
    (out / EVAL_MD).write_text(header + markdown_table(result) + "\n")
    plot_margins(rows_by_model, out / MARGINS_PNG)
    if result.get("samples"):
        (out / SAMPLES_MD).write_text(samples_markdown(result["samples"]))
