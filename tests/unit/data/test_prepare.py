"""The prepare pipeline's actor UDF on its own (no Ray): shards written by the actor, accounting returned."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq

from cpo_ray.config import load_config
from cpo_ray.contract import EVAL, TRAIN
from cpo_ray.data.prepare import TokenizeAndWrite
from cpo_ray.data.readers import read_file


def _held_out_rows(tiny_model_dir, data_file, out) -> list[str]:
    cfg = load_config(None, ["data.eval_split=0.3"])
    udf = TokenizeAndWrite(tiny_model_dir, cfg.data.model_dump(), split=TRAIN,
                           out={TRAIN: str(out / TRAIN), EVAL: str(out / EVAL)}, carve=0.3)  # fmt: skip
    stats = [udf(batch) for batch in read_file({"path": [str(data_file)], "file_index": [0]})]
    assert all(t.num_rows == 2 for t in stats)  # one accounting row per split per batch
    held = [r for f in sorted((out / EVAL).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return [json.dumps({k: v for k, v in r.items() if k != "source"}) for r in held]  # the path is in "source"


def test_held_out_carve_does_not_depend_on_where_the_file_sits(tiny_model_dir, tmp_path):
    """Issue 21: the carve hashed "abs_path:line", so moving the data changed which rows were held out (test
    rows leaked into training). It hashes the record's text now: the same rows wherever the file is."""
    rows = [{"prompt": f"{n} in words:", "chosen": f"number {n}", "rejected": f"numbr {n}"} for n in range(200)]
    here = tmp_path / "a" / "prefs.jsonl"
    here.parent.mkdir()
    here.write_text("".join(json.dumps(r) + "\n" for r in rows))
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.copy(here, moved)
    first = _held_out_rows(tiny_model_dir, here, tmp_path / "out1")
    second = _held_out_rows(tiny_model_dir, moved, tmp_path / "out2")
    assert first == second and 30 < len(first) < 90  # ~0.3 x 200, identical rows
    # the same records with Windows line ends and no final newline: the same rows held out
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes("\r\n".join(json.dumps(r) for r in rows).encode())
    assert _held_out_rows(tiny_model_dir, crlf, tmp_path / "out3") == first
