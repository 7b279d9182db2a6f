"""Generation scoring: task metrics, the judge's order swap and verdicts, and the statistics, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_ray.config import EvalConfig
from cpo_ray.eval import generate, judge, metrics, stats


def test_exact_match_normalises_case_spaces_and_final_punctuation_only():
    assert metrics.exact_match("  Forty-Seven. ", "forty-seven") == 1.0
    assert metrics.exact_match("forty seven", "forty-seven") == 0.0  # a hyphen is part of the answer
    assert metrics.exact_match("seven hundred\n two", "seven hundred two") == 1.0


def test_chrf_and_bleu_are_sacrebleus():
    """chrF of an exact answer is 100; of "forty" against "forty-seven" sacrebleu's character F-score (36.62);
    corpus BLEU with effective order is 100 for identical one-word answers (plain BLEU would give 0)."""
    assert metrics.sentence_chrf("forty-seven", "forty-seven") == pytest.approx(100.0)
    assert metrics.sentence_chrf("forty", "forty-seven") == pytest.approx(36.62377, abs=1e-4)
    scores = metrics.corpus_scores(["one", "two"], ["one", "two"])
    assert scores == {"exact_match": 1.0, "chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0)}


def test_user_scorer_by_import_path():
    fn = metrics.load_scorer("cpo_ray.eval.metrics:exact_match")
    assert fn("a", "a") == 1.0
    with pytest.raises(ValueError, match="module:function"):
        metrics.load_scorer("no_colon")
    with pytest.raises(ValueError, match="nope"):
        metrics.load_scorer("cpo_ray.eval.metrics:nope")


def test_sign_test_p_values_by_hand():
    """Two-sided exact binomial, ties dropped: (1 win, 5 losses) p = 2 (C(6,0)+C(6,1)) / 2^6 = 0.21875;
    (0, 10) p = 2 / 2^10 = 0.001953125; (5, 5) p = 1."""
    assert stats.sign_test(1, 5) == pytest.approx(0.21875)
    assert stats.sign_test(0, 10) == pytest.approx(0.001953125)
    assert stats.sign_test(5, 5) == 1.0


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """A known case: 300 samples of 80 Bernoulli(0.7) draws; the percentile bootstrap's 95% interval holds
    0.7 in close to 95% of them (90-99% here: binomial noise of 300 trials)."""
    rng = np.random.default_rng(11)
    hits = 0
    for i in range(300):
        lo, hi = stats.bootstrap_mean_ci(rng.random(80) < 0.7, seed=i, resamples=2000)
        hits += lo <= 0.7 <= hi
    assert 0.90 <= hits / 300 <= 0.99, hits


def test_win_rate_counts_ties_half():
    out = stats.win_rate([1, 1, 0.5, 0, 1])
    assert out["win_rate"] == pytest.approx(0.7) and (out["wins"], out["ties"], out["losses"]) == (3, 1, 1)
    assert out["sign_test_p"] == pytest.approx(stats.sign_test(3, 1))


def test_judge_verdicts_and_the_order_swap():
    assert [judge.parse_verdict(t) for t in ("A", " b.", "Tie!", "**A**", "neither", "")] == [
        "A",
        "B",
        "tie",
        "A",
        None,
        None,
    ]
    # model first (A = model) then second (B = model)
    assert judge.combine("A", "B") == 1.0  # the model wins in both orders
    assert judge.combine("B", "A") == 0.0
    assert judge.combine("A", "A") == 0.5  # a judge that always says A: position bias, cancelled
    assert judge.combine("A", "tie") == 1.0 and judge.combine("tie", "A") == 0.0
    assert judge.combine(None, "B") == 1.0 and judge.combine(None, None) == 0.5


def test_judge_template_must_hold_its_placeholders(tmp_path):
    from cpo_ray.config import JudgeConfig

    bad = tmp_path / "t.txt"
    bad.write_text("{prompt} only")
    with pytest.raises(ValueError, match="response_a"):
        judge.load_template(JudgeConfig(base_url="http://x/v1", model="m", template=str(bad)))
    assert "{response_b}" in judge.load_template(JudgeConfig(base_url="http://x/v1", model="m"))


def test_rows_summary_and_comparison_of_generations():
    cfg = EvalConfig(generation={"samples": 2})
    refs = ["one", "two", "three", "four"]
    base = {"greedy": ["one", "x", "y", "z"], "samples": [["one", "q"]] * 4}
    tuned = {"greedy": ["one", "two", "three", "z"], "samples": [["q", "four"]] * 4}
    rb = generate.score_rows(["p"] * 4, refs, base, cfg)
    rt = generate.score_rows(["p"] * 4, refs, tuned, cfg)
    sb, st = generate.summarize(rb, cfg), generate.summarize(rt, cfg)
    assert sb["greedy"]["exact_match"] == 0.25 and st["greedy"]["exact_match"] == 0.75
    assert st["samples"]["best_of_n_exact_match"] == 0.25 and sb["samples"]["exact_match"] == 0.125
    c = generate.compare(rb, rt)["exact_match"]
    assert c["diff"] == pytest.approx(0.5) and (c["only_model"], c["only_baseline"]) == (2, 0)
