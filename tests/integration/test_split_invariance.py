"""A step trains the same whatever its split into workers x micro-batches x accumulation (issue 25).

Three global batches of 8 pairs of very different lengths, trained from the same weights (a tiny random Llama,
full fine-tune, AdamW lr 1e-3, clip 1.0, constant lr) as 1 x 8, 2 x 4, 2 x 2 x accum 2 and 1 x 2 x accum 4, with
packing on and off, ZeRO 0 (cpo-ray's overlapped gradient sync) and ZeRO 2 (DeepSpeed's), with rank balancing
on: through the trainer's own WorkerRun (engine, collate, objective, NLL denominator, metric sums) in real
torch.distributed process groups. Against a plain one-process reference that sees each global batch whole
(padded forward, the model's own log-softmax, one token mean for the NLL, TRL's CPOTrainer semantics): per-step
loss and pre-clip gradient norm within 1e-5 relative, and the weights after the three steps within fp32 noise.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from cpo_ray.config import load_config
from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS

STEPS, PAIRS = 3, 8
SPLITS = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]  # (workers, micro_batch_size, grad_accum)
CASES = [(w, m, g, packing, zero) for w, m, g in SPLITS for packing in (True, False) for zero in (0, 2)]
COMMON = [
    "model.lora.enabled=false", "model.lora.modules_to_save=[]", "train.lr=1e-3", "train.warmup_steps=0",
    "train.lr_schedule=constant", "train.max_grad_norm=1.0", "train.adam_betas=[0.9,0.999]", "train.beta=0.5",
    "train.cpo_alpha=1.0", "train.torch_threads=1", "train.balance_ranks=true",
]  # fmt: skip


def global_batches() -> list[list[dict]]:
    """STEPS x PAIRS rows: prompts of 2-20 tokens, responses of 1-25 (the NLL's token weights differ a lot)."""
    rng = np.random.default_rng(7)
    ids = lambda n: rng.integers(3, 128, n).tolist()  # noqa: E731
    return [
        [
            {
                PROMPT_IDS: ids(int(rng.integers(2, 21))),
                CHOSEN_IDS: ids(int(rng.integers(1, 26))),
                REJECTED_IDS: [ids(int(rng.integers(1, 26)))],
            }
            for _ in range(PAIRS)
        ]  # fmt: skip
        for _ in range(STEPS)
    ]


def case_cfg(model_dir, workers, mbs, accum, packing, zero):
    return load_config(None, [*COMMON, f"train.num_workers={workers}", f"train.micro_batch_size={mbs}",
                              f"train.grad_accum={accum}", f"train.packing={packing}", f"train.zero_stage={zero}",
                              f"model.name_or_path={model_dir}"])  # fmt: skip


def run_cases(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    """One rank of every case with this world size: the real WorkerRun step, results to out_dir (rank 0)."""
    import torch.distributed as dist

    from cpo_ray.compat import skip_deepspeed_shm_comm_build
    from cpo_ray.train.collate import as_batch
    from cpo_ray.train.worker import WorkerRun

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    skip_deepspeed_shm_comm_build()
    batches = global_batches()
    for case in [c for c in CASES if c[0] == world]:
        _, mbs, accum, _, _ = case
        run = WorkerRun.__new__(WorkerRun)
        run.setup(case_cfg(model_dir, *case), model_dir, rank, world, STEPS)
        run.engine.train()
        losses, norms = [], []
        for step, rows in enumerate(batches, 1):
            # this rank's micro-batches of the global batch: any split must do, so a strided one
            micro = [rows[(j * world + rank) * mbs : (j * world + rank + 1) * mbs] for j in range(accum)]
            raws = [as_batch(m) for m in micro]
            denominator = run.nll_denominator(raws)
            for raw in raws:
                run.micro_step(raw, denominator)
            metrics = run.step_metrics(step)
            losses.append(metrics["loss"])
            norms.append(metrics["grad_norm"])
        # ZeRO-2 partitions gradients and optimizer state, not the weights: every rank holds them all
        state = {k: v.detach().cpu().double().tolist() for k, v in run.engine.module.model.state_dict().items()}
        if rank == 0:
            with open(os.path.join(out_dir, f"case-{CASES.index(case)}.json"), "w") as f:
                json.dump({"case": case, "loss": losses, "grad_norm": norms, "state": state}, f)
        dist.barrier()
    dist.destroy_process_group()


def reference(model_dir: str) -> dict:
    """One process, the whole global batch at once: padded forward, the model's own log-softmax at the real
    response tokens, loss = preference mean + cpo_alpha x (one token mean over all chosen tokens)."""
    from transformers import AutoModelForCausalLM

    from cpo_ray.train.loss import Objective, PolicyLogps

    cfg = case_cfg(model_dir, 1, 8, 1, False, 0)
    tc = cfg.train
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    init = {k: v.detach().double().tolist() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=0.0)
    objective = Objective.from_config(tc)
    losses, norms = [], []
    for rows in global_batches():
        seqs = [(r[PROMPT_IDS], r[CHOSEN_IDS]) for r in rows] + [(r[PROMPT_IDS], r[REJECTED_IDS][0]) for r in rows]
        logp, count = [], []
        for p, resp in seqs:
            ids = torch.tensor([p + resp])
            out = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0], -1)
            pos = torch.arange(len(p), ids.shape[1])
            logp.append(out[pos - 1, ids[0, pos]].sum())
            count.append(len(resp))
        logp, count = torch.stack(logp), torch.tensor(count, dtype=torch.float32)
        loss, _ = objective(PolicyLogps.split(logp, count, PAIRS))
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)))
        opt.step()
        losses.append(float(loss))
    state = {k: v.detach().double().tolist() for k, v in model.state_dict().items()}
    return {"loss": losses, "grad_norm": norms, "state": state, "init": init}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("split")
    model_dir = root / "model"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    from cpo_ray.embedded import build_tokenizer

    build_tokenizer().save_pretrained(model_dir)  # pad id 0, as the model's config
    out = root / "out"
    out.mkdir()
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run_cases, args=(world, port, str(model_dir), str(out)), nprocs=world, join=True)
    got = {tuple(r["case"]): r for r in (json.loads(f.read_text()) for f in out.glob("case-*.json"))}
    assert len(got) == len(CASES)
    return reference(str(model_dir)), got


def case_id(c) -> str:
    return f"{c[0]}x{c[1]}xaccum{c[2]}-{'packed' if c[3] else 'padded'}-zero{c[4]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_any_split_of_a_step_trains_like_one_device(results, case):
    want, got = results[0], results[1][tuple(case)]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
    # Each parameter's update over the three steps, against the reference's: relative L2 error (what issue 25
    # measured: 1.7e-5 for an exact split, 26% for the per-micro-batch NLL). Adam amplifies fp32 noise in
    # near-zero gradient coordinates, so "exact" here is well below 1e-3, not bitwise.
    worst = 0.0
    for k, final in want["state"].items():
        start = np.asarray(want["init"][k])
        ref, mine = np.asarray(final) - start, np.asarray(got["state"][k]) - start
        worst = max(worst, float(np.linalg.norm(mine - ref) / max(np.linalg.norm(ref), 1e-12)))
    assert worst < 1e-3, worst
