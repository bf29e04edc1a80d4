"""Incremental detokenization: one text piece per generated token, so streamed pieces concatenate to the full
text and a multi-byte character split over tokens comes out whole (the first piece is "" until it completes).

Byte-level BPE (every GPT-2-family tokenizer) gets an exact fast path: each token is a fixed byte string, fed to
an incremental UTF-8 decoder; no tokenizer call per step. Other tokenizers use TGI's offset method
(`decode_token`: decode a short window before and after the new token and emit the difference).
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Protocol

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte in the vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenBytes:
    """token id -> raw bytes for a byte-level BPE tokenizer; None when the tokenizer is not byte-level."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.table: list[bytes] | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        if backend is None or type(decoder).__name__ != "ByteLevel":
            return
        inv = _byte_decoder()
        vocab = backend.get_vocab(with_added_tokens=True)
        special = set(tokenizer.all_special_ids)
        table = [b""] * (max(vocab.values()) + 1)
        for token, idx in vocab.items():
            if idx in special or not all(ch in inv for ch in token):
                # Added (non-byte) tokens decode to their literal text; special ones are never fed here.
                table[idx] = token.encode("utf-8")
            else:
                table[idx] = bytes(inv[ch] for ch in token)
        self.table = table


class IncrementalDecoder(Protocol):
    def push(self, token_id: int) -> str:
        """Feed one (non-special) token; return the text it completes ("" while a character is incomplete)."""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end): replacement characters, or ""."""


class ByteLevelDecoder:
    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece = self.table[token_id] if token_id < len(self.table) else b""
        return str(self.utf8.decode(piece))

    def flush(self) -> str:
        return str(self.utf8.decode(b"", final=True))


class OffsetDecoder:
    """TGI's decode_token for tokenizers without a byte table. The window starts a few prompt tokens back so that
    the first generated token gets its leading space / merged characters right."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


def make_decoder(tokenizer: PreTrainedTokenizerBase, table: TokenBytes, prompt_ids: list[int]) -> IncrementalDecoder:
    if table.table is not None:
        return ByteLevelDecoder(table.table)
    return OffsetDecoder(tokenizer, prompt_ids)


def token_text(tokenizer: PreTrainedTokenizerBase, table: TokenBytes, token_id: int) -> str:
    """One token's own text, alone (prefill details, special tokens); bytes of a partial character show as U+FFFD."""
    if table.table is not None and token_id < len(table.table):
        return table.table[token_id].decode("utf-8", errors="replace")
    return str(tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))
