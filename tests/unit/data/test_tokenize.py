"""Token ids and label masks worked out by hand on the byte tokenizer (id = 3 + byte rank, BOS=1, EOS=2)."""

import json

import numpy as np
import pytest

from conftest import ASSETS
from cpo_ray.contract import RowError
from cpo_ray.data.formats import normalize
from cpo_ray.data.tokenize import Special, tokenize_batch, truncate_pair
from cpo_ray.train.collate import as_batch, collate_padded

IGNORE = -100  # the label a causal LM ignores


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row(tokenizer, p, c, r, max_length=64):
    """One row with one rejected response, which comes back as rejected_ids (not a list of one)."""
    rows, errs = tokenize_batch(tokenizer, Special.of(tokenizer), [p], [c], [[r]], max_length)
    if errs[0]:
        raise errs[0]
    (rejected,) = rows[0]["rejected_ids"]
    return {**rows[0], "rejected_ids": rejected}


def test_explicit_ids_and_labels_exact(tokenizer):
    r = row(tokenizer, "Q:", "ab", "b")
    a, b, q, colon = (ids(tokenizer, ch)[0] for ch in "abQ:")
    assert r["prompt_ids"] == [1, q, colon]  # BOS + prompt
    assert r["chosen_ids"] == [a, b, 2]  # response + EOS
    assert r["rejected_ids"] == [b, 2]
    batch = as_batch([{**r, "rejected_ids": [r["rejected_ids"]]}])
    out = collate_padded(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, q, colon, a, b, 2], [1, q, colon, b, 2, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    # labels as a causal LM sees them: prompt and padding masked, the real response tokens scored
    labels = np.full((2, 6), IGNORE)
    flat = labels.reshape(-1)
    flat[out["pred_idx"].numpy() + 1] = out["tgt_ids"].numpy()
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, a, b, 2], [IGNORE, IGNORE, IGNORE, b, 2, IGNORE]]
    assert out["seq_idx"].tolist() == [0, 0, 0, 1, 1]


def test_chat_template_bos_not_doubled_and_eos_not_doubled(tokenizer):
    rec = json.loads((ASSETS / "formats" / "conversational.jsonl").read_text().splitlines()[0])
    p, c, (r,) = normalize(rec, "conversational", tokenizer)
    out = row(tokenizer, p, c, r, max_length=4096)
    assert out["prompt_ids"][0] == 1 and out["prompt_ids"][1] != 1
    assert out["chosen_ids"][-1] == 2 and out["chosen_ids"][-2] != 2  # the template's own </s>, once
    assert tokenizer.decode(out["prompt_ids"] + out["chosen_ids"]) == (p + c).rstrip()


def test_truncation_prompt_left_first_then_responses():
    p, c, r = list(range(10)), [100, 101, 102], [200, 201]
    assert truncate_pair(p, c, [r], 13) == (p, c, [r])
    assert truncate_pair(p, c, [r], 12) == (p[1:], c, [r])  # prompt loses its START
    # prompt floor is half the budget (4 of 8), then responses lose their ends
    assert truncate_pair(p, [*range(100, 110)], [r], 8) == (p[6:], [100, 101, 102, 103], [r])


def test_pairs_that_cannot_be_kept_are_rejected_with_reason(tokenizer):
    with pytest.raises(RowError) as e:
        row(tokenizer, "x", "same", "same")
    assert e.value.reason == "identical_responses"
    with pytest.raises(RowError) as e:
        row(tokenizer, "prompt", "abcdefgh-1", "abcdefgh-2", max_length=8)
    assert e.value.reason == "identical_after_truncation"


def _joint(tok, text):
    return tok(text, add_special_tokens=True)["input_ids"]


def test_responses_tokenized_with_their_prompt_metaspace(metaspace_tokenizer):
    """SentencePiece/Metaspace: a response encoded alone gets a dummy-prefix "▁" the model never sees after
    the prompt; the stored ids are the tokenizer's own encoding of prompt + response."""
    tok = metaspace_tokenizer
    p, c, r = "[INST] hi there [/INST]", "yo, hello!", "no"
    out = row(tok, p, c, r)
    eos = tok.eos_token_id
    assert out["prompt_ids"] + out["chosen_ids"] == _joint(tok, p + c) + [eos]
    assert out["prompt_ids"] + out["rejected_ids"] == _joint(tok, p + r) + [eos]
    assert out["prompt_ids"] == _joint(tok, p)  # no merge here: the prompt is its own encoding
    alone = tok(c, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁")  # what encoding it alone would have scored
    assert out["chosen_ids"][:-1] != alone


def test_boundary_merge_goes_to_the_response(bpe_tokenizer):
    """Byte-level BPE: a prompt ending in a space followed by "yes" encodes as " yes" jointly. Rule (TRL's):
    the merged token belongs to the response; the prompt ends one token earlier; both sequences are still
    exactly the joint encodings, and the row says it merged."""
    tok = bpe_tokenizer
    p, c, r = "Q: Is the sky blue? A: ", "yes it is.", "no it is not."
    rows, errs = tokenize_batch(tok, Special.of(tok), [p], [c], [[r]], 64)
    out = {**rows[0], "rejected_ids": rows[0]["rejected_ids"][0]}
    eos = tok.eos_token_id
    assert out["merged"] and out["prompt_ids"] == _joint(tok, p)[:-1]  # the trailing " " moved
    assert tok.convert_ids_to_tokens(out["chosen_ids"])[0] == "Ġyes"
    assert out["prompt_ids"] + out["chosen_ids"] == _joint(tok, p + c) + [eos]
    assert out["prompt_ids"] + out["rejected_ids"] == _joint(tok, p + r) + [eos]
    plain = row(tok, p.rstrip(), " " + c, " " + r)  # the same text split at a pre-token boundary: no merge
    assert not plain["merged"] and plain["chosen_ids"] == out["chosen_ids"]


def test_truncation_keeps_bos_and_the_chat_templates_head(bpe_tokenizer, tokenizer):
    """A cut prompt still starts like every prompt at inference: BOS + the template's system turn + the
    first role marker; what goes is the oldest conversation text after them."""
    tok = bpe_tokenizer
    msgs = [{"role": "user", "content": "write seven in words " * 12}]
    p = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    c, r = "seven" + tok.eos_token, "twelve" + tok.eos_token
    special = Special.of(tok)
    head = list(special.head_ids)
    assert head[0] == tok.bos_token_id and tok.decode(head[1:]) == "<|system|>\nBe brief.\n<|user|>\n"
    full = row(tok, p, c, r, max_length=4096)
    short = row(tok, p, c, r, max_length=48)
    assert short["truncated"] and len(short["prompt_ids"]) + len(short["chosen_ids"]) <= 48
    assert short["prompt_ids"][: len(head)] == head  # the head survived
    tail = len(short["prompt_ids"]) - len(head)
    assert short["prompt_ids"][len(head) :] == full["prompt_ids"][-tail:]  # then the prompt's end
    assert tok.decode(short["prompt_ids"]).endswith("<|assistant|>\n")
    # A raw-text prompt (no template) keeps its BOS: the embedded byte tokenizer, HH-style text.
    cut = row(tokenizer, "\n\nHuman: " + "tell me more " * 10 + "\n\nAssistant:", " Sure.", " No.", max_length=24)
    assert cut["truncated"] and cut["prompt_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(cut["prompt_ids"][1:]).endswith("Assistant:")


def test_several_rejected_responses_tokenize_and_truncate_together(tokenizer):
    """K rejected responses: each tokenized with the prompt; the prompt cut once for the longest response."""
    rows, errs = tokenize_batch(tokenizer, Special.of(tokenizer), ["Q:"], ["ab"], [["b", "abc"]], 64)
    a, b, c = (ids(tokenizer, ch)[0] for ch in "abc")
    assert errs == [None] and rows[0]["rejected_ids"] == [[b, 2], [a, b, c, 2]]
    rows, errs = tokenize_batch(tokenizer, Special.of(tokenizer), ["x" * 20], ["ab"], [["b", "abcdef"]], 12)
    r = rows[0]
    assert r["truncated"] and len(r["prompt_ids"]) + len(r["rejected_ids"][1]) <= 12
    assert r["prompt_ids"][0] == 1 and r["rejected_ids"][0] == [b, 2]
    rows, errs = tokenize_batch(tokenizer, Special.of(tokenizer), ["Q:"], ["ab"], [["b", "b"]], 64)
    assert errs[0].reason == "identical_responses" and "two rejected" in str(errs[0])


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """A byte-level BPE with ChatML's special tokens and template (as SmolLM2 / Qwen use): each message ends
    with <|im_end|>\\n, a special token, so a cut can find where turns end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def test_truncation_drops_whole_turns_with_a_chat_template(chatml_tokenizer):
    """A dialogue too long for max_length loses its oldest turns WHOLE: the cut prompt is the system turn, then
    complete turns, each under its own role marker (cut mid-turn, the kept tail of an assistant message would
    sit under the head's "user" marker: the model would train on the assistant's words as the user's)."""
    tok = chatml_tokenizer
    special = Special.of(tok)
    assert tok.decode(list(special.turn_end)) == "<|im_end|>\n"
    assert tok.decode(list(special.head_ids[: special.system_len])) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    turns = [("user", "write seven in words " * 3), ("assistant", "seven " * 8), ("user", "write twelve"),
             ("assistant", "twelve"), ("user", "and seven?")]  # fmt: skip
    msgs = [{"role": r, "content": t} for r, t in turns]
    p = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = row(tok, p, "seven<|im_end|>", "twelve<|im_end|>", max_length=4096)
    budget = len(full["prompt_ids"]) - 6 + 4  # a cut of a few tokens, landing inside the first user turn
    short = row(tok, p, "seven<|im_end|>", "twelve<|im_end|>", max_length=budget)
    text = tok.decode(short["prompt_ids"])
    want = tok.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=True)  # system turn + turns 2-5
    assert short["truncated"] and text == want, text
    # The cut stays mid-turn (behind the whole head) when whole turns would leave less than half: one long turn.
    long = [{"role": "user", "content": "write seven in words " * 12}]
    p = tok.apply_chat_template(long, tokenize=False, add_generation_prompt=True)
    cut = row(tok, p, "seven<|im_end|>", "twelve<|im_end|>", max_length=40)
    assert tok.decode(cut["prompt_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(cut["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_a_tokenizer_without_chat_template_is_one_config_error_not_rejects(tmp_path):
    """Issue 21: message-list rows under a template-less tokenizer became one bad_record reject per row; now
    the tokenizer actor stops with ONE ConfigError, and prepare refuses data.chat_template before reading."""
    from cpo_ray.config import ConfigError, load_config
    from cpo_ray.data.prepare import Tokenize, prepare
    from cpo_ray.embedded import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    udf = Tokenize(str(tmp_path / "tok"), load_config(None).data.model_dump())
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    with pytest.raises(ConfigError, match="has no chat template"):
        udf({"source": ["f:1"], "raw": [json.dumps(row)]})
    explicit = {"source": ["f:1"], "raw": [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})]}
    assert udf(explicit).column("reason").to_pylist() == [None]  # plain text still fine
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.chat_template=true",
                             f"data.train_files=[{tmp_path / 'missing.jsonl'}]"])  # fmt: skip
    with pytest.raises(ConfigError, match="has no chat template"):  # before any file is even looked at
        prepare(cfg, str(tmp_path / "tok"))
