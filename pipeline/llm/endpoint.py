"""What an OpenAI-compatible endpoint supports, asked before a stage sends its work.

`probe_endpoint` finds out, with a handful of small requests:
- the server: llama.cpp (`GET /props`), vLLM (`max_model_len` in `GET /v1/models`), or another;
- its context window per request (llama.cpp: the slot's `n_ctx`; vLLM: `max_model_len`) and, for
  llama.cpp, its slots (requests decoded at once);
- a tokenizer: the served model's own, through `POST /tokenize` (llama.cpp and vLLM both have one),
  with the chat template's overhead measured from one answered request's `usage.prompt_tokens`;
- (llama.cpp and vLLM only: another API is sent no extra request) whether a `response_format` JSON
  schema is accepted and obeyed, and whether logprobs come back with top alternatives, and if those
  alternatives respect the schema (llama.cpp's are the distribution before the grammar constrains the
  token, so an expected grade must be normalised over the grade tokens alone, which `pipeline.llm.judge`
  does).

The stages use it to fit prompts into the context window (`ContextFit`), to keep llama.cpp's request
queue within the timeout, and record it in their manifest.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel

from pipeline.llm.jsonparse import parse_json
from pipeline.llm.models import TokenCounter
from pipeline.llm.types import Message

ServerKind = Literal["llama.cpp", "vllm", "other"]
_PROBE_SCHEMA = {
    "type": "object",
    "properties": {"grade": {"type": "integer", "enum": [0, 1, 2, 3]}},
    "required": ["grade"],
    "additionalProperties": False,
}
_PROBE_MESSAGES = [
    {"role": "system", "content": "You grade relevance from 0 to 3. Answer with JSON only."},
    {
        "role": "user",
        "content": "Query: boiling point of water. Passage: Water boils at 100 degrees Celsius at sea "
        'level. Answer with JSON: {"grade": 0, 1, 2 or 3}',
    },
]


class EndpointInfo(BaseModel):
    """What one endpoint supports (None: could not be told)."""

    url: str
    server: ServerKind = "other"
    context_length: int | None = None
    slots: int | None = None
    tokenizer: Literal["server", "estimate"] = "estimate"
    template_tokens: int | None = None  # prompt tokens of a chat beyond its messages' own tokens
    json_schema: bool | None = None
    logprobs: Literal["top", "sampled", "none"] | None = None
    logprobs_constrained: bool | None = None

    def line(self) -> str:
        """One line: what the stage will use."""
        parts: list[str] = [self.server if self.server != "other" else "OpenAI-compatible server"]
        parts.append(f"context {self.context_length:,} tokens" if self.context_length else "context unknown")
        if self.slots:
            parts.append(f"{self.slots} slot(s)")
        parts.append(
            "its own tokenizer (/tokenize)"
            if self.tokenizer == "server"
            else "tokens estimated at 4 chars/token"
        )
        parts.append(
            {
                True: "JSON schema enforced",
                False: "JSON schema refused or ignored: lenient parsing",
                None: "JSON schema not checked",
            }[self.json_schema]
        )
        parts.append(
            {
                "top": "logprobs with alternatives"
                + ("" if self.logprobs_constrained in (True, None) else " (before the schema's constraint)"),
                "sampled": "logprobs of the sampled tokens only",
                "none": "no logprobs",
                None: "logprobs not checked",
            }[self.logprobs]
        )
        return ", ".join(parts)


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _http(url: str, body: Mapping[str, Any] | None, key: str, timeout_s: float) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


class ServerTokenizer:
    """Token counts from the served model's tokenizer (`POST /tokenize`), cached per text."""

    def __init__(self, url: str, server: ServerKind, model: str, key: str = "", timeout_s: float = 30.0):
        self.endpoint = f"{_root(url)}/tokenize"
        self.server, self.model, self.key, self.timeout_s = server, model, key, timeout_s
        self.count = lru_cache(maxsize=65536)(self._count)

    def body(self, text: str) -> dict[str, Any]:
        if self.server == "llama.cpp":
            return {"content": text, "add_special": False}
        return {"model": self.model, "prompt": text, "add_special_tokens": False}

    def _count(self, text: str) -> int:
        status, data = _http(self.endpoint, self.body(text), self.key, self.timeout_s)
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise OSError(f"{self.endpoint}: HTTP {status or 'no answer'} while counting tokens")
        return len(data["tokens"])

    def works(self) -> bool:
        try:
            return self.count("hello world") > 0
        except OSError:
            return False


class ContextFit:
    """Prompt-token counts for one endpoint and the room a request's prompt has in its context window."""

    SAFETY = 8  # tokens kept free beyond the count: BOS and templates the count may miss

    def __init__(self, info: EndpointInfo, tokenizer: ServerTokenizer | None):
        self.info, self.tokenizer = info, tokenizer
        self.template_tokens = info.template_tokens if info.template_tokens is not None else 8
        self.count_text: Callable[[str], int] = (
            tokenizer.count if tokenizer is not None else TokenCounter().count
        )

    def count_messages(self, messages: Iterable[Message | Mapping[str, str]]) -> int:
        total = 0
        for m in messages:
            total += self.count_text(m.content if isinstance(m, Message) else m["content"])
        return total + self.template_tokens

    def room(self, max_tokens: int | None) -> int | None:
        """Prompt tokens a request with this completion limit may have; None when the context is unknown."""
        ctx = self.info.context_length
        return None if ctx is None else ctx - (max_tokens or 0) - self.SAFETY

    def completion_room(self, messages: Iterable[Message | Mapping[str, str]]) -> int | None:
        """Completion tokens the context leaves after these messages; None when the context is unknown."""
        return self.room(self.count_messages(messages))


def probe_endpoint(
    url: str, model: str, key: str = "", timeout_s: float = 60.0
) -> tuple[EndpointInfo, ContextFit]:
    """Ask `url` (a base URL ending in /v1) what it supports; see the module docstring."""
    info = EndpointInfo(url=url)
    status, props = _http(f"{_root(url)}/props", None, key, 10)
    if status == 200 and isinstance(props, dict) and "default_generation_settings" in props:
        info.server = "llama.cpp"
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        info.context_length = int(n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else None
        info.slots = props.get("total_slots") if isinstance(props.get("total_slots"), int) else None
    status, models = _http(f"{url.rstrip('/')}/models", None, key, 10)
    for entry in (models or {}).get("data", []) if isinstance(models, dict) else []:
        if isinstance(entry, dict) and isinstance(entry.get("max_model_len"), int):
            info.server = "vllm" if info.server == "other" else info.server
            info.context_length = info.context_length or entry["max_model_len"]
    tokenizer = ServerTokenizer(url, info.server, model, key) if info.server != "other" else None
    if tokenizer is not None and tokenizer.works():
        info.tokenizer = "server"
    else:
        tokenizer = None
    fit = ContextFit(info, tokenizer)
    if info.server == "other":  # an unknown (maybe paid) API is asked nothing more; its first answers tell
        return info, fit
    body = {
        "model": model,
        "messages": _PROBE_MESSAGES,
        "temperature": 0,
        "max_tokens": 16,
        "logprobs": True,
        "top_logprobs": 5,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "probe", "schema": _PROBE_SCHEMA, "strict": True},
        },
    }
    status, answer = _http(f"{url.rstrip('/')}/chat/completions", body, key, timeout_s)
    if status == 400:
        body.pop("response_format")
        status, answer = _http(f"{url.rstrip('/')}/chat/completions", body, key, timeout_s)
        info.json_schema = False
    if status == 200 and isinstance(answer, dict) and answer.get("choices"):
        choice = answer["choices"][0]
        if info.json_schema is None:
            info.json_schema = _obeys_schema((choice.get("message") or {}).get("content"))
        tokens = (choice.get("logprobs") or {}).get("content") or []
        if not tokens:
            info.logprobs = "none"
        elif any(t.get("top_logprobs") for t in tokens):
            info.logprobs = "top"
            first = tokens[0].get("top_logprobs") or []
            if info.json_schema:  # under the schema the answer opens with "{": does any alternative not?
                info.logprobs_constrained = all(a.get("token", "").lstrip().startswith("{") for a in first)
        else:
            info.logprobs = "sampled"
        used = (answer.get("usage") or {}).get("prompt_tokens")
        if isinstance(used, int) and tokenizer is not None:
            own = sum(tokenizer.count(m["content"]) for m in _PROBE_MESSAGES)
            info.template_tokens = max(0, used - own)
            fit.template_tokens = info.template_tokens
    return info, fit


def _obeys_schema(content: Any) -> bool:
    try:
        value = parse_json(content) if isinstance(content, str) else None
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"grade"} and value["grade"] in (0, 1, 2, 3)
