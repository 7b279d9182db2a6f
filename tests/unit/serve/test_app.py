"""The Serve application's pure parts: CPU/GPU engine settings, core pinning, and the Bearer-auth middleware
on a bare ASGI app (no Ray)."""

from __future__ import annotations

import pytest

from cpo_ray.config import ServeConfig

KEY = "test-key-123"
MAX_LEN = 256


def test_engine_settings_cpu_and_gpu(monkeypatch):
    from cpo_ray.serve.app import _engine_settings, _env_vars, resolve_api_key

    cfg = ServeConfig(max_model_len=MAX_LEN)
    cpu = _engine_settings(cfg, "cpu", 2)
    assert cpu["engine_kwargs"]["dtype"] == "float32" and cpu["engine_kwargs"]["enforce_eager"] is True
    assert cpu["engine_kwargs"]["kv_cache_memory_bytes"] == cfg.kv_cache_memory_bytes
    assert cpu["accelerator_config"] == {"kind": "cpu"}
    total = (
        cpu["deployment_config"]["ray_actor_options"]["num_cpus"]
        + cpu["placement_group_config"]["bundle_per_worker"]["CPU"]
    )
    assert 2 * total <= 1.0  # two models fit in one of a 2-CPU Ray's CPUs
    gpu = _engine_settings(cfg.model_copy(update={"enforce_eager": False}), "gpu", 2)  # 0-1 visible GPUs here
    assert gpu["engine_kwargs"]["dtype"] == "bfloat16" and gpu["engine_kwargs"]["enforce_eager"] is False
    assert gpu["engine_kwargs"]["gpu_memory_utilization"] == pytest.approx(cfg.gpu_memory_utilization / 2)
    assert gpu["placement_group_config"]["bundle_per_worker"]["GPU"] == 0.5  # two engines share one card
    assert "trust_remote_code" in gpu["engine_kwargs"] and not gpu["engine_kwargs"]["trust_remote_code"]
    assert _env_vars("cpu", "/c", True) == {
        "VLLM_CACHE_ROOT": "/c/vllm",
        "TORCHINDUCTOR_CACHE_DIR": "/c/inductor",
        "TORCHDYNAMO_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    assert "TORCHDYNAMO_DISABLE" not in _env_vars("gpu", "/c", False)
    from cpo_ray.serve.app import cpu_cores

    # two models on 2 cores: one core each (scored at once); one model: both; 3 on 8: 2 each, disjoint
    assert [cpu_cores(i, 2, [0, 1]) for i in range(2)] == ["0", "1"] and cpu_cores(0, 1, [0, 1]) == "0,1"
    assert [cpu_cores(i, 3, list(range(8))) for i in range(3)] == ["0,1", "2,3", "4,5"]
    # an affinity mask (taskset -c 4,6,7, a cgroup cpuset): only those cores, disjoint per model
    assert [cpu_cores(i, 2, [7, 4, 6]) for i in range(2)] == ["4", "6"]
    # more models than cores: one core each, shared round-robin (disjoint is impossible)
    assert [cpu_cores(i, 3, [0, 1]) for i in range(3)] == ["0", "1", "0"]
    env = _env_vars("cpu", "/c", True, "1")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("CPO_RAY_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig()) == "from-env" and resolve_api_key(ServeConfig(api_key="k")) == "k"


def test_serve_cpu_cores_key_and_the_process_affinity(monkeypatch):
    """serve.cpu_cores is a real key (issue 21): one core set per served model, else an error naming it; unset,
    the shares come from the process's affinity (containers, Slurm, taskset), not os.cpu_count()."""
    from cpo_ray.config import ConfigError, load_config
    from cpo_ray.serve.app import engine_cores

    cfg = load_config(None, ["serve.cpu_cores=[0-3, 4-7]"]).serve
    assert engine_cores(cfg, ["base", "tuned"]) == ["0-3", "4-7"]
    with pytest.raises(ConfigError, match=r"serve.cpu_cores lists 2 core sets for 1 models \['base'\]"):
        engine_cores(cfg, ["base"])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {5, 3})  # e.g. taskset -c 3,5 on a 64-core host
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert engine_cores(ServeConfig(), ["base", "tuned"]) == ["3", "5"]


def test_bearer_auth_middleware():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cpo_ray.serve.app import BearerAuth

    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": []})
    app.add_middleware(BearerAuth, api_key=KEY)
    client = TestClient(app)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": KEY}).status_code == 401  # scheme required
    assert client.get("/v1/nowhere").status_code == 401  # before routing: no probing of paths
    ok = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json() == {"data": []}


def test_lora_serving_needs_object_storage(tmp_path):
    """serve.lora_adapters: Ray Serve LLM loads adapters from s3:// / gs:// only: a local adapters folder is a
    config error naming the keys (before any engine starts); a bucket gives the base engine's LoRA settings."""
    from cpo_ray.config import ConfigError, load_config
    from cpo_ray.serve.app import lora_serving

    assert lora_serving(load_config(None, [f"output_dir={tmp_path}"])) is None
    local = load_config(None, [f"output_dir={tmp_path}", "serve.lora_adapters=true"])
    with pytest.raises(ConfigError, match=r"object storage only .* set serve.adapters_dir \(or output_dir\)"):
        lora_serving(local)
    remote = load_config(None, [f"output_dir={tmp_path}", "serve.lora_adapters=true", "serve.adapters_dir=s3://b/ad"])
    assert lora_serving(remote) == {"adapters": "s3://b/ad", "rank": remote.model.lora.r}
