"""LLM client layer: chat requests to OpenAI-compatible servers or in-process vLLM, with an answer cache.

spec = resolve_backend("auto", base_urls, "Qwen2.5-7B")
with spec.create(cache="runs/x/llm-cache.sqlite") as llm:
    results = llm.run_sync(
        [ChatRequest(messages=[...], json_schema=schema)], validate=parse, progress="relabel"
    )
"""

from __future__ import annotations

from pipeline.llm.base import ChatBackend, RunContext, WorkItem
from pipeline.llm.cache import ResultCache
from pipeline.llm.client import OpenAIBackend
from pipeline.llm.jsonparse import parse_json
from pipeline.llm.models import BackendSpec, TokenCounter, resolve_backend, resolve_llm_alias
from pipeline.llm.types import ChatRequest, ChatResult, Message, RunStats, TokenLogprob

__all__ = [
    "BackendSpec",
    "ChatBackend",
    "ChatRequest",
    "ChatResult",
    "Message",
    "OpenAIBackend",
    "ResultCache",
    "RunContext",
    "RunStats",
    "TokenCounter",
    "TokenLogprob",
    "WorkItem",
    "parse_json",
    "resolve_backend",
    "resolve_llm_alias",
]
