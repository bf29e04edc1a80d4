"""When a request stops, and the text it has produced so far.

Finish reasons are TGI's: "eos_token", "stop_sequence", "length". When several hold for the same token, the
first in that order wins (the most specific reason; TGI itself checks length first).

Stop sequences are matched on the decoded text, anywhere in it: a stop sequence may end inside a token (" foo.\n"
holds "."), which TGI's match-at-the-end misses. Text a token carried past the end of the stop sequence is cut.
Two conventions for the stop sequence itself:
- include_stop_sequence=True (TGI): generated_text keeps it; each event's text is its token's piece (cut at the end
  of the stop), special tokens' pieces are their own text.
- include_stop_sequence=False (OpenAI, vLLM's default): generated_text leaves it out. A streamed piece must never
  show the start of a stop sequence that later completes, so text that could still be one (a suffix of the text
  that is a prefix of a stop sequence) is held back until it cannot, and released by the event that shows it (the
  last one at the latest). Special tokens' pieces are "" (OpenAI never shows them), so even an EOS event can carry
  released text.
Either way, the texts of the events that count (non-special ones for TGI, all of them otherwise) concatenate to
generated_text.
"""

from __future__ import annotations

from dataclasses import dataclass

LENGTH = "length"
EOS_TOKEN = "eos_token"
STOP_SEQUENCE = "stop_sequence"


@dataclass
class Verdict:
    text: str                   # the text this event shows
    finish_reason: str | None   # None: keep going


class StopChecker:
    """Tracks one request's generated text and decides, token by token, whether it is finished."""

    def __init__(self, stop: list[str], max_new_tokens: int, eos_token_id: int | None,
                 include_stop_sequence: bool = True) -> None:
        self.stop = [s for s in stop if s]
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.include_stop = include_stop_sequence
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.shown = 0   # characters of text already handed out (include_stop_sequence=False)
        self.generated = 0

    def update(self, token_id: int, piece: str, special: bool) -> Verdict:
        """Record one generated token and its (incrementally decoded) text piece.
        Special tokens' text is never part of generated_text nor searched for stop sequences."""
        self.generated += 1
        if self.eos_token_id is not None and token_id == self.eos_token_id:
            return Verdict(piece if self.include_stop else self._release(len(self.text)), EOS_TOKEN)
        before = len(self.text)
        if not special and piece:
            self.text += piece
            if self.stop:
                # Search only where a match could newly end: the new piece plus the tail a stop could start in.
                start = max(0, before - self.longest + 1)
                found = [(i + len(s), i) for s in self.stop if (i := self.text.find(s, start)) >= 0]
                if found:
                    end, begin = min(found)   # the first stop sequence to complete ends the text
                    if self.include_stop:
                        self.text = self.text[:end]
                        return Verdict(self.text[before:], STOP_SEQUENCE)
                    self.text = self.text[:begin]
                    return Verdict(self._release(len(self.text)), STOP_SEQUENCE)
        finished = self.generated >= self.max_new_tokens
        if self.include_stop:
            return Verdict(piece, LENGTH if finished else None)
        return Verdict(self._release(len(self.text) if finished else self._safe_end()), LENGTH if finished else None)

    def _safe_end(self) -> int:
        """Where text stops being possibly the start of a stop sequence: before the longest suffix of the text that is
        a proper prefix of some stop sequence."""
        text = self.text
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return len(text) - k
        return len(text)

    def _release(self, upto: int) -> str:
        out = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return out

    def finish_text(self, tail: str) -> str:
        """Append text the decoder still held back at the end (an incomplete character, shown by the caller on the
        last event) and return the final generated_text."""
        self.text += tail
        self.shown = len(self.text)
        return self.text
