"""Tokenize a (prompt, chosen, rejected) triple into the compact row the trainer and evaluator share.

A row stores the prompt once and each response once (token ids as int32 lists):

    prompt_ids    BOS + prompt (whatever the tokenizer adds for a single text)
    chosen_ids    chosen response + EOS   (the tokens that are scored)
    rejected_ids  [rejected response + EOS, ...]: K >= 1 of them (a list of lists)

A training sequence is prompt_ids + chosen_ids; only the response tokens are scored, on their REAL ids
(cpo_ray.train.logps never builds a labels tensor: it gathers the response positions).

Boundaries. Each response is tokenized TOGETHER with its prompt (TRL's rule): prompt_ids + chosen_ids is the
tokenizer's own encoding of prompt + chosen, so a SentencePiece/Metaspace tokenizer does not put a scored
"▁" in front of every response, as encoding the response alone would. The split point is the longest
token prefix that the prompt's own encoding and BOTH joint encodings share: normally the whole prompt. Where
a merge crosses the boundary (a prompt ending in " " followed by "yes" encodes as " yes"), the merged token
belongs to the response, as in TRL; the stored prompt then ends one token earlier, and prompt + response is
still exactly the joint encoding (counted in prepare_report.json as boundary_merges).

Truncation to max_length per sequence: the prompt loses tokens from its start first (keep the end, nearest
the answer) down to half the budget, but keeps its head: BOS and, with a chat template, the template's
opening (system message and first role marker), so a cut prompt still starts the way every prompt does at
inference. Where the template ends each message with a special token (ChatML, Llama 3, Gemma), the cut
drops whole turns: the oldest partial turn goes too, so no assistant text is ever shown as the user's. Then
the responses lose their ends; a response is never emptied, and a pair whose responses
become identical is a RowError, never a silent drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS, TRUNCATED, Reject, RowError


@dataclass(frozen=True)
class Special:
    """What the tokenizer adds, learned once from the tokenizer instead of per row."""

    bos_id: int | None
    eos_id: int
    adds_bos: bool  # tokenizer(text) prepends BOS by itself
    head_ids: tuple[int, ...] = ()  # what every prompt starts with: BOS and/or the chat template's opening
    turn_end: tuple[int, ...] = ()  # what the template puts after each message (ChatML "<|im_end|>\n"), if special
    system_len: int = 0  # the part of head_ids before the first role marker (BOS, the system turn)

    @classmethod
    def of(cls, tokenizer) -> Special:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token: responses could not be terminated")
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = bos is not None and probe[:1] == [bos]
        # The head: what every prompt starts with. The turn end: what follows every message, when it opens
        # with a special token (ChatML "<|im_end|>\n", Llama 3 "<|eot_id|>", Gemma "<end_of_turn>\n").
        head, end = _around_user_message(tokenizer)
        end = end if end and _is_special(tokenizer, end[0]) else []
        if adds_bos and head[:1] != [bos]:
            head = [bos, *head]
        ends = _ends(head, end) if end else []
        system_len = ends[-1] if ends else int(bos is not None and head[:1] == [bos])
        return cls(
            bos_id=bos,
            eos_id=tokenizer.eos_token_id,
            adds_bos=adds_bos,
            head_ids=tuple(head),
            turn_end=tuple(end),
            system_len=system_len,
        )


def _around_user_message(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the chat template renders before and after a lone user message's text (([], []) without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return [], []
    mark = "cpo-ray-message-marker"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    except Exception:
        return [], []
    if mark not in text:
        return [], []
    before, after = text.split(mark, 1)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (before, after)]


def _is_special(tokenizer, token_id: int) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return token_id in tokenizer.all_special_ids or getattr(added.get(token_id), "special", False)


def _ends(ids: list[int], end: tuple[int, ...]) -> list[int]:
    """Indices just past each occurrence of the id sequence `end` in ids."""
    n, end = len(end), list(end)
    return [i + n for i in range(len(ids) - n + 1) if ids[i : i + n] == end]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens added. Fast tokenizers are called directly (Rust
    encode_batch): transformers' wrapper builds a BatchEncoding per text (bench/RESULTS.md, tokenize_throughput)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _terminated(tokenizer, texts: list[str]) -> list[str]:
    """A chat template ends an assistant turn with its own EOS text (maybe plus a newline): keep that EOS
    as the last scored token instead of appending a second one after the newline."""
    eos = tokenizer.eos_token
    return [t.rstrip() if eos and t.rstrip().endswith(eos) else t for t in texts]


def _distinct(chosen: list[int], rejected: list[list[int]]) -> str | None:
    """Why the responses cannot be told apart (None if they can)."""
    if any(r == chosen for r in rejected):
        return "chosen and a rejected response"
    if len({tuple(r) for r in rejected}) < len(rejected):
        return "two rejected responses"
    return None


def encode_pairs(tokenizer, special: Special, prompts: list[str], chosens: list[str], rejecteds: list[list[str]]):
    """(prompt_ids, chosen_ids, [rejected_ids, ...], merged) per row: every response encoded jointly with its
    prompt and split at the longest prefix all these encodings share (see the module docstring); EOS ends
    each response, BOS starts the prompt when the tokenizer adds one (never doubled by a chat template)."""
    chosens = _terminated(tokenizer, chosens)
    rejecteds = [_terminated(tokenizer, list(rs)) for rs in rejecteds]
    n = len(prompts)
    joint = [p + r for p, rs in zip(prompts, rejecteds, strict=True) for r in rs]
    enc = _encode(tokenizer, [*prompts, *(p + c for p, c in zip(prompts, chosens, strict=True)), *joint])
    out, at = [], 2 * n
    for i in range(n):
        p, pc = enc[i], enc[n + i]
        prs = enc[at : at + len(rejecteds[i])]
        at += len(rejecteds[i])
        k = min(_common_prefix(p, x) for x in (pc, *prs))
        prompt = p[:k]
        chosen, *rejected = (x[k:] if x[-1:] == [special.eos_id] else [*x[k:], special.eos_id] for x in (pc, *prs))
        if special.adds_bos and prompt[:1] != [special.bos_id]:
            prompt = [special.bos_id, *prompt]
        out.append((prompt, chosen, rejected, k < len(p)))
    return out


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[list[int]],
    max_length: int,
    keep_head: int = 0,
    turn_end: tuple[int, ...] = (),
    system_len: int = 0,
):
    """Fit prompt + each response into max_length; returns (prompt, chosen, rejected) (maybe shorter).

    The first `keep_head` prompt tokens (BOS, the chat template's opening) survive a cut prompt when the
    budget leaves room for them and at least one token of the prompt's end. With `turn_end` (a chat
    template's end-of-message ids) the cut drops WHOLE turns: the kept end starts after the first turn end
    in it, behind the head's first `system_len` tokens (BOS + system turn, without the head's own role
    marker), so no message is shown under the wrong role. If that would keep less than half of the kept
    end (one long last turn), the cut stays mid-turn."""
    longest = max(len(r) for r in (chosen, *rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    # Cut the prompt from the left first, but not below half the budget: an answer scored with no
    # context teaches nothing, so past that point the responses lose their ends instead.
    keep_prompt = max(max_length - longest, min(len(prompt), max_length // 2))
    if keep_prompt < len(prompt):
        head = keep_head if keep_head < keep_prompt else 0
        tail = prompt[len(prompt) - (keep_prompt - head) :]
        starts = [i for i in _ends(tail, turn_end) if i < len(tail)] if turn_end and system_len <= head else []
        if starts and len(tail) - starts[0] >= len(tail) // 2:  # from the first whole turn on
            prompt = prompt[:system_len] + tail[starts[0] :]
        else:
            prompt = prompt[:head] + tail
    room = max_length - len(prompt)
    chosen, rejected = chosen[:room], [r[:room] for r in rejected]
    same = _distinct(chosen, rejected)
    if same:
        raise RowError(
            Reject.IDENTICAL_AFTER_TRUNCATION, f"{same} differ only past max_length={max_length}", "rejected"
        )
    return prompt, chosen, rejected


def tokenize_batch(tokenizer, special: Special, prompts, chosens, rejecteds, max_length: int):
    """Tokenize parallel lists (rejecteds[i]: the row's K >= 1 rejected texts); returns (rows, errors) where
    errors[i] is None or a RowError."""
    rows, errors = [], []
    for p, c, r, merged in encode_pairs(tokenizer, special, list(prompts), list(chosens), list(rejecteds)):
        try:
            if not p:
                raise RowError(
                    Reject.EMPTY_PROMPT, "prompt has no tokens: the first response token would be unscored", "prompt"
                )
            same = _distinct(c, r)
            if same:
                raise RowError(Reject.IDENTICAL_RESPONSES, f"{same} tokenize identically", "rejected")
            full = len(p) + max(len(x) for x in (c, *r))
            keep_head = _common_prefix(p, list(special.head_ids))
            p, c, r = truncate_pair(p, c, r, max_length, keep_head, special.turn_end, special.system_len)
            rows.append({PROMPT_IDS: p, CHOSEN_IDS: c, REJECTED_IDS: r, TRUNCATED: full > max_length, "merged": merged})
            errors.append(None)
        except RowError as e:
            rows.append(None)
            errors.append(e)
    return rows, errors
