"""`mpr run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpr.commands._common import DryRun, Quiet, log, one_line_errors, print_plan


@one_line_errors
def run(
    experiment: Annotated[
        Path, typer.Argument(help="Experiment file (TOML): data, stages and their options.")
    ],
    only: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated stages to run (e.g. relabel,train); the others' outputs are reused."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override an option: STAGE.OPTION=VALUE (e.g. train.loss=jointlh); repeatable."
        ),
    ] = None,
    dry_run: DryRun = False,
    quiet: Quiet = False,
) -> None:
    """Run an experiment from one file: mine, relabel, synth, train, eval, and a report.

    Example: mpr run experiments/example.toml --only relabel,train --set train.loss=jointlh
    """
    stages = [s.strip() for s in only.split(",") if s.strip()] if only else None
    if dry_run:
        from mpr.orchestrate.experiment import plan_experiment

        for plan in plan_experiment(experiment, only=stages, overrides=set_ or []):
            if isinstance(plan, str):
                typer.echo(plan)
            else:
                print_plan(plan)
        return
    from mpr.orchestrate.experiment import run_experiment

    report = run_experiment(experiment, only=stages, overrides=set_ or [], progress=not quiet, log=log)
    typer.echo(f"run: report at {report}")
