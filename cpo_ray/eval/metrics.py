"""Scores of generated text against a reference: exact match, chrF and BLEU (sacrebleu), or a user's scorer.

    em = exact_match(response, reference)               # 1.0 / 0.0 after normalise()
    chrf = sentence_chrf(response, reference)            # 0-100, sacrebleu's chrF (character n-gram F-score)
    corpus = corpus_scores(responses, references)        # {"exact_match", "chrf", "bleu"} over a whole set
    fn = load_scorer("my_pkg.scoring:score")             # fn(prompt, response, reference) -> float

chrF and BLEU are sacrebleu's standard implementations (Popovic 2015; Papineni et al. 2002 with sacrebleu's
defaults), so the numbers compare with published ones; BLEU uses effective order, as answers are often shorter
than four words. Pure: no Ray, no network.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable

TASK_METRICS = ("exact_match", "chrf", "bleu")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text compared by exact match: Unicode NFKC, lower case, whitespace collapsed, ends stripped of
    whitespace and sentence punctuation (an answer's final period is not a different answer)."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    return text.rstrip(".!?;:,").strip()


def exact_match(response: str, reference: str) -> float:
    return float(normalise(response) == normalise(reference))


def sentence_chrf(response: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(response, [reference]).score)


def corpus_scores(responses: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (mean, 0-1), corpus chrF and corpus BLEU (0-100) of aligned lists."""
    import sacrebleu
    from sacrebleu.metrics import BLEU

    if not responses:
        return {k: None for k in TASK_METRICS}
    return {
        "exact_match": sum(exact_match(r, ref) for r, ref in zip(responses, references, strict=True)) / len(responses),
        "chrf": float(sacrebleu.corpus_chrf(responses, [references]).score),
        "bleu": float(BLEU(effective_order=True).corpus_score(responses, [references]).score),
    }


def load_scorer(spec: str) -> Callable[[str, str, str], float]:
    """`module:function` (importable on the driver) -> function(prompt, response, reference) -> float."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"scorer {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scorer {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"scorer {spec!r} is not callable")
    return fn
