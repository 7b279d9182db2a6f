"""In-training held-out scoring: every rank scores its share of the eval split with the model being trained.

    rows = load_heldout_rows(paths.split_dir(EVAL), rank, world)
    scores, per_pair = score_heldout(engine, rows, cfg.train.eval_batch_size, collate, pad_id, world)

The same sums of response-token log-probs that cpo_ray.eval later reads from the served endpoint, so
the two can be compared pair by pair (train_eval.json vs eval/pairs_<model>.jsonl).
"""

from __future__ import annotations

import math

from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS, has_rows, read_pairs
from cpo_ray.train.collate import as_batch


def load_heldout_rows(split_dir, rank: int, world: int) -> list[dict]:
    """This rank's share of the held-out split (row i goes to rank i % world), with global indices; read from
    the split's Location (local disk or object storage) in shard order."""
    rows = read_pairs(split_dir) if has_rows(split_dir) else []
    return [dict(r, index=i) for i, r in enumerate(rows) if i % world == rank]


def _counts(out: list[dict]) -> list[float]:
    """This rank's sums for the held-out scores: pairs, wins against the hardest (so every) rejected, margin,
    wins per (chosen, rejected) pair, rejected responses, per-token wins, chosen log-probs and tokens."""
    return [
        len(out),
        sum(o["logp_chosen"] > o["logp_rejected"] for o in out),
        sum(o["logp_chosen"] - o["logp_rejected"] for o in out),
        sum(sum(o["logp_chosen"] > r for r in o["logp_rejected_all"]) for o in out),
        sum(len(o["logp_rejected_all"]) for o in out),
        sum(o["correct_norm"] for o in out),
        sum(o["logp_chosen"] for o in out),
        sum(o["len_chosen"] for o in out),
    ]


def score_heldout(
    engine, rows: list[dict], batch_size: int, collate, pad_id: int, world: int
) -> tuple[dict, list[dict]]:
    """Held-out accuracy and margin (summed logps) of the model as it is now, all ranks together, through the
    trainer's own forward (engine(batch): packed, LM head on response positions only).

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively): a rank with fewer
    rows, or none at all, runs a one-token dummy pair and drops its result."""
    import torch
    import torch.distributed as dist

    n_local = torch.tensor([math.ceil(len(rows) / batch_size)], device=engine.device)
    if world > 1:
        dist.all_reduce(n_local, op=dist.ReduceOp.MAX)
    dummy = [{PROMPT_IDS: [pad_id], CHOSEN_IDS: [pad_id], REJECTED_IDS: [[pad_id]]}]
    engine.eval()
    out = []
    with torch.no_grad():
        for b in range(int(n_local.item())):
            chunk = rows[b * batch_size : (b + 1) * batch_size]
            logp, _ = engine(collate(as_batch(chunk or dummy)))
            logp, at = logp.tolist(), len(chunk)
            for i, r in enumerate(chunk):
                rejected = logp[at : at + len(r[REJECTED_IDS])]
                at += len(rejected)
                # logp_rejected: the hardest (most likely) rejected response; all of them follow
                n_chosen, n_rejected = len(r[CHOSEN_IDS]), [len(x) for x in r[REJECTED_IDS]]
                out.append(
                    {
                        "index": r["index"],
                        "logp_chosen": logp[i],
                        "logp_rejected": max(rejected),
                        "logp_rejected_all": rejected,
                        # per token: what length-normalised losses (ipo, simpo, infonce + length_normalize) rank by
                        "correct_norm": logp[i] / n_chosen
                        > max(x / n for x, n in zip(rejected, n_rejected, strict=True)),
                        "len_chosen": n_chosen,
                    }
                )
    engine.train()
    local = torch.tensor(_counts(out), dtype=torch.float64, device=engine.device)
    if world > 1:
        dist.all_reduce(local)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, out)
        out = [o for part in gathered for o in part]
    n = max(local[0].item(), 1)
    scores = {"eval/accuracy": local[1].item() / n, "eval/margin": local[2].item() / n, "eval/n": int(local[0].item())}
    scores["eval/pair_accuracy"] = local[3].item() / max(local[4].item(), 1)  # = accuracy with one rejected
    scores["eval/accuracy_length_normalised"] = local[5].item() / n  # as the endpoint's evaluation reports it
    scores["eval/nll"] = -local[6].item() / max(local[7].item(), 1)  # chosen responses' token-mean NLL
    return scores, sorted(out, key=lambda o: o["index"])
