"""Training throughput in one process: TRL's CPOTrainer vs cpo-ray's training step, same everything.

Run from the repository root:

    .venv/bin/python -m bench.train_vs_trl                                # defaults below, ~6 min on 2 cores
    .venv/bin/python -m bench.train_vs_trl --hidden 64 --layers 2 --steps 2 --warmup 1 \
        --max-length 128 --contenders trl,varlen                          # quick smoke run

Same machine, model, data, max_length, batch, precision (fp32), optimizer (torch AdamW fused=True, lr 1e-5, betas
0.9/0.999, no weight decay, grad-norm clip 1.0, constant lr) and loss (sigmoid CPO + NLL, beta 0.1,
cpo_alpha 1.0) for every contender. Default model: a random Llama, vocab 8192 (byte-level BPE trained here
with `tokenizers` on the HH data), hidden 512, 6 layers, 8 heads, intermediate 1376 (~27M params),
max_length 512, 4 pairs per optimizer step, 2 threads. Ray Train scaling is bench.train_scaling.

Data: ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz (implicit-prompt HH-RLHF), split into
prompt/chosen/rejected by cpo_ray.data.formats.normalize and tokenized by cpo_ray.data.tokenize (BOS + prompt,
response + EOS). TRL never truncates prompts, so pairs whose prompt + longest response exceed max_length
are dropped for everyone (counted in the JSON), as are pairs where TRL's enc(prompt + response) would give
other ids than cpo-ray's enc(prompt) + enc(response) (counted too; the ids TRL builds are then checked equal
to cpo-ray's for every used pair). All contenders train on the first (warmup + steps) x pairs kept pairs, in
file order (see bench.common).

Contenders (--contenders, comma-separated):
  trl       trl.experimental.cpo.CPOTrainer, train_sampling_strategy=sequential: batch i = pairs[4i:4i+4],
            DPODataCollatorWithPadding (right padding to the longest of the 8 sequences), full [8, L, V] logits
  padded    cpo-ray step in this process: collate_padded + sequence_logps + Objective + backward + clip +
            AdamW, the SAME batches as trl (one sequence per row, right padding to the longest)
  packed    the same with collate_packed (sequences of the batch packed into rows as wide as the longest,
            block-diagonal mask; padding only in row tails)
  varlen    the same with collate_varlen (all sequences in ONE row, no padding) + per-sequence causal SDPA
  shared    the same with collate_shared (ONE row, each prompt once, both responses attending to it): what the
            trainer runs by default (train.packing + train.shared_prompt); tokens/s still counts prompt + response
            of both sequences, as TRL does, so it is comparable
  *_grouped trl/padded/packed/varlen on the same pairs reordered by cpo-ray's length grouping (warm-up
            and timed pairs regrouped separately, so every timed window holds the same pairs)

Timing: a fixed number of optimizer steps after --warmup steps. tokens/s counts non-pad tokens (prompt and
response of both sequences of each pair): timed tokens / wall time between the end of the last warm-up step
and the end of the last step (collation and data loading included). MFU = tokens/s x 6 x params / peak,
peak = best fp32 torch.mm GFLOP/s measured in this run at the bench's thread count (start and end).
The first-batch loss of trl and of padded/packed/varlen (same saved random model, same first 4 pairs) must
agree within 1e-4. A torch.profiler top-10 (self CPU %) of --profile-variant explains where its time goes.
Targets: best cpo-ray contender >= 2.2x trl tokens/s, and MFU >= 0.75.

Prints ONE JSON object on stdout (everything else goes to stderr). Not a test: numbers depend on the machine
and on its load (the JSON carries the 1-minute load average before and after).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from bench.common import (
    BETA,
    BETAS,
    CPO_ALPHA,
    LR,
    MAX_GRAD_NORM,
    TrainingSetup,
    add_training_args,
    contender_list,
    finish_training,
    grouped_order,
    load1,
    load_model,
    log,
    prepare_training,
    ratio,
    run_bench,
)

ONE_PROCESS = ["trl", "padded", "packed", "varlen", "shared"]
GROUPED = [f"{n}_grouped" for n in ONE_PROCESS]
CONTENDERS = [*ONE_PROCESS, *GROUPED]
CPO_RAY = [n for n in CONTENDERS if not n.startswith("trl")]  # cpo-ray's one-process contenders


# ---------------------------------------------------------------------------------------------- trl


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
        warmup_steps=0,
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
        and td[i]["rejected_input_ids"] == p["prompt_ids"] + p["rejected_ids"][0]
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


def timed(marks: list[float], step_tokens: list[int], args) -> dict:
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


# ---------------------------------------------------------------------------------------------- cpo-ray


def batches(pairs: list[dict], args) -> list[dict]:
    """--pairs pairs per step in order, as the numpy columns the trainer's stream hands to collate."""
    from cpo_ray.train.collate import as_batch

    return [as_batch(pairs[i * args.pairs : (i + 1) * args.pairs]) for i in range(args.warmup + args.steps)]


def batch_loss(model, batch: dict):
    """cpo-ray's loss on a collated batch: one forward, sigmoid CPO + NLL (the bench's settings)."""
    from cpo_ray.train.logps import sequence_logps
    from cpo_ray.train.loss import Objective, PolicyLogps

    logp, count = sequence_logps(model, batch)
    loss, _ = Objective(beta=BETA, cpo_alpha=CPO_ALPHA)(
        PolicyLogps.split(logp, count, batch["num_chosen"], batch["rejected_group"])
    )
    return loss


def cpo_ray_step(model, opt, raw: dict, collate, phases: dict | None = None) -> int:
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
    from cpo_ray.train.collate import collate_packed, collate_padded, collate_shared, collate_varlen

    fn = {"packed": collate_packed, "padded": collate_padded, "varlen": collate_varlen, "shared": collate_shared}[
        variant
    ]
    return lambda b: fn(b, pad_id)


def run_cpo_ray(variant: str, model_dir: Path, pairs: list[dict], args, profile: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    collate = collate_fn(variant, pad_id)
    model = load_model(model_dir)
    if variant in ("varlen", "shared"):
        from cpo_ray.train.attention import use_varlen_attention

        use_varlen_attention(model)
    model.train()
    raws = batches(pairs, args)
    with torch.no_grad():
        first = float(batch_loss(model, collate(raws[0])))
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
            "varlen": "all sequences in one row, no padding; per-sequence causal SDPA (cpo_ray.train.attention.varlen_attention)",
            "padded": "one sequence per row, right-padded to the longest",
            "shared": "one row, each prompt once with both responses attending to it (cpo_ray.train.collate.collate_shared): "
            "what the trainer runs by default",
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


def run_one_process(name: str, s: TrainingSetup, args, work: Path, profile: bool = False) -> dict:
    """One contender of CONTENDERS on the setup's pairs (or on them length-grouped, for *_grouped).
    bench.train_scaling runs its one-process baselines through this too."""
    variant, grouped = name.removesuffix("_grouped"), name.endswith("_grouped")
    pairs = grouped_order(s.pairs, args) if grouped else s.pairs
    if variant == "trl":
        res = run_trl(s.model_dir, pairs, args, work)
    else:
        res = run_cpo_ray(variant, s.model_dir, pairs, args, profile)
    if grouped:
        res["batching"] += "; pairs reordered by cpo-ray's length grouping (same pairs per window)"
    return res


def best_one_process(res: dict[str, dict]) -> str | None:
    """The fastest cpo-ray one-process contender that ran."""
    return max((n for n in CPO_RAY if n in res), key=lambda n: res[n]["tokens_per_s"], default=None)


# ---------------------------------------------------------------------------------------------- loss-path memory


def _loss_path_child(kind: str, lens: list, vocab: int, hidden: int, threads: int, q) -> None:
    """In a fresh process: the hidden states of one step's batch and an LM-head weight exist first (the
    baseline), then the loss path runs forward + backward; reports the peak RSS above the baseline.
    trl: TRL 1.16's path: logits over every position of the padded [2B, L] batch, log_softmax + gather
    (CPOTrainer.get_batch_logps), cross-entropy of the chosen half, sigmoid CPO. cpo_ray: the response
    positions only (gathered), cpo_ray.train.logps.token_logps (chunked, checkpointed head), Objective. liger:
    Liger-Kernel's LigerFusedLinearCPOLoss on TRL's batch."""
    import torch
    import torch.nn.functional as F

    from bench.common import peak_rss_gib, reset_peak_rss
    from cpo_ray.train.loss import Objective, PolicyLogps, cpo_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    width = max(p + max(c, r) for p, c, r in lens)
    b = len(lens)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    if kind in ("trl", "liger"):
        h = torch.randn(2 * b, width, hidden).requires_grad_()
        labels = torch.full((2 * b, width), -100)
        for i, (p, c, r) in enumerate(lens):
            labels[i, p : p + c] = torch.randint(0, vocab, (c,))
            labels[b + i, p : p + r] = torch.randint(0, vocab, (r,))
    else:
        n_resp = sum(c + r for _, c, r in lens)
        h = torch.randn(n_resp, hidden).requires_grad_()
        tgt = torch.randint(0, vocab, (n_resp,))
        seq = torch.cat(
            [torch.full((c,), i) for i, (_, c, _) in enumerate(lens)]
            + [torch.full((r,), b + i) for i, (_, _, r) in enumerate(lens)]
        )
    base = reset_peak_rss()
    if kind == "trl":
        logits = F.linear(h, w).float()
        shifted, lab = logits[:, :-1, :], labels[:, 1:].clone()
        mask = lab != -100
        lab[~mask] = 0
        per_tok = torch.gather(shifted.log_softmax(-1), dim=2, index=lab.unsqueeze(2)).squeeze(2)
        logps = (per_tok * mask).sum(-1)
        nll = F.cross_entropy(shifted[:b].reshape(-1, vocab), labels[:b, 1:].reshape(-1), ignore_index=-100)
        losses, _, _ = cpo_loss(logps[:b], logps[b:], loss_type="sigmoid", beta=BETA)
        loss = losses.mean() + CPO_ALPHA * nll
    elif kind == "liger":
        # Liger-Kernel's chunked CPO loss (pure torch, one pair per chunk, gradients computed in its forward)
        # on TRL's padded, shifted batch; compiled=False: no torch.compile on this CPU stack.
        from liger_kernel.chunked_loss import LigerFusedLinearCPOLoss

        out = LigerFusedLinearCPOLoss(beta=BETA, alpha=CPO_ALPHA, compiled=False)(w, h[:, :-1], labels[:, 1:])
        loss = out[0] if isinstance(out, tuple) else out
    else:
        from cpo_ray.train.logps import token_logps

        def head(x):
            return F.linear(x, w).float()

        head.vocab_size, head.weight = vocab, w
        tok = token_logps(head, h, tgt)
        logp = torch.zeros(2 * b).index_add_(0, seq, tok)
        count = torch.bincount(seq, minlength=2 * b).float()
        loss, _ = Objective(beta=BETA, cpo_alpha=CPO_ALPHA)(PolicyLogps.split(logp, count, b))
    loss.backward()
    q.put(peak_rss_gib() - base)


def loss_path_memory(s: TrainingSetup, args) -> dict:
    """Peak memory (GiB above the baseline) of TRL's and cpo-ray's loss path on the first timed step's pairs,
    each in its own fresh process (the hidden states are random: memory does not depend on their values)."""
    import multiprocessing as mp

    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(s.model_dir)
    ctx = mp.get_context("spawn")
    out = {}
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        liger = True
    except ImportError:
        liger = False
        out["liger"] = "not installed: `pip install --no-deps liger-kernel` (its chunked_loss needs only torch)"
    # The bench's step, then 4x its pairs: large enough that cpo-ray's head runs in several chunks.
    for mult in (1, 4):
        n = mult * args.pairs
        pool = s.pairs[args.warmup * args.pairs :]
        step = [pool[i % len(pool)] for i in range(n)]  # repeats pairs when the run has fewer: memory only
        lens = [(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"][0])) for p in step]
        row = {}
        for kind in ("trl", "cpo_ray") + (("liger",) if liger else ()):
            q = ctx.Queue()
            args_ = (kind, lens, c.vocab_size, c.hidden_size, args.threads, q)
            proc = ctx.Process(target=_loss_path_child, args=args_)
            proc.start()
            row[f"{kind}_gib"] = round(q.get(timeout=1200), 3)
            proc.join()
        for kind in ("cpo_ray", "liger")[: 1 + bool(liger)]:
            row[f"{kind}_over_trl"] = round(row[f"{kind}_gib"] / max(row["trl_gib"], 1e-9), 3)
        row["what"] = (
            f"{len(lens)} pairs, padded width {max(p + max(a, b) for p, a, b in lens)}, "
            f"{sum(a + b for _, a, b in lens)} response tokens, vocab {c.vocab_size}; LM head weight trained"
        )
        out[f"{len(lens)}_pairs"] = row
    out["target_max_ratio"] = 0.25
    return out


# ---------------------------------------------------------------------------------------------- main


def loss_check(res: dict[str, dict]) -> dict:
    """Same steps, same tokens, same first-batch loss; pops the per-step token lists it compares."""
    check: dict = {}
    for group in (ONE_PROCESS, GROUPED):
        token_lists = [res[n]["step_tokens"] for n in group if n in res]
        check[f"same_tokens_per_step_{group[0]}"] = (
            all(t == token_lists[0] for t in token_lists) if token_lists else None
        )
    # Grouping reorders pairs inside the warm-up and inside the timed window, never across them.
    check["same_timed_tokens_all_one_process"] = len({r["timed_tokens"] for r in res.values()}) <= 1
    for r in res.values():
        r.pop("step_tokens", None)
    if "trl" in res:
        for n in ("padded", "packed", "varlen", "shared"):
            if n in res:
                check[f"abs_diff_trl_vs_{n}"] = abs(res[n]["first_batch_loss"] - res["trl"]["first_batch_loss"])
        diffs = [v for k, v in check.items() if k.startswith("abs_diff")]
        check["pass_1e-4"] = bool(diffs) and max(diffs) < 1e-4
        check["trl_first_batch_loss"] = res["trl"]["first_batch_loss"]
        check["token_ids_equal"] = res["trl"].pop("token_ids_equal_cpo_ray")
    return check


def bench(args, names: list[str], work: Path) -> dict:
    s = prepare_training(args, work)
    res: dict[str, dict] = {}
    for name in names:
        log(f"contender {name} (load {load1()})")
        res[name] = run_one_process(name, s, args, work, profile=name == args.profile_variant)
        log(f"  -> {res[name]['tokens_per_s']:.0f} tok/s")
    check = loss_check(res)
    profile = next((r.pop("profile_top10") for r in res.values() if "profile_top10" in r), None)
    head = finish_training("train_vs_trl", args, s, res)
    best = best_one_process(res)
    if args.loss_memory:
        head["loss_path_peak_memory"] = loss_path_memory(s, args)
    targets = {
        "one_process_best_variant": best,
        "one_process_over_trl": ratio(res, best, "trl"),
        "one_process_over_trl_grouped": ratio(res, best, "trl_grouped"),
        "one_process_over_trl_target": 3.0 if args.shape == "smollm2" else 2.2,
        "one_process_mfu": res[best]["mfu_vs_measured_peak"] if best else None,
        "one_process_mfu_target": 0.75,
    }
    return {
        **head,
        "loss_check_first_batch": check,
        "contenders": res,
        "targets": targets,
        "profile_top10_self_cpu": {"variant": args.profile_variant, "ops": profile},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    ap.add_argument("--profile-variant", choices=[*CPO_RAY, "none"], default="shared")
    ap.add_argument(
        "--loss-memory", action="store_true", help="also measure the loss path's peak memory, TRL vs cpo-ray"
    )
    args = ap.parse_args()
    args.warmup = max(1, args.warmup)
    names = contender_list(args.contenders, CONTENDERS)
    run_bench(lambda work: bench(args, names, work), prefix="cpo-train-bench-", keep=args.keep)


if __name__ == "__main__":
    main()
