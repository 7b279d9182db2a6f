"""Ray Data pipeline: every row read is kept or counted by reason with file:line; nothing silently lost."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ASSETS, HH_FILE
from cpo_ray.config import load_config
from cpo_ray.contract import DataError
from cpo_ray.data.prepare import prepare


def cfg_for(tmp_path, files, **over):
    extra = [f"{k}={v}" for k, v in over.items()]
    return load_config(None, [f"output_dir={tmp_path}", f"data.train_files={json.dumps(files)}", *extra])


def test_every_format_prepares(ray_local, tiny_model_dir, tmp_path):
    files = sorted(str(p) for p in (ASSETS / "formats").glob("*.jsonl"))
    cfg = cfg_for(tmp_path, files, **{"data.max_length": 4096, "model.tiny.max_position_embeddings": 8192})
    rep = prepare(cfg, tiny_model_dir)
    lines = sum(len(Path(f).read_text().splitlines()) for f in files)
    assert rep["rows_read"] == rep["rows_kept"] == lines
    table = pq.read_table(tmp_path / "data" / "train")
    assert table.num_rows == lines and set(table.column_names) >= {"prompt_ids", "chosen_ids", "rejected_ids", "source"}
    assert all(c[-1] == 2 for c in table.column("chosen_ids").to_pylist())


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF file absent")
def test_hh_rlhf_every_row_accounted(ray_local, tiny_model_dir, tmp_path):
    cfg = cfg_for(tmp_path, [str(HH_FILE)], **{"data.max_length": 512, "data.eval_split": 0.1})
    rep = prepare(cfg, tiny_model_dir)
    assert rep["rows_read"] == 2312
    assert rep["rows_kept"] + rep["rows_rejected"] == 2312
    assert rep["rows_rejected"] == 4 and all(
        v == 0 or k == "empty_response" for k, v in rep["splits"]["train"]["rejected_by_reason"].items()
    )
    tr, ev = rep["splits"]["train"], rep["splits"]["eval"]
    assert tr["rows_read"] + ev["rows_read"] == 2312 and 150 < ev["rows_read"] < 320
    assert tr["tokens"]["prompt"]["max"] <= 512 and tr["truncated"] > 0
    saved = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert saved["rows_read"] == 2312
    assert pq.read_table(tmp_path / "data" / "train").num_rows == tr["rows_kept"]


def test_corrupted_copy_exact_reason_counts(ray_local, tiny_model_dir, tmp_path):
    good = [json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) for i in range(40)]
    bad = [
        "{not json",  # malformed_json
        '{"prompt": "q", "chosen": "a"',  # malformed_json (truncated line)
        "[1, 2, 3]",  # not_an_object
        json.dumps({"prompt": "q", "chosen": 5, "rejected": "x"}),  # not_string
        json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),  # identical_responses
        json.dumps({"prompt": "q", "chosen": "  ", "rejected": "x"}),  # empty_response
        json.dumps({"chosen": "no assistant turn here", "rejected": "nor here"}),  # unparseable_dialogue
        json.dumps({"foo": 1}),  # missing_field
    ]
    lines = good[:10] + bad + good[10:]
    path = tmp_path / "shard.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    raw = tmp_path / "bytes.jsonl"
    raw.write_bytes(b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n')  # bad_encoding
    cfg = cfg_for(tmp_path, [str(path), str(raw)], **{"data.max_reject_fraction": 0.5})
    rep = prepare(cfg, tiny_model_dir)
    reasons = rep["splits"]["train"]["rejected_by_reason"]
    assert reasons == {
        "malformed_json": 2,
        "not_an_object": 1,
        "not_string": 1,
        "identical_responses": 1,
        "empty_response": 1,
        "unparseable_dialogue": 1,
        "missing_field": 1,
        "bad_encoding": 1,
    }
    assert rep["rows_read"] == 49 and rep["rows_kept"] == 40
    ex = rep["splits"]["train"]["examples"]["malformed_json"][0]
    assert ex.startswith(f"{path}:11: ")  # file:line of the first bad line
    # over the threshold: a clear error naming the counts and the report
    with pytest.raises(DataError, match=r"9/49 rows rejected .*prepare_report.json"):
        prepare(cfg_for(tmp_path, [str(path), str(raw)]), tiny_model_dir)


def test_unreadable_inputs_are_clear_errors(ray_local, tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.jsonl"):
        prepare(cfg_for(tmp_path, [str(tmp_path / "missing.jsonl")]), tiny_model_dir)
    src = ASSETS / "formats" / "explicit.jsonl"
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes() * 50)[:-40])
    with pytest.raises(DataError, match=r"trunc.jsonl.gz: unreadable after line \d+"):
        prepare(cfg_for(tmp_path, [str(gz)]), tiny_model_dir)


def test_parquet_and_glob_inputs(ray_local, tiny_model_dir, tmp_path):
    import pyarrow as pa

    rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(7)]
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), d / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), d / "b.parquet")
    shutil.copy(ASSETS / "formats" / "explicit.jsonl", d / "c.jsonl")
    cfg = cfg_for(
        tmp_path, [str(d / "*.parquet")], **{"data.columns": "{prompt: question, chosen: good, rejected: bad}"}
    )
    rep = prepare(cfg, tiny_model_dir)
    assert rep["rows_read"] == rep["rows_kept"] == 7
    assert len(rep["splits"]["train"]["files"]) == 2
