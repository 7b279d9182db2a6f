"""Log-probs equal each architecture's own forward, through the path training really uses.

For every architecture cpo-ray claims, a tiny random model is built offline from its real config class (shapes
shrunk; sliding windows and soft-caps set small enough to act on these sequences), wrapped with LoRA (non-zero
adapter weights), switched to the trainer's attention and put inside a DeepSpeed engine (ZeRO-0, one rank).
Three micro-batch layouts: shared (each prompt once, both responses attending to it), varlen (one packed
sequence per prompt + response) and padded.
engine(batch) must equal log_softmax(model(ids).logits) gathered at the real response tokens of an eager-
attention copy, one sequence at a time, within 1e-5 nats (+1e-6 relative: fp32 sums of up to 11 tokens), for
packed (varlen) and padded micro-batches.
"""

import copy

import numpy as np
import pytest
import torch

from cpo_ray.config import load_config
from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128,
)  # fmt: skip
SLIDING = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"])
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 6}),  # every layer windowed
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "max_window_layers": 0, **SLIDING}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": True, "max_window_layers": 0, **SLIDING}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 0.5,
            **SLIDING,
        },
    ),  # fmt: skip
    "gemma3_text": (
        "Gemma3TextConfig",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 0.5, **SLIDING},
    ),
    "phi3": ("Phi3Config", {}),
    "phi3_sliding": ("Phi3Config", {"sliding_window": 6}),
    # Its layers keep the window as an attribute only (the eager mask applies it): issue 21's case.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "use_sliding_window": True,
            "max_window_layers": 0,
            **SLIDING,
        },
    ),  # fmt: skip
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "cohere2": ("Cohere2Config", SLIDING),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "granitemoe": ("GraniteMoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "logits_scaling": 4.0}),
    "olmo2": ("Olmo2Config", {}),
}


def _batch(seed: int) -> dict:
    """Three prompts with 1, 2 and 1 rejected responses; prompt + response up to 16 > the window of 6."""
    from cpo_ray.train.collate import as_batch

    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, 256, n)  # noqa: E731
    lens = [(9, 5, [3]), (4, 7, [2, 6]), (2, 3, [11])]
    return as_batch([{PROMPT_IDS: ids(p), CHOSEN_IDS: ids(c), REJECTED_IDS: [ids(r) for r in rs]} for p, c, rs in lens])


def _sequences(batch) -> list:
    """(prompt, response) per sequence in the trainer's order: the chosen ones, then the rejected by prompt."""
    out = list(zip(batch[PROMPT_IDS], batch[CHOSEN_IDS], strict=True))
    return out + [(p, r) for p, rs in zip(batch[PROMPT_IDS], batch[REJECTED_IDS], strict=True) for r in rs]


def _reference(model, batch) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for p, r in _sequences(batch):
            ids = torch.from_numpy(np.concatenate([p, r]))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            pos = torch.arange(len(p), ids.shape[1])
            out.append(logp[pos - 1, ids[0, pos]].sum())
    return torch.stack(out).float()


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    import transformers

    out = {}
    for name, (cls, extra) in ARCHS.items():
        cfg = getattr(transformers, cls)(**BASE, **extra)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # random init is nearly uniform: spread the logits so transforms matter
            model.get_output_embeddings().weight.mul_(3)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.mark.parametrize("layout", ["shared", "varlen", "padded"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logps_equal_the_models_own_forward(arch, layout, arch_dirs, deepspeed_world1):
    import deepspeed

    from cpo_ray.train.collate import collate_for
    from cpo_ray.train.engine import deepspeed_config
    from cpo_ray.train.logps import PairScorer, verify_logps
    from cpo_ray.train.model import build_model

    packing = layout != "padded"
    cfg = load_config(
        None, ["train.zero_stage=0", f"train.packing={packing}", "model.lora.enabled=true", "model.lora.dropout=0"]
    )
    model = build_model(cfg, arch_dirs[arch], torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: the reference must see it too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(model).eval()
    reference.get_base_model().set_attn_implementation("eager")
    collate = collate_for(packing, None, model, pad_id=0, shared_prompt=layout == "shared")
    assert verify_logps(model, collate) < 1e-3  # the start-up check agrees
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(
        model=PairScorer(model),
        optimizer=optimizer,
        config=deepspeed_config(cfg, 1, "float32"),
        dist_init_required=False,
    )
    engine.eval()
    for seed in (0, 1):
        batch = _batch(seed)
        with torch.no_grad():
            got, count = engine(collate(batch))
        want = _reference(reference, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)  # fp32 sums of up to 11 tokens
        assert count.tolist() == [len(r) for _, r in _sequences(batch)]


def test_unsupported_heads_are_refused_before_training():
    from types import SimpleNamespace

    from cpo_ray.train.heads import check_architecture

    with pytest.raises(ValueError, match="inkling"):
        check_architecture(SimpleNamespace(model_type="inkling"), True, None)
    with pytest.raises(ValueError, match="StableLM.*attn_implementation: sdpa"):
        check_architecture(SimpleNamespace(model_type="stablelm"), False, None)
    with pytest.raises(ValueError, match="sdpa attention ignores attn_logit_softcapping"):
        check_architecture(SimpleNamespace(model_type="gemma2", attn_logit_softcapping=50.0), True, "sdpa")
    check_architecture(SimpleNamespace(model_type="stablelm"), True, "sdpa")  # block-diagonal packing: fine
    check_architecture(SimpleNamespace(model_type="llama"), True, None)


def test_a_head_we_do_not_reproduce_fails_the_start_up_check(arch_dirs):
    """The probe is the safety net for any architecture not in the table: a Granite whose logits_scaling we
    pretend not to know is caught, naming the model."""
    from cpo_ray.train import heads
    from cpo_ray.train.collate import collate_for
    from cpo_ray.train.logps import verify_logps
    from cpo_ray.train.model import build_model

    cfg = load_config(None, ["model.lora.enabled=false"])
    model = build_model(cfg, arch_dirs["granite"], torch.float32)
    collate = collate_for(True, None, model, pad_id=0)
    saved = heads.DIVIDE_BY_LOGITS_SCALING
    heads.DIVIDE_BY_LOGITS_SCALING = ()
    try:
        with pytest.raises(
            ValueError, match=r"GraniteForCausalLM \(granite\).*differ from the model's own eager forward"
        ):
            verify_logps(model, collate)
    finally:
        heads.DIVIDE_BY_LOGITS_SCALING = saved


def test_the_start_up_check_catches_a_sliding_window_our_attention_ignores(arch_dirs):
    """Issue 21: the probe's reference is the model's own eager attention, not cpo-ray's. A Qwen2-MoE whose
    window (6, shorter than the probe) cpo-ray's attention is made to ignore must fail the check."""
    from transformers import AttentionInterface

    from cpo_ray.train import attention
    from cpo_ray.train.collate import collate_for
    from cpo_ray.train.logps import verify_logps
    from cpo_ray.train.model import build_model

    cfg = load_config(None, ["model.lora.enabled=false"])
    model = build_model(cfg, arch_dirs["qwen2_moe"], torch.float32)
    collate = collate_for(True, None, model, pad_id=0)  # switches the model to cpo-ray's attention
    assert verify_logps(model, collate) < 1e-3

    def windowless(module, *args, **kwargs):
        kwargs.pop("sliding_window", None)
        saved, module.sliding_window = getattr(module, "sliding_window", None), None
        try:
            return attention.varlen_attention(module, *args, **kwargs)
        finally:
            module.sliding_window = saved

    AttentionInterface.register(attention.VARLEN_ATTENTION, windowless)
    try:
        with pytest.raises(ValueError, match=r"Qwen2MoeForCausalLM \(qwen2_moe\).*own eager forward"):
            verify_logps(model, collate)
    finally:
        AttentionInterface.register(attention.VARLEN_ATTENTION, attention.varlen_attention)
