"""The Ray Data pipeline of `cpo-ray prepare`: preference shards -> tokenized Parquet, every row accounted for.

    read (cpo_ray.data.readers: one task per file) -> normalise + tokenize (actor pool, tokenizer loaded once
    per actor) -> kept rows to Parquet, rejects counted by reason

`prepare(cfg, model_path)` writes each split's Parquet (one shard per batch, written by the tokenizer actors
themselves, on local disk or object storage) and prepare_report.json where cpo_ray.contract.RunPaths says, and
fails when the rejected share exceeds data.max_reject_fraction. `train_stream(split_dir)` is the lazy Ray
Dataset the trainer streams (read_parquet: workers start on the first blocks).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa

from cpo_ray.config import Config, ConfigError, DataConfig
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
    parquet_files,
)
from cpo_ray.data.readers import READ_BATCH, expand_files, read_file
from cpo_ray.data.tokenize import Special, tokenize_batch
from cpo_ray.storage import Location

READ_CPUS = 0.25  # CPU share of a read task: reading is cheap next to tokenizing
ACTOR_CPUS = 0.5  # CPU share reserved by each tokenizer actor (logical: its threads use what the node has)
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
        from cpo_ray.model_source import load_tokenizer

        self.tok = load_tokenizer(model_path, trust_remote_code)  # a node-local copy when it is in storage
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
            except ConfigError:
                raise  # the whole run's problem (e.g. no chat template): stop with one clear error, not N rejects
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


def tokenized_dataset(files: list[str], cfg: Config, model_path: str, num_actors: int | None = None, udf=None,
                      udf_kwargs: dict | None = None):  # fmt: skip
    """Lazy Ray Dataset of the given files through `udf` (default Tokenize: kept and rejected rows, OUT_SCHEMA).

    Runs in order (preserve_order): the rows reach the UDF in file order, so batch boundaries, and the names
    of the shards the pipeline writes from them, are the same on every run and cluster."""
    import ray

    paths = ray.data.from_items(
        [{"path": f, "file_index": i} for i, f in enumerate(files)], override_num_blocks=max(1, len(files))
    )
    paths.context.execution_options.preserve_order = True
    # Reading stays a separate (unfused) stage with its own small CPU share, so one big file read
    # by one task still feeds every tokenizer actor.
    raw = paths.map_batches(read_file, batch_size=1, num_cpus=READ_CPUS)
    cpus = ray.cluster_resources().get("CPU", 1)
    actors = num_actors or max(1, int(cpus))
    # A fixed pool, one actor per CPU from the start: an autoscaling pool starting at one actor never got its
    # second one on 2 CPUs (the reads held the rest), so tokenizing ran on one core. Each actor reserves half a
    # CPU, so that on EVERY node (a 1-CPU head, 2-CPU workers, ...) room stays for the read tasks: a share sized
    # for the whole cluster could fill each node exactly and leave the reads nowhere to run.
    return raw.map_batches(
        udf or Tokenize,
        fn_constructor_kwargs={
            "model_path": model_path,
            "data": cfg.data.model_dump(),
            "trust_remote_code": cfg.model.trust_remote_code,
            **(udf_kwargs or {}),
        },
        batch_size=READ_BATCH,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=ACTOR_CPUS,
    )


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    q = np.percentile(v, [50, 95])
    return {"mean": round(float(v.mean()), 1), "p50": int(q[0]), "p95": int(q[1]), "max": int(v.max())}


def held_out(raw: str | None, fraction: float) -> bool:
    """Whether a record goes to the carved held-out split (data.eval_split): a hash of the record's own
    text, so the split does not depend on where the file sits or what it is called, and duplicate records
    always land on the same side (a copy of a test row is never trained on). Surrounding whitespace is not
    part of it: a JSONL line's LF or CRLF, or a last line without one, hashes the same."""
    h = hashlib.blake2b((raw or "").strip().encode("utf-8", "surrogateescape"), digest_size=8).digest()
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


# One row per (batch, split) that TokenizeAndWrite handled: the batch's accounting, reduced by the driver.
STATS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("first", pa.int64()),  # file_index * 2**32 + record number of the batch's first row: the order key
        ("shard", pa.string()),  # the Parquet file written (null: nothing kept)
        ("accounting", pa.string()),  # JSON: counts, reasons, examples, negatives (see batch_accounting)
        ("prompt_len", pa.list_(pa.int32())),
        ("chosen_len", pa.list_(pa.int32())),
        ("rejected_len", pa.list_(pa.int32())),
    ]
)


def batch_accounting(table: pa.Table) -> dict:
    """Every row of one tokenized batch (OUT_SCHEMA) accounted for: read, rejected by reason (with the first
    MAX_EXAMPLES file:line examples), truncated, boundary merges, rejected responses per kept prompt."""
    import pyarrow.compute as pc

    rejected = table.filter(pc.is_valid(table.column("reason")))
    reasons: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for r, src, msg in zip(*(rejected.column(c).to_pylist() for c in ("reason", SOURCE, "message")), strict=True):
        reasons[r] += 1
        if len(examples[r]) < MAX_EXAMPLES:
            examples[r].append(f"{src}: {msg}")
    kept = table.filter(pc.is_null(table.column("reason")))
    negatives = Counter(pc.list_value_length(kept.column(REJECTED_IDS)).to_pylist())
    return {
        "read": table.num_rows,
        "reasons": dict(reasons),
        "examples": dict(examples),
        "truncated": int(pc.sum(kept.column(TRUNCATED)).as_py() or 0),
        "merges": int(pc.sum(kept.column("boundary_merge")).as_py() or 0),
        "negatives": {str(k): v for k, v in negatives.items()},
    }


class TokenizeAndWrite(Tokenize):
    """The prepare pipeline's actor UDF: tokenize a batch, write its kept rows as ONE Parquet shard from this
    actor (wherever it runs: no driver-side writer, no shared disk), return only the accounting (STATS_SCHEMA).

    Shards are named by their first row's position in the input (file index, record number), so listing a
    split in name order is reading the input in order. With data.eval_split, rows whose hash says so go to
    the eval split's shard instead (their K rejected responses kept); data.split_negatives explodes the
    train rows into one-rejected rows."""

    def __init__(self, model_path: str, data: dict, trust_remote_code: bool = False, *, split: str,
                 out: dict[str, str], carve: float = 0.0):  # fmt: skip
        super().__init__(model_path, data, trust_remote_code)
        self.split, self.carve = split, carve
        self.out = {name: Location(uri) for name, uri in out.items()}

    def __call__(self, batch: dict) -> pa.Table:
        import pyarrow.compute as pc

        table = super().__call__(batch)
        first = int(batch["file_index"][0]) * 2**32 + int(batch["record"][0])
        parts = {self.split: table}
        if self.carve:
            held = pa.array([held_out(x, self.carve) for x in batch["raw"]], pa.bool_())
            parts = {self.split: table.filter(pc.invert(held)), EVAL: table.filter(held)}
        rows = [self._write(name, part, first) for name, part in parts.items()]
        return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)

    def _write(self, split: str, table: pa.Table, first: int) -> dict:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        kept = table.filter(pc.is_null(table.column("reason"))).select(list(KEPT_COLUMNS))
        lengths = {c: pc.list_value_length(kept.column(c)).to_pylist() for c in (PROMPT_IDS, CHOSEN_IDS)}
        lengths[REJECTED_IDS] = pc.list_value_length(pc.list_flatten(kept.column(REJECTED_IDS))).to_pylist()
        accounting = batch_accounting(table)
        if split == TRAIN and self.cfg.split_negatives:
            kept = split_negatives(kept)
        accounting["written"] = kept.num_rows
        shard = None
        if kept.num_rows:
            loc = self.out[split] / f"part-{first >> 32:05d}-{first & 0xFFFFFFFF:09d}.parquet"
            with loc.open_output() as f:
                pq.write_table(kept, f)
            shard = loc.uri
        return {
            "split": split,
            "first": first,
            "shard": shard,
            "accounting": json.dumps(accounting),
            "prompt_len": lengths[PROMPT_IDS],
            "chosen_len": lengths[CHOSEN_IDS],
            "rejected_len": lengths[REJECTED_IDS],
        }


def _split_report(files: list[str], rows: list[dict]) -> dict:
    """One split's prepare_report entry from its batches' STATS rows (in input order)."""
    reasons: Counter = Counter()
    negatives: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    read = truncated = merges = written = 0
    for row in rows:
        acc = json.loads(row["accounting"])
        read, truncated, merges = read + acc["read"], truncated + acc["truncated"], merges + acc["merges"]
        written += acc["written"]
        reasons.update(acc["reasons"])
        negatives.update(acc["negatives"])
        for reason, ex in acc["examples"].items():
            examples[reason] += ex[: MAX_EXAMPLES - len(examples[reason])]
    rejected = sum(reasons.values())
    lens = {c: [n for row in rows for n in row[f"{c}_len"]] for c in ("prompt", "chosen", "rejected")}
    return {
        "files": files,
        "rows_read": read,
        "rows_kept": read - rejected,
        "rows_rejected": rejected,
        "rejected_by_reason": dict(reasons.most_common()),
        "examples": dict(examples),
        "truncated": truncated,
        "boundary_merges": merges,
        "rejected_per_prompt": {k: v for k, v in sorted(negatives.items(), key=lambda kv: int(kv[0]))},
        "rows_written": written,  # rows_kept, or more with data.split_negatives
        "tokens": {c: _stats(v) for c, v in lens.items()},
        "parquet": [row["shard"] for row in rows if row["shard"]],
    }


def _root(err: BaseException) -> BaseException:
    """The innermost error behind Ray's task wrappers."""
    while getattr(err, "cause", None) is not None or err.__cause__ is not None:
        err = getattr(err, "cause", None) or err.__cause__
    return err


def _root_message(err: BaseException) -> str:
    """The message of the innermost error behind Ray's task wrappers (Ray appends hints after it)."""
    err = _root(err)
    text = str(err).strip()
    return text.splitlines()[0] if isinstance(err, DataError | OSError) else f"{type(err).__name__}: {text}"


def _totals(report: dict) -> None:
    """Rows read / kept / rejected over all splits, and the rejected share, into the report."""
    read = sum(r["rows_read"] for r in report["splits"].values())
    rejected = sum(r["rows_rejected"] for r in report["splits"].values())
    report.update(rows_read=read, rows_kept=read - rejected, rows_rejected=rejected)
    report["rejected_share"] = rejected / read if read else 0.0


def _inputs(cfg: Config, paths: RunPaths) -> dict[str, list[str]]:
    """{split: file URIs}: the configured files, or the synthetic task written to the run's storage first."""
    from cpo_ray.data.synthetic import write_task

    train_files, eval_files = list(cfg.data.train_files), list(cfg.data.eval_files)
    if cfg.data.synthetic is not None:
        train_files, eval_files = map(list, zip(write_task(paths.raw_dir, **cfg.data.synthetic.model_dump())))
    if not train_files:
        raise DataError("no training data: set data.train_files or data.synthetic")
    inputs = {TRAIN: expand_files(train_files)}
    if eval_files:
        inputs[EVAL] = expand_files(eval_files)
    return inputs


def prepare(cfg: Config, model_path: str) -> dict:
    """Tokenize train (and held-out) shards to Parquet under the run's data dir; returns the report.

    One pass: Ray Data reads in tasks and tokenizes in parallel actors that write their own Parquet shards;
    only each batch's accounting comes back to the driver, so memory stays bounded whatever the data size
    and nothing depends on the driver's disk."""
    import ray

    paths = RunPaths.of(cfg)
    if cfg.data.chat_template:  # before any row is read (and before Ray Data starts)
        from cpo_ray.data.formats import require_chat_template
        from cpo_ray.model_source import load_tokenizer

        require_chat_template(load_tokenizer(model_path, cfg.model.trust_remote_code))
    inputs = _inputs(cfg, paths)
    carve = cfg.data.eval_split if EVAL not in inputs else 0.0  # hold out rows of the train files by hash
    report: dict = {"model": model_path, "max_length": cfg.data.max_length, "splits": {}}
    for split, files in inputs.items():
        out = {split: paths.split_dir(split)} | ({EVAL: paths.split_dir(EVAL)} if carve else {})
        for loc in out.values():
            loc.rmtree()  # an earlier prepare's shards must not linger
        kwargs = {"split": split, "out": {k: v.uri for k, v in out.items()}, "carve": carve}
        try:
            ds = tokenized_dataset(files, cfg, model_path, udf=TokenizeAndWrite, udf_kwargs=kwargs)
            rows = sorted(ds.take_all(), key=lambda r: r["first"])
        except ray.exceptions.RayTaskError as e:
            if isinstance(_root(e), ConfigError):
                raise ConfigError(str(_root(e))) from None
            raise DataError(_root_message(e)) from None
        for name in out:
            report["splits"][name] = _split_report(files, [r for r in rows if r["split"] == name])
    _totals(report)
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


def count_rows(split_dir) -> int:
    """Rows of a tokenized split, from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    total = 0
    for f in parquet_files(split_dir):
        with f.open_input() as stream:
            total += pq.ParquetFile(stream).metadata.num_rows
    return total


def train_stream(split_dir):
    """The lazy Ray Dataset of tokenized pairs that TorchTrainer splits across workers: the split's shards in
    name order (= input order), read by Ray Data tasks from wherever they are stored."""
    import ray

    files = parquet_files(split_dir)
    if not files:
        raise DataError(f"no tokenized data in {split_dir}: run `cpo-ray prepare` first")
    # A read task's default 1 CPU may never be free: two 1-worker sweep trials at 0.5 CPU each on 2 cores left
    # 0.98, and training waited forever for its first block.
    return ray.data.read_parquet([f.path for f in files], filesystem=files[0].fs, columns=list(PAIR_COLUMNS),
                                 num_cpus=READ_CPUS)  # fmt: skip
