"""API keys never leave the process: every text mpr prints or stores passes through `redact`.

A key is registered when it is read from its environment variable (`read_key`); `redact` replaces every
registered key, anything shaped like an OpenAI key, and the userinfo of a URL by one fixed marker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any

MARKER = "[REDACTED]"
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}")  # OpenAI-style keys; shorter "sk-..." words are text
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s]+@")
_MIN_SECRET = (
    8  # shorter values ("EMPTY", "none": placeholders local servers accept) would redact ordinary words
)
_secrets: set[str] = set()


def register(secret: str | None) -> None:
    if secret and len(secret) >= _MIN_SECRET:
        _secrets.add(secret)


def read_key(env: str) -> str:
    """The API key in `$env` ("" when unset), registered for redaction."""
    key = os.environ.get(env) or ""
    register(key)
    return key


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MARKER)
    text = _KEY_LIKE.sub(MARKER, text)
    return _USERINFO.sub(rf"\1{MARKER}@", text)


def redact_json(payload: Any) -> Any:
    """`payload` (JSON-like) with every string redacted."""
    return json.loads(redact(json.dumps(payload, default=str)))


_logging_redacted = False


def redact_logging() -> None:
    """Every log record's message passes through `redact` (installed once per process)."""
    global _logging_redacted
    if _logging_redacted:
        return
    _logging_redacted = True
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        with contextlib.suppress(
            Exception
        ):  # a record that cannot be formatted is left to logging's own report
            record.msg, record.args = redact(record.getMessage()), ()
        return record

    logging.setLogRecordFactory(factory)


def has_userinfo(url: str) -> bool:
    return bool(_USERINFO.match(url.strip()))


USERINFO_HINT = (
    "holds a user:key@ part; put the key in the environment variable named by --api-key-env "
    "(default OPENAI_API_KEY) instead"
)


def refuse_userinfo(urls: list[str]) -> list[str]:
    """A pydantic validator of base URLs: one with a user:key@ part is refused."""
    if any(has_userinfo(u) for u in urls):
        raise ValueError(USERINFO_HINT)
    return urls
