"""The embedded default model: a tiny random Llama and an offline byte-level tokenizer.

Nothing is downloaded. `build_embedded_model(dir, tiny_cfg)` writes an ordinary Hugging Face folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template) that
transformers and vLLM both load. Same seed, same bytes.

The tokenizer maps every UTF-8 byte to one token (GPT-2 byte alphabet), so any text, HH-RLHF
included, tokenizes without unknown tokens. <s> is prepended by the post-processor, as Llama does.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpo_ray.config import TinyModelConfig

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
STAMP = "cpo_ray_embedded.json"  # the shape a folder was built with: the same shape is not rebuilt
# Plain-text role markers: every byte is a token already, so no special tokens are needed.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer():
    """Byte-level tokenizer: 3 specials (ids 0-2) + 256 byte tokens; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    tok.add_special_tokens([PAD, BOS, EOS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_embedded_model(out_dir: str | Path, tiny: TinyModelConfig | None = None) -> Path:
    """Write the tiny random Llama + tokenizer to out_dir (skipped if the same shape is already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = tiny or TinyModelConfig()
    out = Path(out_dir)
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == tiny.model_dump():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(tiny.seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    stamp.write_text(json.dumps(tiny.model_dump()))
    return out
