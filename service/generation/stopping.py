"""When a request stops, and the text it has produced so far.

Finish reasons are TGI's: "eos_token", "stop_sequence", "length". When several hold for the same token, the
first in that order wins (the most specific reason; TGI itself checks length first).

Stop sequences are matched on the decoded text, anywhere in it: a stop sequence may end inside a token (" foo.\n"
holds "."), which TGI's match-at-the-end misses. Like TGI, generated_text *keeps* the stop sequence; text a token
carried past the end of the stop sequence is cut, from generated_text and from that token's streamed text alike,
so the streamed pieces always concatenate to generated_text.
"""

from __future__ import annotations

from dataclasses import dataclass

LENGTH = "length"
EOS_TOKEN = "eos_token"
STOP_SEQUENCE = "stop_sequence"


@dataclass
class Verdict:
    text: str                   # this token's text, cut at the end of a stop sequence
    finish_reason: str | None   # None: keep going


class StopChecker:
    """Tracks one request's generated text and decides, token by token, whether it is finished."""

    def __init__(self, stop: list[str], max_new_tokens: int, eos_token_id: int | None) -> None:
        self.stop = [s for s in stop if s]
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.generated = 0

    def update(self, token_id: int, piece: str, special: bool) -> Verdict:
        """Record one generated token and its (incrementally decoded) text piece.
        Special tokens' text is never part of generated_text nor searched for stop sequences."""
        self.generated += 1
        if self.eos_token_id is not None and token_id == self.eos_token_id:
            return Verdict(piece, EOS_TOKEN)
        if not special and piece:
            before = len(self.text)
            self.text += piece
            if self.stop:
                # Search only where a match could newly end: the new piece plus the tail a stop could start in.
                start = max(0, before - self.longest + 1)
                ends = [i + len(s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
                if ends:
                    end = min(ends)  # the first stop sequence to complete ends the text
                    self.text = self.text[:end]
                    return Verdict(self.text[before:], STOP_SEQUENCE)
        if self.generated >= self.max_new_tokens:
            return Verdict(piece, LENGTH)
        return Verdict(piece, None)

    def finish_text(self, tail: str) -> str:
        """Append text the decoder still held back at the end (an incomplete character) and return the final
        generated_text."""
        self.text += tail
        return self.text
