"""What every backend shares: the cache in front, de-duplication, validation, delivery, statistics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from tqdm.auto import tqdm

from pipeline.llm.cache import ResultCache
from pipeline.llm.jsonparse import parse_json
from pipeline.llm.types import ChatRequest, ChatResult, RunStats

if TYPE_CHECKING:
    from pipeline.llm.endpoint import ContextFit, EndpointInfo

log = logging.getLogger("mpr.llm")

Validator: TypeAlias = Callable[[str], Any]
OnResult: TypeAlias = Callable[[int, ChatResult], "Awaitable[None] | None"]
RequestLike: TypeAlias = "ChatRequest | Mapping[str, Any]"

_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


@dataclass(slots=True)
class WorkItem:
    """One distinct request of a run and the positions in the caller's list that asked for it."""

    key: str
    request: ChatRequest
    indices: list[int] = field(default_factory=list)


def schema_shape_error(schema: Mapping[str, Any], value: Any) -> str | None:
    """A cheap check of the top level of `value` against `schema`: its type and required keys."""
    kind = schema.get("type")
    expected = _PY_TYPES.get(kind) if isinstance(kind, str) else None
    if expected is not None and (
        not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool))
    ):
        return f"expected a JSON {kind}, got {type(value).__name__}"
    if isinstance(value, dict):
        missing = [k for k in schema.get("required", ()) if k not in value]
        if missing:
            return f"missing required field(s) {', '.join(missing)}"
    return None


class RunContext:
    """Per-run state handed to a backend's `_generate`: validation and delivery of answers."""

    def __init__(
        self,
        backend: ChatBackend,
        n: int,
        validate: Validator | None,
        on_result: OnResult | None,
        progress: bool | str,
    ):
        self.backend = backend
        self.results: list[ChatResult | None] = [None] * n
        self.validate = validate
        self.on_result = on_result
        self.stats = RunStats(requests=n)
        self.pbar = (
            tqdm(
                total=n, desc=progress if isinstance(progress, str) else "llm", unit="req", dynamic_ncols=True
            )
            if progress
            else None
        )
        self._postfix_at = 0.0

    def check(self, item: WorkItem, result: ChatResult) -> str | None:
        """Validate an answer; on success set `result.parsed` and return None, else return the problem."""
        if result.content is None:
            return "the answer has no content"
        schema = item.request.json_schema
        try:
            if self.validate is not None:
                result.parsed = self.validate(result.content)
            elif schema is not None:
                value = parse_json(result.content)
                problem = schema_shape_error(schema, value)
                if problem:
                    raise ValueError(problem)
                result.parsed = value
        except Exception as e:
            return f"{type(e).__name__}: {e}"[:500]
        return None

    async def finish(self, item: WorkItem, result: ChatResult) -> None:
        """Record a final result: cache it when it is a new success, then hand it to the caller."""
        stats = self.stats
        cache = self.backend.cache
        if result.ok:
            if not result.cached:
                stats.answered += 1
                stats.first_try_valid += result.attempts <= 1
                if cache is not None:
                    cache.put(result, item.request.model, self.backend.cache_scope)
        else:
            stats.failures += len(item.indices)
            log.debug("request %s failed: %s", item.key[:12], result.error)
        if result.cached:
            stats.cache_hits += len(item.indices)
        else:
            stats.prompt_tokens += result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
        for n, idx in enumerate(item.indices):
            res = result if n == 0 else result.model_copy()
            self.results[idx] = res
            if self.on_result is not None:
                out = self.on_result(idx, res)
                if inspect.isawaitable(out):
                    await out
        if self.pbar is not None:
            self.pbar.update(len(item.indices))
            now = time.monotonic()
            if now - self._postfix_at > 1.0:
                self._postfix_at = now
                self.pbar.set_postfix(failed=stats.failures, retries=stats.retries, refresh=False)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.set_postfix(failed=self.stats.failures, retries=self.stats.retries, refresh=False)
            self.pbar.close()


class ChatBackend(ABC):
    """`run()` answers a list of chat requests, in order, consulting the cache first."""

    kind: ClassVar[str]

    def __init__(
        self,
        model: str,
        *,
        cache: ResultCache | str | Path | None = None,
        max_invalid_retries: int = 2,
    ):
        self.model = model
        self.cache = ResultCache(cache) if isinstance(cache, (str, Path)) else cache
        self.max_invalid_retries = max_invalid_retries
        self.last_stats = RunStats()
        self.stats = RunStats()
        self.endpoint: EndpointInfo | None = (
            None  # what the server supports, when it was asked (pipeline.llm.endpoint)
        )
        self.fit: ContextFit | None = None  # its context window and tokenizer, for fitting prompts

    @property
    def cache_scope(self) -> str:
        """Who answers, as the request cache keys it next to the request: answers of one server are never
        served for another that happens to serve the same model name."""
        return f"{getattr(self, 'kind', type(self).__name__)}:{self.model}"

    async def run(
        self,
        requests: Iterable[RequestLike],
        *,
        validate: Validator | None = None,
        on_result: OnResult | None = None,
        progress: bool | str = False,
        use_cache: bool = True,
    ) -> list[ChatResult]:
        """Answer every request; results come back in request order.

        `validate(content)` returns the parsed answer (stored in `ChatResult.parsed`) or raises; an answer
        that fails it is asked again (bypassing the cache) up to `max_invalid_retries` times, then returned
        with `error` set. Without `validate`, a request with a `json_schema` must parse as JSON of the
        schema's top-level shape. `on_result(index, result)` (sync or async) is called as each result is
        final, cache hits included; a result is in the cache before the callback sees it.
        """
        t0 = time.perf_counter()
        items: dict[str, WorkItem] = {}
        n = 0
        for n, raw in enumerate(requests, 1):
            req = raw if isinstance(raw, ChatRequest) else ChatRequest.model_validate(raw)
            req = req.with_model(self.model)
            key = req.key
            item = items.get(key)
            if item is None:
                items[key] = WorkItem(key, req, [n - 1])
            else:
                item.indices.append(n - 1)
        ctx = RunContext(self, n, validate, on_result, progress)
        ctx.stats.unique = len(items)
        try:
            hits = (
                self.cache.get_many(items, self.cache_scope) if self.cache is not None and use_cache else {}
            )
            todo = []
            for key, item in items.items():
                hit = hits.get(key)
                if hit is not None:
                    problem = ctx.check(item, hit)
                    if problem is None:
                        await ctx.finish(item, hit)
                        continue
                    log.debug("cached answer %s fails validation (%s); asking again", key[:12], problem)
                todo.append(item)
            if todo:
                await self._generate(todo, ctx)
        finally:
            ctx.close()
            ctx.stats.wall_s = time.perf_counter() - t0
            self.last_stats = ctx.stats
            self.stats.merge(ctx.stats)
        missing = [i for i, r in enumerate(ctx.results) if r is None]
        if missing:
            raise RuntimeError(f"internal error: {len(missing)} request(s) got no result")
        return ctx.results  # type: ignore[return-value]

    def run_sync(self, requests: Iterable[RequestLike], **kwargs: Any) -> list[ChatResult]:
        """`run()` from synchronous code (also from inside a running event loop, via a worker thread)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run(requests, **kwargs))
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.run(requests, **kwargs)).result()

    @abstractmethod
    async def _generate(self, todo: list[WorkItem], ctx: RunContext) -> None:
        """Answer every item, calling `ctx.finish` exactly once per item (answer or failure)."""

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> ChatBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
