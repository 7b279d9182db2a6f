"""The DeepSpeed engine as the trainer builds it, in one process: ZeRO-3 prefetching and gradient accumulation
through PairScorer, bf16 master weights, fp16 refused where DeepSpeed cannot do it right."""

import numpy as np
import pytest
import torch

from cpo_ray.config import ConfigError, load_config
from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from cpo_ray.train.collate import as_batch


def _batch(seed: int, pairs: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    ids = lambda: rng.integers(3, 259, rng.integers(2, 9))  # noqa: E731
    return as_batch([{PROMPT_IDS: ids(), CHOSEN_IDS: ids(), REJECTED_IDS: [ids()]} for _ in range(pairs)])


def _engine(tiny_model_dir, over: list[str], total_steps: int = 10):
    from cpo_ray.train.engine import build_engine

    cfg = load_config(None, ["model.lora.enabled=false", "train.max_grad_norm=0", "train.warmup_steps=0", *over])
    return build_engine(cfg, tiny_model_dir, 1, total_steps, False, pad_id=0)


def test_zero3_prefetches_and_accumulates_like_plain_torch(tiny_model_dir, deepspeed_world1):
    """Through engine(batch) (the root module), ZeRO-3 records its parameter trace on step 1 and prefetches
    from step 2 on; with grad_accum=2 the update equals plain torch on the sum of both micro-batches (called
    around the root, DeepSpeed 0.19.8 overwrote the first micro-batch's gradient and never prefetched)."""
    from cpo_ray.train.collate import collate_padded
    from cpo_ray.train.logps import sequence_logps
    from cpo_ray.train.model import build_model

    over = [
        "train.zero_stage=3",
        "train.grad_accum=2",
        "train.micro_batch_size=2",
        "train.lr=1e-2",
        "train.lr_schedule=constant",
    ]
    engine, _, _, collate = _engine(tiny_model_dir, over)
    cfg = load_config(None, ["model.lora.enabled=false"])
    ref = build_model(cfg, tiny_model_dir, torch.float32)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    traces = []
    for step in range(2):
        for mb in range(2):
            raw = _batch(10 * step + mb)
            logp, _ = engine(collate(raw))  # the trainer's layout (shared prompts, cpo-ray's attention)
            engine.backward(-logp.sum())
            engine.step()
            (-sequence_logps(ref, collate_padded(raw, 0))[0].sum() / 2).backward()  # DeepSpeed averages over grad_accum
            traces.append(
                "complete"
                if coordinator.is_complete_trace()
                else "record"
                if coordinator.is_record_trace()
                else "invalid"
            )
        opt.step()
        opt.zero_grad()
    from deepspeed import zero

    name, p = next((n, p) for n, p in engine.module.model.named_parameters() if "q_proj" in n)
    with zero.GatheredParameters([p]):  # Adam steps of ~1e-2: a lost micro-batch moves many elements by that
        torch.testing.assert_close(p.detach().clone(), dict(ref.named_parameters())[name].detach(), atol=1e-4, rtol=0)
    assert traces == ["record", "complete", "complete", "complete"]  # recorded once, then prefetching


def test_bf16_keeps_fp32_master_weights_so_small_updates_survive(tiny_model_dir, deepspeed_world1):
    """lr 5e-5 on a weight of 0.5: each step is below bf16's resolution there (2^-8), so a pure-bf16 weight
    would never move; DeepSpeed's fp32 master accumulates the updates and the bf16 copy follows."""
    for stage in (0, 2):
        engine, *_ = _engine(
            tiny_model_dir,
            [f"train.zero_stage={stage}", "model.dtype=bfloat16", "train.lr=5e-5", "train.lr_schedule=constant"],
        )
        assert next(engine.module.parameters()).dtype == torch.bfloat16
        w = engine.module.model.model.norm.weight  # a norm weight: 1.0, where bf16 steps are 2^-7
        master = _fp32_master(engine, w)
        with torch.no_grad():
            w.fill_(0.5)
            master.fill_(0.5)
        for _ in range(100):
            loss = (w.float() * 1.0).sum()  # a constant gradient of 1 on every element
            engine.backward(loss)
            engine.step()
        assert master.dtype == torch.float32
        assert abs(float(master.flatten()[0]) - (0.5 - 100 * 5e-5)) < 2e-4, (stage, float(master.flatten()[0]))
        assert float(w.flatten()[0]) < 0.5  # and the bf16 weight moved with it


def _fp32_master(engine, param):
    """The fp32 master copy of `param` inside DeepSpeed's optimizer wrapper (a view that can be written)."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups"):  # ZeRO-0 bf16: FP16_UnfusedOptimizer
        for group, fp32 in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            for p, m in zip(group, fp32, strict=True):
                if p is param:
                    return m
    start = 0  # ZeRO-1/2: one flat fp32 partition per group, parameters laid end to end
    for p in opt.bit16_groups[0]:
        if p is param:
            return opt.single_partition_of_fp32_groups[0].narrow(0, start, p.numel())
        start += p.numel()
    raise KeyError("parameter not found in the optimizer's groups")


def test_fp16_is_refused_where_deepspeed_cannot_do_it_and_configured_with_loss_scaling_where_it_can():
    from cpo_ray.train.engine import deepspeed_config

    with pytest.raises(ConfigError, match="float16 needs train.use_gpu=true"):
        load_config(None, ["model.dtype=float16"])
    with pytest.raises(ConfigError, match="float16 needs train.zero_stage >= 1"):
        load_config(None, ["model.dtype=float16", "train.use_gpu=true", "train.zero_stage=0"])
    cfg = load_config(None, ["model.dtype=float16", "train.use_gpu=true", "train.zero_stage=2"])
    ds = deepspeed_config(cfg, 8, "float16")
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    assert ds["bf16"] == {"enabled": False}


def test_lora_checkpoints_leave_out_frozen_tied_weights_and_resume(tiny_model_dir, deepspeed_world1, tmp_path):
    """SmolLM2 and Qwen2.5-0.5B tie lm_head to embed_tokens: DeepSpeed's exclude_frozen_parameters kept the
    frozen lm_head (the vocabulary matrix: 2/3 of SmolLM2's LoRA checkpoint). It is left out; resuming
    restores the LoRA weights and Adam's state, and the head stays tied to the embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    tied = tmp_path / "tied"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    for stage in (0, 2):
        over = ["model.lora.enabled=true", "model.lora.modules_to_save=[]", "model.lora.dropout=0",
                f"train.zero_stage={stage}"]  # fmt: skip
        engine, *_ = _engine(str(tied), over)
        trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        engine.backward(sum(p.sum() for p in trained.values()))
        engine.step()
        ckpt = tmp_path / f"ckpt-{stage}"
        engine.save_checkpoint(str(ckpt), tag="ckpt", exclude_frozen_parameters=True)
        saved = torch.load(ckpt / "ckpt" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert not [k for k in saved if "lm_head" in k or "embed_tokens" in k]
        assert set(saved) == set(trained), set(saved) ^ set(trained)

        fresh, *_ = _engine(str(tied), over)
        fresh.load_checkpoint(str(ckpt), tag="ckpt", load_module_strict=False)
        for n, p in fresh.module.named_parameters():
            if n in trained:
                assert torch.equal(p, trained[n]), n
        assert fresh.optimizer.state_dict()["state" if stage == 0 else "base_optimizer_state"], "Adam restored"
        model = fresh.module.model
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
