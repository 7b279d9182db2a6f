"""Tokenize a (prompt, chosen, rejected) triple into the compact row the trainer and evaluator share.

A row stores the prompt once and each response once (token ids as int32 lists):

    prompt_ids    BOS + prompt (whatever the tokenizer adds for a single text)
    chosen_ids    chosen response + EOS   (the tokens that are scored)
    rejected_ids  rejected response + EOS

A training sequence is prompt_ids + chosen_ids; only the response tokens are scored, on their REAL ids
(cpo_ray.batch never builds a labels tensor: it gathers the response positions). Prompt and response are
tokenized separately and joined, so the scored tokens are exactly those a server sees when it is sent the
same ids.

Truncation to max_length per sequence: the prompt loses its start first (keep the end, nearest the
answer) down to half the budget, then the responses lose their ends; a response is never emptied, and
a pair whose responses become identical is a RowError, never a silent drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpo_ray.contract import Reject


class RowError(ValueError):
    """A row that cannot be used; `reason` is a counted Reject, `field` the offending source field."""

    def __init__(self, reason: Reject, message: str, field: str | None = None):
        super().__init__(message)
        self.reason = Reject(reason)  # an unknown reason is a bug: ValueError here, not a new silent category
        self.field = field


@dataclass(frozen=True)
class Special:
    """What the tokenizer adds, learned once from the tokenizer instead of per row."""

    bos_id: int | None
    eos_id: int
    adds_bos: bool  # tokenizer(text) prepends BOS by itself

    @classmethod
    def of(cls, tokenizer) -> Special:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token: responses could not be terminated")
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        return cls(bos_id=bos, eos_id=tokenizer.eos_token_id, adds_bos=bos is not None and probe[:1] == [bos])


def encode_prompts(tokenizer, prompts: list[str], special: Special) -> list[list[int]]:
    """Prompt ids with BOS as the tokenizer expects, never doubled when a chat template put it in the text."""
    out = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if special.adds_bos:
        out = [ids if ids[:1] == [special.bos_id] else [special.bos_id, *ids] for ids in out]
    return out


def encode_responses(tokenizer, texts: list[str], special: Special) -> list[list[int]]:
    # A chat template ends an assistant turn with its own EOS text (maybe plus a newline): keep that
    # EOS as the last scored token instead of appending a second one after the newline.
    eos = tokenizer.eos_token
    texts = [t.rstrip() if eos and t.rstrip().endswith(eos) else t for t in texts]
    out = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids if ids[-1:] == [special.eos_id] else [*ids, special.eos_id] for ids in out]


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int):
    """Fit prompt+chosen and prompt+rejected into max_length; returns the three lists (maybe shorter)."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    # Cut the prompt from the left first, but not below half the budget: an answer scored with no
    # context teaches nothing, so past that point the responses lose their ends instead.
    keep_prompt = max(max_length - longest, min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt :]
    room = max_length - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        raise RowError(
            Reject.IDENTICAL_AFTER_TRUNCATION, f"responses differ only past max_length={max_length}", "rejected"
        )
    return prompt, chosen, rejected


def tokenize_batch(tokenizer, special: Special, prompts, chosens, rejecteds, max_length: int):
    """Tokenize parallel lists; returns (rows, errors) where errors[i] is None or a RowError."""
    p_ids = encode_prompts(tokenizer, prompts, special)
    c_ids = encode_responses(tokenizer, chosens, special)
    r_ids = encode_responses(tokenizer, rejecteds, special)
    rows, errors = [], []
    for p, c, r in zip(p_ids, c_ids, r_ids, strict=True):
        try:
            if not p:
                raise RowError(
                    Reject.EMPTY_PROMPT, "prompt has no tokens: the first response token would be unscored", "prompt"
                )
            if c == r:
                raise RowError(Reject.IDENTICAL_RESPONSES, "chosen and rejected tokenize identically", "rejected")
            full = len(p) + max(len(c), len(r))
            p, c, r = truncate_pair(p, c, r, max_length)
            rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "truncated": full > max_length})
            errors.append(None)
        except RowError as e:
            rows.append(None)
            errors.append(e)
    return rows, errors
