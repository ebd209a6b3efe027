"""A `llama-server` process on 127.0.0.1 serving one GGUF model over the OpenAI protocol.

with LlamaServer(binary, model) as server:
    print(server.base_url)   # http://127.0.0.1:PORT/v1, ready for --base-url
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from pipeline.errors import MprError


def _die_with_parent() -> None:
    """In the child, before exec: the kernel stops the server when the process that started it dies (any
    way)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_name(model: Path) -> str:
    """The model name the server answers to: the file's stem without its quantisation suffix."""
    stem = model.name.removesuffix(".gguf")
    head, _, tail = stem.rpartition(".")
    return head if head and tail.upper().startswith(("Q", "F", "BF", "IQ")) else stem


class LlamaServer:
    """Start on enter (waits until `/health` answers 200), stop on exit; the server's log goes to
    `log_path`."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        *,
        port: int = 0,
        ctx_size: int = 8192,
        parallel: int = 1,
        threads: int | None = None,
        alias: str | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
        startup_timeout_s: float = 300.0,
    ):
        if not model.is_file():
            raise MprError(f"{model}: no such GGUF file (--gguf)")
        self.binary, self.model = binary, model
        self.port = port or free_port()
        self.alias = alias or served_name(model)  # comma-separated: every name the server answers to
        self.model_name = self.alias.split(",")[0]
        self.ctx_size, self.parallel = ctx_size, parallel
        self.threads = threads or os.cpu_count() or 1
        self.log_path = (
            log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"mpr-llama-server-{self.port}.log"
        )
        self.extra_args = list(extra_args or [])
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def command(self) -> list[str]:
        # -c is the context of all slots together: each of the `parallel` slots gets ctx_size.
        return [
            str(self.binary),
            "-m",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--alias",
            self.alias,
            "-c",
            str(self.ctx_size * self.parallel),
            "-np",
            str(self.parallel),
            "-t",
            str(self.threads),
            "--no-webui",
            *self.extra_args,
        ]

    def start(self) -> LlamaServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MprError(
                    f"llama-server exited with code {self.proc.returncode} while starting: "
                    f"{self._last_line()} (log: {self.log_path})"
                )
            if self._healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise MprError(
            f"llama-server did not become ready within {self.startup_timeout_s:g}s (log: {self.log_path})"
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root}/health", timeout=2) as resp:
                return resp.status == 200 and json.loads(resp.read() or b"{}").get("status", "ok") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _last_line(self) -> str:
        try:
            lines = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return "no log"
        errors = [x for x in lines if "error" in x.lower()]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
