"""One typed config tree (data, model, train, serve, eval), loaded from YAML with dotted overrides.

    cfg = load_config("configs/tiny-cpu.yaml", ["train.lr=2e-5", "train.num_workers=1"])

Unknown keys, wrong types and missing files are errors that name the key or file. Pure: imports
neither Ray nor DeepSpeed nor vLLM, so every job and test can validate a config cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EMBEDDED_MODEL = "embedded:tiny"


class ConfigError(ValueError):
    """A config problem a user must fix; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """The shipped numbers-to-words preference task (see cpo_ray.synthetic)."""

    train_pairs: int = 20000
    eval_pairs: int = 500
    max_number: int = 999_999
    eval_fraction: float = 0.1  # share of the NUMBERS held out entirely for evaluation
    seed: int = 0


class DataConfig(_Strict):
    train_files: list[str] = Field(default_factory=list)  # paths, globs or fsspec URIs
    eval_files: list[str] = Field(default_factory=list)  # held-out pairs; empty = split from train
    eval_split: float = 0.0  # with no eval_files: share of train rows held out (hash of the row)
    synthetic: SyntheticConfig | None = None  # set: generate the embedded task instead of files
    format: Literal["auto", "explicit", "conversational", "implicit", "sharegpt"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # {prompt|chosen|rejected: source field}
    max_length: int = 512  # per sequence (prompt + one response); longer prompts lose their start
    max_reject_fraction: float = 0.01  # fail the run when more rows than this are rejected
    output_dir: str | None = None  # tokenized Parquet; default <output_dir>/data
    rows_per_file: int = 50_000  # Parquet rows per written shard

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        bad = set(self.columns) - {"prompt", "chosen", "rejected", "messages", "conversations"}
        if bad:
            raise ValueError(f"data.columns: unknown target field(s) {sorted(bad)}")
        if self.max_length < 4:
            raise ValueError("data.max_length must be >= 4")
        return self


class TinyModelConfig(_Strict):
    """Shape of the embedded random Llama (used when model.name_or_path is embedded:tiny)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    seed: int = 0


class LoraConfig(_Strict):
    enabled: bool = False
    r: int = 16  # rank: higher = more capacity, more memory
    alpha: int = 32  # scale = alpha / r
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full (e.g. embed_tokens, lm_head)


class ModelConfig(_Strict):
    name_or_path: str = EMBEDDED_MODEL  # HF id or folder; embedded:tiny = built offline
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 CPU
    trust_remote_code: bool = False  # never run repository code unless asked
    # None = sdpa, and with train.packing per-sequence causal SDPA over one padding-free row;
    # flash_attention_2 on GPU reads the same packed boundaries; sdpa/eager = block-diagonal mask rows.
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False  # less activation memory, ~30% more compute
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TrainConfig(_Strict):
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractional on small CPU hosts so Ray Data still schedules
    torch_threads: int | None = None  # intra-op threads per worker; None = cpus_per_worker (>= 1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO optimizer state in host RAM: less GPU memory, slower
    offload_params: bool = False  # ZeRO-3 parameters in host RAM
    micro_batch_size: int = 8  # pairs per worker per forward
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # decay floor as a share of lr
    max_grad_norm: float = 1.0
    max_steps: int = 300  # optimizer steps; stops earlier if epochs run out
    epochs: int = 100
    # CPO (Xu et al. 2024) and TRL CPOTrainer variants; see cpo_ray.loss
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"] = "sigmoid"
    beta: float = 0.1
    cpo_alpha: float = 1.0  # weight of the chosen NLL term
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0  # AlphaPO reward shape
    packing: bool = False  # padding-free micro-batches (pairs kept together)
    # Micro-batches per length-sorted buffer: pairs of similar length train together (less padding,
    # fewer packed row tails); larger = tighter lengths but batches less random. 0 or 1 = stream order.
    group_by_length: int = 16
    # ZeRO-0 with several workers: all-reduce gradients in buckets while backward runs (as torch DDP)
    # instead of DeepSpeed's one flatten + all-reduce after it. Off = DeepSpeed's own path.
    overlap_grad_sync: bool = True
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    checkpoint_every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    log_every: int = 10  # console progress line every N steps
    # ray.train.report() is a cross-rank barrier plus a hand-off the controller polls (~2 s apart),
    # so reporting every step caps training near one step per poll; metrics.jsonl still gets every step.
    report_every: int = 10
    seed: int = 0
    storage_path: str | None = None  # Ray Train storage (local dir or s3://...); default <output_dir>/ray

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing:
            raise ValueError(f"train.label_smoothing does not apply to loss_type={self.loss_type}")
        if self.loss_type == "alphapo" and self.alpha == 0:
            raise ValueError("train.loss_type=alphapo needs train.alpha != 0")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        return self


class ServeConfig(_Strict):
    models: dict[str, str] = Field(default_factory=dict)  # served id -> model folder; {} = base+tuned
    host: str = "127.0.0.1"  # loopback unless you mean to expose it
    port: int = 8000
    api_key: str | None = None  # or env CPO_RAY_API_KEY; clients then need Bearer auth
    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: str = "auto"  # auto: float32 on CPU (bf16 is slow without AVX-512), bfloat16 on GPU
    max_model_len: int = 1024
    kv_cache_memory_bytes: int | None = 256 * 2**20  # CPU needs an explicit KV cache size
    gpu_memory_utilization: float = 0.85  # per model when several share one GPU
    enforce_eager: bool = True  # CPU: no graph capture; GPU: False for CUDA graphs
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    ready_timeout_s: float = 600.0


class EvalConfig(_Strict):
    endpoint: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    models: list[str] = Field(default_factory=list)  # served ids; first = baseline
    pairs: str | None = None  # held-out pairs (raw file or tokenized dir); default: data eval split
    max_pairs: int | None = None
    concurrency: int = 16  # requests in flight; more = faster until the server saturates
    pairs_per_request: int = 8  # pairs scored per completions call (2 prompts each): fewer HTTP hops
    retries: int = 4
    timeout_s: float = 120.0
    generate_samples: int = 4  # prompts to generate from per model for the report (0 = off)
    max_new_tokens: int = 64
    output_dir: str | None = None  # default <output_dir>/eval


class Config(_Strict):
    name: str = "tiny"  # run name: Ray Train resumes a run of the same name
    output_dir: str = "runs/tiny"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    # Derived locations; one place so jobs and stages agree.
    @property
    def data_dir(self) -> str:
        return self.data.output_dir or str(Path(self.output_dir) / "data")

    @property
    def eval_dir(self) -> str:
        return self.eval.output_dir or str(Path(self.output_dir) / "eval")

    @property
    def storage_path(self) -> str:
        return self.train.storage_path or str((Path(self.output_dir) / "ray").resolve())


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=2e-5)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = _parse_override(item)
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return tree


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing: all defaults), apply dotted overrides, validate."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    apply_overrides(tree, list(overrides or []))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
