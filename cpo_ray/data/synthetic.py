"""The shipped preference task: write a number in English words; `rejected` is a near miss.

In the spirit of CPO's translation data: the chosen answer is correct, the rejected one is what a
weak translator produces (two digits swapped, one digit off by one, the wrong scale word, teen for
ty). Numbers held out for evaluation never appear in training (split by a hash of the number), so
held-out accuracy measures a learned mapping rather than memorised pairs. Deterministic from a seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from cpo_ray.contract import EVAL, TRAIN

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = ["", "thousand", "million"]


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(ONES[n])
    return words


def number_to_words(n: int) -> str:
    if not 0 <= n < 10**9:
        raise ValueError(f"number out of range: {n}")
    if n == 0:
        return "zero"
    groups, words = [], []
    while n:
        groups.append(n % 1000)
        n //= 1000
    for i in reversed(range(len(groups))):
        if groups[i]:
            words += _below_thousand(groups[i]) + ([SCALES[i]] if SCALES[i] else [])
    return " ".join(words)


def is_held_out(n: int, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def near_miss(n: int, rng: random.Random) -> str:
    """A plausible wrong rendering of n (never equal to the right one)."""
    correct = number_to_words(n)
    digits = list(str(n))
    for _ in range(20):
        kind = rng.randrange(4)
        if kind == 0 and len(digits) > 1:  # swap two adjacent different digits
            i = rng.randrange(len(digits) - 1)
            d = digits[:]
            d[i], d[i + 1] = d[i + 1], d[i]
            cand = number_to_words(int("".join(d)))
        elif kind == 1:  # one digit off by one
            i = rng.randrange(len(digits))
            d = digits[:]
            d[i] = str((int(d[i]) + rng.choice([1, 9])) % 10)
            cand = number_to_words(int("".join(d)))
        elif kind == 2 and ("thousand" in correct or "hundred" in correct):  # wrong scale word
            swaps = [("thousand", "hundred"), ("hundred", "thousand"), ("thousand", "million")]
            a, b = rng.choice([s for s in swaps if s[0] in correct])
            cand = correct.replace(a, b, 1)
        elif kind == 3:  # teen <-> ty confusion ("thirteen" for "thirty"), same length class
            pairs = [(ONES[i], TENS[i]) for i in range(3, 10)] + [(TENS[i], ONES[i + 10]) for i in range(3, 10)]
            hits = [(a, b) for a, b in pairs if re.search(rf"\b{a}\b", correct)]
            if not hits:
                continue
            a, b = rng.choice(hits)
            cand = re.sub(rf"\b{a}\b", b, correct, count=1)
        else:
            continue
        if cand != correct:
            return cand
    return number_to_words(n + 1)


def make_pairs(
    count: int, *, held_out: bool, max_number: int, eval_fraction: float, seed: int, negatives: int = 1
) -> list[dict]:
    """Explicit rows; with negatives K > 1, "rejected" lists K distinct near misses."""
    rng = random.Random(f"{seed}:{'eval' if held_out else 'train'}")
    rows = []
    while len(rows) < count:
        # Log-uniform over magnitudes so small and large numbers are both common.
        digits = rng.randint(1, len(str(max_number)))
        n = rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(10**digits - 1, max_number))
        if is_held_out(n, eval_fraction, seed) != held_out:
            continue
        misses: list[str] = []
        for _ in range(20 * negatives):  # small numbers have few distinct near misses: skip those
            miss = near_miss(n, rng)
            if miss not in misses:
                misses.append(miss)
            if len(misses) == negatives:
                break
        if len(misses) < negatives:
            continue
        rejected = misses[0] if negatives == 1 else misses
        rows.append({"prompt": f"{n} in words:", "chosen": number_to_words(n), "rejected": rejected})
    return rows


def write_task(
    out_dir,
    *,
    train_pairs: int,
    eval_pairs: int,
    max_number: int,
    eval_fraction: float,
    seed: int,
    negatives: int = 1,
    eval_negatives: int | None = None,
) -> tuple[str, str]:
    """Write train.jsonl and eval.jsonl (explicit prompt/chosen/rejected) into a folder or storage URI (the
    read tasks of prepare may run on any node); returns their URIs."""
    from cpo_ray.storage import Location

    out = Location(out_dir)
    paths = []
    for name, count, held in ((TRAIN, train_pairs, False), (EVAL, eval_pairs, True)):
        k = (eval_negatives or negatives) if held else negatives
        rows = make_pairs(
            count, held_out=held, max_number=max_number, eval_fraction=eval_fraction, seed=seed, negatives=k
        )
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path.uri)
    return paths[0], paths[1]
