"""`mpr run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpr.commands._common import Quiet, log, one_line_errors


@one_line_errors
def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment file (TOML): data, stages and their options.")],
    only: Annotated[str | None, typer.Option(help="Comma-separated stages to run (e.g. relabel,train); the others' outputs are reused.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override an option: STAGE.OPTION=VALUE (e.g. train.loss=jointlh); repeatable.")] = None,
    quiet: Quiet = False,
) -> None:
    """Run an experiment from one file: mine, relabel, synth, train, eval, and a report.

    Example: mpr run experiments/example.toml --only relabel,train --set train.loss=jointlh
    """
    from mpr.orchestrate.experiment import run_experiment

    stages = [s.strip() for s in only.split(",") if s.strip()] if only else None
    report = run_experiment(experiment, only=stages, overrides=set_ or [], progress=not quiet, log=log)
    typer.echo(f"run: report at {report}")
