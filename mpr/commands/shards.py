"""`mpr inspect` and `mpr validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mpr.commands._common import fail, one_line_errors


@one_line_errors
def inspect(
    folder: Annotated[Path, typer.Argument(help="A shard folder written by any mpr stage.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    samples: Annotated[int, typer.Option(help="Sample rows to show.")] = 3,
) -> None:
    """Counts by source and label, positives and candidates per query, grades, levels and sample rows."""
    from pipeline.data.inspection import format_report, inspect_shards

    report = inspect_shards(folder, samples=samples)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@one_line_errors
def validate(
    folder: Annotated[Path, typer.Argument(help="A shard folder written by any mpr stage.")],
) -> None:
    """Check the schema and invariants of a shard folder; exit non-zero on any violation."""
    from pipeline.data.inspection import validate_shards

    errors = validate_shards(folder)
    for line in errors:
        typer.echo(line, err=True)
    if errors:
        raise fail(f"{folder}: {len(errors)} problem(s)")
    typer.echo(f"{folder}: valid")
