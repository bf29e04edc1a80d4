"""What a generation worker makes of a request's prompt, with the model's own tokenizer (the gateway has none):
text, token ids or chat messages become what the engine takes, and OP_TOKENIZE answers with TGI's token spans."""

from __future__ import annotations

from typing import Any

from inferline.server.errors import InputError
from inferline.server.model import LanguageModel
from inferline.server.protocol import FIT_CONTEXT, TokenSpan


def chat_messages(value: Any) -> list[dict[str, str]]:
    """The payload's `messages` as [{"role", "content"}] of strings (the gateway's schema built them; a worker may be
    reached by other gateways or by hand, so the shape is checked again). Raises InputError naming `messages`."""
    if not isinstance(value, list) or not value:
        raise InputError("`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"`messages.{i}` must be an object with string `role` and `content`", f"messages.{i}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_of(model: LanguageModel, params: dict[str, Any], context_length: int) -> str | list[int]:
    """Take the prompt out of a generation payload (`inputs`: text or token ids; or `messages`: chat, rendered with
    the model's chat template and tokenized as it is, without adding special tokens a second time). With FIT_CONTEXT
    set, lowers params["max_new_tokens"] to what the context leaves after the prompt (OpenAI chat's default is "up
    to the context"). Removes both keys from `params`; raises InputError naming the field."""
    fit = bool(params.pop(FIT_CONTEXT, False))
    messages = params.pop("messages", None)
    prompt: str | list[int]
    if messages is not None:
        text = model.render_chat(chat_messages(messages))
        prompt = list(model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    else:
        inputs = params.pop("inputs", None)
        if isinstance(inputs, str):
            prompt = inputs
        elif isinstance(inputs, list) and all(type(t) is int for t in inputs):
            prompt = inputs
        else:
            raise InputError("`inputs` must be a string or a list of token ids", "inputs")
    if fit:
        if isinstance(prompt, str):   # tokenized as the engine would, so its length check sees the same ids
            prompt = list(model.tokenizer(prompt, verbose=False)["input_ids"]) if prompt else []
        room = context_length - len(prompt)
        if room >= 1:   # else the engine refuses the prompt itself, naming it
            params["max_new_tokens"] = min(int(params.get("max_new_tokens", room)), room)
    return prompt


def tokenize(tokenizer: Any, params: dict[str, Any]) -> list[TokenSpan]:
    """OP_TOKENIZE: the ids the engine would give `inputs` (special tokens included, as a prompt gets them), each with
    its text and [start, stop) character offsets in `inputs` (TGI's /tokenize). Raises InputError naming `inputs`."""
    text = params.get("inputs")
    if not isinstance(text, str) or not text:
        raise InputError("`inputs` must be a non-empty string", "inputs")
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:   # a slow (Python) tokenizer has no offsets: count each token's decoded text
        ids = tokenizer(text, verbose=False)["input_ids"]
        spans, at = [], 0
        for tid in ids:
            piece = str(tokenizer.decode([tid], clean_up_tokenization_spaces=False))
            spans.append(TokenSpan(int(tid), piece, at, at + len(piece)))
            at += len(piece)
        return spans
    return [TokenSpan(int(tid), text[start:stop], int(start), int(stop))
            for tid, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)]
