"""The simulated judge's OpenAI-compatible chat server, on aiohttp's web server, with fault injection.

    python -m mpr.simulated_judge --port 0 [--responder module:factory --responder-arg k=v ...]
        [--faults '{"p_500": 0.1, "seed": 1}'] [--model NAME ...]

It prints `READY http://HOST:PORT/v1 (mpr simulated judge)` on stdout once it listens. From Python:
`start_server(...)` runs it in a background thread (or a subprocess) and returns a `ServerHandle` with the
URL.

Endpoints: `POST /v1/chat/completions`, `GET /v1/models` (OpenAI schema); `GET /_stats[?keys=1]`,
`POST /_control` (JSON: fault settings to change, `"reset_stats": true`), `GET /health`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mpr.simulated_judge.responders import ResponderAnswer, default_responder, load_responder
from pipeline.errors import MprError

NAME = "mpr simulated judge"
_SERVER_HEADER = "mpr-simulated-judge"
_TOKEN = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^\sA-Za-z0-9_]|\s+")
_MAX_BODY = 64 * 1024 * 1024


class Faults(BaseModel):
    """Fault injection. Each `p_*` is a probability, drawn per request from (seed, request key, attempt no).

    delay_s: answer after this long (with probability p_delay); p_500; p_429 with a Retry-After of
    retry_after_s; p_drop: close the connection without an answer; p_bad_body: HTTP 200 whose body
    is not JSON; p_malformed: answer content that is broken JSON; p_truncate: answer cut in half with
    finish_reason "length"; faulty_attempts > 0: faults hit only each key's first N requests;
    reject_response_format: HTTP 400 for any response_format; reject_schema_keywords: HTTP 400 for a
    response_format whose JSON schema uses any of them (a grammar engine without, say, uniqueItems);
    require_api_key: HTTP 401 unless `Authorization: Bearer <it>`.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    delay_s: float = Field(default=0.0, ge=0)
    p_delay: float = Field(default=1.0, ge=0, le=1)
    p_500: float = Field(default=0.0, ge=0, le=1)
    p_429: float = Field(default=0.0, ge=0, le=1)
    retry_after_s: float = Field(default=1.0, ge=0)
    p_drop: float = Field(default=0.0, ge=0, le=1)
    p_bad_body: float = Field(default=0.0, ge=0, le=1)
    p_malformed: float = Field(default=0.0, ge=0, le=1)
    p_truncate: float = Field(default=0.0, ge=0, le=1)
    faulty_attempts: int = Field(default=0, ge=0)
    reject_response_format: bool = False
    reject_schema_keywords: list[str] = Field(default_factory=list)
    require_api_key: str | None = None


SAMPLING = frozenset({"temperature", "top_p", "seed", "max_tokens"})


def request_key(body: dict[str, Any]) -> str:
    """Hash of the question: the request body less its sampling parameters and any turns after the first
    answer, so a retry that samples, asks with a larger token limit or re-asks after showing the model its
    invalid answer is the same request asked again."""
    question = {k: v for k, v in body.items() if k not in SAMPLING}
    messages = question.get("messages")
    if isinstance(messages, list):
        first = next(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), None
        )
        question["messages"] = messages if first is None else messages[:first]
    return hashlib.sha256(json.dumps(question, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _keywords(value: Any) -> set[str]:
    """Every key used anywhere in a (response_format) JSON value."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keywords(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keywords(v)}
    return set()


def _draw(seed: int, key: str, attempt: int, name: str) -> float:
    h = hashlib.blake2b(f"{seed}|{key}|{attempt}|{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def json_response(status: int, data: bytes, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=data, content_type="application/json", headers=headers)


def json_error(
    status: int, message: str, kind: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return json_response(status, json.dumps(body).encode(), headers)


@dataclass(slots=True)
class _KeyStats:
    received: int = 0
    answered: int = 0
    label: str = ""


@dataclass
class _Stats:
    received: int = 0
    answered: int = 0
    dropped: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    status: dict[int, int] = field(default_factory=dict)
    keys: dict[str, _KeyStats] = field(default_factory=dict)

    def as_dict(self, with_keys: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "received": self.received,
            "answered": self.answered,
            "dropped": self.dropped,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "unique_keys": len(self.keys),
            "repeated_keys": sum(1 for k in self.keys.values() if k.received > 1),
            "max_answered_per_key": max((k.answered for k in self.keys.values()), default=0),
        }
        if with_keys:
            out["keys"] = {
                k: {"received": v.received, "answered": v.answered, "label": v.label}
                for k, v in self.keys.items()
            }
        return out


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """aiohttp's own errors (no such route, wrong method, body too large) in OpenAI's error format."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "NotFoundError" if e.status == 404 else "BadRequestError"
        return json_error(e.status, f"{request.method} {request.path}: {e.reason}", kind)


async def _announce(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = _SERVER_HEADER


class ChatServer:
    """The simulated judge's HTTP API: `app()` is the aiohttp application that serves it."""

    def __init__(
        self, responder: Any = None, faults: Faults | None = None, models: Sequence[str] = ("test-model",)
    ):
        self.responder = responder or default_responder()
        self.faults = faults or Faults()
        self.models = list(models)
        self.stats = _Stats()
        self._ids = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_openai_errors], client_max_size=_MAX_BODY)
        app.on_response_prepare.append(_announce)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/chat/completions", self.chat_completions),
                web.get("/v1/models", self.list_models),
                web.get("/models", self.list_models),
                web.get("/_stats", self.get_stats),
                web.post("/_control", self.post_control),
                web.get("/health", self.health),
            ]
        )
        return app

    # -- endpoints -----------------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            out = await self._chat(request.headers, body)
        except Exception as e:
            out = json_error(500, f"{type(e).__name__}: {e}", "InternalServerError")
        finally:
            stats.in_flight -= 1
        if isinstance(out, str):
            stats.dropped += 1
            if request.transport is not None:
                request.transport.close()
            # Never sent: aiohttp finds the transport closing and ends the connection quietly.
            return web.Response()
        stats.status[out.status] = stats.status.get(out.status, 0) + 1
        return out

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        refused = self._refuse_key(request.headers)
        if refused is not None:
            return refused
        data = [{"id": m, "object": "model", "created": 0, "owned_by": _SERVER_HEADER} for m in self.models]
        return json_response(200, json.dumps({"object": "list", "data": data}).encode())

    async def get_stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, json.dumps(self.stats.as_dict(request.query.get("keys") == "1")).encode())

    async def post_control(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = json.loads(await request.read() or b"{}")
            if changes.pop("reset_stats", False):
                self.stats = _Stats()
            self.faults = Faults.model_validate({**self.faults.model_dump(), **changes})
        except ValueError as e:
            return json_error(400, str(e), "BadRequestError")
        return json_response(200, self.faults.model_dump_json().encode())

    async def health(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, json.dumps({"server": NAME}).encode())

    def _refuse_key(self, headers: Mapping[str, str]) -> web.Response | None:
        expected = self.faults.require_api_key
        if expected is None:
            return None
        presented = headers.get("authorization", "").removeprefix("Bearer ")
        if presented == expected:
            return None
        # Like real providers, the message names the key it was given.
        return json_error(401, f"Incorrect API key provided: {presented}.", "invalid_request_error")

    # -- chat completions ----------------------------------------------------------------------------
    async def _chat(self, headers: Mapping[str, str], body: bytes) -> web.Response | Literal["drop"]:
        try:
            req = json.loads(body)
        except ValueError:
            return json_error(400, "request body is not JSON", "BadRequestError")
        if not isinstance(req, dict) or not isinstance(req.get("messages"), list) or not req.get("model"):
            return json_error(400, "'model' and 'messages' are required", "BadRequestError")
        f = self.faults
        stats = self.stats
        key = request_key(req)
        ks = stats.keys.get(key)
        if ks is None:
            last = req["messages"][-1] if req["messages"] else {}
            label = last.get("content") if isinstance(last, dict) else ""
            ks = stats.keys[key] = _KeyStats(label=label[:200] if isinstance(label, str) else "")
        attempt = ks.received
        ks.received += 1
        stats.received += 1

        refused = self._refuse_key(headers)
        if refused is not None:
            return refused
        rf = req.get("response_format")
        if f.reject_response_format and isinstance(rf, dict) and rf.get("type") != "text":
            return json_error(400, "response_format is not supported by this server", "BadRequestError")
        unsupported = sorted(set(f.reject_schema_keywords) & _keywords(rf))
        if unsupported:
            return json_error(
                400, f"JSON schema keyword(s) {', '.join(unsupported)} not supported", "BadRequestError"
            )

        faulty = f.faulty_attempts == 0 or attempt < f.faulty_attempts

        def hit(p: float, name: str) -> bool:
            return faulty and p > 0 and _draw(f.seed, key, attempt, name) < p

        if hit(f.p_drop, "drop"):
            return "drop"
        if hit(f.p_500, "500"):
            return json_error(500, "injected server error", "InternalServerError")
        if hit(f.p_429, "429"):
            return json_error(
                429, "injected rate limit", "rate_limit_exceeded", {"Retry-After": f"{f.retry_after_s:g}"}
            )
        content_fault = "malformed" if hit(f.p_malformed, "malformed") else None
        if content_fault is None and hit(f.p_truncate, "truncate"):
            content_fault = "truncate"
        bad_body = hit(f.p_bad_body, "bad_body")
        if f.delay_s > 0 and hit(f.p_delay, "delay"):
            await asyncio.sleep(f.delay_s)
        answer = self.responder(req)
        if inspect.isawaitable(answer):
            answer = await answer
        return self._answer(req, ks, answer, content_fault, bad_body)

    def _answer(
        self, req: dict[str, Any], ks: _KeyStats, answer: Any, content_fault: str | None, bad_body: bool
    ) -> web.Response:
        if isinstance(answer, str):
            answer = ResponderAnswer(answer)
        elif not isinstance(answer, ResponderAnswer):
            return json_error(500, f"responder returned {type(answer).__name__}", "InternalServerError")
        content = answer.content
        finish = answer.finish_reason
        given = list(answer.token_logprobs) if answer.token_logprobs is not None else None
        tokens = [t[0] for t in given] if given is not None else _TOKEN.findall(content)
        if content_fault == "malformed":
            content = "{" + content[: len(content) // 2]
            tokens = _TOKEN.findall(content)
            given = None
        limit = req.get("max_completion_tokens") or req.get("max_tokens")
        cut = len(tokens) // 2 if content_fault == "truncate" else None
        if isinstance(limit, int) and len(tokens) > limit:
            cut = limit if cut is None else min(cut, limit)
        if cut is not None:
            tokens = tokens[:cut]
            given = given[:cut] if given is not None else None
            content = "".join(tokens)
            finish = "length"

        logprobs = None
        if req.get("logprobs"):
            logprobs = {
                "content": _logprobs(tokens, given, int(req.get("top_logprobs") or 0)),
                "refusal": None,
            }
        messages = req["messages"]
        prompt_tokens = 3 * len(messages) + sum(
            len(m.get("content") or "") // 4
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        self._ids += 1
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        n = req.get("n") or 1
        body = {
            "id": f"chatcmpl-{self._ids:012x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req["model"],
            "choices": [choice] if n == 1 else [{**choice, "index": i} for i in range(n)],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
            "system_fingerprint": None,
        }
        data = json.dumps(body).encode()
        if bad_body:
            data = data[: len(data) // 2]
        else:
            ks.answered += 1
            self.stats.answered += 1
        return json_response(200, data)


def _logprobs(tokens: list[str], given: list[Any] | None, top_n: int) -> list[dict[str, Any]]:
    out = []
    for i, tok in enumerate(tokens):
        lp = float(given[i][1]) if given is not None else -0.01 * (1 + len(tok) % 7)
        if given is not None and len(given[i]) > 2:
            alts = [(str(a), float(b)) for a, b in given[i][2]]
        else:
            alts = [(tok, lp)] + [(f"{tok.strip() or '_'}~{j}", lp - 1.0 - j) for j in range(1, top_n)]
        top = [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in alts[:top_n]]
        out.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": top})
    return out


# -- running it -----------------------------------------------------------------------------------------


async def serve(chat: ChatServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: a free port); returns the runner (`await runner.cleanup()` stops) and the
    port."""
    # A short shutdown: requests still sleeping on an injected delay are cut, not waited for.
    runner = web.AppRunner(chat.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class ServerHandle:
    """A running simulated judge: `url` is the OpenAI base URL (`http://host:port/v1`)."""

    def __init__(self, host: str, port: int, stop: Callable[[], None] | None):
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}/v1"
        self._stop = stop

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(f"http://{self.host}:{self.port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out

    def stats(self, keys: bool = False) -> dict[str, Any]:
        return self._call("GET", "/_stats?keys=1" if keys else "/_stats")

    def control(self, *, reset_stats: bool = False, **faults: Any) -> dict[str, Any]:
        return self._call("POST", "/_control", {**faults, "reset_stats": reset_stats})

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    *,
    responder: Any = None,
    responder_args: dict[str, Any] | None = None,
    faults: Faults | dict[str, Any] | None = None,
    models: Sequence[str] = ("test-model",),
    host: str = "127.0.0.1",
    port: int = 0,
    mode: Literal["thread", "subprocess"] = "thread",
) -> ServerHandle:
    """Start the simulated judge's server and return once it listens.

    `responder`: a callable (thread mode) or 'module:factory'."""
    faults = faults if isinstance(faults, Faults) else Faults.model_validate(faults or {})
    if mode == "subprocess":
        if responder is not None and not isinstance(responder, str):
            raise ValueError("a subprocess server takes the responder as 'module:factory'")
        return _start_subprocess(responder, responder_args, faults, models, host, port)
    if isinstance(responder, str):
        responder = load_responder(responder, responder_args)
    chat = ChatServer(responder, faults, models)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["runner"], box["port"] = loop.run_until_complete(serve(chat, host, port))
        except OSError as e:
            box["error"] = e
            loop.close()
            return
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(box["runner"].cleanup())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=run, name="mpr-simulated-judge", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise MprError(f"the simulated judge cannot listen on {host}:{port}: {box['error']}")
    if "port" not in box:
        raise MprError(f"the simulated judge did not start listening on {host}:{port} within 30 s")

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return ServerHandle(host, box["port"], stop)


def _start_subprocess(
    responder: str | None,
    responder_args: dict[str, Any] | None,
    faults: Faults,
    models: Sequence[str],
    host: str,
    port: int,
) -> ServerHandle:
    cmd = [sys.executable, "-m", "mpr.simulated_judge", "--host", host, "--port", str(port)]
    cmd += ["--faults", faults.model_dump_json()]
    for m in models:
        cmd += ["--model", m]
    if responder:
        cmd += ["--responder", responder, "--responder-args", json.dumps(responder_args or {})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line_box: list[str] = []
    reader = threading.Thread(target=lambda: line_box.append(proc.stdout.readline() if proc.stdout else ""))
    reader.start()
    reader.join(60)
    line = line_box[0] if line_box else ""
    if not line.startswith("READY "):
        proc.kill()
        raise MprError(
            f"the simulated judge's subprocess did not start (exit {proc.poll()}): {line.strip()!r}"
        )
    url = line.split()[1]
    bound_port = int(url.rsplit(":", 1)[1].split("/")[0])

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    return ServerHandle(host, bound_port, stop)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mpr.simulated_judge",
        description=f"The {NAME}: an OpenAI-compatible chat server for tests, demos and benchmarks.",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the READY line)")
    ap.add_argument("--model", action="append", default=None, help="model names listed by /v1/models")
    ap.add_argument("--responder", default=None, help="module.path:factory returning the responder")
    ap.add_argument("--responder-args", default="{}", help="JSON object of keyword arguments for the factory")
    ap.add_argument(
        "--responder-arg", action="append", default=[], metavar="K=V", help="one factory argument"
    )
    ap.add_argument("--faults", default="{}", help='JSON fault settings, e.g. {"p_500": 0.1, "seed": 1}')
    args = ap.parse_args(argv)
    kwargs = json.loads(args.responder_args)
    for item in args.responder_arg:
        k, _, v = item.partition("=")
        try:
            kwargs[k] = json.loads(v)
        except ValueError:
            kwargs[k] = v
    responder = load_responder(args.responder, kwargs) if args.responder else None
    chat = ChatServer(responder, Faults.model_validate_json(args.faults), args.model or ["test-model"])

    async def run() -> None:
        runner, port = await serve(chat, args.host, args.port)
        print(f"READY http://{args.host}:{port}/v1 ({NAME})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
