"""Paired statistics of two models scored on the same held-out pairs (presentation-side, pure numpy).

c = compare(base_rows, tuned_rows)    # accuracy difference, its bootstrap 95% CI, McNemar's exact test
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_CHUNK = 500  # resamples drawn at once: memory is chunk x n int64 indices, whatever `resamples` is


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial test of the discordant pairs (won by exactly one model) against 1/2."""
    n = only_a + only_b
    if not n:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_mean_diff(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 10_000) -> np.ndarray:
    """`resamples` bootstrap replicates of mean(b) - mean(a) over paired samples (the same index draws both),
    drawn BOOTSTRAP_CHUNK at a time: the same replicates for the same seed as one draw of all of them."""
    rng = np.random.default_rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    for at in range(0, resamples, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, len(a), size=(min(BOOTSTRAP_CHUNK, resamples - at), len(a)))
        out[at : at + len(idx)] = b[idx].mean(1) - a[idx].mean(1)
    return out


def compare(base_rows: list[dict], rows: list[dict], seed: int = 0, resamples: int = 10_000) -> dict:
    """Paired comparison of two models on the same pairs: McNemar's exact test on the pairs where exactly one
    model prefers the chosen response, and a bootstrap 95% interval of the accuracy difference."""
    a = np.array([r["correct"] for r in base_rows], dtype=bool)
    b = np.array([r["correct"] for r in rows], dtype=bool)
    only_base, only_model = int((a & ~b).sum()), int((~a & b).sum())
    diffs = bootstrap_mean_diff(a, b, seed, resamples)
    return {
        "accuracy_diff": float(b.mean() - a.mean()),
        "diff_ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
        "only_baseline_correct": only_base,
        "only_model_correct": only_model,
        "mcnemar_p": mcnemar_exact(only_base, only_model),
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins vs losses (ties dropped): the same binomial test as McNemar's."""
    return mcnemar_exact(wins, losses)


def bootstrap_mean_ci(values, seed: int = 0, resamples: int = 10_000) -> list[float]:
    """95% percentile bootstrap interval of the mean of `values` (chunked like bootstrap_mean_diff)."""
    x = np.asarray(values, dtype=np.float64)
    reps = bootstrap_mean_diff(np.zeros_like(x), x, seed, resamples)
    return [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))]


def paired_mean_diff(base: list[float], other: list[float], seed: int = 0, resamples: int = 10_000) -> dict:
    """mean(other) - mean(base) over paired per-prompt scores, with its bootstrap 95% interval."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    reps = bootstrap_mean_diff(a, b, seed, resamples)
    return {
        "diff": float(b.mean() - a.mean()),
        "ci95": [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))],
    }


def win_rate(outcomes: list[float], seed: int = 0, resamples: int = 10_000) -> dict:
    """Per-prompt outcomes 1 (win), 0.5 (tie), 0 (loss): the win rate (ties count half), its bootstrap 95%
    interval, the counts and the sign test of wins vs losses."""
    x = np.asarray(outcomes, dtype=np.float64)
    wins, losses = int((x == 1).sum()), int((x == 0).sum())
    return {
        "win_rate": float(x.mean()) if len(x) else None,
        "ci95": bootstrap_mean_ci(x, seed, resamples) if len(x) else [None, None],
        "wins": wins,
        "ties": int(len(x) - wins - losses),
        "losses": losses,
        "sign_test_p": sign_test(wins, losses),
    }
