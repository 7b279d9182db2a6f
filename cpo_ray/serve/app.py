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
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cpo_ray.config import Config, ConfigError, ServeConfig
from cpo_ray.contract import ADAPTER_MARKER, API_KEY_ENV, FINAL_MARKER, RunPaths
from cpo_ray.storage import Location, is_remote, storage_env

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


BASE = "base"  # the served id of the configured model


def served_models(cfg: Config) -> dict[str, str]:
    """cfg.serve.models, or base (the configured model) + tuned (the run's final/) when it exists; with
    serve.lora_adapters the base alone (the tuned adapter rides on its engine: `served_adapters`)."""
    from cpo_ray.model_source import resolve_model_path

    if cfg.serve.models:
        return dict(cfg.serve.models)
    models = {BASE: resolve_model_path(cfg)}
    final = RunPaths.of(RunPaths.anchored(cfg)).final
    if (final / FINAL_MARKER).is_file() and not cfg.serve.lora_adapters:
        models["tuned"] = final.uri  # a folder, or a storage URI each replica downloads from on its own node
    return models


def adapters_dir(cfg: Config) -> Location:
    return Location(cfg.serve.adapters_dir) if cfg.serve.adapters_dir else Location(cfg.output_dir) / "adapters"


def lora_serving(cfg: Config) -> dict | None:
    """With serve.lora_adapters: what build_llm_app's `lora` takes (where adapters live, the LoRA rank); None
    without. Refused, with the reason, where Ray Serve LLM cannot load adapters from (a local disk)."""
    if not cfg.serve.lora_adapters:
        return None
    where = adapters_dir(cfg)
    if where.is_local:
        raise ConfigError(
            f"serve.lora_adapters: Ray Serve LLM loads adapters from object storage only (s3://, gs://), and "
            f"{where} is a local folder: set serve.adapters_dir (or output_dir) to a bucket, or serve merged models"
        )
    return {"adapters": where.uri, "rank": cfg.model.lora.r}


def served_adapters(cfg: Config) -> list[str]:
    """With serve.lora_adapters: the ids the evaluator asks for ("base:<run name>"), after publishing this
    run's adapter into adapters_dir/<run name> (once). Refused where there is no adapter (a full fine-tune)."""
    if lora_serving(cfg) is None:
        return []
    where = adapters_dir(cfg)
    adapter = RunPaths.of(cfg).adapter
    if not (adapter / ADAPTER_MARKER).is_file():
        raise ConfigError(f"serve.lora_adapters: no LoRA adapter at {adapter} (model.lora.enabled: a LoRA run)")
    check_servable_adapter(adapter)
    mine = where / cfg.name
    if not (mine / ADAPTER_MARKER).is_file() or (mine / ADAPTER_MARKER).mtime() < (adapter / ADAPTER_MARKER).mtime():
        with tempfile.TemporaryDirectory() as tmp:
            mine.publish_from(adapter.download_to(tmp), marker=ADAPTER_MARKER)
    return [f"{BASE}:{cfg.name}"]


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


def cpu_cores(index: int, n_models: int, cores: list[int]) -> str:
    """The cores engine `index` of `n_models` binds its threads to (VLLM_CPU_OMP_THREADS_BIND): an equal,
    disjoint share of `cores` (the ones this process may run on: its affinity, which containers, Slurm and
    taskset restrict), so models scored at the same time do not compete, and a lone model gets them all. With
    more models than cores the shares cannot be disjoint: engines take one core each, round-robin.
    vLLM's own default binds every engine to core 0 and reserves the rest."""
    cores = sorted(cores)
    per = max(1, len(cores) // n_models)
    first = (index * per) % len(cores)
    return ",".join(str(c) for c in cores[first : first + per])


def engine_cores(cfg: ServeConfig, model_ids: list[str]) -> list[str]:
    """Each served model's CPU cores, in serving order: serve.cpu_cores as given (one entry per model, else an
    error naming the key), or an equal, disjoint share of this process's usable cores (cpu_cores())."""
    if cfg.cpu_cores is None:
        cores = usable_cores()  # the engines run on this node in the local (CPU) setups
        return [cpu_cores(i, len(model_ids), cores) for i in range(len(model_ids))]
    if len(cfg.cpu_cores) != len(model_ids):
        raise ConfigError(f"serve.cpu_cores lists {len(cfg.cpu_cores)} core sets for {len(model_ids)} models "
                          f"{model_ids}: give one per served model, in that order")  # fmt: skip
    return list(cfg.cpu_cores)


def usable_cores() -> list[int]:
    """The CPU ids this process may run on (sched affinity; os.cpu_count() where there is no affinity API)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _env_vars(device: str, cache_dir: str, local_model: bool, cores: str | None = None) -> dict:
    env = storage_env() | {
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


# vLLM's names of the projections LoRA adapts (its fused qkv/gate_up and the usual unfused ones), lm_head left
# out: vLLM 0.32 wraps the head for LoRA whenever it may, and its CPU kernel then fails on prompt log-probs of
# batched requests (one LoRA index per request, one row per prompt token); cpo-ray's adapters never adapt the head.
LORA_TARGETS = ["qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj",
                "down_proj", "dense", "fc1", "fc2", "w1", "w2", "w3", "out_proj"]  # fmt: skip


def _lora_settings(adapters: str, rank: int, n: int = 8) -> dict:
    """LLMConfig fields that put LoRA adapters (folders under `adapters`, loaded on demand) on one engine."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank values
    max_rank = next((r for r in allowed if r >= rank), allowed[-1])
    engine = {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": n, "max_cpu_loras": n}
    return {
        "lora_config": {"dynamic_lora_loading_path": adapters, "max_num_adapters_per_replica": n},
        "engine_kwargs": engine | {"lora_target_modules": LORA_TARGETS},
    }


def check_servable_adapter(adapter: Location) -> None:
    """Refuse, before any engine starts, an adapter vLLM would not apply as trained: fully trained modules
    (modules_to_save: vLLM loads none for causal LMs) or a LoRA on the head (left out above)."""
    cfg = json.loads((adapter / ADAPTER_MARKER).read_text())
    saved = cfg.get("modules_to_save") or []
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if saved or "lm_head" in targets:
        what = f"modules_to_save {saved}" if saved else "a LoRA on lm_head"
        raise ConfigError(
            f"serve.lora_adapters: {adapter} has {what}, which vLLM's LoRA serving does not apply: train with "
            "model.lora.modules_to_save: [] (and no lm_head target), or serve the merged model (lora_adapters: false)"
        )


def build_llm_app(cfg: ServeConfig, models: dict[str, str], *, cache_dir: str | None = None,
                  lora: dict | None = None):  # fmt: skip
    """A Serve application: one vLLM deployment per served id plus the OpenAI ingress (0 CPUs). `lora`
    ({"adapters": uri, "rank": r}) puts LoRA adapters on the BASE engine (served as "base:<name>")."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from cpo_ray.compat import model_card, openai_ingress_app

    if not models:
        raise ValueError("serve: no models to serve (pass {served_id: model folder})")
    device = resolve_device(cfg.device)
    cache = cache_dir or default_cache_dir()
    configs, bind = [], engine_cores(cfg, list(models))
    for i, (model_id, source) in enumerate(models.items()):
        # A folder or a storage URI (ray.serve.llm downloads it to the replica's node) needs no hub.
        local = is_remote(source) or Path(source).is_dir()
        settings = _engine_settings(cfg, device, len(models))
        if lora and model_id == BASE:
            extra = _lora_settings(lora["adapters"], lora["rank"])
            settings["engine_kwargs"] |= extra.pop("engine_kwargs")
            settings |= extra
        configs.append(
            LLMConfig(
                model_loading_config={
                    "model_id": model_id,
                    "model_source": source if is_remote(source) else str(Path(source).resolve()) if local else source,
                },
                runtime_env={"env_vars": _env_vars(device, cache, local, bind[i])},
                **settings,
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
    # The ingress lists adapters in storage itself (/v1/models): it needs the store's settings too.
    options["ray_actor_options"] = {"num_cpus": 0, "runtime_env": {"env_vars": storage_env()}}
    ingress = make_fastapi_ingress(OpenAiIngress, app=app)
    return serve.deployment(ingress, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: model_card(c.model_id, c) for c in configs},
        # where each base model's adapters live: the ingress lists them (/v1/models) and routes "base:<name>"
        lora_paths={c.model_id: c.lora_config.dynamic_lora_loading_path for c in configs if c.lora_config},
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
    lora: dict | None = None,
    adapters: tuple[str, ...] = (),
) -> str:
    """Deploy the models, wait until /v1/models lists each id (and each "base:<name>" adapter in `adapters`,
    with `lora` as build_llm_app takes it), and return the base URL (.../v1).

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
        [
            serve.RunTarget(
                target=build_llm_app(cfg, models, cache_dir=cache_dir, lora=lora), name=APP_NAME, route_prefix="/"
            )
        ],  # fmt: skip
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}/v1"
    api_key, want = resolve_api_key(cfg), {*models, *adapters}
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
