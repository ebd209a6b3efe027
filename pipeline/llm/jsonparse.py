"""Tolerant extraction of one JSON value from a model answer; it never repairs or guesses."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_DECODER = json.JSONDecoder()
_OPEN = re.compile(r"[{\[]")


def parse_json(text: str) -> Any:
    """The JSON value in `text`: the whole text, a fenced block, or the value opening at the first `{`/`[`.

    A reasoning block (`<think>...</think>`) and prose around the value are skipped. Only the outermost
    value is taken, so a truncated answer is an error, never one of its inner values. Raises ValueError.
    """
    s = text.strip()
    try:
        return json.loads(s)
    except ValueError:
        pass
    s = _THINK.sub("", s).strip()
    for block in _FENCE.findall(s):
        try:
            return json.loads(block.strip())
        except ValueError:
            continue
    m = _OPEN.search(s)
    if m is not None:
        try:
            return _DECODER.raw_decode(s, m.start())[0]
        except ValueError:
            pass
    snippet = text.strip().replace("\n", " ")
    raise ValueError(f"no complete JSON value in the answer: {snippet[:80]!r}")
