"""Export without a cluster: the merged final/ computes what the trained (LoRA or full) module computed."""

from types import SimpleNamespace

import pytest
import torch

from cpo_ray.config import load_config
from cpo_ray.train.logps import PairScorer
from cpo_ray.train.model import build_model, export_model


@pytest.mark.parametrize(
    "over",
    [
        ["model.lora.enabled=true", "model.lora.modules_to_save=[embed_tokens, lm_head]"],
        ["model.lora.enabled=true", "model.lora.modules_to_save=[]"],
        ["model.lora.enabled=false"],
    ],
    ids=["lora+modules_to_save", "lora", "full"],
)
def test_export_merged_matches_trained_module(tiny_model_dir, tmp_path, over):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, ["train.zero_stage=2", *over])
    module = build_model(cfg, tiny_model_dir, torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    export_model(SimpleNamespace(module=PairScorer(module)), cfg, tiny_model_dir, tmp_path, rank=0)  # as trained
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, module(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert not list((tmp_path / "final").glob("*.bin"))
    assert (tmp_path / "adapter").exists() == cfg.model.lora.enabled
