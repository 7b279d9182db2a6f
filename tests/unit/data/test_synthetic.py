import pytest

from cpo_ray.data.synthetic import is_held_out, make_pairs, number_to_words


@pytest.mark.parametrize(
    "n,words",
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (1001, "one thousand one"),
        (40017, "forty thousand seventeen"),
        (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
        (2000000, "two million"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_pairs_are_near_misses_with_disjoint_held_out_numbers():
    kw = dict(max_number=999_999, eval_fraction=0.1, seed=0)
    train = make_pairs(3000, held_out=False, **kw)
    held = make_pairs(300, held_out=True, **kw)
    num = lambda r: int(r["prompt"].split()[0])  # noqa: E731
    assert not {num(r) for r in train} & {num(r) for r in held}
    assert all(is_held_out(num(r), 0.1, 0) for r in held)
    for r in train + held:
        assert r["chosen"] == number_to_words(num(r)) and r["rejected"] != r["chosen"]
    assert make_pairs(50, held_out=False, **kw) == train[:50]  # deterministic from the seed


def test_several_distinct_near_misses_per_number():
    rows = make_pairs(200, held_out=False, max_number=999_999, eval_fraction=0.1, seed=0, negatives=3)
    assert len(rows) == 200
    for r in rows:
        assert isinstance(r["rejected"], list) and len(r["rejected"]) == 3
        assert len(set(r["rejected"])) == 3 and r["chosen"] not in r["rejected"]
