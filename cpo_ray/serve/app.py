"""Serve base and tuned models behind one OpenAI-compatible API with Ray Serve LLM (vLLM engines).

    url = start_server(cfg.serve, {"base": base_dir, "tuned": tuned_dir}, detached=False)
    client = openai.OpenAI(base_url=url, api_key=key or "none")   # /v1/models, /v1/completions, ...
    stop_server()                                                 # from any process on the cluster

`detached=True` connects to a running cluster (`ray start --head`, or RAY_ADDRESS) so the app
outlives this process; `cpo-ray serve --stop` then calls stop_server() from a new process.
With an API key (cfg.api_key or env CPO_RAY_API_KEY) every request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hmac
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from cpo_ray.config import Config, ServeConfig
from cpo_ray.contract import API_KEY_ENV, FINAL_MARKER, RunPaths

APP_NAME = "cpo-ray"
# Small CPU shares so two models + a 0-CPU ingress schedule on a 2-CPU Ray next to other work; the
# engine's threads are not limited by these numbers, they only reserve scheduling room.
CPU_REPLICA_CPUS = 0.25
CPU_ENGINE_CPUS = 0.25


def resolve_device(device: str) -> str:
    """ "auto" -> "gpu" when this process sees CUDA, else "cpu"."""
    if device != "auto":
        return device
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def served_models(cfg: Config) -> dict[str, str]:
    """cfg.serve.models, or base (the configured model) + tuned (the run's final/) when it exists."""
    from cpo_ray.model_source import resolve_model_path

    if cfg.serve.models:
        return dict(cfg.serve.models)
    models = {"base": resolve_model_path(cfg)}
    final = RunPaths.of(cfg).final
    if (final / FINAL_MARKER).exists():
        models["tuned"] = str(final.resolve())
    return models


def resolve_api_key(cfg: ServeConfig) -> str | None:
    return cfg.api_key or os.environ.get(API_KEY_ENV) or None


def default_cache_dir() -> str:
    return os.environ.get("CPO_RAY_CACHE_DIR") or str(Path.home() / ".cache" / "cpo_ray")


def _engine_settings(cfg: ServeConfig, device: str, n_models: int) -> dict:
    """LLMConfig fields that differ between CPU and GPU engines."""
    engine = {"max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs, "trust_remote_code": False}
    if device == "cpu":
        # float32 + eager: bf16 is far slower on CPUs without AVX-512 BF16 (bench/RESULTS.md) and graph
        # capture buys nothing on CPU.
        engine |= {"dtype": "float32" if cfg.dtype == "auto" else cfg.dtype, "enforce_eager": True}
        if cfg.kv_cache_memory_bytes:
            engine["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        return {
            "engine_kwargs": engine,
            "accelerator_config": {"kind": "cpu"},
            "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": CPU_REPLICA_CPUS}},
            "placement_group_config": {"bundle_per_worker": {"CPU": CPU_ENGINE_CPUS}},
        }
    import ray
    import torch

    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()
    # Models that do not get a GPU each share one: a fractional GPU bundle and an equal memory split,
    # since every vLLM engine claims gpu_memory_utilization of the WHOLE card at start-up.
    share = max(1, -(-n_models // max(gpus, 1))) if cfg.tensor_parallel_size == 1 else 1
    engine |= {
        "dtype": "bfloat16" if cfg.dtype == "auto" else cfg.dtype,
        "enforce_eager": cfg.enforce_eager,
        "gpu_memory_utilization": cfg.gpu_memory_utilization / share,
        "tensor_parallel_size": cfg.tensor_parallel_size,
    }
    out = {"engine_kwargs": engine, "accelerator_config": {"kind": "gpu"}, "deployment_config": {"num_replicas": 1}}
    if share > 1:
        out["placement_group_config"] = {"bundle_per_worker": {"GPU": 1.0 / share, "CPU": 1}}
    return out


def cpu_cores(index: int, n_models: int, n_cpus: int) -> str:
    """The cores engine `index` of `n_models` binds its threads to: an equal, disjoint share of the node's
    cores, so models scored at the same time do not compete (one core each on 2 cores), and a lone model
    gets them all. vLLM's own default binds every engine to core 0 and reserves the rest."""
    per = max(1, n_cpus // n_models)
    first = (index * per) % n_cpus
    return str(first) if per == 1 else f"{first}-{first + per - 1}"


def _env_vars(device: str, cache_dir: str, local_model: bool, cores: str | None = None) -> dict:
    env = {
        "VLLM_CACHE_ROOT": str(Path(cache_dir) / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(Path(cache_dir) / "inductor"),
    }
    if device == "cpu":
        env["TORCHDYNAMO_DISABLE"] = "1"  # eager engine: skip dynamo's compile probes (slow on CPU)
        if cores is not None:
            env |= {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if local_model:
        env["HF_HUB_OFFLINE"] = "1"  # a folder needs no hub look-ups; fail fast instead of timing out
    return env


class BearerAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                body = json.dumps(
                    {"error": {"message": "invalid or missing API key", "type": "authentication_error", "code": 401}}
                ).encode()
                headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build_llm_app(cfg: ServeConfig, models: dict[str, str], *, cache_dir: str | None = None):
    """A Serve application: one vLLM deployment per served id plus the OpenAI ingress (0 CPUs)."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from cpo_ray.compat import model_card, openai_ingress_app

    if not models:
        raise ValueError("serve: no models to serve (pass {served_id: model folder})")
    device = resolve_device(cfg.device)
    cache = cache_dir or default_cache_dir()
    configs = []
    n_cpus = os.cpu_count() or 1  # the engines run on this node in the local (CPU) setups
    for i, (model_id, source) in enumerate(models.items()):
        local = Path(source).is_dir()
        configs.append(
            LLMConfig(
                model_loading_config={
                    "model_id": model_id,
                    "model_source": str(Path(source).resolve()) if local else source,
                },
                runtime_env={"env_vars": _env_vars(device, cache, local, cpu_cores(i, len(models), n_cpus))},
                **_engine_settings(cfg, device, len(models)),
            )
        )
    # Same wiring as ray.serve.llm.build_openai_app, except that we hand make_fastapi_ingress our
    # own FastAPI app (the stock one + Bearer auth): build_openai_app offers no way to add middleware,
    # and Serve 2.60 removed HTTPOptions.middlewares in favour of exactly this FastAPI route.
    app = openai_ingress_app()
    api_key = resolve_api_key(cfg)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)  # added last = runs first, before any routing
    options = OpenAiIngress.get_deployment_options(configs)
    options["ray_actor_options"] = {"num_cpus": 0}
    ingress = make_fastapi_ingress(OpenAiIngress, app=app)
    return serve.deployment(ingress, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: model_card(c.model_id, c) for c in configs},
    )


def _listed_models(url: str, api_key: str | None) -> set[str]:
    req = urllib.request.Request(f"{url}/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return {m["id"] for m in json.load(resp)["data"]}


def _app_state() -> tuple[str, str]:
    """(status, message) of our Serve app; the message gathers the deployments' errors."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return "NOT_STARTED", ""
    details = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return getattr(app.status, "value", str(app.status)), "; ".join([app.message, *details])


def start_server(
    cfg: ServeConfig,
    models: dict[str, str],
    *,
    detached: bool,
    cache_dir: str | None = None,
    address: str | None = None,
) -> str:
    """Deploy the models, wait until /v1/models lists each id, and return the base URL (.../v1).

    Uses the Ray this process is connected to; else connects to `address` / RAY_ADDRESS ("auto" when
    detached: the app must outlive this driver, so it lives on an already running cluster) or, not
    detached, starts a local Ray that ends with this process (the caller then keeps it alive, e.g.
    until Ctrl-C). On failure or timeout the half-deployed app is deleted and the error raised.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address or ("auto" if detached else None))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run_many(
        [serve.RunTarget(target=build_llm_app(cfg, models, cache_dir=cache_dir), name=APP_NAME, route_prefix="/")],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}/v1"
    api_key, want = resolve_api_key(cfg), set(models)
    deadline = time.monotonic() + cfg.ready_timeout_s
    while True:
        # The ingress answers /v1/models before the engines load: also wait for the app to run.
        status, message = _app_state()
        try:
            if status == "RUNNING" and want <= _listed_models(url, api_key):
                break
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass  # proxy not listening yet
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            # Do not leave a broken app behind restarting replicas and holding CPUs/GPUs.
            serve.delete(APP_NAME, _blocking=False)
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"serve: deployment failed: {message}")
            raise TimeoutError(f"serve: {sorted(want)} not ready at {url} after {cfg.ready_timeout_s:.0f}s ({status})")
        time.sleep(1.0)
    return url


def stop_server(address: str | None = None) -> None:
    """Shut Serve down on the cluster this process is connected to, else on `address` / RAY_ADDRESS /
    the newest local cluster ("auto"): works from a fresh process such as `cpo-ray serve --stop`."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address or "auto")
    serve.shutdown()
