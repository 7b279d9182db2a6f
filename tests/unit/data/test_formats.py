"""Raw preference records -> (prompt, chosen, rejected) text: every format, every RowError reason, HH-RLHF."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import ASSETS as TEST_ASSETS
from conftest import HH_FILE
from cpo_ray.contract import RowError
from cpo_ray.data.formats import FORMATS, detect_format
from cpo_ray.data.formats import normalize as normalize_k
from cpo_ray.embedded import build_tokenizer


def normalize(*args, **kw):
    """The one-rejected-response view the tests below were written in: (prompt, chosen, rejected)."""
    prompt, chosen, rejected = normalize_k(*args, **kw)
    assert len(rejected) == 1, rejected
    return prompt, chosen, rejected[0]


ASSETS = TEST_ASSETS / "formats"
HH_TEST = HH_FILE


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


def reject(record, fmt, tok, columns=None) -> RowError:
    with pytest.raises(RowError) as e:
        normalize(record, fmt, tok, columns)
    return e.value


# ---- explicit -------------------------------------------------------------------------------------


def test_explicit_strings_unchanged(tok):
    rec = {"prompt": "Q: 2+2?\n", "chosen": " 4", "rejected": " five\n"}
    assert detect_format(rec) == "explicit"
    assert normalize(rec, "explicit", tok) == ("Q: 2+2?\n", " 4", " five\n")
    assert normalize(rec, "auto", tok) == ("Q: 2+2?\n", " 4", " five\n")


def test_explicit_column_mapping(tok):
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    rec = {"question": "Capital of France?", "good": "Paris", "bad": "Lyon", "id": 7}
    assert detect_format(rec, cols) == "explicit"
    assert normalize(rec, "auto", tok, cols) == ("Capital of France?", "Paris", "Lyon")
    e = reject({"question": "q", "good": "a"}, "explicit", tok, cols)
    assert (e.reason, e.field) == ("missing_field", "bad")
    assert "'rejected'" in str(e)


# ---- conversational ----------------------------------------------------------------------------------


def test_conversational_single_turn(tok):
    rec = {"prompt": [U("hi")], "chosen": [A("yo")], "rejected": [A("go away")]}
    assert detect_format(rec) == "conversational"
    assert normalize(rec, "conversational", tok) == ("<s><|user|>\nhi\n<|assistant|>\n", "yo</s>\n", "go away</s>\n")


def test_conversational_system_and_history(tok):
    rec = {
        "prompt": [S("be brief"), U("hi"), A("hello"), U("2+2?")],
        "chosen": [{"role": "assistant", "content": "4", "name": "ignored"}],
        "rejected": [A("5")],
    }
    prompt = "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello</s>\n<|user|>\n2+2?\n<|assistant|>\n"
    assert normalize(rec, "conversational", tok) == (prompt, "4</s>\n", "5</s>\n")


def test_implicit_conversational_splits_at_last_assistant(tok):
    chosen = [U("q1"), A("a1"), U("q2"), A("good")]
    rejected = [U("q1"), A("a1"), U("q2"), A("bad")]
    rec = {"chosen": chosen, "rejected": rejected}
    assert detect_format(rec) == "conversational"
    expected = ("<s><|user|>\nq1\n<|assistant|>\na1</s>\n<|user|>\nq2\n<|assistant|>\n", "good</s>\n", "bad</s>\n")
    assert normalize(rec, "conversational", tok) == expected
    assert normalize(rec, "implicit", tok) == expected
    assert normalize({**rec, "prompt": None}, "auto", tok) == expected  # Arrow's null for a missing column


def test_implicit_conversational_divergence_at_user_turn(tok):
    # The sides differ at a user message: the split goes back to the assistant turn before it.
    rec = {"chosen": [U("q1"), A("a1"), U("q2"), A("x")], "rejected": [U("q1"), A("a1"), U("q3"), A("y")]}
    assert normalize(rec, "conversational", tok) == (
        "<s><|user|>\nq1\n<|assistant|>\n",
        "a1</s>\n<|user|>\nq2\n<|assistant|>\nx</s>\n",
        "a1</s>\n<|user|>\nq3\n<|assistant|>\ny</s>\n",
    )


def test_conversational_column_mapping(tok):
    cols = {"prompt": "context", "chosen": "win", "rejected": "lose"}
    rec = {"context": [U("hi")], "win": [A("yo")], "lose": [A("no")]}
    assert detect_format(rec, cols) == "conversational"
    assert normalize(rec, "auto", tok, cols) == ("<s><|user|>\nhi\n<|assistant|>\n", "yo</s>\n", "no</s>\n")


# ---- implicit (HH-RLHF) ----------------------------------------------------------------------------


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_implicit_hh_last_turn(tok):
    c, r = hh("hi", "hello", "help me", "Sure, here's how."), hh("hi", "hello", "help me", "No.")
    assert detect_format({"chosen": c, "rejected": r}) == "implicit"
    assert normalize({"chosen": c, "rejected": r}, "implicit", tok) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:",
        " Sure, here's how.",
        " No.",
    )


def test_implicit_hh_shared_start_of_response(tok):
    # Both answers begin "Sure, ": the prompt still ends at the marker, not at the divergence.
    c, r = hh("q", "Sure, I can."), hh("q", "Sure, no.")
    assert normalize({"chosen": c, "rejected": r}, "implicit", tok) == (
        "\n\nHuman: q\n\nAssistant:",
        " Sure, I can.",
        " Sure, no.",
    )


def test_implicit_hh_divergence_inside_marker(tok):
    # Sides differ inside "\n\nAssistant:" ('A' vs 'H'): the last complete marker is the earlier one.
    c = "\n\nHuman: q\n\nAssistant: a\n\nAssistant: more"
    r = "\n\nHuman: q\n\nAssistant: a\n\nHuman: again\n\nAssistant: b"
    assert normalize({"chosen": c, "rejected": r}, "implicit", tok) == (
        "\n\nHuman: q\n\nAssistant:",
        " a\n\nAssistant: more",
        " a\n\nHuman: again\n\nAssistant: b",
    )
    # A marker cut short on one side is no marker either.
    c, r = "\n\nHuman: q\n\nAssistant: a\n\nAssistant: x", "\n\nHuman: q\n\nAssistant: a\n\nAssist"
    assert normalize({"chosen": c, "rejected": r}, "implicit", tok)[0] == "\n\nHuman: q\n\nAssistant:"


def test_implicit_hh_one_side_prefix_of_other(tok):
    c, r = hh("q", "You're welcome. Come back any time."), hh("q", "You're welcome.")
    p, cc, rr = normalize({"chosen": c, "rejected": r}, "implicit", tok)
    assert (p, cc, rr) == ("\n\nHuman: q\n\nAssistant:", " You're welcome. Come back any time.", " You're welcome.")
    c, r = hh("q", "a", "more?"), hh("q", "a")  # chosen = rejected + a further human turn
    assert normalize({"chosen": c, "rejected": r}, "implicit", tok) == (
        "\n\nHuman: q\n\nAssistant:",
        " a\n\nHuman: more?",
        " a",
    )


def test_implicit_column_mapping(tok):
    cols = {"chosen": "a", "rejected": "b"}
    rec = {"a": hh("q", "yes"), "b": hh("q", "no")}
    assert detect_format(rec, cols) == "implicit"
    assert normalize(rec, "auto", tok, cols) == ("\n\nHuman: q\n\nAssistant:", " yes", " no")


# ---- sharegpt ----------------------------------------------------------------------------------------


def test_sharegpt(tok):
    rec = {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "2+2?"},
        ],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "22"},
    }
    assert detect_format(rec) == "sharegpt"
    prompt = "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello</s>\n<|user|>\n2+2?\n<|assistant|>\n"
    assert normalize(rec, "sharegpt", tok) == (prompt, "4</s>\n", "22</s>\n")


def test_sharegpt_column_mapping(tok):
    cols = {"conversations": "history"}
    rec = {
        "history": [{"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "yo"},
        "rejected": {"from": "gpt", "value": "no"},
    }
    assert detect_format(rec, cols) == "sharegpt"
    assert normalize(rec, "auto", tok, cols) == ("<s><|user|>\nhi\n<|assistant|>\n", "yo</s>\n", "no</s>\n")
    e = reject({k: v for k, v in rec.items() if k != "history"}, "sharegpt", tok, cols)
    assert (e.reason, e.field) == ("missing_field", "history")


# ---- detection and errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record,reason,field",
    [
        ({"chosen": "a"}, "missing_field", "rejected"),
        ({"text": "x"}, "missing_field", "chosen"),
        ({"chosen": 1, "rejected": "b"}, "unknown_format", "chosen"),
        (["not", "a", "dict"], "unknown_format", None),
    ],
)
def test_undetectable_records(record, reason, field):
    with pytest.raises(RowError) as e:
        detect_format(record)
    assert (e.value.reason, e.value.field) == (reason, field)


def test_wrong_typed_explicit_field_is_named(tok):
    rec = {"prompt": "p", "chosen": 1, "rejected": "b"}
    assert detect_format(rec) == "explicit"
    e = reject(rec, "auto", tok)
    assert (e.reason, e.field) == ("not_string", "chosen")


def test_unknown_format_name_is_a_config_error(tok):
    with pytest.raises(ValueError, match="unknown data format"):
        normalize({"chosen": "a", "rejected": "b"}, "alpaca", tok)
    assert FORMATS == ("explicit", "conversational", "implicit", "sharegpt", "ranked")


class MisTemplate:
    """A chat template whose generation prompt is not a prefix of the rendered dialogue."""

    chat_template = "[role]content[end]"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return body + ("[assistant]" if add_generation_prompt else "") + "[end]"


CONV = {"prompt": [U("hi")], "chosen": [A("yo")], "rejected": [A("no")]}
SGPT = {
    "conversations": [{"from": "human", "value": "hi"}],
    "chosen": {"from": "gpt", "value": "yo"},
    "rejected": {"from": "gpt", "value": "no"},
}


@pytest.mark.parametrize(
    "record, fmt, reason, field",
    [
        ({"prompt": "p", "chosen": "a"}, "explicit", "missing_field", "rejected"),
        ({"chosen": "a", "rejected": "b"}, "explicit", "missing_field", "prompt"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "explicit", "not_string", "chosen"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "explicit", "not_string", "prompt"),
        ({"chosen": "a", "rejected": None}, "implicit", "not_string", "rejected"),
        ({"prompt": "p", "chosen": "  \n", "rejected": "b"}, "explicit", "empty_response", "chosen"),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, "explicit", "empty_response", "rejected"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "explicit", "identical_responses", "rejected"),
        ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "explicit", "empty_prompt", "prompt"),
        ({**CONV, "prompt": "hi"}, "conversational", "bad_messages", "prompt"),
        ({**CONV, "chosen": ["yo"]}, "conversational", "bad_messages", "chosen"),
        ({**CONV, "chosen": [{"role": "assistant"}]}, "conversational", "bad_messages", "chosen"),
        ({**CONV, "rejected": [{"role": "assistant", "content": 5}]}, "conversational", "bad_messages", "rejected"),
        ({**CONV, "prompt": [{"role": "human", "content": "hi"}]}, "conversational", "bad_messages", "prompt"),
        ({**CONV, "chosen": [U("yo")]}, "conversational", "bad_messages", "chosen"),
        ({**CONV, "chosen": []}, "conversational", "empty_response", "chosen"),
        ({**CONV, "rejected": [A(" ")]}, "conversational", "empty_response", "rejected"),
        ({**CONV, "rejected": [A("yo")]}, "conversational", "identical_responses", "rejected"),
        ({**CONV, "prompt": []}, "conversational", "empty_prompt", "prompt"),
        (
            {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]},
            "conversational",
            "identical_responses",
            "rejected",
        ),
        ({"chosen": [A("a")], "rejected": [A("b")]}, "conversational", "empty_prompt", "chosen"),
        (
            {"chosen": [U("q"), A("a")], "rejected": [U("r"), A("a")]},
            "conversational",
            "unparseable_dialogue",
            "chosen",
        ),
        ({"chosen": [U("q"), U("x")], "rejected": [U("q"), U("y")]}, "implicit", "unparseable_dialogue", "chosen"),
        ({**SGPT, "conversations": [{"from": "bot", "value": "hi"}]}, "sharegpt", "bad_messages", "conversations"),
        ({**SGPT, "chosen": {"from": "gpt", "value": None}}, "sharegpt", "bad_messages", "chosen"),
        ({**SGPT, "rejected": "no"}, "sharegpt", "bad_messages", "rejected"),
        ({**SGPT, "chosen": {"from": "human", "value": "yo"}}, "sharegpt", "bad_messages", "chosen"),
        ({**SGPT, "rejected": {"from": "gpt", "value": ""}}, "sharegpt", "empty_response", "rejected"),
        ({**SGPT, "conversations": []}, "sharegpt", "empty_prompt", "conversations"),
        ({"chosen": hh("q", "a"), "rejected": hh("q", "a")}, "implicit", "identical_responses", "rejected"),
        (
            {"chosen": "Human: q Assistant: a", "rejected": "Human: q Assistant: b"},
            "implicit",
            "unparseable_dialogue",
            "chosen",
        ),
        (
            {"chosen": hh("q", "a"), "rejected": "\n\nHuman: r\n\nAssistant: a"},
            "implicit",
            "unparseable_dialogue",
            "chosen",
        ),
        ({"chosen": "x", "rejected": "y"}, "implicit", "unparseable_dialogue", "chosen"),
        ({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "implicit", "empty_prompt", "chosen"),
        ({"chosen": hh("q", ""), "rejected": hh("q", "b")}, "implicit", "empty_response", "chosen"),
        ({"chosen": hh("q", "a"), "rejected": "\n\nHuman: q\n\nAssistant:"}, "implicit", "empty_response", "rejected"),
    ],
)
def test_row_errors(tok, record, fmt, reason, field):
    e = reject(record, fmt, tok)
    assert (e.reason, e.field) == (reason, field), str(e)
    assert str(e)


def test_template_that_does_not_extend_the_prompt_is_bad_messages():
    e = reject(CONV, "conversational", MisTemplate())
    assert (e.reason, e.field) == ("bad_messages", "chosen")


def test_mapped_field_named_in_errors(tok):
    cols = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    e = reject({"q": "p", "good": 1.5, "bad": "b"}, "explicit", tok, cols)
    assert (e.reason, e.field) == ("not_string", "good")
    assert "good" in str(e)


# ---- sample files and real data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("explicit", "explicit"),
        ("conversational", "conversational"),
        ("implicit_hh", "implicit"),
        ("sharegpt", "sharegpt"),
    ],
)
def test_asset_files(tok, name, fmt):
    rows = [json.loads(line) for line in (ASSETS / f"{name}.jsonl").read_text().splitlines()]
    assert 3 <= len(rows) <= 5
    for rec in rows:
        assert detect_format(rec) == fmt
        p, c, r = normalize(rec, "auto", tok)
        assert p.strip() and c.strip() and r.strip() and c != r
        if fmt == "implicit":
            assert (p + c, p + r) == (rec["chosen"], rec["rejected"])
            assert p.endswith("\n\nAssistant:") and c.startswith(" ") and r.startswith(" ")
        if fmt in ("conversational", "sharegpt"):
            assert p.startswith("<s>") and p.endswith("<|assistant|>\n") and c.endswith("</s>\n")


@pytest.mark.skipif(not HH_TEST.is_file(), reason="shared HH-RLHF test split not present")
def test_hh_rlhf_harmless_test_split(tok):
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312
    rejects = {}
    for i, rec in enumerate(rows):
        assert detect_format(rec) == "implicit"
        try:
            p, c, r = normalize(rec, "implicit", tok)
        except RowError as e:
            rejects[i] = (e.reason, e.field)
            continue
        assert p + c == rec["chosen"] and p + r == rec["rejected"]
        assert p.endswith("\n\nAssistant:") and p.startswith("\n\nHuman:")
    # Four pairs whose chosen answer is a lone space (the labeller preferred no answer at all).
    assert rejects == {i: ("empty_response", "chosen") for i in (86, 516, 925, 1103)}


def test_chat_template_option_for_explicit_and_hh_text(bpe_tokenizer):
    """data.chat_template: an explicit row is one user turn + one assistant turn; an HH dialogue becomes its
    turns (Human -> user, Assistant -> assistant), split at the last shared assistant turn."""
    tok = bpe_tokenizer
    render = lambda msgs, gen=False: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    user = [{"role": "user", "content": "47 in words:"}]
    p, c, r = normalize(
        {"prompt": "47 in words:", "chosen": "forty-seven", "rejected": "seventy-four"}, "explicit", tok, chat=True
    )
    assert p == render(user, gen=True) and p.startswith("<s><|system|>")
    assert p + c == render([*user, {"role": "assistant", "content": "forty-seven"}]) and c.startswith("forty-seven</s>")
    assert r.startswith("seventy-four</s>")
    hh = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Sure, here is one.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
    }
    p, c, r = normalize(hh, "implicit", tok, chat=True)
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Joke?")]
    assert p == render([{"role": a, "content": b} for a, b in turns], gen=True)
    assert c.startswith("Sure, here is one.</s>") and r.startswith("No.</s>")
    with pytest.raises(RowError) as e:
        normalize({"chosen": "no turns here", "rejected": "nor here"}, "implicit", tok, chat=True)
    assert e.value.reason == "unparseable_dialogue"


# ---------------------------------------------------------------------------------------------- K rejected


def test_several_rejected_responses_in_every_format(tok):
    """A list where one response is expected holds K rejected ones, in every format; they keep their order."""
    p, c, rs = normalize_k({"prompt": "Q?", "chosen": " yes", "rejected": [" no", " maybe"]}, "auto", tok)
    assert (p, c, rs) == ("Q?", " yes", [" no", " maybe"])
    msgs = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rec = {"prompt": [{"role": "user", "content": "hi"}], "chosen": msgs("yo"), "rejected": [msgs("no"), msgs("go")]}
    assert normalize_k(rec, "auto", tok)[2] == ["no</s>\n", "go</s>\n"]
    share = {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "yo"}}
    share["rejected"] = [[{"from": "gpt", "value": "no"}], [{"from": "gpt", "value": "go"}]]
    assert normalize_k(share, "auto", tok)[2] == ["no</s>\n", "go</s>\n"]
    hh = "\n\nHuman: q\n\nAssistant:"
    p, c, rs = normalize_k({"chosen": hh + " yes", "rejected": [hh + " no", hh + " nope"]}, "auto", tok)
    assert (p, c, rs) == (hh, " yes", [" no", " nope"])


def test_several_rejected_responses_must_differ(tok):
    for rejected in ([" no", " yes"], [" no", " no"]):
        with pytest.raises(RowError) as e:
            normalize_k({"prompt": "Q?", "chosen": " yes", "rejected": rejected}, "explicit", tok)
        assert e.value.reason == "identical_responses"


def test_ranked_rows(tok):
    """The best score is chosen; those at least min_score_gap below it are rejected, hardest first."""
    rec = {"prompt": "Q?", "responses": [" ok", " best", " bad", " worse"], "scores": [7, 9.5, 3, 1]}
    assert detect_format(rec) == "ranked"
    assert normalize_k(rec, "auto", tok) == ("Q?", " best", [" ok", " bad", " worse"])
    assert normalize_k(rec, "auto", tok, min_score_gap=3)[2] == [" bad", " worse"]  # 7 is only 2.5 below
    conv = {"prompt": [{"role": "user", "content": "hi"}], "responses": [[{"role": "assistant", "content": t}] for t in ("a", "b")], "scores": [1, 2]}  # fmt: skip
    assert normalize_k(conv, "auto", tok)[1:] == ("b</s>\n", ["a</s>\n"])
    cols = {"responses": "outputs", "scores": "ratings", "prompt": "instruction"}
    mapped = {"instruction": "Q?", "outputs": [" a", " b"], "ratings": [0.5, 0.1]}
    assert normalize_k(mapped, "auto", tok, cols) == ("Q?", " a", [" b"])
    for bad, reason in (
        ({**rec, "scores": [1, 2, 3]}, "bad_scores"),
        ({**rec, "scores": [1, "2", 3, 4]}, "bad_scores"),
        ({**rec, "scores": [1, float("nan"), 3, 4]}, "bad_scores"),
        ({**rec, "scores": [1, True, 3, 4]}, "bad_scores"),
        ({**rec, "scores": [9.5, 9.5, 3, 1]}, "tied_scores"),
    ):
        with pytest.raises(RowError) as e:
            normalize_k(bad, "auto", tok)
        assert e.value.reason == reason, bad
    with pytest.raises(RowError) as e:
        normalize_k({**rec, "scores": [9, 9.5, 9.2, 9.1]}, "auto", tok, min_score_gap=1)
    assert e.value.reason == "no_negative" and "1" in str(e.value)
