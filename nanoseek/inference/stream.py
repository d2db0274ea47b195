"""Streaming text pieces shared by the HTTP server and the chat CLI.

  TextStream         incremental detokenisation. Decoding the newest ids alone can end inside a
                     UTF-8 character (byte-level BPE splits characters across tokens), which decodes
                     to U+FFFD; text is released only when it does not end in U+FFFD. Stop strings:
                     text from the first stop string on is never released, and a tail that could be
                     the start of a stop string is held back until it is decided. When the sequence
                     finishes, the rest of `LLM.to_output`'s text is released, so the streamed pieces
                     always add up to exactly the non-streamed text.
  ReasoningSplitter  DeepSeek's `reasoning_content`: text inside <think>...</think> is reasoning, the
                     rest is content. Only a <think> that opens the reply counts (a later one is just
                     text), and the whitespace opening each section is dropped. It starts inside the
                     reasoning when the prompt already opened it (the R1 template ends with
                     "<think>\\n"), and holds back a tail that could be the start of a tag, so a tag
                     split across chunks is still recognised.
"""
from __future__ import annotations

from ..tokenizer import THINK, THINK_END


def held_tail(text: str, word: str) -> int:
    """Length of the longest proper prefix of `word` that `text` ends with (0 if none)."""
    return max((k for k in range(1, len(word)) if text.endswith(word[:k])), default=0)


class TextStream:
    """Turns a growing list of token ids into newly released text (see the module docstring)."""

    def __init__(self, decode, stop: list[str] = ()):
        self.decode, self.stop = decode, list(stop)
        self.text = ""                       # decoded text of ids[:read_offset]
        self.sent = 0                        # characters released so far
        self.prefix_offset = self.read_offset = 0

    def update(self, ids: list[int]) -> str:
        # decode a short window [prefix_offset:] rather than all ids, so a step costs O(1), not O(len)
        prefix = self.decode(ids[self.prefix_offset:self.read_offset])
        new = self.decode(ids[self.prefix_offset:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        cuts = [self.text.find(s) for s in self.stop if s in self.text]
        end = min(cuts) if cuts else len(self.text) - max((held_tail(self.text, s) for s in self.stop), default=0)
        return self.finish(self.text[:end])

    def finish(self, final_text: str) -> str:
        """Release what `final_text` (the full, authoritative text) has beyond the released part."""
        delta = final_text[self.sent:]
        self.sent = max(self.sent, len(final_text))
        return delta


class ReasoningSplitter:
    """Feeds text chunks, returns (reasoning, content) pieces; states before -> reasoning -> after."""

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "before"
        self.saw_reasoning = in_reasoning
        self.buf = ""
        self.lstrip = in_reasoning           # drop the whitespace that opens a section

    def _take(self, k: int) -> str:
        piece, self.buf = self.buf[:k], self.buf[k:]
        if self.lstrip:
            piece = piece.lstrip()
            self.lstrip = not piece
        return piece

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        while self.buf:
            if self.state == "before":       # only a <think> that opens the answer starts reasoning
                head = self.buf.lstrip()
                if head.startswith(THINK):
                    self.buf = head[len(THINK):]
                    self.state, self.saw_reasoning, self.lstrip = "reasoning", True, True
                    continue
                if THINK.startswith(head) and not final:
                    break                    # could still become <think>: wait for more text
                self.state = "after"
            elif self.state == "reasoning":
                i = self.buf.find(THINK_END)
                if i < 0:
                    reasoning += self._take(len(self.buf) - (0 if final else held_tail(self.buf, THINK_END)))
                    break
                reasoning += self._take(i)
                self.buf = self.buf[len(THINK_END):]
                self.state, self.lstrip = "after", True
            else:
                content += self._take(len(self.buf))
        return reasoning, content

    def split(self, text: str) -> tuple[str, str]:
        """Non-streaming: the whole text at once."""
        return self.feed(text, final=True)
