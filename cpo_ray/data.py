"""Preference shards -> tokenized pairs on Ray Data, with every row accounted for.

    read (one task per file, batches of lines with file:line) -> normalise + tokenize (actor pool,
    tokenizer loaded once per actor) -> kept rows to Parquet, rejects counted by reason

`prepare(cfg)` writes each split's Parquet and prepare_report.json where cpo_ray.contract.RunPaths says, and
fails when the rejected share exceeds data.max_reject_fraction. `train_stream(split_dir)` is the lazy Ray
Dataset the trainer streams (read_parquet: workers start on the first blocks). Inputs: JSONL, JSONL.gz,
JSON arrays (.json/.json.gz holding [ {...}, ... ], streamed; records numbered `file:recordN`) and Parquet;
local paths, globs, folders or any fsspec URI (s3://, gs://, ...).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import fsspec
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
    Reject,
    RunPaths,
)
from cpo_ray.tokenize import RowError, Special, tokenize_batch

READ_BATCH = 1024
READ_CPUS = 0.25  # CPU share of a read task: reading is cheap next to tokenizing
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
MAX_EXAMPLES = 5  # file:line examples kept per reject reason

# What the tokenize stage emits per row read: the kept columns, plus why a row was rejected.
OUT_SCHEMA = pa.schema(
    [
        (PROMPT_IDS, pa.list_(pa.int32())),
        (CHOSEN_IDS, pa.list_(pa.int32())),
        (REJECTED_IDS, pa.list_(pa.list_(pa.int32()))),  # K >= 1 rejected responses per prompt
        (TRUNCATED, pa.bool_()),
        ("boundary_merge", pa.bool_()),  # a merge across prompt|response moved a token (cpo_ray.tokenize)
        (SOURCE, pa.string()),
        ("reason", pa.string()),  # a Reject value; null = kept
        ("message", pa.string()),
    ]
)


class DataError(RuntimeError):
    """Input that cannot be read at all (missing file, truncated gzip, unreadable Parquet)."""

    user_error = True  # the message names the file/row: no traceback needed


def expand_files(specs: list[str]) -> list[str]:
    """Paths, globs, folders and URIs -> sorted file URIs; a spec matching nothing is an error."""
    files: list[str] = []
    for spec in specs:
        fs, path = fsspec.core.url_to_fs(spec)
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(SUFFIXES))
        elif fs.exists(path):
            found = [path]
        else:
            raise DataError(f"data file not found: {spec}")
        if not found:
            raise DataError(f"no data files match {spec!r} (expected {', '.join(SUFFIXES)})")
        files += [fs.unstrip_protocol(p) if "://" in spec else str(Path(p).resolve()) for p in found]
    return files


def _lines(path: str):
    """(line_no, raw bytes) for a JSONL / JSONL.gz file (compression from the suffix)."""
    with fsspec.open(path, "rb", compression="infer") as stream:
        line_no = 0
        try:
            for line_no, line in enumerate(stream, 1):
                yield line_no, line
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: unreadable after line {line_no} ({type(e).__name__}: {e})") from None


def _is_json_array(path: str) -> bool:
    """A .json/.json.gz file whose first non-blank byte is "[" holds one JSON array of records (as
    LLaMA-Factory and many dataset repositories ship them); anything else is read as JSONL."""
    if not path.endswith((".json", ".json.gz")):
        return False
    with fsspec.open(path, "rb", compression="infer") as stream:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"["


class _ArrayReader:
    """The elements of one JSON array as raw JSON text, streamed in 1 MiB chunks: the C JSON scanner finds
    where each element ends, and the Tokenize stage parses it as it parses a JSONL line (so a record that
    is valid JSON but not a usable pair is a counted reject). Bytes that are not UTF-8 survive as surrogate
    escapes and are rejected per record (bad_encoding). Only a broken array (a syntax error between or
    inside elements) stops the file, with a DataError naming the record."""

    CHUNK = 1 << 20

    def __init__(self, stream, path: str):
        import codecs

        self.stream, self.path = stream, path
        self.decode = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape").decode
        self.buf, self.pos, self.eof = "", 0, False

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.stream.read(self.CHUNK)
        self.eof = not data
        self.buf = self.buf[self.pos :] + self.decode(data, final=self.eof)
        self.pos = 0
        return True

    def _peek(self) -> str:
        """The next non-blank character ("" at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos : self.pos + 1]

    def _fail(self, n: int, what: str):
        raise DataError(f"{self.path}: not a valid JSON array after record {n} ({what})")

    def __iter__(self):
        scan = json.JSONDecoder().raw_decode
        if self._peek() != "[":
            self._fail(0, "no opening [")
        self.pos += 1
        n = 0
        while True:
            c = self._peek()
            if c == "]":
                self.pos += 1
                if self._peek():
                    self._fail(n, "text after the closing ]")
                return
            if n:
                if c != ",":
                    self._fail(n, "expected , or ]" if c else "the file ends inside the array")
                self.pos += 1
                self._peek()
            while True:
                try:
                    _, end = scan(self.buf, self.pos)
                    if end < len(self.buf) or self.eof:  # a number at the buffer's end may continue
                        break
                except ValueError as e:  # JSONDecodeError, or an int over Python's digit limit
                    if self.eof:
                        self._fail(n, str(e))
                if not self._more():
                    self._fail(n, "the file ends inside a record")
            n += 1
            yield n, self.buf[self.pos : end]
            self.pos = end


def _array_records(path: str):
    """(record number, JSON text) of each element of a JSON array file; never loaded whole."""
    try:
        with fsspec.open(path, "rb", compression="infer") as stream:
            yield from _ArrayReader(stream, path)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _json_default(value):
    """Parquet values JSON has no type for: UTF-8 bytes are text (UnicodeDecodeError -> bad_encoding);
    anything else (timestamp, decimal, ...) stays a non-string so normalize counts it, never its str()."""
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8")
    return {"$type": type(value).__name__, "value": str(value)}


def _parquet_records(rb) -> list:
    """Rows of one record batch; a row whose strings are not UTF-8 is None (counted as bad_encoding)."""
    try:
        return rb.to_pylist()
    except UnicodeDecodeError:
        out = []
        for i in range(rb.num_rows):
            try:
                out.append(rb.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError:
                out.append(None)
        return out


def read_file(batch: dict) -> dict:
    """Ray Data generator UDF: one file path in, batches of {source, raw} out (raw = one JSON text)."""
    (path,) = batch["path"]
    sources, raws = [], []
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with fsspec.open(path, "rb") as f:
                row = 0
                for rb in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH):
                    for rec in _parquet_records(rb):
                        row += 1
                        sources.append(f"{path}:row{row}")
                        try:
                            raws.append(None if rec is None else json.dumps(rec, default=_json_default))
                        except UnicodeDecodeError:
                            raws.append(None)  # a binary cell that is not UTF-8: bad_encoding
                    yield {"source": sources, "raw": raws}
                    sources, raws = [], []
        except (OSError, ValueError, pa.ArrowException) as e:  # ValueError: e.g. undecodable schema names
            raise DataError(f"{path}: unreadable Parquet ({e})") from None
        return
    if _is_json_array(path):
        for n, text in _array_records(path):
            sources.append(f"{path}:record{n}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8 (surrogate escapes): bad_encoding
                text = None
            raws.append(text)
            if len(raws) >= READ_BATCH:
                yield {"source": sources, "raw": raws}
                sources, raws = [], []
        if raws:
            yield {"source": sources, "raw": raws}
        return
    for line_no, line in _lines(path):
        if not line.strip():
            continue  # blank lines are not records (a trailing newline, spacing)
        sources.append(f"{path}:{line_no}")
        try:
            raws.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            raws.append(None)  # counted as bad_encoding by the tokenizer stage
        if len(raws) >= READ_BATCH:
            yield {"source": sources, "raw": raws}
            sources, raws = [], []
    if raws:
        yield {"source": sources, "raw": raws}


class Tokenize:
    """Actor-pool UDF: normalise each record and tokenize the batch; rejects are kept as rows with a reason."""

    def __init__(self, model_path: str, data: dict, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.special = Special.of(self.tok)
        self.cfg = DataConfig.model_validate(data)

    def _record(self, raw):
        from cpo_ray.formats import detect_format, normalize

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


def prepare(cfg: Config, model_path: str) -> dict:
    """Tokenize train (and held-out) shards to Parquet under the run's data dir; returns the report.

    One pass: Ray Data tokenizes in parallel actors while the driver streams kept rows to Parquet
    and counts rejects, so memory stays bounded by a few batches whatever the data size.
    """
    import pyarrow.compute as pc
    import ray

    from cpo_ray.synthetic import write_task

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
    total_read = sum(r["rows_read"] for r in report["splits"].values())
    total_rej = sum(r["rows_rejected"] for r in report["splits"].values())
    report.update(rows_read=total_read, rows_kept=total_read - total_rej, rows_rejected=total_rej)
    report["rejected_share"] = total_rej / total_read if total_read else 0.0
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    paths.prepare_report.write_text(json.dumps(report, indent=2))
    if report["rejected_share"] > cfg.data.max_reject_fraction:
        reasons: Counter = Counter()
        for r in report["splits"].values():
            reasons.update(r["rejected_by_reason"])
        raise DataError(
            f"{total_rej}/{total_read} rows rejected ({report['rejected_share']:.1%} > "
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

    if not any(Path(split_dir).glob("*.parquet")):
        raise DataError(f"no tokenized data in {split_dir}: run `cpo-ray prepare` first")
    return ray.data.read_parquet(str(split_dir), columns=list(PAIR_COLUMNS))
