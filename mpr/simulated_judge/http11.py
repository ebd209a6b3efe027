"""A minimal asyncio HTTP/1.1 server for JSON APIs: keep-alive, Content-Length or chunked request bodies.

Requests on one connection are answered in order (HTTP/1.1 clients do not pipeline). The handler returns a
response, an awaitable of one, or "drop" to cut the connection in the middle of a response.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeAlias

Response: TypeAlias = tuple[int, bytes, Sequence[tuple[str, str]]]
Handler: TypeAlias = Callable[
    [str, str, dict[str, str], bytes], "Response | Awaitable[Response] | Literal['drop']"
]

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}
_MAX_HEADER = 64 * 1024


def json_error(status: int, message: str, kind: str) -> Response:
    """An error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return status, json.dumps(body).encode(), ()


async def serve(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Http11Protocol(handler), host, port, backlog=1024)


class Http11Protocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection are answered in order."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while self.transport is not None and not self.busy:
            parsed = self._parse()
            if parsed is None:
                return
            method, path, headers, body = parsed
            close = headers.get("connection", "").lower() == "close"
            try:
                out = self.handler(method, path, headers, body)
            except Exception as e:
                out = json_error(500, f"{type(e).__name__}: {e}", "InternalServerError")
            if isinstance(out, tuple):
                self._send(out, close)
            elif out == "drop":
                self._drop()
            else:
                self.busy = True
                task = asyncio.ensure_future(out)
                task.add_done_callback(functools.partial(self._done, close=close))

    def _done(self, task: asyncio.Future[Response], close: bool) -> None:
        self.busy = False
        try:
            out = task.result()
        except Exception as e:
            out = json_error(500, f"{type(e).__name__}: {e}", "InternalServerError")
        if self.transport is None or self.transport.is_closing():
            return
        self._send(out, close)
        self._process()

    def _parse(self) -> tuple[str, str, dict[str, str], bytes] | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEADER:
                self._send(json_error(431, "header too large", "BadRequestError"), True)
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        try:
            method, path, _ = lines[0].split(" ", 2)
        except ValueError:
            self._send(json_error(400, "bad request line", "BadRequestError"), True)
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            decoded = _dechunk(buf, start)
            if decoded is None:
                return None
            body, stop = decoded
        else:
            length = int(headers.get("content-length") or 0)
            if len(buf) < start + length:
                return None
            body, stop = bytes(buf[start : start + length]), start + length
        del buf[:stop]
        return method, path, headers, body

    def _send(self, out: Response, close: bool) -> None:
        status, data, extra = out
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status")),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(data),
        ]
        head.extend(f"{k}: {v}\r\n".encode() for k, v in extra)
        head.append(b"connection: close\r\n\r\n" if close else b"\r\n")
        assert self.transport is not None
        self.transport.write(b"".join(head) + data)
        if close:
            self.transport.close()

    def _drop(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{"id":'
        )
        self.transport.close()


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", pos)
            if trailer_end < 0:
                return None
            return b"".join(parts), trailer_end + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2
