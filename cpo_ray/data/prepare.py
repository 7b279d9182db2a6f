"""The Ray Data pipeline of `cpo-ray prepare`: preference shards -> tokenized Parquet, every row accounted for.

    read (cpo_ray.data.readers: one task per file) -> normalise + tokenize (actor pool, tokenizer loaded once
    per actor) -> kept rows to Parquet, rejects counted by reason

`prepare(cfg, model_path)` writes each split's Parquet and prepare_report.json where cpo_ray.contract.RunPaths
says, and fails when the rejected share exceeds data.max_reject_fraction. `train_stream(split_dir)` is the lazy
Ray Dataset the trainer streams (read_parquet: workers start on the first blocks).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from cpo_ray.config import Config, DataConfig
from cpo_ray.contract import (
    CHOSEN_IDS,
    EVAL,
    KEPT_COLUMNS,
    PAIR_COLUMNS,
    PROMPT_IDS,
    REJECTED_IDS,
    SOURCE,
    TRAIN,
    TRUNCATED,
    DataError,
    Reject,
    RowError,
    RunPaths,
    has_rows,
)
from cpo_ray.data.readers import READ_BATCH, expand_files, read_file
from cpo_ray.data.tokenize import Special, tokenize_batch

READ_CPUS = 0.25  # CPU share of a read task: reading is cheap next to tokenizing
MAX_EXAMPLES = 5  # file:line examples kept per reject reason

# What the tokenize stage emits per row read: the kept columns, plus why a row was rejected.
OUT_SCHEMA = pa.schema(
    [
        (PROMPT_IDS, pa.list_(pa.int32())),
        (CHOSEN_IDS, pa.list_(pa.int32())),
        (REJECTED_IDS, pa.list_(pa.list_(pa.int32()))),  # K >= 1 rejected responses per prompt
        (TRUNCATED, pa.bool_()),
        ("boundary_merge", pa.bool_()),  # a merge across prompt|response moved a token (cpo_ray.data.tokenize)
        (SOURCE, pa.string()),
        ("reason", pa.string()),  # a Reject value; null = kept
        ("message", pa.string()),
    ]
)


class Tokenize:
    """Actor-pool UDF: normalise each record and tokenize the batch; rejects are kept as rows with a reason."""

    def __init__(self, model_path: str, data: dict, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.special = Special.of(self.tok)
        self.cfg = DataConfig.model_validate(data)

    def _record(self, raw):
        from cpo_ray.data.formats import detect_format, normalize

        if raw is None:
            raise RowError(Reject.BAD_ENCODING, "line is not valid UTF-8")
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, ints over 4300 digits, deep nesting
            raise RowError(Reject.MALFORMED_JSON, f"not valid JSON: {str(e)[:120]}") from None
        if not isinstance(rec, dict):
            raise RowError(Reject.NOT_AN_OBJECT, f"a record must be a JSON object, got {type(rec).__name__}")
        cols = self.cfg.columns or None
        fmt = detect_format(rec, cols) if self.cfg.format == "auto" else self.cfg.format
        triple = normalize(rec, fmt, self.tok, cols, chat=self.cfg.chat_template, min_score_gap=self.cfg.min_score_gap)
        for name, text in (("prompt", triple[0]), ("chosen", triple[1]), *(("rejected", r) for r in triple[2])):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                field = (cols or {}).get(name, name)
                msg = f"{name} text has a lone surrogate \\u{ord(text[e.start]):04x} at char {e.start}"
                raise RowError(Reject.BAD_ENCODING, msg, field) from None
        return triple

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["source"])
        triples, errors = [], [None] * n
        for i, raw in enumerate(batch["raw"]):
            try:
                triples.append((i, *self._record(raw)))
            except RowError as e:
                errors[i] = e
            except Exception as e:
                errors[i] = RowError(Reject.BAD_RECORD, f"{type(e).__name__}: {str(e)[:200]}")
        rows: list = [None] * n
        if triples:
            idx, p, c, r = zip(*triples, strict=True)
            tok_rows, tok_errs = tokenize_batch(self.tok, self.special, p, c, r, self.cfg.max_length)
            for i, row, err in zip(idx, tok_rows, tok_errs, strict=True):
                rows[i], errors[i] = row, err
        empty: list[int] = []
        return pa.table(
            {
                **{c: [r[c] if r else empty for r in rows] for c in PAIR_COLUMNS},
                TRUNCATED: [bool(r and r[TRUNCATED]) for r in rows],
                "boundary_merge": [bool(r and r["merged"]) for r in rows],
                SOURCE: list(batch["source"]),
                "reason": [e.reason.value if e else None for e in errors],
                "message": [(f"{e.field}: {e}" if e.field else str(e)) if e else None for e in errors],
            },
            schema=OUT_SCHEMA,
        )


def tokenized_dataset(files: list[str], cfg: Config, model_path: str, num_actors: int | None = None):
    """Lazy Ray Dataset of tokenized rows (kept and rejected, see OUT_SCHEMA) for the given files."""
    import ray

    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    # Reading stays a separate (unfused) stage with its own small CPU share, so one big file read
    # by one task still feeds every tokenizer actor.
    raw = paths.map_batches(read_file, batch_size=1, num_cpus=READ_CPUS)
    cpus = ray.cluster_resources().get("CPU", 1)
    actors = num_actors or max(1, int(cpus))
    # A fixed pool, one actor per CPU from the start, each holding a CPU share that leaves room for the
    # read tasks: an autoscaling pool starting at one actor never got its second one on 2 CPUs (the
    # reads held the rest), so tokenizing ran on one core.
    return raw.map_batches(
        Tokenize,
        fn_constructor_kwargs={
            "model_path": model_path,
            "data": cfg.data.model_dump(),
            "trust_remote_code": cfg.model.trust_remote_code,
        },
        batch_size=READ_BATCH,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=max(0.1, (cpus - READ_CPUS) / actors),
    )


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    q = np.percentile(v, [50, 95])
    return {"mean": round(float(v.mean()), 1), "p50": int(q[0]), "p95": int(q[1]), "max": int(v.max())}


def _held_out(source: str, fraction: float) -> bool:
    h = hashlib.blake2b(source.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def split_negatives(table: pa.Table) -> pa.Table:
    """Each row with K rejected responses as K rows of one (prompt and chosen repeated), in order."""
    import pyarrow.compute as pc

    rejected = table.column(REJECTED_IDS).combine_chunks()  # list<list<int32>>
    parent = np.repeat(np.arange(table.num_rows), pc.list_value_length(rejected).to_numpy(zero_copy_only=False))
    out = table.take(pa.array(parent, pa.int64()))
    flat = rejected.flatten()  # one list<int32> per rejected response
    one = pa.ListArray.from_arrays(pa.array(np.arange(len(flat) + 1, dtype=np.int32)), flat)
    return out.set_column(out.schema.get_field_index(REJECTED_IDS), REJECTED_IDS, one)


class _SplitWriter:
    """Streams kept rows of one split to Parquet shards and accounts for every row it is shown."""

    def __init__(self, out_dir: Path, rows_per_file: int, explode: bool = False):
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.parquet"):
            old.unlink()
        self.out_dir, self.rows_per_file, self.explode, self.written = out_dir, rows_per_file, explode, 0
        self.writer, self.in_file, self.files = None, 0, []
        self.read = self.truncated = self.merges = 0
        self.reasons: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.lens: dict[str, list[int]] = {c: [] for c in PAIR_COLUMNS}
        self.negatives: Counter = Counter()  # rows by their number of rejected responses

    def add(self, table: pa.Table) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.read += table.num_rows
        rejected = table.filter(pc.is_valid(table.column("reason")))
        for r, src, msg in zip(*(rejected.column(c).to_pylist() for c in ("reason", SOURCE, "message")), strict=True):
            self.reasons[r] += 1
            if len(self.examples[r]) < MAX_EXAMPLES:
                self.examples[r].append(f"{src}: {msg}")
        kept = table.filter(pc.is_null(table.column("reason")))
        self.merges += int(pc.sum(kept.column("boundary_merge")).as_py() or 0)
        kept = kept.select(list(KEPT_COLUMNS))
        self.truncated += int(pc.sum(kept.column(TRUNCATED)).as_py() or 0)
        for c in (PROMPT_IDS, CHOSEN_IDS):
            self.lens[c] += pc.list_value_length(kept.column(c)).to_pylist()
        self.lens[REJECTED_IDS] += pc.list_value_length(pc.list_flatten(kept.column(REJECTED_IDS))).to_pylist()
        self.negatives.update(pc.list_value_length(kept.column(REJECTED_IDS)).to_pylist())
        if self.explode:
            kept = split_negatives(kept)
        self.written += kept.num_rows
        while kept.num_rows:
            if self.writer is None:
                path = self.out_dir / f"part-{len(self.files):05d}.parquet"
                self.writer, self.in_file = pq.ParquetWriter(path, kept.schema), 0
                self.files.append(str(path))
            take = min(kept.num_rows, self.rows_per_file - self.in_file)
            self.writer.write_table(kept.slice(0, take))
            kept, self.in_file = kept.slice(take), self.in_file + take
            if self.in_file >= self.rows_per_file:
                self.writer.close()
                self.writer = None

    def close(self, files: list[str]) -> dict:
        if self.writer is not None:
            self.writer.close()
        rejected = sum(self.reasons.values())
        return {
            "files": files,
            "rows_read": self.read,
            "rows_kept": self.read - rejected,
            "rows_rejected": rejected,
            "rejected_by_reason": dict(self.reasons.most_common()),
            "examples": dict(self.examples),
            "truncated": self.truncated,
            "boundary_merges": self.merges,
            "rejected_per_prompt": {str(k): v for k, v in sorted(self.negatives.items())},
            "rows_written": self.written,  # rows_kept, or more with data.split_negatives
            "tokens": {c.removesuffix("_ids"): _stats(v) for c, v in self.lens.items()},
            "parquet": self.files,
        }


def _root_message(err: BaseException) -> str:
    """The message of the innermost error behind Ray's task wrappers (Ray appends hints after it)."""
    while getattr(err, "cause", None) is not None or err.__cause__ is not None:
        err = getattr(err, "cause", None) or err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if isinstance(err, DataError | OSError) else f"{type(err).__name__}: {text}"


def _totals(report: dict) -> None:
    """Rows read / kept / rejected over all splits, and the rejected share, into the report."""
    read = sum(r["rows_read"] for r in report["splits"].values())
    rejected = sum(r["rows_rejected"] for r in report["splits"].values())
    report.update(rows_read=read, rows_kept=read - rejected, rows_rejected=rejected)
    report["rejected_share"] = rejected / read if read else 0.0


def prepare(cfg: Config, model_path: str) -> dict:
    """Tokenize train (and held-out) shards to Parquet under the run's data dir; returns the report.

    One pass: Ray Data tokenizes in parallel actors while the driver streams kept rows to Parquet
    and counts rejects, so memory stays bounded by a few batches whatever the data size.
    """
    import pyarrow.compute as pc
    import ray

    from cpo_ray.data.synthetic import write_task

    paths = RunPaths.of(cfg)
    train_files, eval_files = list(cfg.data.train_files), list(cfg.data.eval_files)
    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        tr, ev = write_task(paths.raw_dir, **s.model_dump())
        train_files, eval_files = [tr], [ev]
    if not train_files:
        raise DataError("no training data: set data.train_files or data.synthetic")
    inputs = {TRAIN: expand_files(train_files)}
    if eval_files:
        inputs[EVAL] = expand_files(eval_files)
    carve = not eval_files and cfg.data.eval_split > 0  # hold out rows of the train files by hash
    report: dict = {"model": model_path, "max_length": cfg.data.max_length, "splits": {}}
    for split, files in inputs.items():
        writers = {
            split: _SplitWriter(
                paths.split_dir(split), cfg.data.rows_per_file, cfg.data.split_negatives and split == TRAIN
            )
        }
        if carve:
            writers[EVAL] = _SplitWriter(paths.split_dir(EVAL), cfg.data.rows_per_file)  # held-out rows keep their K
        try:
            for batch in tokenized_dataset(files, cfg, model_path).iter_batches(
                batch_format="pyarrow", batch_size=None
            ):
                batch = batch.cast(OUT_SCHEMA)
                if carve:
                    held = pa.array([_held_out(x, cfg.data.eval_split) for x in batch.column(SOURCE).to_pylist()])
                    writers[EVAL].add(batch.filter(held))
                    batch = batch.filter(pc.invert(held))
                writers[split].add(batch)
        except ray.exceptions.RayTaskError as e:
            raise DataError(_root_message(e)) from None
        for name, w in writers.items():
            report["splits"][name] = w.close(files)
    _totals(report)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    paths.prepare_report.write_text(json.dumps(report, indent=2))
    if report["rejected_share"] > cfg.data.max_reject_fraction:
        reasons: Counter = Counter()
        for r in report["splits"].values():
            reasons.update(r["rejected_by_reason"])
        raise DataError(
            f"{report['rows_rejected']}/{report['rows_read']} rows rejected ({report['rejected_share']:.1%} > "
            f"data.max_reject_fraction={cfg.data.max_reject_fraction:.1%}): {dict(reasons)}; "
            f"examples in {paths.prepare_report}"
        )
    return report


def count_rows(split_dir: Path) -> int:
    """Rows of a tokenized split, from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(split_dir).glob("*.parquet")))


def train_stream(split_dir: Path):
    """The lazy Ray Dataset of tokenized pairs that TorchTrainer splits across workers."""
    import ray

    if not has_rows(split_dir):
        raise DataError(f"no tokenized data in {split_dir}: run `cpo-ray prepare` first")
    return ray.data.read_parquet(str(split_dir), columns=list(PAIR_COLUMNS))
