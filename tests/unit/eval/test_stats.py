"""Paired statistics: McNemar's exact test by hand, the bootstrap drawn in bounded-memory chunks (issue 21)."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np

from cpo_ray.eval import stats


def test_mcnemar_exact_by_hand():
    """Discordant pairs 1 vs 5: two-sided binomial p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7/64 = 0.21875."""
    assert math.isclose(stats.mcnemar_exact(1, 5), 0.21875)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0


def test_chunked_bootstrap_equals_one_draw_of_all_replicates():
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.6, rng.random(300) < 0.7
    idx = np.random.default_rng(5).integers(0, 300, size=(1234, 300))  # the old code: every index at once
    want = b[idx].mean(1) - a[idx].mean(1)
    np.testing.assert_array_equal(stats.bootstrap_mean_diff(a, b, seed=5, resamples=1234), want)


def test_bootstrap_memory_is_bounded_by_the_chunk_not_the_resamples():
    """20k pairs x 10k resamples: one int64 index array would be 1.6 GB; chunks keep the peak near 500 x n."""
    a = b = np.ones(20_000, dtype=bool)
    tracemalloc.start()
    stats.bootstrap_mean_diff(a, b, seed=0, resamples=10_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * stats.BOOTSTRAP_CHUNK * 20_000 * 8, peak  # a few chunk-sized temporaries, not 1.6 GB
