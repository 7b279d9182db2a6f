"""Shared fixtures. Tests never download: the model is the embedded tiny Llama built from a config.

tests/unit/ mirrors the package (fast, no Ray cluster); tests/integration/ starts Ray clusters, DeepSpeed
workers, vLLM or Serve and is marked `integration` here, by folder: a plain `pytest` runs the unit suite,
scripts/test.sh both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The embedded default model (random tiny Llama + byte tokenizer), built once per session."""
    from cpo_ray.embedded import build_embedded_model

    return str(build_embedded_model(tmp_path_factory.mktemp("embedded") / "tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance for this module (own temp dir), shut down by its own handle."""
    import ray

    tmp = tempfile.mkdtemp(prefix="cpo-ray-t-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ctx = ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


CORPUS = [
    "Q: Is the sky blue? A: yes it is. Q: Is grass red? A: no it is not.",
    "[INST] hi there [/INST] yo, hello! Sure, here you go. [INST] thanks [/INST] You are welcome.",
    "User: write seven in words Assistant: seven. User: write twelve Assistant: twelve.",
] * 20


def _fast(tok, bos="<s>", eos="</s>", pad="<pad>", chat_template=None):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """A Llama-2-style SentencePiece tokenizer (Metaspace pre-tokenizer, dummy prefix on the first word),
    BPE-trained here on a toy corpus: encoding a response alone puts a scored "▁" in front of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return _fast(tok)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE (regex pre-tokenizer: " yes" is one pre-token) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>\nBe brief.\n{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return _fast(tok, chat_template=template)


@pytest.fixture(scope="session")
def deepspeed_world1():
    """torch.distributed with one gloo rank in this process, so DeepSpeed engines can be built in a test."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    from cpo_ray.compat import skip_deepspeed_shm_comm_build

    skip_deepspeed_shm_comm_build()
    return 1
