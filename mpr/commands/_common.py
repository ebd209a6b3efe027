"""What every command shares: one-line errors, option types, the end-of-run summary."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import ValidationError

from pipeline.errors import FailedItems, MprError
from pipeline.redact import read_key, redact, redact_logging

F = TypeVar("F", bound=Callable[..., Any])

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

# The options every LLM stage takes (pipeline.llm.stage.LLMStageConfig).
Backend = Annotated[Literal["auto", "openai", "vllm"], typer.Option(help="openai: any OpenAI-compatible server; vllm: in-process (pip install 'mpr[vllm]'); auto: vLLM with a GPU, else $OPENAI_BASE_URL or localhost:8000.")]
BaseUrl = Annotated[list[str] | None, typer.Option(help="OpenAI-compatible base URL; repeat to spread the load over several servers.")]
ApiKeyEnv = Annotated[str, typer.Option(help="Environment variable holding the API key (never written anywhere).")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight.")]
HttpClient = Annotated[Literal["aiohttp", "openai"], typer.Option(help="HTTP path to OpenAI-compatible servers: aiohttp (fast), or the official openai client (4-8x the client CPU per request).")]
Timeout = Annotated[float, typer.Option(help="Seconds per request before it is retried.")]
MaxInvalidRetries = Annotated[int, typer.Option(help="Times an answer that does not parse or validate is asked again before it is recorded as failed.")]
Shard = Annotated[str | None, typer.Option(help="K/N: process one slice (whole queries) of N; N jobs together fill one folder.")]
QueriesPerShard = Annotated[int, typer.Option(help="Queries per output part (the unit of resumption and of --shard).")]
LLMCache = Annotated[Path | None, typer.Option(help="SQLite request cache (default: $MPR_CACHE/llm.sqlite).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Count requests and tokens, send nothing.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder written with other options.")]
MaxFailureRate = Annotated[float, typer.Option(help="Share of items (rows, sets) left failed that still exits 0; above it the run exits 3.")]
VerifyInputs = Annotated[Literal["fast", "full"] | None, typer.Option(help="Check input shard folders against their manifests: fast (parts, sizes, row counts; checksums up to 1 GiB) or full (every checksum). Default: $MPR_VERIFY, else fast.")]
# Exit codes: 0 success, 2 a user error (one line on stderr), 3 the run finished with failed items
# (output complete and resumable: rerun the same command to retry exactly those).
EXIT_FAILED_ITEMS = 3
Engine = Annotated[Literal["local", "ray"], typer.Option(help="local: mpr's async client in this process; ray: a Ray Data pipeline through ray.data.llm (pip install 'mpr[ray]'; README: running on a cluster).")]
RayAddress = Annotated[str | None, typer.Option(help="--engine ray: the Ray cluster (default: $RAY_ADDRESS, else a local Ray).")]
RayProcessor = Annotated[Literal["mpr", "ray-llm"], typer.Option(help="--engine ray, HTTP: mpr's async client in Ray actors, or ray.data.llm's HttpRequestProcessorConfig (one request in flight per actor).")]
RayWorkers = Annotated[int, typer.Option(help="--engine ray: HTTP actors per server, or vLLM engine replicas with --backend vllm.")]
RayBatchSize = Annotated[int, typer.Option(help="--engine ray: rows per Ray Data batch.")]


def _ray_defaults() -> dict[str, Any]:
    from pipeline.ray_engine import RayOptions

    return {name: field.default for name, field in RayOptions.model_fields.items()}


RAY_DEFAULTS = _ray_defaults()  # the defaults are written once, in the pydantic config


Encoding = Annotated[str | None, typer.Option(help="Encoding of the text inputs (default: UTF-8, with or without a byte-order mark), e.g. latin-1.")]

# Exit codes (the README's "Errors" section lists them).
EXIT_BAD_INPUT = 2  # a user error (bad option, path, file, server answer) or Ctrl-C; one line on stderr
# Options naming what a command writes: removed again when the command created them and then failed.
OUTPUT_OPTIONS = ("out", "json_out", "run_out")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print one `error:` line (API keys redacted, newlines folded) and return the exit to raise."""
    line = " ".join(redact(message).split())
    typer.echo(f"error: {line}", err=True)
    return typer.Exit(code)


def _option(loc: tuple[Any, ...]) -> str:
    return "--" + "-".join(str(p) for p in loc).replace("_", "-")


def one_line_errors(fn: F | None = None, *, cleanup: bool = True) -> Any:
    """User errors end the command with one line on stderr and exit code 2; no traceback. With `cleanup`,
    what the command set out to create (`--out`, `--json`, `--run`) and had not existed is removed again,
    so a failed run leaves nothing a later run or reader mistakes for output; Ctrl-C keeps it for resuming."""
    if fn is None:
        return functools.partial(one_line_errors, cleanup=cleanup)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        redact_logging()
        read_key("OPENAI_API_KEY")
        read_key(kwargs.get("api_key_env") or "OPENAI_API_KEY")
        if kwargs.get("quiet"):
            quiet_libraries()
        if kwargs.get("encoding") is not None:
            from pipeline.readers import use_encoding

            try:
                use_encoding(kwargs["encoding"])
            except MprError as exc:
                raise fail(str(exc)) from None
        fresh = [p for p in (kwargs.get(k) for k in OUTPUT_OPTIONS) if isinstance(p, Path) and not p.exists()]
        try:
            return fn(*args, **kwargs)
        except FailedItems as exc:
            typer.echo(redact(str(exc)), err=True)
            raise typer.Exit(EXIT_FAILED_ITEMS) from None
        except (MprError, ValidationError, OSError, UnicodeError, EOFError) as exc:
            if cleanup and not kwargs.get("shard"):  # parallel --shard jobs share the folder
                _remove(fresh)
            raise fail(_message(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; rerun the same command to resume") from None

    return wrapper


def _message(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{_option(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, EOFError):
        return f"unexpected end of a file ({exc or 'truncated input'})"
    return str(exc)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def quiet_libraries() -> None:
    """`--quiet` also silences the progress bars of the libraries mpr drives."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def log(message: str) -> None:
    typer.echo(redact(message), err=True)


def print_summary(stage: str, out: Path, summary: dict[str, Any]) -> None:
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict) and v not in (0, None)}
    typer.echo(redact(f"{stage}: wrote {out}"))
    width = max((len(k) for k in flat), default=0)
    for key, value in flat.items():
        typer.echo(f"  {key:<{width}}  {value:,}" if isinstance(value, int) else f"  {key:<{width}}  {value}")
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            typer.echo(f"  {key:<{width}}  " + ", ".join(f"{k}={v}" for k, v in value.items()))


def print_dry_run(stage: str, estimate: dict[str, Any]) -> None:
    typer.echo(f"{stage} --dry-run: nothing was sent")
    for key, value in estimate.items():
        typer.echo(f"  {key:<28} {value:,}" if isinstance(value, int) else f"  {key:<28} {value}")


def exit_on_failures(stage: str, out: Path, summary: dict[str, Any], max_rate: float) -> None:
    """After `print_summary`: one line and exit code 3 when more items failed than `max_rate` allows."""
    from pipeline.llm.stage import failure_line

    line = failure_line(stage, out, summary, max_rate)
    if line:
        raise FailedItems(line)
