"""Chat requests to OpenAI-compatible servers (vLLM, SGLang, OpenAI).

Two HTTP paths, the same requests and the same error handling:

- `aiohttp` (the default): one `aiohttp.ClientSession` POSTs the JSON body to `{base_url}/chat/completions`
  with the headers an OpenAI client sends (bearer key, JSON content type). vLLM's own serving benchmark
  talks to the server the same way.
- `openai`: the official `openai` client, through `AsyncOpenAI.post("/chat/completions", cast_to=bytes)`,
  its documented raw-request call (it skips the typed `chat.completions.create()` transformation). Its
  request machinery still costs several times the CPU of the aiohttp path per request (measured by
  bench/bench_llm_client.py), which caps pointwise judging on a small client machine; it is there for
  servers or proxies that only the SDK's defaults get along with.

Retries are ours on both paths (the SDK's own are off, `max_retries=0`): the SDK retries the same URL at most
twice with at most 8 s of backoff, while a long batch needs a retry that may move to another base URL, a 429's
Retry-After that pauses that server for every in-flight request (not only the one that got it), and attempt
counts in the results. Retried: 408/409/429/5xx, timeouts, dropped connections, unparseable bodies;
Retry-After and Retry-After-Ms are honoured (capped at `max_retry_after_s`, 120 s like the SDK) by pausing
that server, otherwise the request backs off exponentially with jitter. An answer that fails validation is
asked again (it never reaches the cache): the model is shown its answer and what was wrong with it (`reask`),
sampled rather than greedy, and given twice the token limit when the answer was cut at `max_tokens`
(`_retry_sampling`). The cache keeps the answer under the original request.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.identity import RUNTIME
from pipeline.errors import MprError
from pipeline.llm.base import ChatBackend, RunContext, WorkItem
from pipeline.llm.cache import ResultCache
from pipeline.llm.types import ChatRequest, ChatResult, TokenLogprob
from pipeline.redact import read_key, redact

log = logging.getLogger("mpr.llm")

Transport = Literal["aiohttp", "openai"]
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy"})


@dataclass
class _Server:
    url: str
    schema_level: int = 2  # 2: the request's JSON schema; 1: its core (`core_schema`); 0: no response_format
    in_flight: int = 0
    sent: int = 0
    blocked_until: float = 0.0
    fail_streak: int = 0


@dataclass
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class _NoReply(Exception):
    """No HTTP answer: the connection failed, or no answer came within the timeout."""

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.message, self.timed_out = message, timed_out


@dataclass
class _Outcome:
    result: ChatResult | None = None
    error: str = ""
    retryable: bool = True
    retry_after: float | None = None
    schema_refused: bool = False


class _Fatal(Exception):
    """A failure that will hit every request the same way (bad key, unknown model)."""


class ClientOptions(BaseModel):
    """How mpr talks to a model server: part of every LLM stage's config, and the client's defaults."""

    model_config = ConfigDict(extra="forbid")

    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Environment variable holding the API key (never written anywhere).",
        json_schema_extra=RUNTIME,
    )
    concurrency: int = Field(64, ge=1, description="Requests in flight.", json_schema_extra=RUNTIME)
    http_client: Transport = Field(
        "aiohttp",
        description="HTTP path to OpenAI-compatible servers: aiohttp (fast), or the official openai client "
        "(4-8x the client CPU per request).",
        json_schema_extra=RUNTIME,
    )
    timeout: float = Field(
        300.0, gt=0, description="Seconds per request before it is retried.", json_schema_extra=RUNTIME
    )
    max_attempts: int = Field(
        6,
        ge=1,
        description="Attempts per request (429, 5xx, timeouts) before it is recorded as failed.",
        json_schema_extra=RUNTIME,
    )
    max_invalid_retries: int = Field(
        2,
        ge=0,
        description=(
            "Times an answer that does not parse or validate is asked again before it is recorded as failed."
        ),
        json_schema_extra=RUNTIME,
    )


#: The client's defaults, for callers that build one without a stage config.
CLIENT_DEFAULTS = ClientOptions()


class OpenAIBackend(ChatBackend):
    """Chat completions from one or more OpenAI-compatible base URLs sharing the load (least in flight).

    `concurrency` requests in flight at most; `timeout_s` per request; `max_attempts` HTTP attempts per
    request on retryable failures; `max_invalid_retries` extra asks after an answer that fails validation.
    The API key is read from `$api_key_env` at each run and never stored on the backend; `extra_body` is
    merged into every request body (e.g. `{"chat_template_kwargs": {"enable_thinking": False}}` for Qwen3
    on vLLM/SGLang).
    """

    kind = "openai"

    def __init__(
        self,
        model: str,
        base_urls: str | Sequence[str],
        *,
        cache: ResultCache | str | Path | None = None,
        api_key_env: str = CLIENT_DEFAULTS.api_key_env,
        concurrency: int = CLIENT_DEFAULTS.concurrency,
        timeout_s: float = CLIENT_DEFAULTS.timeout,
        connect_timeout_s: float = 10.0,
        max_attempts: int = CLIENT_DEFAULTS.max_attempts,
        max_invalid_retries: int = CLIENT_DEFAULTS.max_invalid_retries,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        strict_schema: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        transport: Transport = CLIENT_DEFAULTS.http_client,
    ):
        super().__init__(model, cache=cache, max_invalid_retries=max_invalid_retries)
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise MprError("no base URL given for the OpenAI-compatible backend")
        self.servers = [_Server(u.rstrip("/")) for u in urls]
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.strict_schema = strict_schema
        self.extra_body = dict(extra_body or {})
        self.transport = transport

    @property
    def cache_scope(self) -> str:
        """The base URLs, in any order: servers behind one list serve one model; another address is another
        server."""
        return "openai:" + ",".join(sorted({s.url.lower() for s in self.servers}))

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_urls={[s.url for s in self.servers]!r})"

    # -- the run ---------------------------------------------------------------------------------------
    async def _generate(self, todo: list[WorkItem], ctx: RunContext) -> None:
        secret = read_key(self.api_key_env)
        make = _OpenAIPoster if self.transport == "openai" else _AiohttpPoster
        poster = make(
            [s.url for s in self.servers], self.concurrency, self.timeout_s, self.connect_timeout_s, secret
        )
        pending = iter(todo)

        async def worker() -> None:
            for item in pending:
                await self._answer(item, ctx, poster, secret)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(todo)))]
        try:
            await asyncio.gather(*tasks)
        except _Fatal as e:
            raise MprError(str(e)) from None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await poster.aclose()

    async def _answer(self, item: WorkItem, ctx: RunContext, poster: _Poster, secret: str) -> None:
        """Ask until the answer validates, a retry budget is spent, or the error is not worth retrying."""
        stats = ctx.stats
        asked = [{"role": m.role, "content": m.content} for m in item.request.messages]
        messages = asked
        attempts = failures = invalid = 0
        overrides: dict[str, Any] = {}  # after an invalid answer: sample, and give a cut answer more room
        last: _Server | None = None
        refused_by: _Server | None = None  # the server that answered HTTP 400 to this request's schema
        below = 0  # after a refusal at level L: L, so the next try asks with less (whatever others learnt)
        while True:
            server = refused_by or await self._pick(last if failures else None)
            level = server.schema_level if item.request.json_schema is not None else 0
            if refused_by is not None:
                level = max(0, min(level, below - 1))
            attempts += 1
            if attempts > 1:
                stats.retries += 1
            stats.sent += 1
            stats.per_server[server.url] = stats.per_server.get(server.url, 0) + 1
            out = await self._attempt(server, poster, item, messages, level, secret, overrides)
            last = server
            if out.schema_refused:
                refused_by, below = server, level
                continue
            if out.result is not None:
                result = out.result
                if refused_by is not None and server.schema_level > level:
                    server.schema_level = level
                    log.warning(
                        "%s rejects the JSON schema; %s",
                        server.url,
                        "sending its core (no length, count or uniqueness keywords)"
                        if level
                        else "parsing JSON answers leniently instead",
                    )
                refused_by = None
                result.attempts = attempts
                problem = ctx.check(item, result)
                if problem is None:
                    await ctx.finish(item, result)
                    return
                invalid += 1
                stats.invalid += 1
                if invalid > self.max_invalid_retries:
                    result.error = f"invalid answer after {attempts} attempts: {problem}"
                    result.parsed = None
                    await ctx.finish(item, result)
                    return
                overrides.update(_retry_sampling(item.request, invalid, result.finish_reason))
                messages = reask(asked, result.content or "", problem)
                continue
            refused_by = None
            failures += 1
            log.debug("request %s attempt %d on %s: %s", item.key[:12], attempts, server.url, out.error)
            if not out.retryable or failures >= self.max_attempts:
                error = out.error if not out.retryable else f"gave up after {attempts} attempts: {out.error}"
                await ctx.finish(item, ChatResult(key=item.key, error=error, attempts=attempts))
                return
            if out.retry_after is not None and out.retry_after > 0:
                pause = min(out.retry_after, self.max_retry_after_s)
                server.blocked_until = max(server.blocked_until, time.monotonic() + pause)
            else:
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _attempt(
        self,
        server: _Server,
        poster: _Poster,
        item: WorkItem,
        messages: list[dict[str, str]],
        schema_level: int,
        secret: str,
        overrides: Mapping[str, Any] | None = None,
    ) -> _Outcome:
        """One HTTP request, its failure classified."""
        body = {**self._body(item.request, messages, schema_level), **(overrides or {})}
        server.sent += 1
        server.in_flight += 1
        try:
            reply = await poster.post(server.url, body)
        except _NoReply as e:
            server.fail_streak += 1
            if server.fail_streak >= 3 and len(self.servers) > 1:
                # Steer traffic away from a server that keeps failing; a success resets the streak.
                pause = min(5.0, 0.1 * 2 ** (server.fail_streak - 3))
                server.blocked_until = max(server.blocked_until, time.monotonic() + pause)
            if e.timed_out:
                return _Outcome(error=f"timed out after {self.timeout_s:g}s")
            return _Outcome(error=redact(e.message))
        finally:
            server.in_flight -= 1
        status = reply.status
        if status >= 400:
            message = redact(_status_message(reply.body))
            if status == 400 and schema_level:
                log.debug("%s: HTTP 400 with response_format; retrying with less of the schema", server.url)
                return _Outcome(schema_refused=True)
            if status in (401, 403):
                raise _Fatal(
                    f"{server.url} refused the API key from ${self.api_key_env} (HTTP {status}): {message}"
                )
            if status == 404:
                raise _Fatal(
                    f"{server.url}: HTTP 404 for model {item.request.model!r}: {message} "
                    f"(GET {server.url}/models lists the models it serves)"
                )
            retryable = status in (408, 409, 429) or status >= 500
            return _Outcome(
                error=f"HTTP {status}: {message}",
                retryable=retryable,
                retry_after=_retry_after(reply.headers),
            )
        try:
            result = _parse(item.key, reply.body)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return _Outcome(error=redact(f"malformed response: {type(e).__name__}: {e}"[:300]))
        if result.content is not None:  # a server that echoes the key does not get it stored
            result.content = redact(result.content)
        server.fail_streak = 0
        return _Outcome(result=result)

    async def _pick(self, avoid: _Server | None) -> _Server:
        """The unblocked server with the fewest requests in flight (ties: the one sent the fewest)."""
        servers = self.servers
        while True:
            now = time.monotonic()
            if len(servers) == 1:
                wait = servers[0].blocked_until - now
                if wait <= 0:
                    return servers[0]
            else:
                ready = [s for s in servers if s.blocked_until <= now]
                if len(ready) > 1 and avoid in ready:
                    ready.remove(avoid)
                if ready:
                    return min(ready, key=lambda s: (s.in_flight, s.sent))
                wait = min(s.blocked_until for s in servers) - now
            await asyncio.sleep(wait)

    def _body(self, req: ChatRequest, messages: list[dict[str, str]], schema_level: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": req.model,
            "messages": messages,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = req.stop
        if req.logprobs:
            body["logprobs"] = True
            if req.top_logprobs:
                body["top_logprobs"] = req.top_logprobs
        if schema_level and req.json_schema is not None:
            schema = req.json_schema if schema_level >= 2 else core_schema(req.json_schema)
            spec: dict[str, Any] = {"name": req.schema_name, "schema": schema}
            if self.strict_schema:
                spec["strict"] = True
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        if self.extra_body:
            body.update(self.extra_body)
        return body


class _Poster(Protocol):
    async def post(self, url: str, body: dict[str, Any]) -> _Reply: ...

    async def aclose(self) -> None: ...


class _AiohttpPoster:
    """POST /chat/completions with aiohttp: one session, at most `concurrency` connections."""

    def __init__(
        self, urls: list[str], concurrency: int, timeout_s: float, connect_timeout_s: float, secret: str
    ):
        import aiohttp

        from pipeline import __version__

        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"mpr/{__version__}",
        }
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(concurrency, 1)),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s),
            # HTTP(S)_PROXY and NO_PROXY as the openai client honours them; the look-up runs in a thread per
            # request, so only when a proxy is set.
            trust_env=any(name.lower() in _PROXY_VARIABLES for name in os.environ),
        )

    async def post(self, url: str, body: dict[str, Any]) -> _Reply:
        import aiohttp

        try:
            async with self.session.post(f"{url}/chat/completions", data=json.dumps(body).encode()) as resp:
                return _Reply(resp.status, resp.headers, await resp.read())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise _NoReply(f"connection failed: {type(e).__name__}: {e}"[:200]) from None
        except asyncio.TimeoutError:
            raise _NoReply("timed out", timed_out=True) from None
        except aiohttp.ClientError as e:  # the server dropped the connection or sent a broken response
            raise _NoReply(f"connection failed: {type(e).__name__}: {e}"[:200]) from None

    async def aclose(self) -> None:
        await self.session.close()


class _OpenAIPoster:
    """POST /chat/completions through the official openai client (its raw-request call)."""

    def __init__(
        self, urls: list[str], concurrency: int, timeout_s: float, connect_timeout_s: float, secret: str
    ):
        import openai

        try:
            hx = importlib.import_module("httpx2")  # the transport of openai >= 3
        except ImportError:
            hx = importlib.import_module("httpx")

        limits = hx.Limits(max_connections=max(concurrency, 1), max_keepalive_connections=max(concurrency, 1))
        self.http_client = openai.DefaultAsyncHttpxClient(limits=limits)
        timeout = openai.Timeout(timeout_s, connect=connect_timeout_s)
        self.clients = {
            url: openai.AsyncOpenAI(
                base_url=url,
                api_key=secret or "EMPTY",
                max_retries=0,
                timeout=timeout,
                http_client=self.http_client,
            )
            for url in urls
        }

    async def post(self, url: str, body: dict[str, Any]) -> _Reply:
        import openai

        try:
            return _Reply(
                200, {}, await self.clients[url].post("/chat/completions", cast_to=bytes, body=body)
            )
        except openai.APIStatusError as e:
            detail = e.body if e.body is not None else e.message
            return _Reply(e.status_code, e.response.headers, json.dumps(detail).encode())
        except openai.APIConnectionError as e:  # APITimeoutError included
            if (
                isinstance(e, openai.APITimeoutError)
                and "Connect" not in type(e.__cause__ or e.__context__).__name__
            ):
                raise _NoReply("timed out", timed_out=True) from None
            raise _NoReply(f"connection failed: {_cause(e)}") from None

    async def aclose(self) -> None:
        await self.http_client.aclose()


def _parse(key: str, raw: bytes) -> ChatResult:
    data = json.loads(raw)
    choice = data["choices"][0]
    message = choice.get("message") or {}
    logprobs = None
    lp = (choice.get("logprobs") or {}).get("content")
    if lp:
        logprobs = [
            TokenLogprob(
                token=t["token"],
                logprob=t["logprob"],
                top=[(a["token"], a["logprob"]) for a in t.get("top_logprobs") or ()],
            )
            for t in lp
        ]
    usage = data.get("usage") or {}
    return ChatResult(
        key=key,
        content=message.get("content"),
        finish_reason=choice.get("finish_reason"),
        logprobs=logprobs,
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
    )


RETRY_TEMPERATURE = 0.7
# What a JSON-schema grammar is most often without (OpenAI's strict mode, some xgrammar and llama.cpp
# versions).
EXTRA_KEYWORDS = frozenset(
    {"uniqueItems", "minLength", "maxLength", "minItems", "maxItems", "pattern", "format"}
)


def core_schema(schema: Any) -> Any:
    """The schema without `EXTRA_KEYWORDS`: types, properties, required and enums only (the answer's validator
    still checks everything)."""
    if isinstance(schema, dict):
        return {k: core_schema(v) for k, v in schema.items() if k not in EXTRA_KEYWORDS}
    if isinstance(schema, list):
        return [core_schema(v) for v in schema]
    return schema


def reask(messages: list[dict[str, str]], answer: str, problem: str) -> list[dict[str, str]]:
    """The conversation asked again after an invalid answer: the answer (cut to 2,000 characters) and what
    was wrong with it, so the model can correct it rather than guess again (as `instructor` re-asks)."""
    return [
        *messages,
        {"role": "assistant", "content": answer[:2000]},
        {
            "role": "user",
            "content": f"That answer was not accepted: {problem.removeprefix('ValueError: ')}. "
            "Answer the same request again, correctly, with JSON only.",
        },
    ]


def _retry_sampling(req: ChatRequest, invalid: int, finish_reason: str | None) -> dict[str, Any]:
    """How the next ask after an invalid answer differs: a greedy (temperature 0) model gives the same invalid
    answer again, so it samples (`RETRY_TEMPERATURE`, a new seed each time); an answer cut at `max_tokens`
    gets twice the request's limit."""
    out: dict[str, Any] = {
        "temperature": max(req.temperature, RETRY_TEMPERATURE),
        "seed": (req.seed or 0) + invalid,
    }
    if finish_reason == "length" and req.max_tokens is not None:
        out["max_tokens"] = 2 * req.max_tokens  # once: a model that rambles past twice the limit rambles on
    return out


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from Retry-After-Ms / Retry-After (seconds or an HTTP date), as the openai SDK reads them."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
            return seconds if math.isfinite(seconds) else None
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        parsed = email.utils.parsedate_tz(value)
        if parsed is not None:
            return email.utils.mktime_tz(parsed) - time.time()
    return None


def _status_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:300]
    inner = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return inner["message"][:300]
    return (inner if isinstance(inner, str) else body.decode("utf-8", "replace"))[:300]


def _cause(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return f"{type(cause).__name__}: {cause}"[:200] if cause is not None else type(e).__name__
