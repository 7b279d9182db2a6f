"""Data fuzzing (hypothesis): whatever a shard holds, every record ends as one counted row or a clear error.

Drives the real reader and tokenizer UDFs (`read_file` -> `Tokenize.__call__`) on fuzzed files, without Ray:

  * one output row per non-blank JSONL line / Parquet row, in order, source "<path>:<line>" / "<path>:row<N>";
  * a kept row: reason null, non-empty ids, chosen != rejected, prompt + response <= max_length;
  * a rejected row: a known reason with a message, never the catch-all "bad_record" (= an unexpected exception);
  * Tokenize.__call__ never raises; an unreadable file (truncated or non-gzip .gz, corrupt Parquet) raises
    DataError naming the file (and, for gzip, the last good line).
"""

from __future__ import annotations

import datetime
import decimal
import gzip
import itertools
import json
import re
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from cpo_ray.config import DataConfig
from cpo_ray.contract import DataError, Reject, RowError
from cpo_ray.data.prepare import OUT_SCHEMA, Tokenize
from cpo_ray.data.readers import _ArrayReader, read_file

MAX_LEN = 96  # small, so generated text is truncated often
REASONS = {r.value for r in Reject} - {Reject.BAD_RECORD}  # the catch-all a fuzzed input must never reach
BLANK = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes: such lines are not records
SPECIALS = ("<s>", "</s>", "<pad>")  # the embedded tokenizer's special tokens

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
FEW = settings(FUZZ, max_examples=100)

_n = itertools.count()
_FORMATS = ("explicit", "conversational", "implicit", "sharegpt")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def udf(tiny_model_dir):
    return Tokenize(tiny_model_dir, DataConfig(max_length=MAX_LEN).model_dump())


@pytest.fixture(scope="module")
def forced_udfs(tiny_model_dir):
    """One Tokenize per forced format, plus a column mapping, for the non-auto code paths."""
    out = {f: Tokenize(tiny_model_dir, DataConfig(max_length=MAX_LEN, format=f).model_dump()) for f in _FORMATS}
    mapped = {"prompt": "q", "chosen": "good", "rejected": "bad", "conversations": "chosen"}
    out["mapped"] = Tokenize(tiny_model_dir, DataConfig(max_length=MAX_LEN, columns=mapped).model_dump())
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _file(workdir: Path, suffix: str) -> Path:
    return workdir / f"shard{next(_n)}{suffix}"


# ---------------------------------------------------------------------------------------------- helpers


def run_file(udf, path: Path) -> list[dict]:
    """read_file -> Tokenize for every batch; the rows out, in order."""
    rows: list[dict] = []
    for batch in read_file({"path": [str(path)]}):
        assert set(batch) == {"source", "raw", "file_index", "record"}
        assert len({len(v) for v in batch.values()}) == 1
        assert batch["record"] == sorted(batch["record"])  # in file order: the prepared shards' order key
        table = udf(batch)  # must never raise
        assert table.schema == OUT_SCHEMA and table.num_rows == len(batch["source"])
        rows += table.to_pylist()
    return rows


def jsonl_sources(path: Path, data: bytes) -> list[str]:
    """The source of each record the reader must emit: every non-blank b"\\n"-separated line, 1-based."""
    return [f"{path}:{i}" for i, piece in enumerate(data.split(b"\n"), 1) if piece.strip(BLANK)]


def check_rows(rows: list[dict], sources: list[str]) -> Counter:
    """The invariants every output row obeys; returns the count per reason (None = kept)."""
    assert [r["source"] for r in rows] == sources, "rows out must match records in, one each, in order"
    for r in rows:
        where, reason = r["source"], r["reason"]
        p, c, js = r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]  # K >= 1 rejected responses
        if reason is None:
            assert r["message"] is None, where
            assert p and c and js and all(js), f"kept row with empty ids at {where}"
            assert c not in js and len({tuple(j) for j in js}) == len(js), (
                f"kept row with identical responses at {where}"
            )
            assert len(p) + max(len(x) for x in (c, *js)) <= MAX_LEN, f"kept row longer than max_length at {where}"
            if not r["truncated"]:
                assert c[-1] == 2 and all(j[-1] == 2 for j in js), f"untruncated response without EOS at {where}"
        else:
            assert reason != "bad_record", f"unexpected exception (catch-all bad_record) at {where}: {r['message']}"
            assert reason in REASONS, f"unknown reason {reason!r} at {where}"
            assert isinstance(r["message"], str) and r["message"].strip(), f"reject without message at {where}"
            assert not (p or c or js or r["truncated"]), f"rejected row carries ids at {where}"
    return Counter(r["reason"] for r in rows)


def note(counts: Counter) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics): which outcomes the fuzzer reached."""
    for reason in counts:
        event(f"row: {reason or 'kept'}")


def write_jsonl(workdir: Path, lines: list[bytes], sep: bytes = b"\n", trailing: bool = True, gz: bool = False):
    data = sep.join(lines) + (sep if trailing else b"")
    path = _file(workdir, ".jsonl.gz" if gz else ".jsonl")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path, data


def dumps_line(rec, ascii_only: bool = True) -> bytes:
    """A JSON line; without ensure_ascii a lone surrogate becomes invalid UTF-8 bytes (surrogatepass)."""
    return json.dumps(rec, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------- strategies

ODD = [
    "\x00", "\x1f", "\x7f", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202e", "\u2066", "\ufeff",
    "\u2028", "\u2029", "\x85", "\r", "\t", "\n", "\ufffd", "\U0010ffff", "e\u0301", "\U0001f600", "\u0645\u0631",
    "\ud800", "\udfff", "</s>", "<s>", "<pad>", '"', "\\", "\n\nHuman:", "\n\nAssistant:",
]  # fmt: skip
odd_chars = st.one_of(
    st.characters(codec=None, exclude_categories=()),  # any code point, surrogates and controls included
    st.characters(categories=["Cs"]),  # lone surrogates: valid in a JSON "\ud800" escape, not in UTF-8
    st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Zs", "Mn"]),
    st.sampled_from(ODD),
)
odd_text = st.lists(odd_chars, max_size=16).map("".join)
plain_text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=30)

KEYS = ["prompt", "chosen", "rejected", "conversations", "messages", "role", "content", "from", "value"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text)
json_values = st.recursive(
    json_scalars,
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | odd_text, ch, max_size=3),
    max_leaves=8,
)
role_msg = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "bogus", ""]) | json_values},
    optional={"content": odd_text | plain_text | json_values, "extra": json_values},
)
share_msg = st.fixed_dictionaries(
    {"from": st.sampled_from(["system", "human", "user", "gpt", "assistant", "bot"]) | json_values},
    optional={"value": odd_text | plain_text | json_values},
)
field_value = st.one_of(
    odd_text, plain_text, json_values, st.lists(role_msg, max_size=4), st.lists(share_msg, max_size=3), share_msg
)
fuzz_record = st.dictionaries(st.sampled_from([*KEYS, "extra"]) | odd_text, field_value, max_size=5)


@st.composite
def valid_record(draw) -> dict:
    """A well-formed record of each format (it may still be rejected, e.g. identical responses)."""
    p, a, b = draw(plain_text), draw(plain_text), draw(plain_text)
    kind = draw(st.sampled_from(["explicit", "implicit", "conv", "conv_implicit", "sharegpt"]))
    if kind == "explicit":
        return {"prompt": p, "chosen": a, "rejected": b}
    if kind == "implicit":
        head = f"\n\nHuman: {p}\n\nAssistant:"
        return {"chosen": f"{head} {a}", "rejected": f"{head} {b}"}
    user = {"role": "user", "content": p}
    if kind == "conv":
        return {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}],
        }
    if kind == "conv_implicit":
        return {
            "chosen": [user, {"role": "assistant", "content": a}],
            "rejected": [user, {"role": "assistant", "content": b}],
        }
    return {
        "conversations": [{"from": "human", "value": p}],
        "chosen": {"from": "gpt", "value": a},
        "rejected": {"from": "gpt", "value": b},
    }


@st.composite
def deep_line(draw) -> bytes:
    """Deeply nested JSON (closed or not), as the whole line or as the value of "chosen"."""
    depth = draw(st.sampled_from([1, 50, 500, 999, 1000, 3000, 10_000, 100_000]) | st.integers(1, 20_000))
    opener, closer = draw(
        st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"chosen":', "}"), ('[{"role":"user","content":', "}]")])
    )
    inner = opener * depth + '"x"' + (closer * depth if draw(st.booleans()) else "")
    if draw(st.booleans()):
        return inner.encode()
    return ('{"prompt": "q", "chosen": ' + inner + ', "rejected": "r"}').encode()


@st.composite
def number_line(draw) -> bytes:
    """Numbers Python's json cannot or will not turn into a value: > 4300 digits, huge exponents, NaN."""
    num = draw(
        st.sampled_from(["1e999999", "-1e-999999", "NaN", "-Infinity", "0" * 5000, "-0.0"])
        | st.integers(4290, 6000).map(lambda n: "7" * n)
    )
    field = draw(st.sampled_from(["prompt", "chosen", "rejected", None]))
    if field is None:
        return num.encode()
    rec = {"prompt": "q", "chosen": "a", "rejected": "b"}
    return json.dumps(rec).replace(f'"{field}": "{rec[field]}"', f'"{field}": {num}').encode()


@st.composite
def json_line(draw, records) -> bytes:
    line = dumps_line(draw(records), ascii_only=draw(st.booleans()))
    if draw(st.integers(0, 9)) == 0:  # a line cut short
        line = line[: draw(st.integers(0, len(line)))]
    return line


any_line = st.one_of(
    st.binary(max_size=80),  # random bytes, invalid UTF-8, embedded newlines
    json_line(valid_record()),
    json_line(fuzz_record),
    json_line(json_values),  # valid JSON, not an object
    deep_line(),
    number_line(),
)
separators = st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\n \t\n"])


# ---------------------------------------------------------------------------------------------- JSONL


def test_reasons_are_the_contracts():
    """A RowError reason must be one of contract.Reject: a typo is an error, not a new silent category."""
    assert RowError(Reject.EMPTY_PROMPT, "x").reason == "empty_prompt"
    with pytest.raises(ValueError):
        RowError("emptyprompt", "x")


@FUZZ
@given(lines=st.lists(any_line, max_size=25), sep=separators, trailing=st.booleans(), gz=st.booleans())
def test_fuzzed_jsonl_every_line_accounted(udf, workdir, lines, sep, trailing, gz):
    path, data = write_jsonl(workdir, lines, sep, trailing, gz)
    note(check_rows(run_file(udf, path), jsonl_sources(path, data)))


@FEW
@given(recs=st.lists(fuzz_record, min_size=1, max_size=10), fmt=st.sampled_from([*_FORMATS, "mapped"]))
@example(recs=[{"chosen": [], "rejected": []}], fmt="conversational")
@example(recs=[{"chosen": [{"role": "user", "content": "x"}], "rejected": []}], fmt="implicit")
@example(recs=[{"conversations": [], "chosen": [], "rejected": {"from": "gpt", "value": "x"}}], fmt="sharegpt")
def test_wrong_types_in_record_fields(udf, forced_udfs, workdir, recs, fmt):
    """Wrong-typed values in prompt/chosen/rejected/conversations/messages: auto and forced formats."""
    path, data = write_jsonl(workdir, [dumps_line(r) for r in recs])
    sources = jsonl_sources(path, data)
    note(check_rows(run_file(udf, path), sources))
    note(check_rows(run_file(forced_udfs[fmt], path), sources))


@FUZZ
@given(p=odd_text, c=odd_text, r=odd_text, ascii_only=st.booleans(), conv=st.booleans())
@example(p="q", c="a\ud800", r="b", ascii_only=True, conv=False)
@example(p="0", c="0", r="\ud800\udc00", ascii_only=True, conv=False)  # a pair: U+10000, kept
def test_odd_unicode_in_valid_records(udf, workdir, p, c, r, ascii_only, conv):
    """NUL, zero-width, RTL, BOM, line separators, specials-as-text and lone surrogates in every field."""
    if conv:
        rec = {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}]}
        rec["rejected"] = [{"role": "assistant", "content": r}]
    else:
        rec = {"prompt": p, "chosen": c, "rejected": r}
    path, data = write_jsonl(workdir, [dumps_line(rec, ascii_only)])
    rows = run_file(udf, path)
    check_rows(rows, jsonl_sources(path, data))
    if any(_lone_surrogate(s, ascii_only) for s in (p, c, r)):
        # A lone surrogate cannot be tokenized faithfully: the row is counted, never kept or crashing.
        assert rows[0]["reason"] is not None


def _lone_surrogate(s: str, ascii_only: bool) -> bool:
    """Whether `s` still holds a lone surrogate once it has been through a JSON line: escaped (ascii_only), a
    high + low pair reads back as one astral character; raw, any surrogate makes the line invalid UTF-8."""
    if not ascii_only:
        return any("\ud800" <= ch <= "\udfff" for ch in s)
    paired = s.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return any("\ud800" <= ch <= "\udfff" for ch in paired)


@FEW
@given(line=deep_line())
@example(line=b"[" * 10_000 + b"]" * 10_000)
@example(line=b'{"prompt": "q", "chosen": ' + b"[" * 10_000 + b'"x"' + b"]" * 10_000 + b', "rejected": "r"}')
def test_deep_nesting(udf, workdir, line):
    path, data = write_jsonl(workdir, [line])
    counts = check_rows(run_file(udf, path), jsonl_sources(path, data))
    if line.count(b"[") + line.count(b"{") > 5000:  # beyond any recursion limit: a JSON parse failure
        assert counts == {"malformed_json": 1}


@FEW
@given(line=number_line())
@example(line=b'{"prompt": ' + b"1" * 5000 + b', "chosen": "a", "rejected": "b"}')
def test_unrepresentable_numbers(udf, workdir, line):
    path, data = write_jsonl(workdir, [line])
    check_rows(run_file(udf, path), jsonl_sources(path, data))


HUGE = [
    pytest.param({"prompt": "q", "chosen": "c" * 1_500_000, "rejected": "r"}, None, id="chosen-1.5MB"),
    pytest.param({"prompt": "p" * 1_000_000, "chosen": "c", "rejected": "r"}, None, id="prompt-1MB"),
    pytest.param(
        {"prompt": "q", "chosen": "x" * 700_000 + "a", "rejected": "x" * 700_000 + "b"},
        "identical_after_truncation",
        id="responses-differ-past-max-length",
    ),
    pytest.param(None, "malformed_json", id="1MB-of-brackets"),
    pytest.param(b"\xff" * 1_000_000, "bad_encoding", id="1MB-invalid-utf8"),
]


@pytest.mark.parametrize(("rec", "reason"), HUGE)
def test_huge_lines(udf, workdir, rec, reason):
    line = b"[" * 1_000_000 if rec is None else rec if isinstance(rec, bytes) else dumps_line(rec)
    cut = b'{"prompt": "q", "chosen": "' + b"z" * 100_000  # a long line cut short
    path, data = write_jsonl(workdir, [b'{"prompt": "q", "chosen": "a", "rejected": "b"}', line, cut])
    rows = run_file(udf, path)
    counts = check_rows(rows, jsonl_sources(path, data))
    assert rows[0]["reason"] is None and rows[1]["reason"] == reason and rows[2]["reason"] == "malformed_json"
    assert sum(counts.values()) == 3
    if reason is None:
        assert rows[1]["truncated"]


# Characters that survive JSON, UTF-8 and the byte-level tokenizer unchanged: no surrogates, no specials' text.
safe_chars = st.characters(codec="utf-8") | st.sampled_from(
    [c for c in ODD if c not in SPECIALS and len(c) == 1 and not "\ud800" <= c <= "\udfff"]
)
safe_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(safe_chars, max_size=8),
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(safe_chars, max_size=8), ch, max_size=3),
    max_leaves=6,
)


@st.composite
def roundtrip_case(draw):
    """(record or raw line, expected reason or None) with the expectation computed independently."""
    text = plain_text | st.lists(safe_chars, min_size=1, max_size=16).map("".join)
    text = text.map(lambda s: s if s.strip() else s + "x")
    kind = draw(st.sampled_from(["ok", "ok", "ok", "not_string", "missing", "not_object", "garbage", "identical"]))
    p, c, r = draw(text), draw(text), draw(text)
    if kind == "ok":
        return {"prompt": p, "chosen": c, "rejected": r if r != c else c + "!"}, None
    if kind == "not_string":
        bad = draw(safe_values.filter(lambda v: not isinstance(v, str)))
        return {"prompt": p, "chosen": bad, "rejected": r}, "not_string"
    if kind == "missing":
        return {"prompt": p, "chosen": c}, "missing_field"
    if kind == "not_object":
        return draw(st.lists(safe_values, max_size=3) | safe_values.filter(lambda v: not isinstance(v, dict))), (
            "not_an_object"
        )
    if kind == "garbage":  # "{" + NUL is never JSON: malformed_json, or bad_encoding when not UTF-8
        return b"{\x00" + draw(st.binary(max_size=20)).replace(b"\n", b" "), None
    return {"prompt": p, "chosen": c, "rejected": c}, "identical_responses"


@FUZZ
@given(cases=st.lists(roundtrip_case(), min_size=1, max_size=20), ascii_only=st.booleans())
def test_records_roundtrip(udf, tokenizer, workdir, cases, ascii_only):
    """Kept + rejected == lines; each kept explicit pair decodes back to exactly prompt + response."""
    lines = [rec if isinstance(rec, bytes) else dumps_line(rec, ascii_only) for rec, _ in cases]
    path, data = write_jsonl(workdir, lines)
    rows = run_file(udf, path)
    counts = check_rows(rows, jsonl_sources(path, data))
    note(counts)
    assert len(rows) == len(lines) and sum(counts.values()) == len(lines)
    assert counts[None] + sum(v for k, v in counts.items() if k) == len(lines)
    for (rec, want), row in zip(cases, rows, strict=True):
        if isinstance(rec, bytes):
            assert row["reason"] in ("malformed_json", "bad_encoding"), row
            continue
        if want is not None:
            assert row["reason"] == want, (rec, row)
            continue
        assert row["reason"] is None, (rec, row)
        p, c, r = (len(rec[k].encode()) for k in ("prompt", "chosen", "rejected"))
        assert row["truncated"] == (1 + p + max(c, r) + 1 > MAX_LEN)
        if not row["truncated"]:
            prompt_ids = row["prompt_ids"]

            def dec(ids):
                return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

            assert dec(prompt_ids + row["chosen_ids"]) == rec["prompt"] + rec["chosen"]
            assert dec(prompt_ids + row["rejected_ids"][0]) == rec["prompt"] + rec["rejected"]


# ---------------------------------------------------------------------------------------------- gzip


@st.composite
def truncated_gzip(draw):
    lines = [dumps_line(r) for r in draw(st.lists(valid_record(), min_size=1, max_size=300))]
    data = b"\n".join(lines) + b"\n"
    blob = gzip.compress(data, mtime=0)
    return data, blob[: draw(st.integers(1, len(blob) - 1))]


@FUZZ
@given(case=truncated_gzip())
def test_truncated_gzip_names_file_and_last_good_line(workdir, case):
    _, cut = case
    path = _file(workdir, ".jsonl.gz")
    path.write_bytes(cut)
    good = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")  # complete lines before the cut
    with pytest.raises(DataError) as err:
        for _ in read_file({"path": [str(path)]}):
            pass
    assert str(path) in str(err.value) and f"unreadable after line {good} " in str(err.value)


@FUZZ
@given(blob=st.binary(min_size=1, max_size=300) | st.binary(max_size=300).map(lambda b: b"\x1f\x8b" + b))
@example(blob=b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
def test_not_gzip_named_gz(workdir, blob):
    """Plain JSONL or random bytes named .jsonl.gz: a DataError naming the file, not a bare exception."""
    path = _file(workdir, ".jsonl.gz")
    path.write_bytes(blob)
    with pytest.raises(DataError, match=re.escape(str(path))):
        for _ in read_file({"path": [str(path)]}):
            pass


@FEW
@given(recs=st.lists(valid_record(), min_size=1, max_size=5), junk=st.binary(min_size=1, max_size=50))
def test_gzip_with_trailing_junk_is_an_error(workdir, recs, junk):
    path = _file(workdir, ".jsonl.gz")
    path.write_bytes(gzip.compress(b"\n".join(map(dumps_line, recs)) + b"\n", mtime=0) + b"\x01" + junk)
    with pytest.raises(DataError, match=re.escape(str(path))):
        for _ in read_file({"path": [str(path)]}):
            pass


def test_empty_gzip_is_an_empty_shard(udf, workdir):
    path = _file(workdir, ".jsonl.gz")
    path.write_bytes(b"")
    assert run_file(udf, path) == []


# ---------------------------------------------------------------------------------------------- Parquet

pq_text = st.text(st.characters(codec="utf-8"), max_size=12)  # Arrow strings cannot hold lone surrogates
MSG_T = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PQ_TYPES = {
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "float": (pa.float64(), st.floats()),
    "bool": (pa.bool_(), st.booleans()),
    "string": (pa.string(), pq_text),
    "large_string": (pa.large_string(), pq_text),
    "null": (pa.null(), st.none()),
    "list_int": (pa.list_(pa.int64()), st.lists(st.integers(-9, 9), max_size=3)),
    "list_str": (pa.list_(pa.string()), st.lists(pq_text, max_size=3)),
    "struct": (
        pa.struct([("x", pa.int64()), ("y", pa.string())]),
        st.fixed_dictionaries({"x": st.integers(-9, 9) | st.none(), "y": pq_text | st.none()}),
    ),
    "nested": (
        pa.struct([("a", pa.struct([("b", pa.list_(pa.struct([("c", pa.string())])))]))]),
        st.fixed_dictionaries(
            {"a": st.fixed_dictionaries({"b": st.lists(st.fixed_dictionaries({"c": pq_text}), max_size=2)})}
        ),
    ),
    "map": (pa.map_(pa.string(), pa.int64()), st.lists(st.tuples(pq_text, st.integers(-9, 9)), max_size=2)),
    "messages": (
        MSG_T,
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "bogus"]) | st.none(), "content": pq_text}
            ),
            max_size=3,
        ),
    ),
    "sharegpt_msg": (
        pa.struct([("from", pa.string()), ("value", pa.string())]),
        st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "bot"]), "value": pq_text}),
    ),
}
PQ_NAMES = ["prompt", "chosen", "rejected", "conversations", "messages", "a", "b"]


@st.composite
def parquet_table(draw) -> pa.Table:
    n = draw(st.integers(0, 12))
    if draw(st.booleans()):  # the explicit schema, so kept rows happen too
        schema = {"prompt": "string", "chosen": "string", "rejected": "string"}
        schema.update(draw(st.dictionaries(st.sampled_from(PQ_NAMES), st.sampled_from(sorted(PQ_TYPES)), max_size=2)))
    else:
        schema = draw(
            st.dictionaries(st.sampled_from(PQ_NAMES), st.sampled_from(sorted(PQ_TYPES)), min_size=1, max_size=5)
        )
    cols = {}
    for name, key in schema.items():
        typ, values = PQ_TYPES[key]
        cells = draw(st.lists(values | st.none(), min_size=n, max_size=n))
        cols[name] = pa.array(cells, type=typ)
    return pa.table(cols)


@FUZZ
@given(table=parquet_table(), row_group=st.integers(1, 8))
@example(table=pa.table({"a": [1, 2], "b": [3, 4]}), row_group=1)
@example(table=pa.table({"prompt": ["q"], "chosen": [5], "rejected": ["r"]}), row_group=1)
@example(table=pa.table({"prompt": ["q"], "chosen": [{"x": 1}], "rejected": ["r"]}), row_group=1)
def test_parquet_wrong_schema_counted_per_row(udf, workdir, table, row_group):
    path = _file(workdir, ".parquet")
    pq.write_table(table, path, row_group_size=row_group)
    counts = check_rows(run_file(udf, path), [f"{path}:row{i}" for i in range(1, table.num_rows + 1)])
    note(counts)
    if table.num_rows and not {"chosen", "rejected"} <= set(table.column_names):
        assert counts == {"missing_field": table.num_rows}


NON_JSON = [
    pytest.param(pa.array([datetime.datetime(2024, 1, 2, 3, 4, 5)]), id="timestamp"),
    pytest.param(pa.array([datetime.date(2024, 1, 2)]), id="date"),
    pytest.param(pa.array([datetime.time(3, 4)]), id="time"),
    pytest.param(pa.array([datetime.timedelta(seconds=3)]), id="duration"),
    pytest.param(pa.array([decimal.Decimal("1.50")]), id="decimal"),
    pytest.param(pa.array([b"\xff\xfe not utf-8"], pa.binary()), id="binary-not-utf8"),
]


@pytest.mark.parametrize("chosen", NON_JSON)
def test_parquet_non_json_types_are_not_stringified(udf, workdir, chosen):
    """A timestamp/decimal/binary "chosen" column is a wrong schema: counted, not kept as str(value)."""
    path = _file(workdir, ".parquet")
    pq.write_table(pa.table({"prompt": ["q"], "chosen": chosen, "rejected": ["r"]}), path)
    rows = run_file(udf, path)
    check_rows(rows, [f"{path}:row1"])
    assert rows[0]["reason"] is not None, f"{chosen.type} value kept as its Python str()"


def test_parquet_binary_utf8_is_text_not_repr(udf, tokenizer, workdir):
    """UTF-8 in a binary (un-annotated BYTE_ARRAY) column: kept as the text, or counted; never "b'...'"."""
    path = _file(workdir, ".parquet")
    table = pa.table({"prompt": [b"q"], "chosen": [b"good"], "rejected": [b"bad"]})
    pq.write_table(table, path)
    rows = run_file(udf, path)
    check_rows(rows, [f"{path}:row1"])
    if rows[0]["reason"] is None:
        assert tokenizer.decode(rows[0]["chosen_ids"], skip_special_tokens=True) == "good"


def _patched_parquet(workdir: Path, n: int = 5, bad_row: int = 2) -> Path:
    """A Parquet string column whose bytes in one row are not UTF-8 (as a buggy writer or bit rot leaves it)."""
    marker = "@@MARK@@"
    chosen = [f"good {i}" if i != bad_row else marker for i in range(n)]
    table = pa.table(
        {"prompt": [f"q{i}" for i in range(n)], "chosen": chosen, "rejected": [f"bad {i}" for i in range(n)]}
    )
    path = _file(workdir, ".parquet")
    pq.write_table(table, path, compression="NONE", use_dictionary=False, write_statistics=False)
    blob = path.read_bytes()
    assert blob.count(marker.encode()) == 1
    path.write_bytes(blob.replace(marker.encode(), b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"))
    return path


def test_parquet_invalid_utf8_string_cell(udf, workdir):
    """Invalid UTF-8 in a string column: that row counted (bad_encoding) or a DataError naming the file."""
    path = _patched_parquet(workdir)
    try:
        rows = run_file(udf, path)
    except DataError as e:
        assert str(path) in str(e)
        return
    counts = check_rows(rows, [f"{path}:row{i}" for i in range(1, 6)])
    assert counts == {None: 4, "bad_encoding": 1} and rows[2]["reason"] == "bad_encoding"


@FUZZ
@given(blob=st.binary(max_size=400) | st.binary(max_size=400).map(lambda b: b"PAR1" + b + b"PAR1"))
@example(blob=b"")
@example(blob=b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
def test_corrupt_parquet_is_a_data_error(workdir, blob):
    path = _file(workdir, ".parquet")
    path.write_bytes(blob)
    with pytest.raises(DataError, match=re.escape(str(path))):
        for _ in read_file({"path": [str(path)]}):
            pass


@pytest.fixture(scope="module")
def good_parquet() -> bytes:
    import io

    n = 30
    table = pa.table(
        {
            "prompt": [f"question {i}" for i in range(n)],
            "chosen": [f"good {i}" for i in range(n)],
            "rejected": [f"bad {i}" for i in range(n)],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="NONE", use_dictionary=False, row_group_size=10)
    return buf.getvalue()


@FUZZ
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.booleans(),
)
def test_damaged_parquet_error_or_counted(udf, workdir, good_parquet, edits, cut):
    """Byte flips / truncation in a real Parquet file: a DataError naming the file, or every row counted."""
    blob = bytearray(good_parquet)
    for where, value in edits:
        blob[int(where * len(blob))] = value
    if cut:
        blob = blob[: int(edits[0][0] * len(blob))]
    path = _file(workdir, ".parquet")
    path.write_bytes(bytes(blob))
    try:
        rows = run_file(udf, path)
    except DataError as e:
        assert str(path) in str(e)
        return
    check_rows(rows, [f"{path}:row{i}" for i in range(1, len(rows) + 1)])


# ---------------------------------------------------------------------------------------------- JSON arrays


def _json_array(workdir: Path, records: list, gz: bool, indent) -> Path:
    path = _file(workdir, ".json.gz" if gz else ".json")
    text = json.dumps(records, indent=indent).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


@FEW
@given(
    records=st.lists(st.one_of(valid_record(), fuzz_record, json_values), max_size=30),
    gz=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
def test_fuzzed_json_array_every_record_accounted(udf, workdir, records, gz, indent):
    """A .json file holding [ {...}, ... ] is read as records (streamed), numbered record1.. in rejects."""
    try:
        json.dumps(records, allow_nan=False)
    except ValueError:
        return  # NaN/Infinity: not JSON
    path = _json_array(workdir, records, gz, indent)
    note(check_rows(run_file(udf, path), [f"{path}:record{i}" for i in range(1, len(records) + 1)]))


def test_json_array_and_jsonl_in_a_json_file(udf, workdir, monkeypatch):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    path = _json_array(workdir, [good, {"prompt": "q", "chosen": 5, "rejected": "x"}, "not an object", good], False, 2)
    rows = run_file(udf, path)
    assert [r["reason"] for r in rows] == [None, "not_string", "not_an_object", None]
    assert rows[1]["source"] == f"{path}:record2"
    monkeypatch.setattr(_ArrayReader, "CHUNK", 3)  # records cut across many read chunks: the same rows
    assert run_file(udf, path) == rows
    bad = _file(workdir, ".json")  # bytes that are not UTF-8 inside one record: that record only
    bad.write_bytes(b'[{"prompt": "q", "chosen": "\xff", "rejected": "b"}, ' + json.dumps(good).encode() + b"]")
    assert [r["reason"] for r in run_file(udf, bad)] == ["bad_encoding", None]
    jsonl = _file(workdir, ".json")  # JSONL that happens to be named .json still reads line by line
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert [r["source"] for r in run_file(udf, jsonl)] == [f"{jsonl}:1", f"{jsonl}:2"]


def test_broken_json_array_is_a_clear_error_naming_the_record(udf, workdir):
    path = _file(workdir, ".json")
    path.write_text('[{"prompt": "q", "chosen": "a", "rejected": "b"},\n {"prompt": "q", "chosen": ')
    with pytest.raises(DataError, match=r"\.json: not a valid JSON array after record 1"):
        run_file(udf, path)


def test_split_negatives_writes_one_row_per_rejected_response():
    import pyarrow as pa

    from cpo_ray.data.prepare import OUT_SCHEMA, split_negatives

    rows = [
        {
            "prompt_ids": [1, 5],
            "chosen_ids": [6, 2],
            "rejected_ids": [[7, 2], [8, 2], [9, 2]],
            "truncated": False,
            "source": "f:1",
        },
        {"prompt_ids": [1, 4], "chosen_ids": [3, 2], "rejected_ids": [[5, 2]], "truncated": True, "source": "f:2"},
    ]
    schema = pa.schema([OUT_SCHEMA.field(c) for c in rows[0]])
    table = pa.concat_tables(
        [pa.Table.from_pylist(rows[:1], schema), pa.Table.from_pylist(rows[1:], schema)]
    )  # 2 chunks
    out = split_negatives(table).to_pylist()
    assert [r["rejected_ids"] for r in out] == [[[7, 2]], [[8, 2]], [[9, 2]], [[5, 2]]]
    assert [r["source"] for r in out] == ["f:1", "f:1", "f:1", "f:2"] and out[3]["truncated"]
    assert all(r["chosen_ids"] == [6, 2] for r in out[:3])


@pytest.mark.parametrize("chunk", range(1, 12))
def test_json_array_scalars_cut_at_any_chunk_boundary_are_counted_rejects(udf, workdir, monkeypatch, chunk):
    """Issue 21: "1e" | "+20" scanned as the number 1 then a stray "e": the file ended in a DataError. Every
    top-level scalar (numbers with exponents, strings, literals) is a counted not_an_object reject, whatever
    the chunk boundary cuts."""
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    path = _file(workdir, ".json")
    path.write_text("[1e+20, -2.5E-3, 12345678901234567890, " + json.dumps(good) + ', "text", true, null, 7]')
    monkeypatch.setattr(_ArrayReader, "CHUNK", chunk)
    rows = run_file(udf, path)
    assert [r["reason"] for r in rows] == ["not_an_object"] * 3 + [None] + ["not_an_object"] * 4
