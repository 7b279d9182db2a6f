"""Where artifacts live: a local folder or object storage, addressed by URI, through one small path type.

    out = Location("s3://bucket/runs/tiny")          # or "runs/tiny", "/abs/path", "gs://...", "memory://..."
    (out / "eval" / "eval.json").write_text(text)     # atomic on local disk; one PUT on an object store
    out.upload_from("final-tmp/")                     # a whole folder, file by file
    local = node_copy(out / "final")                  # a node-local copy (cached, locked): what vLLM/transformers load

A cluster often has NO shared disk, only an object store: nothing a stage writes may be read back from
another node's local disk. Every run artifact is a Location; workers read and write them directly (Ray Data
tasks, each Ray Train rank, rank 0's exports, Serve replicas), never through a path that only one node sees.

Filesystems are pyarrow's (what Ray Data and Ray Train take as `filesystem=`): local, S3 (endpoint and
credentials from the environment only: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION; never from a config file), GCS, and any other fsspec protocol wrapped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import tempfile
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

# What a process on another node needs to reach the same object store: copied into Ray runtime envs.
S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)

# Bytes per read when copying a file to or from a store (Ray Train's checkpoint copies use the same). pyarrow's
# default (1 MiB) makes one ranged GET per MiB: a round trip each on a real store, and quadratic in the file's
# size on moto's server, which re-reads the object per range (bench/RESULTS.md, "Storage costs").
COPY_CHUNK_BYTES = 64 << 20


def is_remote(uri: str | Path) -> bool:
    """A URI with a scheme other than file:// (s3://, gs://, ...)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def storage_env() -> dict[str, str]:
    """The object-store settings of this process's environment, for the runtime env of remote processes."""
    return {k: os.environ[k] for k in S3_ENV if os.environ.get(k)}


@cache
def _s3_filesystem():
    import pyarrow.fs as pafs

    kw: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


@cache
def _filesystem(scheme: str):
    """pyarrow filesystem of a URI scheme ("" = local)."""
    import pyarrow.fs as pafs

    if scheme in ("", "file"):
        return pafs.LocalFileSystem()
    if scheme in ("s3", "s3a"):
        return _s3_filesystem()
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))


class Location:
    """A file or folder on a local disk or an object store, with the few path operations run artifacts need.

    Local locations are absolute paths (relative ones resolve against the current directory once, when the
    Location is made, so they travel to workers intact); remote ones keep their URI. Object stores have no
    folders: `mkdir` is a no-op there and a "folder" exists when a key below it does.
    """

    __slots__ = ("path", "scheme")

    def __init__(self, uri: str | Path | Location):
        if isinstance(uri, Location):
            self.scheme, self.path = uri.scheme, uri.path
            return
        text = str(uri)
        if is_remote(text):
            scheme, rest = text.split("://", 1)
            self.scheme, self.path = scheme, rest.rstrip("/")
        else:
            self.scheme, self.path = "", str(Path(text.removeprefix("file://")).expanduser().resolve())

    # --- naming -------------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{part}")

    def __reduce__(self):  # pickles as its URI (Ray ships Locations to workers)
        return (Location, (self.uri,))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0])

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local(self) -> Path:
        """The path of a local location (a remote one raises: copy it with node_copy first)."""
        if self.scheme:
            raise ValueError(f"{self.uri} is not on this machine's disk (node_copy() makes a local copy)")
        return Path(self.path)

    @property
    def fs(self):
        """pyarrow filesystem; `self.path` is the path inside it (what Ray Data / Ray Train take)."""
        return _filesystem(self.scheme)

    # --- queries ------------------------------------------------------------------------------------
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound or self.is_dir()

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.Directory:
            return True
        if info.type == pafs.FileType.File or self.is_local:
            return False
        return bool(self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False)))

    def mtime(self) -> float:
        """Last modification time, seconds since the epoch (0 when missing)."""
        info = self._info()
        return info.mtime.timestamp() if info.mtime else 0.0

    def iterdir(self) -> list[Location]:
        """Direct children (files and folders), sorted by name; [] for a missing folder."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False))
        return sorted((self._child(i.path) for i in infos), key=lambda loc: loc.name)

    def glob(self, pattern: str) -> list[Location]:
        """Direct children whose name matches the pattern (e.g. "*.parquet"), sorted."""
        return [c for c in self.iterdir() if fnmatch.fnmatch(c.name, pattern)]

    def rglob(self, suffixes: tuple[str, ...] | str) -> list[Location]:
        """Every file below this folder whose name ends with one of the suffixes, sorted by path."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=True))
        hits = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)]
        return [self._child(p) for p in sorted(hits)]

    def _child(self, inner_path: str) -> Location:
        return Location(f"{self.scheme}://{inner_path}" if self.scheme else inner_path)

    # --- contents -----------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Whole-file write: on local disk a temporary file renamed into place (readers never see half a
        file); on an object store one PUT, which is atomic by itself."""
        if self.is_local:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.local.parent, prefix=f".{self.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.local)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def open_input(self):
        """A binary, seekable input file (pyarrow NativeFile): for Parquet readers and decompressors."""
        return self.fs.open_input_file(self.path)

    def open_output(self):
        if self.is_local:
            self.local.parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open_output_stream(self.path)

    # --- folders ------------------------------------------------------------------------------------
    def mkdir(self) -> None:
        if self.is_local:
            self.local.mkdir(parents=True, exist_ok=True)

    def unlink(self) -> None:
        """Delete a file; a missing one is fine."""
        import pyarrow.fs as pafs

        if self._info().type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete a folder and everything below it; a missing one is fine."""
        if self.is_local:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)
            return
        if self.exists():  # the prefix and every key below it (pyarrow leaves no directory markers behind)
            self.fs.delete_dir(self.path)

    def upload_from(self, local_dir: str | Path) -> None:
        """Copy a local folder's files here (this location's old files under the same names are replaced)."""
        src = Path(local_dir)
        self.mkdir()
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            (self / f.relative_to(src).as_posix()).upload_file(f)

    def publish_from(self, local_dir: str | Path, marker: str) -> None:
        """Replace this folder with a local one so that readers who wait for `marker` never see a mix: on
        local disk a sibling copy renamed into place; on an object store the old keys deleted, then every
        file but the marker, then the marker last."""
        src = Path(local_dir)
        if not (src / marker).is_file():
            raise FileNotFoundError(f"{src}: no {marker} to publish")
        if self.is_local:
            import shutil

            tmp = self.local.with_name(f".{self.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            old = self.local.with_name(f".{self.name}.old-{os.getpid()}")
            if self.local.exists():
                os.replace(self.local, old)
            os.replace(tmp, self.local)
            shutil.rmtree(old, ignore_errors=True)
            return
        self.rmtree()
        files = sorted(p for p in src.rglob("*") if p.is_file() and p != src / marker)
        for f in [*files, src / marker]:
            (self / f.relative_to(src).as_posix()).upload_file(f)

    def upload_file(self, local_file: str | Path) -> None:
        """Copy one local file to this location."""
        import pyarrow.fs as pafs

        if self.is_local:
            self.local.parent.mkdir(parents=True, exist_ok=True)
        copy_file(pafs.LocalFileSystem(), str(Path(local_file).resolve()), self.fs, self.path)

    def download_to(self, local_dir: str | Path) -> Path:
        """Copy this folder's files into a local folder; returns it."""
        import pyarrow.fs as pafs

        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        root = self.path.rstrip("/")
        for info in self.fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.type == pafs.FileType.File:
                target = dest / info.path[len(root) :].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                copy_file(self.fs, info.path, pafs.LocalFileSystem(), str(target.resolve()))
        return dest


def copy_file(src_fs, src: str, dst_fs, dst: str) -> None:
    """Stream one file between pyarrow filesystems. An object store completes an upload when the output is
    closed, so that is where its errors come: they must reach the caller. pyarrow.fs.copy_files drops them
    (a missing file, no error: tests/unit/test_storage.py)."""
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(COPY_CHUNK_BYTES):
            fout.write(chunk)


def node_cache_dir() -> Path:
    """This node's private cache for copies of remote folders (models, adapters): CPO_RAY_NODE_CACHE or the
    system temp dir. Never assumed shared with any other node."""
    return Path(os.environ.get("CPO_RAY_NODE_CACHE") or Path(tempfile.gettempdir()) / "cpo-ray-cache")


def node_copy(folder: str | Location, marker: str = "config.json") -> Path:
    """A local path of `folder`: itself when local, else a copy in node_cache_dir() made once per node and
    version (keyed by the URI and the marker's modification time: a re-exported model is copied again; a file
    lock keeps concurrent workers on one node from copying twice; a `.complete` stamp marks a whole copy).
    `marker` must exist in the folder: a half-written export is an error here, not a broken model later."""
    loc = Location(folder)
    if loc.is_local:
        return loc.local
    from filelock import FileLock

    stamp = loc / marker
    if not stamp.is_file():
        raise FileNotFoundError(f"{loc.uri}: no {marker} (not a complete folder)")
    digest = hashlib.sha256(f"{loc.uri}@{stamp.mtime()}".encode()).hexdigest()[:16]
    dest = node_cache_dir() / f"{loc.name}-{digest}"
    done = dest / ".complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not done.exists():
            loc.download_to(dest)
            done.write_text(loc.uri)
    return dest
