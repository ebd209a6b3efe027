"""What every command shares: one-line errors, option types, the end-of-run summary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from mpr.pipeline.errors import MprError

F = TypeVar("F", bound=Callable[..., Any])

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder written with other options.")]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def one_line_errors(fn: F) -> F:
    """User errors end the command with one line on stderr and exit code 2; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
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
