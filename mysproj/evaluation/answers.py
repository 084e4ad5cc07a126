"""Free-text LLaVA answer -> class label (docs/recipe.md#decisions-left-open-upstream; the released code has none).

Both sides are normalised the same way: lower case, quotes and punctuation to spaces, underscores to spaces,
whitespace collapsed. Then, in order:

1. exact: the whole answer is a class name;
2. contained: class names found in the answer on word boundaries; the longest wins (so "bell pepper leaf
   spot" beats "leaf spot" inside it); two different names of the same greatest length are ambiguous;
3. close: the best difflib ratio >= `close_match` between a class name and the whole answer or any run of
   the answer's words as long as the class name (a misspelling inside extra words still matches); a tie
   between different classes is ambiguous;
4. otherwise unparsed (`label=None`), which the metrics count as wrong and report.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower().replace("_", " ")).split())


@dataclass(frozen=True)
class Parsed:
    label: str | None   # one of the classes, or None when unparsed
    how: str            # exact | contained | close | unparsed


class AnswerParser:
    def __init__(self, classes: list[str], close_match: float = 0.8):
        self.close_match = close_match
        self.by_norm: dict[str, str] = {}
        for c in classes:
            key = normalise(c)
            if not key:
                raise ValueError(f"class name {c!r} is empty after normalisation")
            if key in self.by_norm and self.by_norm[key] != c:
                raise ValueError(f"class names {self.by_norm[key]!r} and {c!r} normalise to the same text {key!r}")
            self.by_norm[key] = c
        self._patterns = {key: re.compile(rf"(?<![0-9a-z]){re.escape(key)}(?![0-9a-z])") for key in self.by_norm}

    def __call__(self, answer: str) -> Parsed:
        text = normalise(answer)
        if not text:
            return Parsed(None, "unparsed")
        if text in self.by_norm:
            return Parsed(self.by_norm[text], "exact")
        found = [key for key, pat in self._patterns.items() if pat.search(text)]
        if found:
            longest = max(len(k) for k in found)
            best = [k for k in found if len(k) == longest]
            return Parsed(self.by_norm[best[0]], "contained") if len(best) == 1 else Parsed(None, "unparsed")
        return self._close(text)

    def _close(self, text: str) -> Parsed:
        words = text.split()
        scores: dict[str, float] = {}
        for key in self.by_norm:
            n = len(key.split())
            spans = {text} | {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 0))}
            scores[key] = max(difflib.SequenceMatcher(None, key, s).ratio() for s in spans)
        top = max(scores.values())
        if top < self.close_match:
            return Parsed(None, "unparsed")
        best = [k for k, v in scores.items() if v == top]
        return Parsed(self.by_norm[best[0]], "close") if len(best) == 1 else Parsed(None, "unparsed")
