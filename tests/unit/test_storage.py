"""cpo_ray.storage.Location on a local disk and on a real S3-compatible server (moto_server on loopback,
reached through pyarrow's S3FileSystem with the endpoint and keys from the environment), and has_rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from cpo_ray import storage
from cpo_ray.contract import has_rows
from cpo_ray.devcluster import S3Server
from cpo_ray.storage import Location, node_copy


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("moto")) as server:
        mp = pytest.MonkeyPatch()
        for k, v in server.env.items():
            mp.setenv(k, v)
        storage._s3_filesystem.cache_clear()  # the filesystem reads the environment once per process
        storage._filesystem.cache_clear()
        yield server
        mp.undo()
        storage._s3_filesystem.cache_clear()
        storage._filesystem.cache_clear()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return Location(tmp_path / "store")
    server = request.getfixturevalue("s3")
    return Location(f"s3://{server.bucket}/{tmp_path.name}")


def test_write_read_list_and_delete(root):
    assert not root.exists() and root.iterdir() == [] and not (root / "x.json").is_file()
    (root / "a" / "x.json").write_text('{"k": 1}')
    (root / "a" / "y.parquet").write_bytes(b"PAR1")
    (root / "b" / "deep" / "z.parquet").write_bytes(b"PAR1")
    assert (root / "a" / "x.json").read_text() == '{"k": 1}'
    assert root.is_dir() and (root / "a").is_dir() and not (root / "a" / "x.json").is_dir()
    assert [c.name for c in root.iterdir()] == ["a", "b"]
    assert [c.name for c in (root / "a").glob("*.parquet")] == ["y.parquet"]
    assert [c.uri.removeprefix(root.uri) for c in root.rglob(".parquet")] == ["/a/y.parquet", "/b/deep/z.parquet"]
    assert (root / "a" / "x.json").mtime() > 0 and (root / "missing").mtime() == 0.0
    (root / "a" / "x.json").unlink()
    (root / "a" / "x.json").unlink()  # a missing file is fine
    assert not (root / "a" / "x.json").exists()
    (root / "b").rmtree()
    assert not (root / "b").exists() and [c.name for c in root.iterdir()] == ["a"]


def test_publish_replaces_whole_folder_and_node_copy_follows_new_versions(root, tmp_path, monkeypatch):
    monkeypatch.setenv("CPO_RAY_NODE_CACHE", str(tmp_path / "node-cache"))
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for folder, files in ((v1, {"w.bin": b"1", "old.bin": b"x"}), (v2, {"w.bin": b"22"})):
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        (root / "final").publish_from(v1, marker="config.json")  # nothing to mark it complete
    (v1 / "config.json").write_text("{}")
    (v2 / "config.json").write_text('{"v": 2}')
    final = root / "final"
    final.publish_from(v1, marker="config.json")
    first = node_copy(final)
    assert (first / "w.bin").read_bytes() == b"1"
    if not root.is_local:
        import time

        time.sleep(1.1)  # S3 LastModified has one-second resolution: the copy is keyed by it
    final.publish_from(v2, marker="config.json")
    assert sorted(c.name for c in final.iterdir()) == ["config.json", "w.bin"]  # old.bin gone: no mix of versions
    second = node_copy(final)
    assert (second / "w.bin").read_bytes() == b"22" and (second / "config.json").read_text() == '{"v": 2}'
    if root.is_local:
        assert first == second == final.local  # local folders are used in place
    else:
        assert second != first and node_copy(final) == second  # one copy per node and version
        with pytest.raises(FileNotFoundError, match="not a complete folder"):
            node_copy(root / "nothing-here")


def test_has_rows_of_folders_files_and_missing_paths(root):
    assert not has_rows(root / "train")
    table = pa.table({"prompt_ids": [[1]], "chosen_ids": [[2]], "rejected_ids": [[3]]})
    with (root / "train" / "part-0.parquet").open_output() as f:
        pq.write_table(table, f)
    assert has_rows(root / "train")
    assert has_rows(root / "train" / "part-0.parquet")  # eval.pairs may name one file
    (root / "notes.txt").write_text("x")
    assert not has_rows(root / "notes.txt")


def test_folders_go_up_and_come_down_whole_in_several_chunks(root, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "COPY_CHUNK_BYTES", 1000)  # several reads per file, as a big model's
    src = tmp_path / "src"
    files = {"model.bin": bytes(range(256)) * 17, "sub/deep/a.json": b"{}", "empty.txt": b""}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (root / "up").upload_from(src)
    down = (root / "up").download_to(tmp_path / "down")
    assert {p.relative_to(down).as_posix(): p.read_bytes() for p in down.rglob("*") if p.is_file()} == files


class _FailsOnClose:
    """A writable file whose close fails, as an object store's upload does when completing it fails."""

    def __init__(self):
        self.closed = False

    def write(self, data):
        return len(data)

    def close(self):
        if not self.closed:
            self.closed = True
            raise OSError("CompleteMultipartUpload failed")


class _FailingUploads(pa.fs.FileSystemHandler):
    """Local reads; every write fails when it is closed."""

    def __init__(self):
        self.local = pa.fs.LocalFileSystem()

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "failing-uploads"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_FailsOnClose(), mode="w")

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = None
    open_input_file = open_append_stream = None


def test_a_failed_upload_is_an_error_not_a_missing_file(tmp_path):
    # pyarrow.fs.copy_files (what Location used) ignores the error of closing the output, where an object store
    # completes a multipart upload: moto_server failing a 1.6 GB checkpoint's completion left no object, no error.
    (tmp_path / "ckpt.pt").write_bytes(b"x" * 100)
    failing = pa.fs.PyFileSystem(_FailingUploads())
    with pytest.raises(OSError, match="CompleteMultipartUpload failed"):
        storage.copy_file(pa.fs.LocalFileSystem(), str(tmp_path / "ckpt.pt"), failing, str(tmp_path / "out.pt"))
