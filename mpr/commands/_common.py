"""What every command shares: one-line errors, option types, the end-of-run summary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import ValidationError

from pipeline.errors import MprError

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
Engine = Annotated[Literal["local", "ray"], typer.Option(help="local: mpr's async client in this process; ray: a Ray Data pipeline through ray.data.llm (pip install 'mpr[ray]'; README: running on a cluster).")]
RayAddress = Annotated[str | None, typer.Option(help="--engine ray: the Ray cluster (default: $RAY_ADDRESS, else a local Ray).")]
RayProcessor = Annotated[Literal["mpr", "ray-llm"], typer.Option(help="--engine ray, HTTP: mpr's async client in Ray actors, or ray.data.llm's HttpRequestProcessorConfig (one request in flight per actor).")]
RayWorkers = Annotated[int, typer.Option(help="--engine ray: HTTP actors per server, or vLLM engine replicas with --backend vllm.")]
RayBatchSize = Annotated[int, typer.Option(help="--engine ray: rows per Ray Data batch.")]


def _ray_defaults() -> dict[str, Any]:
    from pipeline.ray_engine import RayOptions

    return {name: field.default for name, field in RayOptions.model_fields.items()}


RAY_DEFAULTS = _ray_defaults()  # the defaults are written once, in the pydantic config


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def one_line_errors(fn: F) -> F:
    """User errors end the command with one line on stderr and exit code 2; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("quiet"):
            quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except MprError as exc:
            raise fail(str(exc)) from None
        except ValidationError as exc:
            err = exc.errors()[0]
            option = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            raise fail(f"{option}: {err['msg']}") from None
        except KeyboardInterrupt:
            raise fail("interrupted; rerun the same command to resume") from None

    return wrapper  # type: ignore[return-value]


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
    typer.echo(message, err=True)


def print_summary(stage: str, out: Path, summary: dict[str, Any]) -> None:
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict) and v not in (0, None)}
    typer.echo(f"{stage}: wrote {out}")
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
