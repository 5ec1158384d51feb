"""Incremental detokenization for streaming output, and stop strings in the streamed text.

Decoding one token at a time is wrong in two ways: a multi-byte UTF-8 character split over
several byte-level or byte-fallback tokens decodes to U+FFFD pieces, and SentencePiece drops
the leading space of the first token of any decoded span ("▁Hello" alone is "Hello"). So, as
vLLM and TGI do, we decode a small window of tokens twice and emit the difference:

    ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                 already emitted text     |  not yet emitted
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    emit new_text[len(prefix_text):] when it is longer and does not end in U+FFFD
    (a trailing U+FFFD means an incomplete UTF-8 sequence: wait for the next token).

The concatenation of everything emitted equals tokenizer.decode(context + ids) minus
tokenizer.decode(context) for the tokenizers we use (byte-level BPE, SentencePiece with byte
fallback), and never contains a U+FFFD that the full decode would not also contain.

At the end of a sequence, `finish()` gives the text still held back, minus an incomplete UTF-8
sequence at the very end (max_tokens stopped in the middle of an emoji or CJK character): those
bytes are dropped, as vLLM's detokenizer does, instead of ending the answer with U+FFFD. The chat
REPL, `LLM.generate` and the server all end a text with `finish()`.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into new printable text, one call per token.

    `context` are tokens before the streamed ones (e.g. the tail of the prompt); they only
    give the first streamed token its correct leading space and are never emitted.
    """

    def __init__(
        self, tokenizer, context: Sequence[int] = (), *, skip_special_tokens: bool = True, context_window: int = 5
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context)[-context_window:] if context_window > 0 else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became printable (possibly '')."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            # Slide the window: the tokens just emitted become the next prefix.
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def finish(self) -> str:
        """The last text of a finished sequence: what `add` still held back, without an incomplete UTF-8
        sequence at the end (its bytes are dropped; they would print as U+FFFD). Call once, when the sequence
        ends (EOS, stop, max_tokens); use this, not `flush`, to end an answer."""
        return self.flush().rstrip(REPLACEMENT_CHAR)

    def flush(self) -> str:
        """Text still held back, an incomplete UTF-8 tail included (it decodes as U+FFFD); see `finish`."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopStringChecker:
    """Cuts streamed text before the first stop string.

    Text that could still be the beginning of a stop string is held back until the next piece
    decides it; `feed` returns (text safe to print, stopped). After a stop nothing more is emitted.
    """

    def __init__(self, stop: Sequence[str] | None) -> None:
        self.stop = [s for s in (stop or ()) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return buf[: min(hits)], True
        hold = self._held_suffix(buf)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back tail at the end of generation (it never became a stop string)."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
