import hashlib
from pathlib import Path

import torch

from cpo_ray.embedded import build_embedded_model


def test_any_text_roundtrips_without_unknown_tokens(tokenizer):
    text = "\n\nHuman: Héllo 😀 — ünïcödé\tand\x00nul\n\nAssistant: 日本語"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte, plus BOS


def test_special_tokens_and_chat_template(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == "<s><|user|>\nhi\n<|assistant|>\nyo</s>\n"
    assert (
        tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        == "<s><|user|>\nhi\n<|assistant|>\n"
    )


def test_model_is_an_ordinary_hf_folder_and_deterministic(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    files = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = model(torch.tensor([[1, 50, 60]])).logits
    assert out.shape == (1, 3, model.config.vocab_size) and torch.isfinite(out).all()
    again = build_embedded_model(tmp_path / "again")

    def digest(d):
        return hashlib.sha256((Path(d) / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_model_dir)
