"""What every command shares: one-line errors, the options that are no config field, the end-of-run
summary."""

from __future__ import annotations

import errno
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from pipeline.errors import FailedItems, MprError
from pipeline.formatting import number, summary_value
from pipeline.redact import read_key, redact, redact_logging
from pipeline.stages.plan import StagePlan

F = TypeVar("F", bound=Callable[..., Any])

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print what the command would read and write (queries, parts; for an LLM stage its requests and "
        "tokens), and stop: nothing is sent, encoded or written.",
    ),
]

# Exit codes: 0 success, 2 a user error (one line on stderr), 3 the run finished with failed items
# (output complete and resumable: rerun the same command to retry exactly those).
EXIT_FAILED_ITEMS = 3

Encoding = Annotated[
    str | None,
    typer.Option(
        help="Encoding of the text inputs (default: UTF-8, with or without a byte-order mark), e.g. latin-1."
    ),
]

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
            from pipeline.data.readers import use_encoding

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
            if (
                cleanup and not kwargs.get("shard") and not getattr(exc, "keeps_output", False)
            ):  # --shard jobs share the folder
                _remove(fresh)
            outputs = [p for p in (kwargs.get(k) for k in OUTPUT_OPTIONS) if isinstance(p, Path)]
            raise fail(_message(exc, outputs)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; rerun the same command to resume") from None

    return wrapper


#: Write errors that free space (or a higher file-size limit) cures: disk full, file too large, quota.
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _message(exc: BaseException, outputs: list[Path] | None = None) -> str:
    if isinstance(exc, OSError) and exc.errno in NO_ROOM:
        where = exc.filename or (outputs[0] if outputs else None) or "the output"
        return (
            f"{where}: no room to write ({os.strerror(exc.errno or 0)}); free space (or raise the limit) and "
            "run the same command again: it keeps what was finished"
        )
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


def _shown(key: str, value: Any) -> str:
    return (
        summary_value(key, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else str(value)
    )


def print_summary(stage: str, out: Path, summary: dict[str, Any]) -> None:
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict) and v not in (0, None)}
    typer.echo(redact(f"{stage}: wrote {out}"))
    width = max((len(k) for k in flat), default=0)
    for key, value in flat.items():
        typer.echo(f"  {key:<{width}}  {_shown(key, value)}")
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            typer.echo(f"  {key:<{width}}  " + ", ".join(f"{k}={v}" for k, v in value.items()))


def print_plan(plan: StagePlan) -> None:
    """What `--dry-run` prints: the stage's plan, one `name  value` line each."""
    typer.echo(f"{plan.stage} --dry-run: nothing was sent or written")
    for key, value in plan.rows():
        items = (
            value
            if isinstance(value, list)
            else [number(value, "count") if isinstance(value, int) else value]
        )
        for i, item in enumerate(items):  # a list: one item a line
            typer.echo(redact(f"  {key if i == 0 else '':<28} {item}"))
    for note in plan.notes:
        typer.echo(redact(f"  note: {note}"))


def exit_on_failures(stage: str, out: Path, summary: dict[str, Any], max_rate: float) -> None:
    """After `print_summary`: one line and exit code 3 when more items failed than `max_rate` allows."""
    from pipeline.llm.stage import failure_line

    line = failure_line(stage, out, summary, max_rate)
    if line:
        raise FailedItems(line)
