"""A multi-node Ray cluster with no shared disk, and an S3-compatible store, on ONE machine: what the integration
tests and benchmarks run cpo-ray on, and a way to try a cluster setup locally. Every process is started and
stopped by its own handle (never `ray stop`, never pkill by name: other Ray clusters may run on this machine).
Needs root (mount namespaces) and moto (`pip install 'moto[s3,server]'`, in the CPU lock).

    with S3Server(tmp) as s3, RayNodes(tmp, env=s3.env) as cluster:
        cluster.start_head(num_cpus=1)
        node = cluster.add_node(num_cpus=2)      # in its own mount namespace: a private /tmp
        cluster.kill_node(node)                  # SIGKILL of its raylet and every worker it started

S3Server: moto's S3-compatible server (`moto_server`, a real HTTP server) on a free loopback port; clients reach
it through the standard AWS environment (AWS_ENDPOINT_URL, keys), never through a config file.

RayNodes: a head (`ray start --head --block`) and worker nodes on this machine, each worker node under
`unshare --mount` with a tmpfs mounted over /tmp and its own HOME: a file one node writes to its /tmp (Ray's
session dir, the job's working dir, checkpoints staged by Ray Train, vLLM's model cache, anything a stage puts
in a temp dir) is invisible to every other node, as on a real cluster without a shared disk. The repository
and the virtualenv (the "image") stay visible to all. Each worker node gets its own loopback address
(127.0.0.2, 127.0.0.3, ...), so Ray sees distinct machines.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tree(root_pid: int, extra: list[psutil.Process] = (), timeout: float = 20) -> None:
    """SIGTERM a process, all its descendants and `extra`; SIGKILL what is left after `timeout`."""
    procs = list(extra)
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(root_pid)
        procs += [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _tagged(tag: str) -> list[psutil.Process]:
    """Processes whose command line mentions `tag` (our temp dirs): what Ray re-parented away from a node."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(tag in part for part in (p.info["cmdline"] or [])):
                found.append(p)
    return found


class S3Server:
    """moto_server on 127.0.0.1:<free port>, with a bucket; `env` is what any client needs."""

    def __init__(self, workdir: Path, bucket: str = "cpo-ray"):
        self.workdir, self.bucket = Path(workdir), bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": "cpo-ray-test",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8),
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.proc = None

    def __enter__(self) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "moto.log", "w")  # the server writes here for its lifetime
        self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"moto_server did not start: {(self.workdir / 'moto.log').read_text()}"
                    ) from None
                time.sleep(0.3)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")  # fmt: skip

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes | None:
        try:
            return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception:
            return None

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            stop_tree(self.proc.pid)


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen
    tag: str  # a string in every command line of this node's processes (its temp dir)
    killed: bool = False
    extra: list = field(default_factory=list)


class RayNodes:
    """A private multi-node Ray cluster on this machine; see the module docstring."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        # Short: Ray's socket paths have a length limit.
        self.root = Path(tempfile.mkdtemp(prefix="cpo-mn-", dir="/tmp"))
        self.workdir = Path(workdir)
        self.token = secrets.token_hex(16)
        self.env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=self.token, **(env or {}))  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self._ips = iter(f"127.0.0.{i}" for i in range(2, 250))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a client process (ray job submit, a driver) needs to reach this cluster."""
        return dict(self.env, RAY_ADDRESS=self.address)

    def start_head(self, num_cpus: float = 1) -> Node:
        tmp = self.root / "head"
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={tmp}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=400000000"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=self.env, stdout=self._log("head"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.head = Node("head", "127.0.0.1", proc, str(tmp))
        self._wait_dashboard()
        return self.head

    def add_node(self, num_cpus: float = 2, resources: str | None = None) -> Node:
        """A worker node in its own mount namespace (private /tmp and HOME), joined to the head."""
        ip = next(self._ips)
        name = f"node-{ip.rsplit('.', 1)[1]}"
        tmp = f"/tmp/{name}"  # inside the namespace's own tmpfs
        ports = free_port()
        ray = [str(VENV_BIN / "ray"), "start", f"--address={self.address}", "--block", f"--node-ip-address={ip}",
               f"--num-cpus={num_cpus}", f"--temp-dir={tmp}/ray", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={ports}", "--include-log-monitor=false",
               f"--min-worker-port={20000 + 1000 * len(self.nodes)}", f"--max-worker-port={20999 + 1000 * len(self.nodes)}",
               "--object-store-memory=400000000"]  # fmt: skip
        if resources:
            ray.append(f"--resources={resources}")
        script = (f"mount -t tmpfs -o size=6g cpo-{name} /tmp && mkdir -p {tmp}/home && "
                  f"export HOME={tmp}/home TMPDIR={tmp} CPO_RAY_NODE_TAG={name} && exec " + " ".join(ray))  # fmt: skip
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=self.env,
                                stdout=self._log(name), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        node = Node(name, ip, proc, tmp)
        self.nodes.append(node)
        self._wait_alive(node)
        return node

    def kill_node(self, node: Node) -> None:
        """The node dies at once: SIGKILL to its raylet, its workers and everything else it started."""
        procs = [node.proc]
        with contextlib.suppress(psutil.Error):
            procs += psutil.Process(node.proc.pid).children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.kill() if isinstance(p, psutil.Process) else os.kill(p.pid, signal.SIGKILL)
        node.killed = True

    def _wait_dashboard(self) -> None:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                return
            except Exception:
                if time.time() > deadline or self.head.proc.poll() is not None:
                    raise RuntimeError(f"Ray head did not come up: {self._tail('head')}") from None
                time.sleep(1)

    def _wait_alive(self, node: Node) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited: {self._tail(node.name)}")
            out = subprocess.run([str(VENV_BIN / "ray"), "list", "nodes", f"--address={self.address}",
                                  "--filter", f"node_ip={node.ip}", "--format=json"],
                                 env=self.env, capture_output=True, text=True)  # fmt: skip
            if '"ALIVE"' in out.stdout:
                return
            time.sleep(1)
        raise RuntimeError(f"{node.name} did not join: {self._tail(node.name)}")

    def _log(self, name: str):
        self.workdir.mkdir(parents=True, exist_ok=True)
        return open(self.workdir / f"{name}.log", "w")  # the node writes here for its lifetime

    def _tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def __enter__(self) -> RayNodes:
        return self

    def keep_logs(self) -> None:
        """Copy each live worker node's Ray logs (inside its private /tmp, reachable through /proc/<pid>/root)
        next to the node's console log, for whoever reads a failure."""
        for node in self.nodes:
            if node.proc.poll() is None:
                root = f"/proc/{node.proc.pid}/root"
                with contextlib.suppress(OSError):  # session_latest links to an absolute path of that namespace
                    session = os.readlink(f"{root}{node.tag}/ray/session_latest")
                    shutil.copytree(f"{root}{session}/logs", self.workdir / f"{node.name}-ray-logs", dirs_exist_ok=True)

    def __exit__(self, *exc) -> None:
        self.keep_logs()
        for node in [*reversed(self.nodes), *([self.head] if self.head else [])]:
            if node.proc.poll() is None:
                stop_tree(node.proc.pid, _tagged(node.tag) if node is self.head else [])
        for p in _tagged(str(self.root)):  # anything Ray re-parented away from the head
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.root, ignore_errors=True)
