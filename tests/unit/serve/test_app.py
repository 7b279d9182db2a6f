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
    assert [cpu_cores(i, 2, 2) for i in range(2)] == ["0", "1"] and cpu_cores(0, 1, 2) == "0-1"
    assert [cpu_cores(i, 3, 8) for i in range(3)] == ["0-1", "2-3", "4-5"]
    env = _env_vars("cpu", "/c", True, "1")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("CPO_RAY_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig()) == "from-env" and resolve_api_key(ServeConfig(api_key="k")) == "k"


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
