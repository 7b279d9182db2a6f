"""One typed config tree (data, model, train, serve, eval), loaded from YAML with dotted overrides.

    cfg = load_config("configs/tiny-cpu.yaml", ["train.lr=2e-5", "train.num_workers=1"])

Every field carries a one-line comment: what it does, what it trades off, and the paper's or TRL's default
where there is one. Library defaults are those of a real pretrained model tuned with LoRA as in the CPO paper
(Xu et al. 2024, ALMA-R: LoRA rank 16, lr 1e-4, beta 0.1, one epoch); the toy values of the embedded default
live in configs/tiny-cpu.yaml, which says why each differs. Unknown keys, wrong types and missing files are
errors that name the key or file. Pure: imports neither Ray nor DeepSpeed nor vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cpo_ray.contract import LossType

EMBEDDED_MODEL = "embedded:tiny"
# The held-out metrics the trainer logs at each evaluation (cpo_ray.train.heldout): what select_by may name.
SELECTABLE = frozenset(
    {"eval/accuracy", "eval/margin", "eval/pair_accuracy", "eval/accuracy_length_normalised", "eval/nll"}
)


class ConfigError(ValueError):
    """A config problem a user must fix; the message names the file and key."""

    user_error = True


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """The shipped numbers-to-words preference task (see cpo_ray.data.synthetic)."""

    train_pairs: int = 20000  # more pairs = more distinct numbers seen, a longer prepare
    eval_pairs: int = 500  # held-out pairs; more = a tighter accuracy estimate, slower evaluations
    max_number: int = 999_999  # largest number; more digits = a harder, longer task
    eval_fraction: float = 0.1  # share of the NUMBERS held out entirely for evaluation
    seed: int = 0  # same seed, same files
    negatives: int = 1  # distinct near misses per number: 1 = pairs, K > 1 = a list of K rejected responses
    eval_negatives: int | None = None  # near misses per held-out number; None = negatives


class DataConfig(_Strict):
    """Preference shards in, tokenized Parquet out (cpo_ray.data)."""

    train_files: list[str] = Field(default_factory=list)  # paths, globs, folders or fsspec URIs (s3://, hf://)
    eval_files: list[str] = Field(default_factory=list)  # held-out pairs; empty = carve eval_split out of train
    eval_split: float = 0.0  # with no eval_files: share of train rows held out (by a hash of the row's source)
    synthetic: SyntheticConfig | None = None  # set: generate the embedded numbers task instead of reading files
    # explicit / conversational / implicit (HH-RLHF) / sharegpt; auto detects per row (a few us per row)
    format: Literal["auto", "explicit", "conversational", "implicit", "sharegpt", "ranked"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # {prompt|chosen|rejected|...: source field name}
    # Write each row with K rejected responses as K one-rejected rows (the chosen repeated): what pairwise-only
    # trainers require; costs K x the prompt and chosen compute of multi-negative training (for comparisons)
    split_negatives: bool = False
    # ranked rows: responses scored at least this far below the best one become its rejected responses
    # (0 = every lower score); higher = only clear losers, fewer negatives per prompt
    min_score_gap: float = 0.0
    # Render explicit strings (one user turn, one assistant turn) and HH-style "Human:/Assistant:" dialogues
    # with the tokenizer's chat template: what a chat model sees at inference. Off = the text as it is.
    chat_template: bool = False
    # Tokens per sequence (prompt + one response), TRL's default: longer = more memory per pair; longer
    # prompts lose their start first (down to half the budget), then responses their ends.
    max_length: int = 1024
    max_reject_fraction: float = 0.01  # fail the run when more rows than this are rejected (never silently)
    output_dir: str | None = None  # tokenized Parquet (a folder or storage URI); None = <output_dir>/data

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        bad = set(self.columns) - {"prompt", "chosen", "rejected", "messages", "conversations", "responses", "scores"}
        if bad:
            raise ValueError(f"data.columns: unknown target field(s) {sorted(bad)}")
        if self.max_length < 4:
            raise ValueError("data.max_length must be >= 4")
        return self


class TinyModelConfig(_Strict):
    """Shape of the embedded random Llama (used when model.name_or_path is embedded:tiny)."""

    hidden_size: int = 128  # wider = more capacity per step, slower steps
    num_hidden_layers: int = 4  # deeper = more capacity, slower steps
    num_attention_heads: int = 4  # head dim = hidden_size / heads
    intermediate_size: int = 384  # MLP width
    max_position_embeddings: int = 2048  # must cover data.max_length + eval.max_new_tokens (no weights: RoPE)
    seed: int = 0  # same seed, same weights


class LoraConfig(_Strict):
    """peft LoRA; the CPO paper's ALMA-R tuned rank-16 LoRA weights only."""

    enabled: bool = True  # False = full fine-tune: every weight and its Adam state, ~10x lower lr
    r: int = 16  # rank (paper: 16): higher = more capacity, more memory and compute
    alpha: int = 32  # scale = alpha / r
    # Regularisation of the adapter input (ALMA-R: 0.05). > 0 copies every adapted layer's input: more
    # activation memory and time (measured: bench/RESULTS.md, figures cited by the code); 0 for short runs,
    # tiny or synthetic tasks.
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"  # every projection in attention and MLP (not lm_head)
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full as well (e.g. embed_tokens)


class ModelConfig(_Strict):
    """The causal LM to tune (cpo_ray.train.model)."""

    # Hub id or folder; embedded:tiny = a tiny random model built offline; a .gguf file (path, or
    # pkg:<package>/<file> inside an installed package) = converted once to a safetensors folder (cpo_ray.gguf)
    name_or_path: str = EMBEDDED_MODEL
    cache_dir: str | None = None  # where embedded/GGUF models are built; None = the run's output_dir (shared storage)
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)  # shape of embedded:tiny
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False  # never run a repository's code unless asked
    # None = sdpa, and with train.packing per-sequence causal SDPA over one padding-free row;
    # flash_attention_2 on GPU reads the same packed boundaries; sdpa/eager = block-diagonal mask rows.
    attn_implementation: str | None = None
    # Recompute activations in backward: peak memory per worker falls by about a third for more compute
    # (SmolLM2 figures: bench/RESULTS.md, "Memory of a training process").
    gradient_checkpointing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TrainConfig(_Strict):
    """Ray Train + DeepSpeed + the CPO loss (cpo_ray.train)."""

    num_workers: int = 1  # Ray Train workers = data-parallel ranks (one per GPU)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # fractional on small CPU hosts so Ray Data still schedules
    torch_threads: int | None = None  # intra-op threads per worker; None = cpus_per_worker (>= 1)
    zero_stage: Literal[0, 1, 2, 3] = (
        2  # 1: shard Adam state, 2: + gradients, 3: + parameters (an all-gather per layer)
    )
    offload_optimizer: bool = False  # ZeRO optimizer state in host RAM: less GPU memory, slower steps
    offload_params: bool = False  # ZeRO-3 parameters in host RAM: fits bigger models, slower again
    micro_batch_size: int = 8  # pairs per worker per forward (TRL: 8): more = faster, more activation memory
    grad_accum: int = 1  # micro-batches per optimizer step: a larger batch without the memory
    lr: float = 1e-4  # the paper's LoRA lr; full fine-tunes want ~1e-6 (TRL's default 1e-6 assumes full)
    weight_decay: float = 0.0  # TRL's default
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch/TRL defaults
    warmup_ratio: float = 0.01  # share of the run spent warming up (paper: 0.01); warmup_steps wins when set
    warmup_steps: int | None = None  # linear warm-up steps; None = warmup_ratio x total steps
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"  # after warm-up (TRL: linear to 0)
    min_lr_ratio: float = 0.0  # decay floor as a share of lr (0 = decay to zero, as TRL)
    max_grad_norm: float = 1.0  # gradient clipping (TRL: 1.0); 0 = off
    max_steps: int | None = None  # optimizer steps; None = as many as `epochs` allows
    epochs: int = 1  # passes over the training split (paper: 1); the run ends at whichever comes first
    # CPO (Xu et al. 2024) and TRL CPOTrainer's pairwise variants (averaged over a prompt's K rejected
    # responses), or infonce: one softmax over the chosen and all K rejected per prompt; see cpo_ray.train.loss
    loss_type: LossType = LossType.SIGMOID
    length_normalize: bool = False  # infonce on length-averaged log-probs (ipo/simpo/alphapo always average)
    # Warm start: the first N optimizer steps train the chosen NLL alone (SFT), then the configured CPO loss
    sft_steps: int = 0
    beta: float = 0.1  # temperature of the preference term (paper: 0.1): higher = sharper, less tolerant margins
    # weight of the chosen NLL term (paper: 1): 0 drops the behaviour-cloning regulariser; alphapo sets 0 (TRL)
    cpo_alpha: float = 1.0
    label_smoothing: float = 0.0  # sigmoid/simpo only: assumed share of flipped labels (conservative DPO)
    simpo_gamma: float = 0.5  # simpo: target reward margin (TRL: 0.5), applied as gamma/beta
    alpha: float = 0.0  # AlphaPO reward shape r = (1 - p^-alpha)/alpha; 0 = the plain log-prob reward
    packing: bool = True  # padding-free micro-batches (pairs kept together): the same log-probs, fewer FLOPs
    # With packing (and cpo-ray's attention): each prompt computed once for both of its responses, which
    # attend to it (len(prompt) fewer tokens per pair); off = one packed sequence per prompt + response.
    shared_prompt: bool = True
    # Seeded shuffle of the stream (a local buffer per rank, TRL shuffles too); false = file order, for
    # curricula and for exact comparisons with other trainers (then group_by_length must be 0). Both resume exactly.
    shuffle: bool = True
    # Micro-batches per length-sorted buffer: pairs of similar length train together (less padding,
    # fewer packed row tails); larger = tighter lengths but batches less random. 0 or 1 = stream order.
    group_by_length: int = 16
    # Several workers: pool the ranks' micro-batches (one all-gather of their token ids) and re-split them
    # into equal pair counts with near-equal tokens, so no rank waits for a longer batch at the all-reduce.
    # Off = each rank trains the pairs it read.
    balance_ranks: bool = True
    # ZeRO-0 with several workers: all-reduce gradients in buckets while backward runs (as torch DDP)
    # instead of DeepSpeed's one flatten + all-reduce after it. Off = DeepSpeed's own path.
    overlap_grad_sync: bool = True
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the start and the end)
    eval_batch_size: int = 32  # held-out pairs per forward (no backward, so more than micro_batch_size fits)
    checkpoint_every: int = 200  # steps between checkpoints (0 = only at the end): more = less lost to a crash
    keep_checkpoints: int = 2  # checkpoints kept in storage (each holds every rank's shard)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    log_every: int = 10  # console progress line every N steps (metrics.jsonl gets every step)
    # ray.train.report() is a cross-rank barrier plus a hand-off the controller polls (~2 s apart),
    # so reporting every step caps training near one step per poll; metrics.jsonl still gets every step.
    report_every: int = 10
    seed: int = 0  # model init (embedded), shuffling and length grouping
    storage_path: str | None = None  # Ray Train checkpoints (local dir or s3://...); None = <output_dir>/ray
    # Experiment trackers that get the config, every step's metrics, the held-out scores, the endpoint's table and
    # report.html / eval.json (cpo_ray.tracking); a resumed run continues the same tracked run. [] = none
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(default_factory=list)
    mlflow_tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else SQLite in local_dir/mlflow.db
    mlflow_experiment: str = "cpo-ray"
    wandb_project: str = "cpo-ray"  # WANDB_MODE=offline keeps it on disk (no account, no network)
    # Export the best held-out evaluation instead of the last step: a logged held-out metric (eval/accuracy,
    # eval/nll, eval/margin, eval/pair_accuracy, eval/accuracy_length_normalised; "heldout/..." works too).
    # Costs an export each time the metric improves. None = the last step
    select_by: str | None = None
    select_mode: Literal["max", "min"] | None = None  # None = min for eval/nll, max for the others

    @model_validator(mode="before")
    @classmethod
    def _alphapo_without_nll(cls, data):
        """TRL's CPOConfig turns "alphapo" into simpo with cpo_alpha = 0; resolved here, so the saved config is
        what ran. An explicit non-zero cpo_alpha with alphapo is a contradiction, not something to overrule."""
        if isinstance(data, dict) and data.get("loss_type") == LossType.ALPHAPO:
            if data.get("cpo_alpha", 0.0) != 0:
                raise ValueError(
                    "train.loss_type=alphapo trains without the NLL term (cpo_alpha 0, as TRL's CPOConfig): drop "
                    f"train.cpo_alpha={data['cpo_alpha']}, or use loss_type=simpo with train.alpha to keep it"
                )
            data = {**data, "cpo_alpha": 0.0}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing:
            raise ValueError(f"train.label_smoothing does not apply to loss_type={self.loss_type}")
        if self.loss_type == "infonce" and (self.alpha or self.label_smoothing):
            raise ValueError("train.loss_type=infonce takes neither train.alpha nor train.label_smoothing")
        if self.loss_type == "alphapo" and self.alpha == 0:
            raise ValueError("train.loss_type=alphapo needs train.alpha != 0")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("train.warmup_ratio must be in [0, 1)")
        if self.select_by is not None:
            key = self.select_by.replace("heldout/", "eval/", 1)
            if key not in SELECTABLE:
                raise ValueError(f"train.select_by={self.select_by!r}: one of {sorted(SELECTABLE)}")
            self.__dict__["select_by"] = key  # resolved here (validate_assignment would re-enter this check)
            if self.select_mode is None:
                self.__dict__["select_mode"] = "min" if key == "eval/nll" else "max"
        if not self.shuffle and self.group_by_length > 1:
            raise ValueError(
                f"train.shuffle=false streams pairs in file order, but train.group_by_length={self.group_by_length} "
                "reorders them by length: set train.group_by_length=0"
            )
        return self


class ServeConfig(_Strict):
    """Ray Serve LLM + vLLM behind one OpenAI-compatible API (cpo_ray.serve)."""

    models: dict[str, str] = Field(default_factory=dict)  # served id -> model folder; {} = base + tuned
    host: str = "127.0.0.1"  # loopback unless you mean to expose it
    port: int = 8000
    api_key: str | None = None  # or env CPO_RAY_API_KEY; clients then need `Authorization: Bearer <key>`
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: gpu when this process sees CUDA
    dtype: str = "auto"  # auto: float32 on CPU (bf16 is far slower without AVX-512 BF16), bfloat16 on GPU
    # Longest sequence an engine holds: a scored pair (up to data.max_length, plus the one token vLLM must
    # generate) or a prompt plus eval.max_new_tokens. None = derived from those; more = more KV cache per sequence
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = 256 * 2**20  # CPU needs an explicit KV cache size; None = GPU sizing
    gpu_memory_utilization: float = 0.85  # per model when several share one GPU
    enforce_eager: bool = True  # CPU: no graph capture; GPU: False for CUDA graphs (faster, slower start)
    tensor_parallel_size: int = 1  # GPUs per model
    max_num_seqs: int = 64  # sequences an engine batches per step: more = throughput, more KV cache
    # CPU engines: the cores each served model's threads bind to, one entry per model in serving order (e.g.
    # ["0-3", "4-7"]); None = an equal, disjoint share of the cores this process may use (its affinity). Set it
    # on multi-node CPU clusters, where the engines' nodes may have other cores than the driver's.
    cpu_cores: list[str] | None = None
    ready_timeout_s: float = 600.0  # give up (and delete the app) if the models are not up by then
    # LoRA runs: serve the tuned adapter on the BASE model's engine (one engine for base and any number of
    # adapters, vLLM's LoRA kernels; served id "base:<run name>") instead of a second engine for a merged copy.
    # Ray Serve LLM loads adapters from object storage only (s3://, gs://): needs adapters_dir or output_dir there.
    lora_adapters: bool = False
    # Where adapters live, one folder per run name (a LoRA run publishes its adapter here too); evaluating N
    # runs that share it needs one engine. None = <output_dir>/adapters
    adapters_dir: str | None = None


class GenerationConfig(_Strict):
    """What each served model GENERATES for held-out prompts, scored against the chosen response
    (cpo_ray.eval.generate): the log-prob ranking alone says nothing about the greedy answer."""

    enabled: bool = True  # greedy generations scored with `metrics` for every served model
    prompts: int | None = 200  # held-out prompts generated for (None = all): more = tighter intervals, slower
    # Also this many samples per prompt at `temperature` (ONE request with n: the prompt's KV cache is shared):
    # mean and best-of-n exact match next to greedy. 0 = greedy only
    samples: int = 0
    temperature: float = 0.7  # of the samples (greedy is temperature 0)
    metrics: list[Literal["exact_match", "chrf", "bleu"]] = Field(
        default_factory=lambda: ["exact_match", "chrf", "bleu"]
    )  # reference-based, against the chosen response (sacrebleu's chrF and BLEU)
    scorer: str | None = None  # also a user scorer: "module:function(prompt, response, reference) -> float"
    prompts_per_request: int = 16  # prompts per completions call: fewer HTTP hops
    seed: int = 0  # sampling seed (vLLM per-request seed): the same samples on a re-run


class JudgeConfig(_Strict):
    """A pairwise LLM judge through ANY OpenAI-compatible endpoint: each model vs the baseline on every generated
    prompt, asked twice with the answers swapped so position bias cancels; ties allowed (cpo_ray.eval.judge)."""

    base_url: str  # e.g. https://api.openai.com/v1, or a judge cpo-ray serves
    model: str  # the judge's model id at that endpoint
    api_key_env: str | None = None  # the environment variable holding its key (never the key itself); None = none
    template: str | None = None  # prompt file with {prompt} {response_a} {response_b}; None = the shipped one
    max_tokens: int = 8  # the verdict is one word: A, B or tie
    concurrency: int = 8  # judge requests in flight
    prompts: int | None = None  # judge only the first N generated prompts (None = all of them)


class EvalConfig(_Strict):
    """Held-out pairs scored through the endpoint, and generations scored (cpo_ray.eval)."""

    endpoint: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    models: list[str] = Field(default_factory=list)  # served ids; the first is the baseline
    pairs: str | None = None  # held-out pairs (a tokenized Parquet dir/file); None = the data eval split
    max_pairs: int | None = None  # score at most this many pairs (None = all)
    concurrency: int = 16  # requests in flight; more = faster until the server saturates
    pairs_per_request: int = 8  # pairs scored per completions call (2 prompts each): fewer HTTP hops
    retries: int = 4  # the openai client's retries of connection errors, 408/409/429 and 5xx (with backoff)
    timeout_s: float = 120.0  # per request
    generate_samples: int = 4  # prompts to generate from per model for the report (0 = off)
    max_new_tokens: int = 64  # per sample generation
    stop: list[str] = Field(default_factory=list)  # extra stop strings for samples (e.g. "\n\nHuman:" for raw HH text)
    output_dir: str | None = None  # None = <output_dir>/eval
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    judge: JudgeConfig | None = None  # set: a judge's pairwise win rate of each model over the baseline


class IterateConfig(_Strict):
    """`cpo-ray iterate`: online CPO, rounds of sampling from the current model and training on its own
    mistakes as negatives (cpo_ray.iterate)."""

    rounds: int = 3  # sample -> score -> train rounds; the final model is evaluated after the last
    prompts_per_round: int = 1000  # training prompts per round (disjoint slices of the training files, in order)
    samples: int = 4  # answers sampled per prompt (one request with n): more = more negatives, longer sampling
    temperature: float = 1.0  # of the samples: higher = more varied mistakes, fewer right answers
    # How a sample is scored against the reference: exact_match, chrf, or "module:function(prompt, response,
    # reference) -> float" for verifiable tasks. The reference is always the best answer of its row.
    scorer: str = "exact_match"
    min_score_gap: float = 0.5  # samples scored at least this far below the reference become rejected responses
    # Rejected responses kept per prompt (the lowest-scored first): 1 = pairs, the token cost of offline pairs;
    # more = multi-negative rows (pairwise CPO averages over them; infonce takes all)
    max_negatives: int = 1
    steps_per_round: int | None = None  # training steps of each round; None = train.max_steps (or its epochs)
    seed: int = 0  # sampling seed (per request)


class SweepConfig(_Strict):
    """`cpo-ray sweep`: Ray Tune trials over dotted config keys, stopped early by a scheduler (cpo_ray.sweep)."""

    # dotted key -> a list (grid: every value) or "loguniform(a, b)" / "uniform(a, b)" / "randint(a, b)" /
    # "choice([...])" (sampled `samples` times per grid point), e.g. {train.beta: [0.05, 0.1], train.lr: ...}
    params: dict[str, Any] = Field(default_factory=dict)
    samples: int = 1  # draws of the sampled keys per grid point (Tune's num_samples)
    metric: str = "eval/accuracy"  # a held-out metric logged at each evaluation (eval/nll, eval/margin, ...)
    mode: Literal["max", "min"] = "max"  # max for accuracies, min for eval/nll
    scheduler: Literal["asha", "none"] = "asha"  # asha stops trials that fall behind; none runs all to the end
    grace_period: int = 100  # steps a trial runs before it may be stopped: fewer = earlier (riskier) stops
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent_trials: int | None = None  # None = what the cluster's CPUs (GPUs) hold at once
    evaluate_best: bool = False  # serve and evaluate the best trial against the base through the endpoint


class Config(_Strict):
    name: str = "cpo"  # run name: Ray Train resumes a run of the same name
    # data/, final/, adapter/, metrics.jsonl, eval/, report.html: a local folder, or object storage (s3://,
    # gs://, any fsspec URI) on a cluster whose nodes share no disk (credentials from the environment)
    output_dir: str = "runs/cpo"
    # On the driver's own disk: stage logs and copies of eval.json and report.html; None = output_dir when it is
    # local, else runs/<name>
    local_dir: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)
    sweep: SweepConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> Config:
        need = self.data.max_length + max(1, self.eval.max_new_tokens)
        if self.serve.max_model_len is None:
            self.serve.max_model_len = need  # resolved here: the saved config says what ran
        elif self.serve.max_model_len < need:
            raise ValueError(
                f"serve.max_model_len={self.serve.max_model_len} is shorter than data.max_length="
                f"{self.data.max_length} + eval.max_new_tokens={self.eval.max_new_tokens} (a full-length pair is "
                f"data.max_length tokens and vLLM must generate at least one more): raise serve.max_model_len to "
                f"{need}, or leave it unset to derive it"
            )
        if self.model.name_or_path == EMBEDDED_MODEL and self.model.tiny.max_position_embeddings < need:
            raise ValueError(
                f"model.tiny.max_position_embeddings={self.model.tiny.max_position_embeddings} < {need} "
                "(data.max_length + eval.max_new_tokens): the embedded model could not hold its longest sequence"
            )
        if self.model.dtype == "float16":
            # DeepSpeed 0.19.8: its CPU accelerator has no fp16, and its ZeRO-0 fp16 optimizer never applies
            # the loss scale to a client optimizer's backward (updates shrink by 2^16): refuse both.
            if not self.train.use_gpu:
                raise ValueError(
                    "model.dtype=float16 needs train.use_gpu=true (no fp16 on CPU): use bfloat16 or float32"
                )
            if self.train.zero_stage == 0:
                raise ValueError(
                    "model.dtype=float16 needs train.zero_stage >= 1 (DeepSpeed's ZeRO-0 fp16 path does not scale the loss); or use bfloat16"
                )
        return self


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
