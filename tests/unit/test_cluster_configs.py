"""The launch files validate offline: cluster.yaml against Ray's own autoscaler schema, k8s/rayjob.yaml as a
KubeRay RayJob, runtime_env.yaml as a Ray RuntimeEnv, and the GPU configs as real-model configs that the
cluster can actually schedule. No network, no cluster: these are the checks `ray up` / `ray job submit`
would run first, plus the wiring between files (paths, extras, versions) that nothing else checks.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from conftest import ROOT
from cpo_ray.config import EMBEDDED_MODEL, load_config
from cpo_ray.contract import RunPaths

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_CONFIGS = [p for p in CONFIGS if "cpu" not in p.stem]  # naming rule: CPU configs say "cpu" in their name
STORE = ("s3://", "gs://")  # multi-node outputs live in object storage: the launchers provide no shared disk
GPUS_PER_INSTANCE = {"g5.12xlarge": 4, "p4d.24xlarge": 8}  # AWS spec sheets


def _yaml(name: str):
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _yaml("cluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, [d.get("kind") for d in docs]
    return jobs[0], docs


def _worker_types(cluster: dict) -> dict[str, dict]:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


# ---------------------------------------------------------------- cluster.yaml (Ray cluster launcher, AWS)


def test_cluster_yaml_passes_rays_own_validation_as_ray_up_runs_it(cluster):
    """`ray up` (commands._bootstrap_config): prepare_config merges aws/defaults.yaml, the setup commands and
    per-type worker limits, then validate_config checks ray-schema.json + head/min_workers rules. Skipped
    here: the AWS-only steps after it (instance-type resource lookup and bootstrap both call EC2)."""
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_yaml_as_written_matches_the_schema(cluster):
    """The file itself, before defaults: a misspelt key is an error, not silently dropped."""
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    bad = copy.deepcopy(cluster)
    bad["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cluster)
    next(iter(_worker_types(bad).values()))["resources"]["GPU"] = 0.5  # resources are whole numbers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_head_is_cpu_and_gpu_workers_declare_their_gpus(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = _worker_types(cluster)
    assert workers
    for name, t in workers.items():
        instance = t["node_config"]["InstanceType"]
        assert t["resources"].get("GPU", 0) == GPUS_PER_INSTANCE[instance], (name, instance)
        assert t["max_workers"] >= t.get("min_workers", 0) >= 0
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]


def test_cluster_installs_the_project_with_its_gpu_extra_from_the_mounted_checkout(cluster):
    (remote, local), *_ = cluster["file_mounts"].items()
    assert local == "."
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert any(f"{remote}[gpu]" in c for c in installs), installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \["vllm==', pyproject, re.M), "pyproject.toml lost its [gpu] extra"


def test_cluster_image_matches_the_pinned_ray_and_python(cluster):
    image = cluster["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image  # pyproject: ray==, python 3.11
    assert image.endswith("gpu"), image


def test_cluster_shares_no_disk_and_every_node_may_reach_the_bucket(cluster):
    """Object storage only: no NFS/EFS mount; each node type carries the instance profile the SDKs take their
    credentials from (the configs hold none)."""
    text = yaml.safe_dump(cluster)
    assert "nfs" not in text.lower() and not cluster.get("initialization_commands")
    types = cluster["available_node_types"].values()
    assert all("IamInstanceProfile" in t["node_config"] for t in types)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_each_gpu_config_fits_the_cluster(path, cluster):
    """Some worker type, at its max_workers, can place every Ray Train worker ({CPU: c, GPU: 1} each)."""
    t = load_config(path).train
    room = 0
    for node in _worker_types(cluster).values():
        res = node["resources"]
        room = max(room, node["max_workers"] * min(res["GPU"], int(res["CPU"] // t.cpus_per_worker)))
    assert room >= t.num_workers, (path.name, room, t.num_workers)


# ---------------------------------------------------------------- k8s/rayjob.yaml (KubeRay)


def test_rayjob_is_a_kuberay_v1_rayjob_with_a_head_and_a_gpu_worker_group(rayjob):
    job, _ = rayjob
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and head[0]["image"]
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if any(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def test_rayjob_entrypoint_runs_the_pipeline_on_a_shipped_gpu_config(rayjob):
    job, _ = rayjob
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"] and (ROOT / argv[1]).is_file(), argv
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), config
    cfg = load_config(ROOT / config)
    assert cfg.train.use_gpu and cfg.output_dir.startswith(STORE)


def test_rayjob_runtime_env_volumes_and_credentials_are_consistent(rayjob):
    """Every pod gets the object store's credentials from the Secret (no shared volume at all), and every
    volume a container mounts exists."""
    job, docs = rayjob
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)
    assert not [d for d in docs if d.get("kind") == "PersistentVolumeClaim"]
    secrets = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
    cluster = job["spec"]["rayClusterSpec"]
    for pod in [
        cluster["headGroupSpec"]["template"]["spec"],
        *(g["template"]["spec"] for g in cluster["workerGroupSpecs"]),
    ]:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert not any("persistentVolumeClaim" in v for v in volumes.values())
        for c in pod["containers"]:
            assert {e["secretRef"]["name"] for e in c.get("envFrom", [])} & secrets, c["name"]
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, (c["name"], m["name"])


# ---------------------------------------------------------------- runtime_env.yaml


def test_runtime_env_yaml_is_a_valid_ray_runtime_env(monkeypatch):
    monkeypatch.chdir(ROOT)  # working_dir "." is validated as a path relative to where you submit from
    data = _yaml("runtime_env.yaml")
    assert set(data) <= RuntimeEnv.known_fields, (
        set(data) - RuntimeEnv.known_fields
    )  # RuntimeEnv passes unknown keys on
    env = RuntimeEnv(**data)  # Ray's own field validation; no cluster needed
    assert env["working_dir"] == "."
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "pip" not in env and "conda" not in env  # the image carries the pins; see the commented example


# ---------------------------------------------------------------- GPU configs


def test_the_gpu_configs_exist():
    assert {p.name for p in GPU_CONFIGS} >= {
        "qwen2.5-0.5b-lora-1gpu.yaml",
        "qwen2.5-7b-lora-zero3-16gpu.yaml",
        "qwen2.5-7b-full-zero3-offload.yaml",
    }


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_gpu_config_trains_and_serves_a_hub_model_on_gpu(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert f"--runtime-env runtime_env.yaml -- python jobs/pipeline.py --config configs/{path.name}" in first
    assert cfg.model.name_or_path != EMBEDDED_MODEL
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.model.name_or_path), cfg.model.name_or_path  # org/name Hub id
    assert cfg.train.use_gpu and cfg.model.dtype == "bfloat16"
    assert cfg.serve.device == "gpu" and not cfg.serve.enforce_eager and cfg.serve.dtype == "bfloat16"
    assert cfg.serve.max_model_len >= cfg.data.max_length
    assert cfg.data.train_files and cfg.data.synthetic is None
    assert cfg.output_dir.startswith(STORE), "multi-node outputs must be in object storage"
    assert RunPaths.of(cfg).storage.uri.startswith(STORE), RunPaths.of(cfg).storage
    assert (cfg.train.beta, cfg.train.cpo_alpha) == (0.1, 1.0)  # CPO paper defaults


def test_cpu_configs_stay_on_cpu():
    """...and offline: the embedded model or a GGUF file from an installed package, nothing downloaded."""
    from cpo_ray.gguf import is_gguf

    for path in CONFIGS:
        if path not in GPU_CONFIGS:
            cfg = load_config(path)
            name = cfg.model.name_or_path
            assert not cfg.train.use_gpu and (name == EMBEDDED_MODEL or is_gguf(name)), path.name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_launch_command_names_its_own_file(path):
    assert f"--config configs/{path.name}" in path.read_text().splitlines()[0]
