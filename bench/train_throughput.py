"""Training throughput: TRL's CPOTrainer vs cpo-ray (one process, and through Ray Train), same everything.

    .venv/bin/python bench/train_throughput.py                      # defaults below, ~10 min on 2 cores
    .venv/bin/python bench/train_throughput.py --hidden 128 --layers 2 --steps 2 --warmup 1 \
        --max-length 256 --contenders trl,varlen,ray_1x1     # quick smoke run

Same machine, model, data, max_length, batch, precision (fp32), optimizer (torch AdamW fused=True, lr 1e-5, betas
0.9/0.999, no weight decay, grad-norm clip 1.0, constant lr) and loss (sigmoid CPO + NLL, beta 0.1,
cpo_alpha 1.0) for every contender. Default model: a random Llama, vocab 8192 (byte-level BPE trained here
with `tokenizers` on the HH data), hidden 512, 6 layers, 8 heads, intermediate 1376 (~27M params),
max_length 512, 4 pairs per optimizer step, 2 threads.

Data: ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz (implicit-prompt HH-RLHF), split into
prompt/chosen/rejected by cpo_ray.formats.normalize and tokenized by cpo_ray.tokenize (BOS + prompt,
response + EOS). TRL never truncates prompts, so pairs whose prompt + longest response exceed max_length
are dropped for everyone (counted in the JSON), as are pairs where TRL's enc(prompt + response) would give
other ids than cpo-ray's enc(prompt) + enc(response) (counted too; the ids TRL builds are then checked equal
to cpo-ray's for every used pair). All contenders train on the first (warmup + steps) x pairs kept pairs, in
file order.

Contenders (--contenders, comma-separated):
  trl       trl.experimental.cpo.CPOTrainer, train_sampling_strategy=sequential: batch i = pairs[4i:4i+4],
            DPODataCollatorWithPadding (right padding to the longest of the 8 sequences), full [8, L, V] logits
  padded    cpo-ray step in this process: collate_padded + sequence_logps + cpo_objective + backward + clip +
            AdamW, the SAME batches as trl (one sequence per row, right padding to the longest)
  packed    the same with collate_packed (sequences of the batch packed into rows as wide as the longest,
            block-diagonal mask; padding only in row tails)
  varlen    the same with collate_varlen (all sequences in ONE row, no padding) + per-sequence causal SDPA:
            what the trainer runs when train.packing is on (default attention)
  *_grouped trl/padded/packed/varlen on the same pairs reordered by cpo-ray's length grouping (warm-up
            and timed pairs regrouped separately, so every timed window holds the same pairs)
  ray_1x2   cpo_ray.train.run_training (TorchTrainer + DeepSpeed) on a Parquet of the same pairs,
            1 worker x 2 torch threads; ray_1x1: 1 worker x 1 thread; ray_2x1: 2 workers x 1 thread
            (global batch stays --pairs: micro_batch_size = pairs / workers). Ray Data streams the Parquet
            with the trainer's local shuffle, so its batches are the same pairs in another order.
            ray.init(num_cpus=2), resources_per_worker CPU 0.5, torch_threads explicit.

Timing: a fixed number of optimizer steps after --warmup steps. tokens/s counts non-pad tokens (prompt and
response of both sequences of each pair). For trl/padded/packed: timed tokens / wall time between the end of
the last warm-up step and the end of the last step (collation and data loading included). For ray_*: the mean
of the per-step tokens_per_s in metrics.jsonl after the warm-up steps. MFU = tokens/s x 6 x params / peak,
peak = best fp32 torch.mm GFLOP/s measured in this run at the bench's thread count (start and end).
The first-batch loss of trl and of padded/packed (same saved random model, same first 4 pairs) must agree
within 1e-4. A torch.profiler top-10 (self CPU %) of --profile-variant explains where its time goes.

Prints ONE JSON object on stdout (everything else goes to stderr). Not a test: numbers depend on the machine
and on its load (the JSON carries the 1-minute load average before and after).
"""

# ruff: noqa: E402  (sys.path and env are set before the imports on purpose)
from __future__ import annotations

import os
import sys

# A bench script named like a stdlib module would shadow it (linecache, torch): drop this folder from sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import gc
import gzip
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
LR, BETAS, MAX_GRAD_NORM = 1e-5, (0.9, 0.999), 1.0
BETA, CPO_ALPHA = 0.1, 1.0
RAY_SHAPES = {"ray_1x2": (1, 2), "ray_1x1": (1, 1), "ray_2x1": (2, 1)}
ONE_PROCESS = ["trl", "padded", "packed", "varlen"]
GROUPED = [f"{n}_grouped" for n in ONE_PROCESS]
ALL = [*ONE_PROCESS, *GROUPED, *RAY_SHAPES]


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def log(msg: str) -> None:
    print(f"[train_throughput] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- setup


def read_hh() -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
    """Kept pairs (text + cpo-ray ids) in file order, and the drop counts."""
    from transformers import AutoTokenizer

    from cpo_ray.formats import normalize
    from cpo_ray.tokenize import RowError, Special, tokenize_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = Special.of(tok)
    texts, bad = [], 0
    for r in records:
        try:
            texts.append(normalize(r, "implicit", tok))
        except RowError:
            bad += 1
    p, c, j = (list(x) for x in zip(*texts, strict=True))
    rows, errs = tokenize_batch(tok, special, p, c, j, max_length=10**9)  # no truncation: we filter instead
    # TRL tokenizes prompt+response as one text and splits at len(enc(prompt)): keep pairs where that
    # equals cpo-ray's separate encodings, so both see the same ids.
    enc = lambda xs: tok(xs, add_special_tokens=False)["input_ids"]  # noqa: E731
    pe, ce, je, pce, pje = (
        enc(p),
        enc(c),
        enc(j),
        enc([a + b for a, b in zip(p, c, strict=True)]),
        enc([a + b for a, b in zip(p, j, strict=True)]),
    )
    kept, too_long, mismatch = [], 0, 0
    for i, (row, err) in enumerate(zip(rows, errs, strict=True)):
        if err is not None:
            bad += 1
            continue
        if pce[i] != pe[i] + ce[i] or pje[i] != pe[i] + je[i]:
            mismatch += 1
            continue
        if len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) > args.max_length:
            too_long += 1
            continue
        kept.append(
            {
                "prompt": p[i],
                "chosen": c[i],
                "rejected": j[i],
                **{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
            }
        )
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


def pair_tokens(p: dict) -> int:
    """Non-pad tokens of a pair: prompt + chosen and prompt + rejected."""
    return 2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])


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


def load_model(model_dir: Path):
    import torch

    from cpo_ray.config import Config
    from cpo_ray.train import build_model

    cfg = Config.model_validate({"model": {"name_or_path": str(model_dir), "dtype": "float32"}})
    return build_model(cfg, str(model_dir), torch.float32)


# ---------------------------------------------------------------------------------------------- contenders


def run_trl(model_dir: Path, pairs: list[dict], args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    step_tokens: list[int] = []
    marks: list[float] = []

    class Counting(CPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step_tokens.append(int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())

    conf = CPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused",  # the AdamW implementation cpo-ray uses
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=args.max_length,
        beta=BETA,
        cpo_alpha=CPO_ALPHA,
        loss_type="sigmoid",
        train_sampling_strategy="sequential",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=args.seed,
    )
    trainer = Counting(model=model, args=conf, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    # The ids TRL built must be cpo-ray's ids: BOS + prompt + response + EOS.
    td = trainer.train_dataset
    same_ids = all(
        td[i]["chosen_input_ids"] == p["prompt_ids"] + p["chosen_ids"]
        and td[i]["rejected_input_ids"] == p["prompt_ids"] + p["rejected_ids"]
        for i, p in enumerate(pairs)
    )
    first = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        first_loss, _ = trainer.get_batch_loss_metrics(trainer.model, trainer._prepare_inputs(first))
    step_tokens.clear()
    trainer.train()
    res = timed(marks, step_tokens, args)
    res.update(first_batch_loss=float(first_loss), token_ids_equal_cpo_ray=same_ids)
    res["batching"] = "sequential batches of --pairs pairs; one sequence per row, right-padded to the longest"
    del trainer, model
    gc.collect()
    return res


def timed(marks: list[float], step_tokens: list[int], args, start: float | None = None) -> dict:
    """tokens/s over the steps after warm-up: marks[i] = end of step i (0-based)."""
    w, n = args.warmup, args.warmup + args.steps
    if len(marks) < n or len(step_tokens) < n:
        raise RuntimeError(f"expected {n} steps, saw {len(marks)} step ends and {len(step_tokens)} batches")
    secs = marks[n - 1] - marks[w - 1]
    toks = sum(step_tokens[w:n])
    return {
        "tokens_per_s": toks / secs,
        "step_s_mean": secs / args.steps,
        "timed_steps": args.steps,
        "timed_tokens": toks,
        "step_tokens": step_tokens[:n],
    }


def grouped_order(pairs: list[dict], args) -> list[dict]:
    """The same pairs reordered as cpo-ray's length grouping (cpo_ray.batch.length_grouped) would batch
    them: the warm-up pairs among themselves and the timed pairs among themselves, so every contender's
    timed window still holds exactly the same pairs, only batched by length."""
    import numpy as np

    from cpo_ray.batch import length_grouped

    def regroup(chunk: list[dict]) -> list[dict]:
        cols = {
            k: np.array([*(c[k] for c in chunk), None], dtype=object)[:-1]
            for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        }
        cols["i"] = np.arange(len(chunk))
        rng = np.random.default_rng(args.seed)
        return [chunk[i] for mb in length_grouped([cols], args.pairs, rng) for i in mb["i"]]

    w, n = args.warmup * args.pairs, (args.warmup + args.steps) * args.pairs
    return regroup(pairs[:w]) + regroup(pairs[w:n])


def batches(pairs: list[dict], args) -> list[dict]:
    import numpy as np

    out = []
    for i in range(args.warmup + args.steps):
        chunk = pairs[i * args.pairs : (i + 1) * args.pairs]
        out.append(
            {
                k: np.array([np.asarray(r[k], dtype=np.int64) for r in chunk] + [None], dtype=object)[:-1]
                for k in ("prompt_ids", "chosen_ids", "rejected_ids")
            }
        )
    return out


def batch_loss(model, batch: dict):
    """cpo-ray's loss on a collated batch: one forward, sigmoid CPO + NLL (the bench's settings)."""
    from cpo_ray.batch import sequence_logps
    from cpo_ray.loss import cpo_objective

    logp, count = sequence_logps(model, batch)
    b = batch["num_seqs"] // 2
    loss, _ = cpo_objective(
        logp[:b], logp[b:], count[:b], count[b:],
        loss_type="sigmoid", beta=BETA, cpo_alpha=CPO_ALPHA, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0,
    )  # fmt: skip
    return loss


def cpo_ray_step(model, opt, raw: dict, collate, phases: dict | None = None):
    import torch

    t0 = time.perf_counter()
    batch = collate(raw)
    t1 = time.perf_counter()
    loss = batch_loss(model, batch)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    if phases is not None:
        for k, v in zip(
            ("collate", "forward_loss", "backward", "clip_adamw"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True
        ):
            phases[k] = phases.get(k, 0.0) + v
    return batch["tokens"]


def collate_fn(variant: str, pad_id: int):
    from cpo_ray.batch import collate_packed, collate_padded, collate_varlen

    fn = {"packed": collate_packed, "padded": collate_padded, "varlen": collate_varlen}[variant]
    return lambda b: fn(b, pad_id)


def first_loss_cpo_ray(model, raw: dict, collate) -> float:
    import torch

    with torch.no_grad():
        return float(batch_loss(model, collate(raw)))


def run_cpo_ray(variant: str, model_dir: Path, pairs: list[dict], args, profile: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    collate = collate_fn(variant, pad_id)
    model = load_model(model_dir)
    if variant == "varlen":
        from cpo_ray.batch import use_varlen_attention

        use_varlen_attention(model)
    model.train()
    raws = batches(pairs, args)
    first = first_loss_cpo_ray(model, raws[0], collate)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, fused=True)
    marks, step_tokens, phases = [], [], {}
    for i, raw in enumerate(raws):
        step_tokens.append(cpo_ray_step(model, opt, raw, collate, phases if i >= args.warmup else None))
        marks.append(time.perf_counter())
    res = timed(marks, step_tokens, args)
    res["phase_s_per_step"] = {k: round(v / args.steps, 4) for k, v in phases.items()}
    res["first_batch_loss"] = first
    res["batching"] = (
        "the same sequential batches as trl; "
        + {
            "packed": "sequences packed into rows as wide as the longest (first-fit by length, position ids restart, "
            "block-diagonal mask), padding only in row tails",
            "varlen": "all sequences in one row, no padding; per-sequence causal SDPA (cpo_ray.batch.varlen_sdpa)",
            "padded": "one sequence per row, right-padded to the longest",
        }[variant]
    )
    if profile:
        res["profile_top10"] = profile_steps(model, opt, raws, collate, args)
    del model, opt
    gc.collect()
    return res


def profile_steps(model, opt, raws, collate, args, steps: int = 2) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for raw in raws[args.warmup : args.warmup + steps]:
            cpo_ray_step(model, opt, raw, collate)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return [{"op": e.key, "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count} for e in top]


def write_parquet(pairs: list[dict], data_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cpo_ray.data import KEPT_COLUMNS, OUT_SCHEMA

    schema = pa.schema([OUT_SCHEMA.field(c) for c in KEPT_COLUMNS])
    table = pa.table(
        {
            "prompt_ids": [p["prompt_ids"] for p in pairs],
            "chosen_ids": [p["chosen_ids"] for p in pairs],
            "rejected_ids": [p["rejected_ids"] for p in pairs],
            "truncated": [False] * len(pairs),
            "source": [f"{HH.name}:kept{i}" for i in range(len(pairs))],
        },
        schema=schema,
    )
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / "train" / "part-00000.parquet")


def run_ray(name: str, model_dir: Path, data_dir: Path, args, work: Path) -> dict:
    import statistics

    from cpo_ray.config import Config
    from cpo_ray.train import run_training

    workers, threads = RAY_SHAPES[name]
    if args.pairs % workers:
        raise SystemExit(f"--pairs {args.pairs} is not divisible by {workers} workers")
    out = work / name
    cfg = Config.model_validate(
        {
            "name": f"bench-{name}",
            "output_dir": str(out),
            "data": {"output_dir": str(data_dir), "max_length": args.max_length},
            "model": {
                "name_or_path": str(model_dir),
                "dtype": "float32",
                # the trainer packs varlen unless an explicit sdpa asks for block-diagonal rows
                "attn_implementation": "sdpa" if args.ray_collate == "packed" else None,
            },
            "train": {
                "num_workers": workers,
                "cpus_per_worker": 0.5,
                "torch_threads": threads,
                "zero_stage": args.zero_stage,
                "micro_batch_size": args.pairs // workers,
                "lr": LR,
                "adam_betas": list(BETAS),
                "weight_decay": 0.0,
                "warmup_steps": 0,
                "lr_schedule": "constant",
                "max_grad_norm": MAX_GRAD_NORM,
                "max_steps": args.warmup + args.steps,
                "packing": args.ray_collate != "padded",
                "group_by_length": args.ray_group,
                "eval_every": 0,
                "checkpoint_every": 0,
                "max_failures": 0,
                "seed": args.seed,
            },
        }
    )
    t0 = time.perf_counter()
    run_training(cfg, str(model_dir))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if not r.get("final")]
    timed_rows = [r for r in rows if r["step"] > args.warmup]
    rates = [r["tokens_per_s"] for r in timed_rows]
    if len(rates) != args.steps:
        raise RuntimeError(f"{name}: expected {args.steps} timed steps in metrics.jsonl, got {len(rates)}")
    toks = sum(r["tokens"] for r in timed_rows)
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed_rows)  # each step's own wall time
    phases = {
        k[5:]: round(statistics.fmean(r[k] for r in timed_rows), 4)
        for k in timed_rows[0]
        if k.startswith("time/") and not isinstance(timed_rows[0][k], list)
    }
    per_rank = [statistics.fmean(r["time/rank_compute_s"][j] for r in timed_rows) for j in range(workers)]
    # what the slowest rank costs the others: mean over steps of (max - min) forward+backward seconds
    spread = statistics.fmean(max(r["time/rank_compute_s"]) - min(r["time/rank_compute_s"]) for r in timed_rows)
    return {
        "tokens_per_s": toks / secs,  # aggregate, as for the one-process contenders
        "tokens_per_s_mean_of_steps": statistics.fmean(rates),
        "tokens_per_s_median": statistics.median(rates),
        "timed_steps": len(rates),
        "timed_tokens": toks,
        "rank0_phase_s_per_step": phases,
        "rank_compute_s_per_step": [round(x, 4) for x in per_rank],
        "rank_compute_spread_s_per_step": round(spread, 4),
        "run_training_wall_s": round(wall, 1),
        "batching": (
            f"Ray Data stream of the same pairs with the trainer's local shuffle; {workers} worker(s) x "
            f"{args.pairs // workers} pairs, {args.ray_collate} collate, group_by_length {args.ray_group}, "
            f"DeepSpeed ZeRO-{args.zero_stage}, "
            f"{threads} torch thread(s) per worker"
        ),
    }


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (global)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per contender")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of trl/padded/packed and of the peak")
    ap.add_argument("--contenders", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--ray-collate", choices=["varlen", "packed", "padded"], default="varlen", help="batches of ray_*")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=0, help="train.zero_stage of ray_*")
    ap.add_argument("--ray-group", type=int, default=16, help="train.group_by_length of ray_* (0 = stream order)")
    ap.add_argument("--profile-variant", choices=[*ONE_PROCESS[1:], *GROUPED[1:], "none"], default="varlen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, Parquet, runs)")
    args = ap.parse_args()
    args.warmup = max(1, args.warmup)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(names) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; choose from {ALL}")

    real_stdout = sys.stdout
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cpo-train-bench-"))
    result: dict = {}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = bench(args, names, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"].update(
        load_avg_1_5_15_before=[round(x, 2) for x in load_before],
        load_avg_1_5_15_after=[round(x, 2) for x in os.getloadavg()],
        bench_wall_s=round(time.perf_counter() - t_start, 1),
    )
    if args.keep:
        result["work_dir"] = str(work)
    print(json.dumps(result, indent=2), file=real_stdout)


def bench(args, names: list[str], work: Path) -> dict:
    import torch

    records = read_hh()
    log(f"training the {args.vocab}-token BPE and saving the random model")
    model_dir = build_model_dir(work / "model", records, args)
    pairs, counts = select_pairs(records, model_dir, args)
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    peak_start = measure_peak(args.threads)
    log(
        f"{counts['pairs_kept']} pairs fit, using {len(pairs)}; {n_params / 1e6:.1f}M params; peak {peak_start:.1f} GFLOP/s"
    )

    res: dict[str, dict] = {}
    pairs_grouped = grouped_order(pairs, args)
    for name in (n for n in names if n not in RAY_SHAPES):
        log(f"contender {name} (load {load1()})")
        variant, data = name.removesuffix("_grouped"), pairs_grouped if name.endswith("_grouped") else pairs
        if variant == "trl":
            res[name] = run_trl(model_dir, data, args, work)
        else:
            res[name] = run_cpo_ray(variant, model_dir, data, args, profile=name == args.profile_variant)
        if name.endswith("_grouped"):
            res[name]["batching"] += "; pairs reordered by cpo-ray's length grouping (same pairs per window)"
        log(f"  -> {res[name]['tokens_per_s']:.0f} tok/s")
    ray_names = [n for n in names if n in RAY_SHAPES]
    if ray_names:
        import ray

        data_dir = work / "data"
        write_parquet(pairs, data_dir)
        ray.init(
            num_cpus=2, include_dashboard=False, _temp_dir=str(work / "ray"), logging_level="WARNING",
            log_to_driver=args.keep,
        )  # fmt: skip
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for name in ray_names:
                log(f"contender {name} (load {load1()})")
                res[name] = run_ray(name, model_dir, data_dir, args, work)
                log(f"  -> {res[name]['tokens_per_s']:.0f} tok/s")
        finally:
            ray.shutdown()
    peak_end = measure_peak(args.threads)
    peak = max(peak_start, peak_end)
    peak_1 = measure_peak(1)  # what one worker x 1 thread can reach at most
    torch.set_num_threads(args.threads)

    trl = res.get("trl", {}).get("tokens_per_s")
    for r in res.values():
        r["mfu_vs_measured_peak"] = round(r["tokens_per_s"] * 6 * n_params / (peak * 1e9), 4)
        if trl:
            r["ratio_vs_trl"] = round(r["tokens_per_s"] / trl, 3)
        r["tokens_per_s"] = round(r["tokens_per_s"], 1)
        for k in ("tokens_per_s_median", "step_s_mean"):
            if k in r:
                r[k] = round(r[k], 3)

    # Same steps, same tokens: trl, padded and packed saw the same batches.
    check: dict = {}
    for group in (ONE_PROCESS, GROUPED):
        token_lists = [res[n]["step_tokens"] for n in group if n in res]
        check[f"same_tokens_per_step_{group[0]}"] = (
            all(t == token_lists[0] for t in token_lists) if token_lists else None
        )
    # Grouping reorders pairs inside the warm-up and inside the timed window, never across them.
    timed_tokens = {res[n]["timed_tokens"] for n in ONE_PROCESS + GROUPED if n in res}
    check["same_timed_tokens_all_one_process"] = len(timed_tokens) <= 1
    for n in ONE_PROCESS + GROUPED:
        res.get(n, {}).pop("step_tokens", None)
    if "trl" in res:
        for n in ("padded", "packed", "varlen"):
            if n in res:
                d = abs(res[n]["first_batch_loss"] - res["trl"]["first_batch_loss"])
                check[f"abs_diff_trl_vs_{n}"] = d
        diffs = [v for k, v in check.items() if k.startswith("abs_diff")]
        check["pass_1e-4"] = bool(diffs) and max(diffs) < 1e-4
        check["trl_first_batch_loss"] = res["trl"]["first_batch_loss"]
        check["token_ids_equal"] = res["trl"].pop("token_ids_equal_cpo_ray")
    profile = next((r.pop("profile_top10") for r in res.values() if "profile_top10" in r), None)

    def ratio(a: str, b: str):
        return round(res[a]["tokens_per_s"] / res[b]["tokens_per_s"], 3) if a in res and b in res else None

    best_one = max(
        (n for n in ONE_PROCESS[1:] + GROUPED[1:] if n in res),
        key=lambda n: res[n]["tokens_per_s"],
        default=None,
    )
    targets = {
        "one_process_best_variant": best_one,
        "one_process_over_trl": ratio(best_one, "trl") if best_one else None,
        "one_process_over_trl_grouped": ratio(best_one, "trl_grouped") if best_one else None,
        "one_process_over_trl_target": 2.2,
        "one_process_mfu": res[best_one]["mfu_vs_measured_peak"] if best_one else None,
        "one_process_mfu_target": 0.75,
        "ray_2x1_over_ray_1x1": ratio("ray_2x1", "ray_1x1"),
        "ray_2x1_over_ray_1x1_target": 1.6,
        "ray_2x1_over_ray_1x2": ratio("ray_2x1", "ray_1x2"),
        f"ray_2x1_over_one_process_{args.ray_collate}": ratio("ray_2x1", args.ray_collate),
        f"ray_2x1_over_one_process_{args.ray_collate}_grouped": ratio("ray_2x1", f"{args.ray_collate}_grouped"),
        "ray_2x1_over_best_one_process": ratio("ray_2x1", best_one) if best_one else None,
        "ray_2x1_over_one_process_target": 0.9,
    }
    return {
        "bench": "train_throughput",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "model": {
            "arch": "llama",
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "intermediate": args.intermediate,
            "params": n_params,
            "dtype": "float32",
        },
        "setup": {
            "max_length": args.max_length,
            "pairs_per_step": args.pairs,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "optimizer": f"torch AdamW (fused) lr {LR} betas {list(BETAS)} wd 0, clip {MAX_GRAD_NORM}, constant lr",
            "loss": f"sigmoid CPO + NLL, beta {BETA}, cpo_alpha {CPO_ALPHA}",
            "ray": f"ray.init(num_cpus=2), CPU 0.5 per worker, ZeRO-{args.zero_stage}, {args.ray_collate} collate",
            **counts,
        },
        "peak_fp32_mm_gflops": {
            "start": round(peak_start, 1),
            "end": round(peak_end, 1),
            "used": round(peak, 1),
            "one_thread": round(peak_1, 1),
        },
        "flops_per_token": 6 * n_params,
        "loss_check_first_batch": check,
        "contenders": res,
        "targets": targets,
        "profile_top10_self_cpu": {"variant": args.profile_variant, "ops": profile},
    }


if __name__ == "__main__":
    main()
