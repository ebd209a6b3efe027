"""A local OpenAI-compatible chat server: for tests, benchmarks and the demo when no LLM endpoint is set.

    python -m mpr.simulated_judge.server --port 0 [--responder module:factory --responder-arg k=v ...]
        [--faults '{"p_500": 0.1, "seed": 1}'] [--model NAME ...]

It prints `READY http://HOST:PORT/v1` on stdout once it listens. From Python: `start_server(...)` runs it in
a background thread (or a subprocess) and returns a `ServerHandle` with the URL.

Endpoints: `POST /v1/chat/completions`, `GET /v1/models` (OpenAI schema); `GET /_stats[?keys=1]`,
`POST /_control` (JSON: fault settings to change, `"reset_stats": true`), `GET /health`.
It runs on the raw asyncio HTTP/1.1 server in `http11.py` so that one core answers several thousand
requests per second and the client, not the server, is what a benchmark measures.
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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mpr.simulated_judge.http11 import Response, json_error, serve
from mpr.simulated_judge.responders import ResponderAnswer, default_responder, load_responder
from pipeline.errors import MprError

_TOKEN = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^\sA-Za-z0-9_]|\s+")


class Faults(BaseModel):
    """Fault injection. Each `p_*` is a probability, drawn per request from (seed, request key, attempt no).

    delay_s: answer after this long (with probability p_delay); p_500; p_429 with a Retry-After of
    retry_after_s; p_drop: cut the connection in the middle of the response; p_bad_body: HTTP 200 whose body
    is not JSON; p_malformed: answer content that is broken JSON; p_truncate: answer cut in half with
    finish_reason "length"; faulty_attempts > 0: faults hit only each key's first N requests;
    reject_response_format: HTTP 400 for any response_format; require_api_key: HTTP 401 unless
    `Authorization: Bearer <it>`.
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
    require_api_key: str | None = None


def request_key(body: dict[str, Any]) -> str:
    """Hash of the request body: model, messages and every parameter."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _draw(seed: int, key: str, attempt: int, name: str) -> float:
    h = hashlib.blake2b(f"{seed}|{key}|{attempt}|{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


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


class ChatServer:
    """The request handling, independent of the transport."""

    def __init__(
        self, responder: Any = None, faults: Faults | None = None, models: Sequence[str] = ("test-model",)
    ):
        self.responder = responder or default_responder()
        self.faults = faults or Faults()
        self.models = list(models)
        self.stats = _Stats()
        self._ids = 0

    # -- routing -------------------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Response | Awaitable[Response] | Literal["drop"]:
        route, _, query = path.partition("?")
        if method == "POST" and route in ("/v1/chat/completions", "/chat/completions"):
            try:
                out = self._chat(headers, body)
            except Exception as e:
                out = json_error(500, f"{type(e).__name__}: {e}", "InternalServerError")
            if isinstance(out, tuple):
                self._count(out)
            elif out == "drop":
                self.stats.dropped += 1
            else:
                return self._track(out)
            return out
        if method == "GET" and route in ("/v1/models", "/models"):
            refused = self._refuse_key(headers)
            if refused is not None:
                return refused
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "mpr-testserver"} for m in self.models
            ]
            return 200, json.dumps({"object": "list", "data": data}).encode(), ()
        if method == "GET" and route == "/_stats":
            return 200, json.dumps(self.stats.as_dict("keys=1" in query)).encode(), ()
        if method == "POST" and route == "/_control":
            return self._control(body)
        if method == "GET" and route == "/health":
            return 200, b"{}", ()
        return json_error(404, f"no route {method} {route}", "NotFoundError")

    def _count(self, out: Response) -> None:
        status = self.stats.status
        status[out[0]] = status.get(out[0], 0) + 1

    async def _track(self, pending: Awaitable[Response]) -> Response:
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            out = await pending
        except Exception as e:
            out = json_error(500, f"{type(e).__name__}: {e}", "InternalServerError")
        finally:
            stats.in_flight -= 1
        self._count(out)
        return out

    def _control(self, body: bytes) -> Response:
        try:
            changes = json.loads(body or b"{}")
            if changes.pop("reset_stats", False):
                self.stats = _Stats()
            self.faults = Faults.model_validate({**self.faults.model_dump(), **changes})
        except ValueError as e:
            return json_error(400, str(e), "BadRequestError")
        return 200, self.faults.model_dump_json().encode(), ()

    def _refuse_key(self, headers: dict[str, str]) -> Response | None:
        expected = self.faults.require_api_key
        if expected is None:
            return None
        presented = headers.get("authorization", "").removeprefix("Bearer ")
        if presented == expected:
            return None
        # Like real providers, the message names the key it was given.
        return json_error(401, f"Incorrect API key provided: {presented}.", "invalid_request_error")

    # -- chat completions ----------------------------------------------------------------------------
    def _chat(self, headers: dict[str, str], body: bytes) -> Response | Awaitable[Response] | Literal["drop"]:
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

        faulty = f.faulty_attempts == 0 or attempt < f.faulty_attempts

        def hit(p: float, name: str) -> bool:
            return faulty and p > 0 and _draw(f.seed, key, attempt, name) < p

        if hit(f.p_drop, "drop"):
            return "drop"
        if hit(f.p_500, "500"):
            return json_error(500, "injected server error", "InternalServerError")
        if hit(f.p_429, "429"):
            status, data, _ = json_error(429, "injected rate limit", "rate_limit_exceeded")
            return status, data, (("retry-after", f"{f.retry_after_s:g}"),)
        content_fault = "malformed" if hit(f.p_malformed, "malformed") else None
        if content_fault is None and hit(f.p_truncate, "truncate"):
            content_fault = "truncate"
        bad_body = hit(f.p_bad_body, "bad_body")
        delay = f.delay_s if f.delay_s > 0 and hit(f.p_delay, "delay") else 0.0

        if delay:
            return self._chat_async(req, ks, delay, content_fault, bad_body)
        answer = self.responder(req)
        if inspect.isawaitable(answer):
            return self._finish_async(req, ks, answer, content_fault, bad_body)
        return self._answer(req, ks, answer, content_fault, bad_body)

    async def _chat_async(
        self, req: dict[str, Any], ks: _KeyStats, delay: float, content_fault: str | None, bad_body: bool
    ) -> Response:
        if delay:
            await asyncio.sleep(delay)
        answer = self.responder(req)
        if inspect.isawaitable(answer):
            answer = await answer
        return self._answer(req, ks, answer, content_fault, bad_body)

    async def _finish_async(
        self,
        req: dict[str, Any],
        ks: _KeyStats,
        answer: Awaitable[Any],
        content_fault: str | None,
        bad_body: bool,
    ) -> Response:
        return self._answer(req, ks, await answer, content_fault, bad_body)

    def _answer(
        self, req: dict[str, Any], ks: _KeyStats, answer: Any, content_fault: str | None, bad_body: bool
    ) -> Response:
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
        return 200, data, ()


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


class ServerHandle:
    """A running test server: `url` is the OpenAI base URL (`http://host:port/v1`)."""

    def __init__(self, host: str, port: int, stop: Any):
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}/v1"
        self._stop = stop

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(f"http://{self.host}:{self.port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

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
    """Start a test server and return once it listens. `responder`: a callable (thread mode) or 'module:factory'."""
    faults = faults if isinstance(faults, Faults) else Faults.model_validate(faults or {})
    if mode == "subprocess":
        if responder is not None and not isinstance(responder, str):
            raise ValueError("a subprocess server takes the responder as 'module:factory'")
        return _start_subprocess(responder, responder_args, faults, models, host, port)
    if isinstance(responder, str):
        responder = load_responder(responder, responder_args)
    chat = ChatServer(responder, faults, models)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            srv = loop.run_until_complete(serve(chat.handle, host, port))
        except OSError as e:
            box["error"] = e
            ready.set()
            return
        box["loop"], box["port"] = loop, srv.sockets[0].getsockname()[1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            srv.close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=main, name="mpr-llm-testserver", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise MprError(f"test server cannot listen on {host}:{port}: {box['error']}")

    def stop() -> None:
        box["loop"].call_soon_threadsafe(box["loop"].stop)
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
    cmd = [sys.executable, "-m", "mpr.simulated_judge.server", "--host", host, "--port", str(port)]
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
        raise MprError(f"test server subprocess did not start (exit {proc.poll()}): {line.strip()!r}")
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
        prog="python -m mpr.simulated_judge.server", description=__doc__.split("\n")[0]
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
        srv = await serve(chat.handle, args.host, args.port)
        port = srv.sockets[0].getsockname()[1]
        print(f"READY http://{args.host}:{port}/v1", flush=True)
        async with srv:
            await srv.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
