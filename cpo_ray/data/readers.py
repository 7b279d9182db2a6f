"""Raw preference files -> batches of (source, raw JSON text): what the Ray Data read stage yields.

    files = expand_files(["data/*.jsonl.gz", "s3://bucket/prefs/"])   # sorted URIs; a spec matching nothing fails
    for batch in read_file({"path": [files[0]]}):                    # {"source": ["file:line", ...], "raw": [...]}

JSONL, JSONL.gz, JSON arrays (.json/.json.gz holding [ {...}, ... ], streamed in 1 MiB chunks, records numbered
`file:recordN`) and Parquet (`file:rowN`), on local disk or any cpo_ray.storage location. A record that cannot be decoded stays in
the batch as None (counted later as bad_encoding); only a file that cannot be read at all raises DataError.
Pure I/O: no Ray, no tokenizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import io
import json
import zlib

import pyarrow as pa

from cpo_ray.contract import DataError
from cpo_ray.storage import Location, is_remote

READ_BATCH = 1024  # records per yielded batch (and per tokenize call)
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
NUMBER_CHARS = frozenset("0123456789+-.eE")


def expand_files(specs: list[str]) -> list[str]:
    """Paths, globs, folders and URIs -> sorted file URIs (local: absolute paths); a spec matching nothing is
    an error naming it. A glob may use * ? [ ] in any part of the path (matched below its fixed prefix)."""
    files: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            parts = spec.split("/")
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            base = Location("/".join(parts[:fixed]) or ".")
            pattern = (base / "/".join(parts[fixed:])).uri
            found = [f.uri for f in base.rglob(("",)) if fnmatch.fnmatch(f.uri, pattern)]
        else:
            loc = Location(spec)
            if loc.is_file():
                found = [loc.uri]
            elif loc.is_dir():
                found = [f.uri for f in loc.rglob(SUFFIXES)]
            else:
                raise DataError(f"data file not found: {spec}")
        if not found:
            raise DataError(f"no data files match {spec!r} (expected {', '.join(SUFFIXES)})")
        files += found
    return files


class _RawReader(io.RawIOBase):
    """A pyarrow input file as a raw stream, so io.BufferedReader / gzip can read lines from it."""

    def __init__(self, native):
        self.native = native

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.native.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_binary(path: str):
    """A buffered binary stream of a local file or URI, gunzipped when the name ends in .gz."""
    if is_remote(path):
        native = Location(path).open_input()
        stream = io.BufferedReader(_RawReader(native), 1 << 20)
    else:
        native = stream = open(path, "rb")  # noqa: SIM115 (closed below)
    try:
        yield gzip.GzipFile(fileobj=stream) if path.endswith(".gz") else stream
    finally:
        native.close()


def _lines(path: str):
    """(line_no, raw bytes) for a JSONL / JSONL.gz file (compression from the suffix)."""
    with open_binary(path) as stream:
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
    with open_binary(path) as stream:
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

    def _may_continue(self, end: int) -> bool:
        """Whether the value just scanned may be a number cut by the chunk boundary ("1e" | "+20" scans as 1):
        a number, followed by nothing but number characters up to the buffer's end."""
        if self.buf[self.pos] not in "-0123456789":
            return False
        buf = self.buf  # indexed, not sliced: a slice would copy up to a chunk per top-level number
        return all(buf[i] in NUMBER_CHARS for i in range(end, len(buf)))

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
                    if self.eof or not self._may_continue(end):
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
        with open_binary(path) as stream:
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


def _records(path: str):
    """(record number, "file:where", raw JSON text or None) for every record of one file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with Location(path).open_input() as f:  # seekable: Parquet reads its footer first
                row = 0
                for rb in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH):
                    for rec in _parquet_records(rb):
                        row += 1
                        try:
                            raw = None if rec is None else json.dumps(rec, default=_json_default)
                        except UnicodeDecodeError:
                            raw = None  # a binary cell that is not UTF-8: bad_encoding
                        yield row, f"{path}:row{row}", raw
        except (OSError, ValueError, pa.ArrowException) as e:  # ValueError: e.g. undecodable schema names
            raise DataError(f"{path}: unreadable Parquet ({e})") from None
        return
    if _is_json_array(path):
        for n, text in _array_records(path):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8 (surrogate escapes): bad_encoding
                text = None
            yield n, f"{path}:record{n}", text
        return
    for line_no, line in _lines(path):
        if not line.strip():
            continue  # blank lines are not records (a trailing newline, spacing)
        try:
            raw = line.decode("utf-8")
        except UnicodeDecodeError:
            raw = None  # counted as bad_encoding by the tokenizer stage
        yield line_no, f"{path}:{line_no}", raw


def read_file(batch: dict):
    """Ray Data generator UDF: one file path in, batches of READ_BATCH records out:
    {source: "file:line", raw: JSON text or None, file_index: the file's position in the input, record: its
    number in the file} (the last two order the prepared shards)."""
    (path,) = batch["path"]
    index = int(batch["file_index"][0]) if "file_index" in batch else 0
    buf: list[tuple] = []
    for rec in _records(path):
        buf.append(rec)
        if len(buf) >= READ_BATCH:
            yield _as_batch(buf, index)
            buf = []
    if buf:
        yield _as_batch(buf, index)


def _as_batch(records: list[tuple], file_index: int) -> dict:
    numbers, sources, raws = zip(*records, strict=True)
    return {"source": list(sources), "raw": list(raws), "file_index": [file_index] * len(records),
            "record": list(numbers)}  # fmt: skip
