"""The data contract every stage shares: split and column names, reject reasons, metric keys, the run layout.

Each name is defined here once; data, train, evaluate, pipeline, report and the tests import it. Pure
Python: no Ray, torch or transformers, so anything may import it cheaply.

    paths = RunPaths.of(cfg)
    paths.split_dir(TRAIN)     # <data_dir>/train/*.parquet, written by prepare, streamed by train (a Location)
    paths.final                # <output_dir>/final: the merged Hugging Face model
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cpo_ray.storage import Location

# Tokenized splits: <data_dir>/<split>/part-*.parquet
TRAIN, EVAL = "train", "eval"

# One tokenized row per prompt (int32 lists): the prompt once, the chosen response, and K >= 1 rejected
# responses as a list of lists (see cpo_ray.data.tokenize).
PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS = "prompt_ids", "chosen_ids", "rejected_ids"
PAIR_COLUMNS = (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS)
TRUNCATED, SOURCE = "truncated", "source"  # bool; "file:line" (or "file:rowN") of the raw record
KEPT_COLUMNS = (*PAIR_COLUMNS, TRUNCATED, SOURCE)


class Stage(StrEnum):
    """Pipeline stages, in order; each is also a `cpo-ray` subcommand."""

    PREPARE = "prepare"
    TRAIN = TRAIN
    EVAL = EVAL
    REPORT = "report"


class Reject(StrEnum):
    """Why prepare rejected a row: counted per reason in prepare_report.json, with file:line examples."""

    BAD_ENCODING = "bad_encoding"  # not UTF-8, or a lone surrogate in a text field
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"  # valid JSON, but not a {...} record
    MISSING_FIELD = "missing_field"
    NOT_STRING = "not_string"
    UNKNOWN_FORMAT = "unknown_format"
    BAD_MESSAGES = "bad_messages"  # a message list that is not [{role, content}] or a template mismatch
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_RESPONSE = "empty_response"
    IDENTICAL_RESPONSES = "identical_responses"
    IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
    UNPARSEABLE_DIALOGUE = "unparseable_dialogue"  # implicit format: no assistant turn before the difference
    BAD_SCORES = "bad_scores"  # ranked format: scores missing, not numbers, or not one per response
    TIED_SCORES = "tied_scores"  # ranked format: two responses share the best score (no chosen)
    NO_NEGATIVE = "no_negative"  # ranked format: no response scored data.min_score_gap below the best
    BAD_RECORD = "bad_record"  # catch-all for an unexpected exception: a bug to report, never expected


class LossType(StrEnum):
    """train.loss_type: TRL CPOTrainer's pairwise losses, then cpo-ray's multi-negative one."""

    SIGMOID = "sigmoid"  # CPO Eq. 3 (+ label smoothing)
    HINGE = "hinge"  # SLiC
    IPO = "ipo"
    SIMPO = "simpo"
    ALPHAPO = "alphapo"  # TRL's alias: simpo with the AlphaPO reward shape and cpo_alpha = 0
    INFONCE = "infonce"  # one softmax over the chosen and all K rejected responses (infonce_loss)


# What the trainer logs every step (TRL CPOTrainer's names), in this order.
METRIC_KEYS = (
    "loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",  # the chosen beats its hardest (so every) rejected response
    "rewards/pair_accuracies",  # share of (chosen, rejected) comparisons won; = accuracies with one rejected
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# Seconds per phase of rank 0's step, logged next to the metrics (see cpo_ray.train).
PHASE_KEYS = (
    "time/data_s",
    "time/forward_s",
    "time/backward_s",
    "time/grad_sync_s",
    "time/optimizer_s",
    "time/metrics_sync_s",
)


class RowError(ValueError):
    """A row that cannot be used; `reason` is a counted Reject, `field` the offending source field."""

    def __init__(self, reason: Reject, message: str, field: str | None = None):
        super().__init__(message)
        self.reason = Reject(reason)  # an unknown reason is a bug: ValueError here, not a new silent category
        self.field = field


class DataError(RuntimeError):
    """Input that cannot be read at all (missing file, truncated gzip, unreadable Parquet), or no data."""

    user_error = True  # the message names the file/row: no traceback needed


def has_rows(source) -> bool:
    """Whether a tokenized split folder holds any Parquet shard (prepare wrote it), or is one Parquet file."""
    loc = Location(source)
    if loc.is_file():  # listing a file is an error on pyarrow's filesystems
        return loc.name.endswith(".parquet")
    return bool(parquet_files(loc))


def parquet_files(split_dir) -> list[Location]:
    """A tokenized split's Parquet shards in name order: the order every reader streams them in."""
    return Location(split_dir).glob("*.parquet")


def read_pairs(source, max_rows: int | None = None) -> list[dict]:
    """Tokenized rows {prompt_ids, chosen_ids, rejected_ids} (int lists) of a split folder (shards in name order)
    or one Parquet file, on local disk or in storage; a file without those columns is an error naming it."""
    import pyarrow.parquet as pq

    loc = Location(source)
    files = [loc] if loc.is_file() else parquet_files(loc)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {loc}")
    rows: list[dict] = []
    for f in files:
        with f.open_input() as stream:
            table = pq.read_table(stream)
        missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; expected tokenized pairs with {list(PAIR_COLUMNS)}")
        rows += table.select(list(PAIR_COLUMNS)).to_pylist()
        if max_rows is not None and len(rows) >= max_rows:
            return rows[:max_rows]
    return rows


API_KEY_ENV = "CPO_RAY_API_KEY"  # Bearer key of the served API, when serve.api_key is not set


@dataclass(frozen=True)
class RunPaths:
    """Where every artifact of a run lives: Locations (cpo_ray.storage) on a local disk or an object store.
    Defaults sit under cfg.output_dir; data.output_dir, eval.output_dir and train.storage_path move their parts
    elsewhere. `local_dir` is on the driver's own disk: the stage logs and a copy of eval.json and report.html
    for the person at the driver (the output_dir itself when that is local)."""

    output_dir: Location
    data_dir: Location
    eval_dir: Location
    storage: Location  # Ray Train checkpoints
    local_dir: Path

    @staticmethod
    def anchored(cfg):
        """A copy of cfg whose local folders are absolute: workers and replicas run in other directories."""
        cfg = cfg.model_copy(deep=True)
        cfg.output_dir = Location(cfg.output_dir).uri
        for section in (cfg.data, cfg.eval, cfg.model):
            key = "cache_dir" if section is cfg.model else "output_dir"
            if getattr(section, key):
                setattr(section, key, Location(getattr(section, key)).uri)
        if cfg.train.storage_path:
            cfg.train.storage_path = Location(cfg.train.storage_path).uri
        cfg.local_dir = str(RunPaths.of(cfg).local_dir.resolve())
        return cfg

    @classmethod
    def of(cls, cfg) -> RunPaths:
        out = Location(cfg.output_dir)
        local = Path(cfg.local_dir) if cfg.local_dir else (out.local if out.is_local else Path("runs") / cfg.name)
        return cls(
            output_dir=out,
            data_dir=Location(cfg.data.output_dir) if cfg.data.output_dir else out / "data",
            eval_dir=Location(cfg.eval.output_dir) if cfg.eval.output_dir else out / EVAL,
            storage=Location(cfg.train.storage_path) if cfg.train.storage_path else out / "ray",
            local_dir=local,
        )

    # prepare
    def split_dir(self, split: str) -> Location:
        return self.data_dir / split

    @property
    def raw_dir(self) -> Location:  # the synthetic task's generated JSONL
        return self.data_dir / "raw"

    @property
    def prepare_report(self) -> Location:
        return self.data_dir / "prepare_report.json"

    # train
    @property
    def metrics(self) -> Location:  # one JSON line per optimizer step (rank 0, through the run log actor)
        return self.output_dir / "metrics.jsonl"

    @property
    def events(self) -> Location:  # resumes and other run events
        return self.output_dir / "events.jsonl"

    @property
    def heldout_scores(self) -> Location:  # the last in-training held-out scores, per pair
        return self.output_dir / "train_eval.json"

    @property
    def final(self) -> Location:  # merged Hugging Face model (safetensors + tokenizer)
        return self.output_dir / FINAL

    @property
    def adapter(self) -> Location:  # the LoRA adapter alone (LoRA runs)
        return self.output_dir / ADAPTER

    @property
    def train_summary(self) -> Location:
        return self.output_dir / "train_summary.json"

    # evaluate
    @property
    def eval_json(self) -> Location:
        return self.eval_dir / EVAL_JSON

    @property
    def margins_png(self) -> Location:
        return self.eval_dir / MARGINS_PNG

    # pipeline and report
    @property
    def timings(self) -> Location:
        return self.output_dir / "timings.json"

    @property
    def report_html(self) -> Location:
        return self.output_dir / "report.html"

    @property
    def logs(self) -> Path:  # on the driver: one log per stage
        return self.local_dir / "logs"


# Names inside a run's folders that more than one module reads.
EVAL_JSON, EVAL_MD, MARGINS_PNG, SAMPLES_MD = "eval.json", "eval.md", "margins.png", "samples.md"  # in eval_dir
FINAL, ADAPTER = "final", "adapter"  # the merged model and the LoRA adapter, in output_dir and in checkpoints
FINAL_MARKER = "config.json"  # final/ is complete when its config.json exists (published last)
ADAPTER_MARKER = "adapter_config.json"  # the same for a LoRA adapter folder
CHECKPOINT_STATE = "cpo_state.json"  # step + data position, next to DeepSpeed's files in each checkpoint


def pairs_file(model: str) -> str:
    """pairs_<model>.jsonl with a filesystem-safe model id (ids may contain '/' or ':')."""
    return f"pairs_{_safe(model)}.jsonl"


def generations_file(model: str) -> str:
    """generations_<model>.jsonl: each held-out prompt's generated answer(s) and their scores."""
    return f"generations_{_safe(model)}.jsonl"


def _safe(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", model)
