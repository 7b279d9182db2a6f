"""Turn one raw preference record into (prompt, chosen, [rejected, ...]) text: K >= 1 rejected responses.

Five input formats (TRL's names, plus ranked), detected per record or named in DataConfig.format:

    explicit        {"prompt": str, "chosen": str, "rejected": str | [str, ...]}
    conversational  {"prompt": [msgs]?, "chosen": [msgs], "rejected": [msgs] | [[msgs], ...]}  (msgs = {role, content})
    implicit        {"chosen": str, "rejected": str | [str, ...]}: whole HH-RLHF dialogues sharing a prefix
    sharegpt        {"conversations": [{from, value}], "chosen": {from, value}, "rejected": {from, value} | [[...], ...]}
    ranked          {"prompt": str | [msgs], "responses": [str | [msgs], ...], "scores": [number, ...]}: the best
                    scored response is chosen, every one scored at least data.min_score_gap below it is rejected

A list of responses where one response is expected means several rejected ones (for message-list formats:
a list of message lists). Messages are rendered with the tokenizer's chat template, so the text is what the
model sees at inference; tokenization (BOS on the prompt, EOS after each response) happens in
cpo_ray.data.tokenize. A record that cannot be used raises RowError(reason, message, field), `field` being the
source field name (after DataConfig.columns mapping). A tokenizer without a chat template is a config error
(ConfigError from require_chat_template), not a RowError.
"""

from __future__ import annotations

import math
import os
import re

from cpo_ray.config import ConfigError
from cpo_ray.contract import Reject, RowError

FORMATS = ("explicit", "conversational", "implicit", "sharegpt", "ranked")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
ROLE_OF = {"Human": "user", "Assistant": "assistant"}
TARGETS = ("prompt", "chosen", "rejected", "conversations", "responses", "scores")


def _names(columns: dict[str, str] | None) -> dict[str, str]:
    names = {k: k for k in TARGETS}
    names.update(columns or {})
    return names


def _get(record: dict, target: str, names: dict[str, str]):
    src = names[target]
    if src not in record:
        mapped = f" (mapped from {target!r})" if src != target else ""
        raise RowError(Reject.MISSING_FIELD, f"record has no field {src!r}{mapped}", src)
    return record[src]


def _string(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(Reject.NOT_STRING, f"{field!r} must be a string, got {type(value).__name__}", field)
    return value


def _is_messages(value, key: str) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and key in m for m in value)


def _several(value) -> bool:
    """A field holding several responses: a non-empty list of strings, or of lists (message lists)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str | list) for v in value)


def _options(value) -> list:
    """The rejected field as a list of single responses."""
    return value if _several(value) else [value]


def detect_format(record: dict, columns: dict[str, str] | None = None) -> str:
    """The format of one record by the shape of its fields; RowError(Reject.UNKNOWN_FORMAT) if none fits."""
    if not isinstance(record, dict):
        raise RowError(Reject.UNKNOWN_FORMAT, f"record is a {type(record).__name__}, not a mapping")
    names = _names(columns)
    if names["responses"] in record and names["scores"] in record:
        return "ranked"
    chosen, rejected = record.get(names["chosen"]), record.get(names["rejected"])
    rejected = rejected[0] if _several(rejected) else rejected  # K negatives: the shape of one
    if names["conversations"] in record and all(
        (isinstance(x, dict) and "from" in x) or _is_messages(x, "from") for x in (chosen, rejected)
    ):
        return "sharegpt"
    if _is_messages(chosen, "role") and _is_messages(rejected, "role"):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        # A prompt field that is present but null or not a string is reported by normalize, precisely.
        return "explicit" if names["prompt"] in record else "implicit"
    if names["prompt"] in record and names["chosen"] in record and names["rejected"] in record:
        # The explicit field set with a wrong-typed value: normalize names the field ("not_string").
        return "explicit"
    missing = [names[k] for k in ("chosen", "rejected") if names[k] not in record]
    if missing:
        raise RowError(
            Reject.MISSING_FIELD,
            f"no {' or '.join(map(repr, missing))} field (fields: {sorted(record)[:10]})",
            missing[0],
        )
    raise RowError(Reject.UNKNOWN_FORMAT, f"no known preference format fits fields {sorted(record)}", names["chosen"])


def _messages(value, field: str) -> list[dict]:
    """Validated copy keeping only role/content, so extra keys never change the rendered text."""
    if not isinstance(value, list):
        raise RowError(Reject.BAD_MESSAGES, f"{field!r} must be a list of messages, got {type(value).__name__}", field)
    return _validated(value, field, "role", "content", {r: r for r in ROLES}, "role")


def _validated(items: list, field: str, role_key: str, text_key: str, roles: dict[str, str], who: str) -> list[dict]:
    """[{role, content}] from a message list whose role/text live under role_key/text_key (mapped by `roles`)."""
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
            raise RowError(
                Reject.BAD_MESSAGES, f"{field}[{i}] is not a {{{role_key}: str, {text_key}: str}} message", field
            )
        if m[role_key] not in roles:
            raise RowError(Reject.BAD_MESSAGES, f"{field}[{i}] has unknown {who} {m[role_key]!r}", field)
        out.append({"role": roles[m[role_key]], "content": m[text_key]})
    return out


def _check_response(msgs: list[dict], field: str) -> None:
    if not msgs or all(not m["content"].strip() for m in msgs):
        raise RowError(Reject.EMPTY_RESPONSE, f"{field!r} has no text", field)
    if msgs[0]["role"] != "assistant":
        raise RowError(
            Reject.BAD_MESSAGES, f"{field!r} must start with an assistant message, not {msgs[0]['role']!r}", field
        )


def _split_messages(chosen: list[dict], rejected: list[list[dict]], names: dict[str, str]):
    """Implicit conversational: the messages shared by all sides before the last assistant turn at or before
    the first difference are the prompt (TRL's maybe_extract_prompt, but never cutting inside a turn pair)."""
    d = None
    for other in rejected:
        di = next((i for i, (a, b) in enumerate(zip(chosen, other, strict=False)) if a != b), None)
        if di is None:
            if len(chosen) == len(other):
                raise RowError(
                    Reject.IDENTICAL_RESPONSES, "chosen and rejected are the same messages", names["rejected"]
                )
            di = min(len(chosen), len(other))
        d = di if d is None else min(d, di)
    sides = [chosen, *rejected]
    for i in range(d, -1, -1):
        if all(i < len(side) and side[i]["role"] == "assistant" for side in sides):
            if i == 0:
                raise RowError(Reject.EMPTY_PROMPT, "no messages precede the first assistant turn", names["chosen"])
            return chosen[:i], chosen[i:], [side[i:] for side in rejected]
    raise RowError(
        Reject.UNPARSEABLE_DIALOGUE, "no assistant turn at or before where the sides differ", names["chosen"]
    )


def _render(
    tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[list[dict]], names: dict, prompt_field: str
):
    """Template prompt (with generation prompt) and each prompt+response; a response is the full text minus
    the prompt text, so prompt + response is exactly what the template renders for the whole dialogue."""
    if not prompt:
        raise RowError(Reject.EMPTY_PROMPT, f"{prompt_field!r} has no messages", prompt_field)
    _check_response(chosen, names["chosen"])
    for r in rejected:
        _check_response(r, names["rejected"])
    require_chat_template(tokenizer)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for target, msgs in (("chosen", chosen), *(("rejected", r) for r in rejected)):
        full = tokenizer.apply_chat_template(prompt + msgs, tokenize=False)
        if not full.startswith(prompt_text):
            msg = f"chat template renders prompt+{target} without the prompt's text as its start"
            raise RowError(Reject.BAD_MESSAGES, msg, names[target])
        out.append(full[len(prompt_text) :])
    return prompt_text, out[0], out[1:]


def require_chat_template(tokenizer) -> None:
    """Message lists (and data.chat_template) are rendered with the tokenizer's chat template: a tokenizer
    without one is a configuration problem of the whole run, raised once, never a reject per row."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise ConfigError(
            f"{name} has no chat template, which message-list rows and data.chat_template: true need: use a chat "
            "model's tokenizer, set data.chat_template: false for plain-text rows, or convert the data to explicit "
            "prompt/chosen/rejected strings"
        )


def _conversational(record: dict, tokenizer, names: dict[str, str]):
    chosen = _messages(_get(record, "chosen", names), names["chosen"])
    rejected = [_messages(r, names["rejected"]) for r in _options(_get(record, "rejected", names))]
    # A null prompt counts as absent: Arrow readers fill a column missing from some rows with nulls.
    if record.get(names["prompt"]) is not None:
        prompt = _messages(record[names["prompt"]], names["prompt"])
    else:
        prompt, chosen, rejected = _split_messages(chosen, rejected, names)
    return _render(tokenizer, prompt, chosen, rejected, names, names["prompt"])


def _sharegpt_messages(value, field: str) -> list[dict]:
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise RowError(Reject.BAD_MESSAGES, f"{field!r} must be a {{from, value}} message or a list of them", field)
    return _validated(items, field, "from", "value", SHAREGPT_ROLES, "speaker")


def _sharegpt(record: dict, tokenizer, names: dict[str, str]):
    prompt = _sharegpt_messages(_get(record, "conversations", names), names["conversations"])
    chosen = _sharegpt_messages(_get(record, "chosen", names), names["chosen"])
    raw = _get(record, "rejected", names)
    options = raw if isinstance(raw, list) and raw and all(isinstance(r, list) for r in raw) else [raw]
    rejected = [_sharegpt_messages(r, names["rejected"]) for r in options]
    return _render(tokenizer, prompt, chosen, rejected, names, names["conversations"])


def _implicit_text(chosen: str, rejected: list[str], names: dict[str, str]):
    """HH-RLHF: the prompt ends with the last complete "\\n\\nAssistant:" inside the prefix all dialogues share,
    so a difference inside the marker, or one side ending early, falls back to the turn before; the
    remainders keep their leading space, and prompt + response reproduces each side exactly."""
    if any(r == chosen for r in rejected):
        raise RowError(Reject.IDENTICAL_RESPONSES, "chosen and rejected dialogues are identical", names["rejected"])
    shared = os.path.commonprefix([chosen, *rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        msg = 'no "\\n\\nAssistant:" turn precedes where chosen and rejected differ'
        raise RowError(Reject.UNPARSEABLE_DIALOGUE, msg, names["chosen"])
    end = cut + len(HH_ASSISTANT)
    if not chosen[:cut].strip():
        raise RowError(Reject.EMPTY_PROMPT, "nothing precedes the first assistant turn", names["chosen"])
    return chosen[:end], chosen[end:], [r[end:] for r in rejected]


def _hh_messages(text: str, field: str) -> list[dict]:
    """An HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as user/assistant messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(Reject.UNPARSEABLE_DIALOGUE, f"{field!r} does not start with a Human:/Assistant: turn", field)
    return [{"role": ROLE_OF[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def _strings(record: dict, names: dict[str, str]) -> tuple[str, list[str]]:
    chosen = _string(_get(record, "chosen", names), names["chosen"])
    return chosen, [_string(r, names["rejected"]) for r in _options(_get(record, "rejected", names))]


def _explicit_prompt(record: dict, names: dict[str, str]) -> str:
    prompt = _string(_get(record, "prompt", names), names["prompt"])
    if not prompt.strip():
        raise RowError(Reject.EMPTY_PROMPT, f"{names['prompt']!r} is empty", names["prompt"])
    return prompt


def _as_chat(record: dict, fmt: str, tokenizer, names: dict[str, str]):
    """data.chat_template: explicit strings become one user and one assistant turn, HH dialogues their turns,
    rendered with the tokenizer's chat template like conversational rows."""
    chosen, rejected = _strings(record, names)
    if fmt == "explicit":
        user = [{"role": "user", "content": _explicit_prompt(record, names)}]
        turns = [[{"role": "assistant", "content": text}] for text in (chosen, *rejected)]
        return _render(tokenizer, user, turns[0], turns[1:], names, names["prompt"])
    hh = [_hh_messages(r, names["rejected"]) for r in rejected]
    return _render(
        tokenizer, *_split_messages(_hh_messages(chosen, names["chosen"]), hh, names), names, names["chosen"]
    )


def _ranked(record: dict, names: dict[str, str], min_score_gap: float) -> dict:
    """The ranked row as an explicit or conversational one: the best-scored response is chosen, those scored
    at least min_score_gap below it rejected (hardest first); ties for the best and bad scores are rejects."""
    responses, scores = _get(record, "responses", names), _get(record, "scores", names)
    field = names["scores"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError(
            Reject.BAD_MESSAGES, f"{names['responses']!r} must list at least 2 responses", names["responses"]
        )
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise RowError(Reject.BAD_SCORES, f"{field!r} must hold one number per response ({len(responses)})", field)
    if not all(isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise RowError(Reject.BAD_SCORES, f"{field!r} holds a value that is not a finite number", field)
    best = max(scores)
    if scores.count(best) > 1:
        raise RowError(Reject.TIED_SCORES, f"{scores.count(best)} responses share the best score {best}", field)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    rejected = [responses[i] for i in order[1:] if scores[i] <= best - min_score_gap]
    if not rejected:
        raise RowError(
            Reject.NO_NEGATIVE, f"no response scored at least {min_score_gap} below the best ({best})", field
        )
    return {"prompt": record.get(names["prompt"]), "chosen": responses[order[0]], "rejected": rejected}


def normalize(
    record: dict,
    fmt: str,
    tokenizer,
    columns: dict[str, str] | None = None,
    chat: bool = False,
    min_score_gap: float = 0.0,
) -> tuple[str, str, list[str]]:
    """(prompt, chosen, [rejected, ...]) text of one record in format `fmt` ("auto" detects it per record).
    With `chat`, explicit and HH-style string rows go through the tokenizer's chat template (see _as_chat)."""
    if fmt == "auto":
        fmt = detect_format(record, columns)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS} or 'auto'")
    names = _names(columns)
    if fmt == "ranked":
        record = _ranked(record, names, min_score_gap)
        names = _names(None)
        fmt = "explicit" if isinstance(record["chosen"], str) else "conversational"
    if fmt == "sharegpt":
        prompt, chosen, rejected = _sharegpt(record, tokenizer, names)
    elif fmt == "conversational":
        prompt, chosen, rejected = _conversational(record, tokenizer, names)
    elif chat and fmt in ("explicit", "implicit"):
        prompt, chosen, rejected = _as_chat(record, fmt, tokenizer, names)
    elif fmt == "implicit" and isinstance(record.get(names["chosen"]), list):
        # Implicit conversational: message lists with the prompt inside them, so any prompt field is ignored.
        record = {k: v for k, v in record.items() if k != names["prompt"]}
        prompt, chosen, rejected = _conversational(record, tokenizer, names)
    else:
        chosen, rejected = _strings(record, names)
        if fmt == "explicit":
            prompt = _explicit_prompt(record, names)
        else:
            prompt, chosen, rejected = _implicit_text(chosen, rejected, names)
    for target, text in (("chosen", chosen), *(("rejected", r) for r in rejected)):
        if not text.strip():
            raise RowError(Reject.EMPTY_RESPONSE, f"{names[target]!r} is empty or whitespace", names[target])
    if chosen in rejected:
        raise RowError(Reject.IDENTICAL_RESPONSES, "chosen and rejected are the same text", names["rejected"])
    if len(set(rejected)) < len(rejected):
        raise RowError(Reject.IDENTICAL_RESPONSES, "two rejected responses are the same text", names["rejected"])
    return prompt, chosen, rejected
