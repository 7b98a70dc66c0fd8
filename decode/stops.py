"""Stop strings: a row ends when its decoded text contains one, however the tokenizer split it.

Only the generated text is searched (a stop string that the prompt's end and the output's start
would make together does not count). Checked on the host between chunks of the jitted loop (a row
that stops is marked done on the device, so it stops costing steps). Each row's whole text is
decoded again at each check, so a stop string spanning several tokens, or split differently than it
was written, is found all the same. The text a caller sees ends before the stop string; while a row
runs, any tail of its text that could still become a stop string (with the next tokens) is held
back, so a stream never shows text that a stop string later removes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class _Row:
    text_shown: int = 0  # characters of the text already handed out
    checked: int = 0  # tokens already searched up to (a stop string ends after them)
    cut: int | None = None  # tokens kept when the row stopped on a stop string
    text: str = ""  # the final text (up to the stop string) once stopped


class StopStrings:
    """Per-row stop-string bookkeeping for one batch. ``tokenizer.decode(ids) -> str``."""

    def __init__(self, tokenizer, stops: Sequence[str], batch: int):
        if isinstance(stops, str):
            stops = [stops]
        stops = list(stops)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(
                    f"stop string {s!r} is empty or not text; give non-empty strings, e.g. stop=['\\n\\n']"
                )
        if stops and (tokenizer is None or not hasattr(tokenizer, "decode")):
            raise ValueError(
                "stop strings need the tokenizer to read the text: pass tokenizer=... (with a decode method)"
            )
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.rows = [_Row() for _ in range(batch)]

    def _find(self, text: str, start: int) -> int:
        """Where the first stop string in ``text[start:]`` begins, or -1."""
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def check(self, i: int, ids: np.ndarray) -> bool:
        """Row i has emitted ``ids`` so far: True when a stop string is complete (the row then ends)."""
        row = self.rows[i]
        if row.cut is not None or not self.stops:
            return row.cut is not None
        decode = self.tokenizer.decode
        text = decode([int(t) for t in ids])
        # Only text a new token could have completed: the last longest-1 characters before it and after
        # (and 3 more: up to 3 U+FFFD of an unfinished character may have become one character).
        start = max(0, len(decode([int(t) for t in ids[: row.checked]])) - self.longest + 1 - 3)
        if self._find(text, start) < 0:
            row.checked = len(ids)
            return False
        for n in range(row.checked + 1, len(ids) + 1):  # the first token count whose text holds one
            prefix = decode([int(t) for t in ids[:n]])
            at = self._find(prefix, start)
            if at >= 0:
                row.cut, row.text = n, prefix[:at]
                return True
        raise AssertionError("a stop string in the text but in no prefix of it")  # decode is not prefix-monotone

    def visible(self, i: int, ids: np.ndarray, final: bool = False) -> str:
        """Row i's text that may be shown now: up to a stop string, else all but a tail that could
        still turn into one (and an incomplete UTF-8 character), or everything when ``final``."""
        row = self.rows[i]
        if row.cut is not None:
            return row.text
        text = self.tokenizer.decode([int(t) for t in ids])
        if final:
            return text
        # An unfinished UTF-8 character at the end decodes as one U+FFFD (Python, byte-level BPE) or as
        # one per byte (SentencePiece's byte fallback), and has at most 3 bytes: only the last 3 U+FFFD
        # can still change. Earlier ones are bytes no later token can complete: shown now, as the
        # final text will show them.
        trail = len(text) - len(text.rstrip("\ufffd"))
        end = len(text) - min(trail, 3)
        hold = 0  # the longest tail that is the start of a stop string
        for s in self.stops:
            hold = max(hold, next((n for n in range(min(len(s) - 1, end), 0, -1) if text[end - n : end] == s[:n]), 0))
        end -= hold
        return text[:end]

    def delta(self, i: int, ids: np.ndarray, final: bool = False) -> str:
        """The new visible text of row i since the last call."""
        row = self.rows[i]
        text = self.visible(i, ids, final)
        out = text[row.text_shown :] if len(text) > row.text_shown else ""
        row.text_shown = max(row.text_shown, len(text))
        return out
