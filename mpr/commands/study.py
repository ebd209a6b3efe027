"""`mpr study`: its options are the fields of `mpr.orchestrate.study.StudyConfig`."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import typer

from mpr.commands._common import log, one_line_errors, quiet_libraries
from mpr.commands.options import config_options
from mpr.orchestrate.study import StudyConfig


@one_line_errors(cleanup=False)  # every finished cell is kept: a rerun computes only the missing ones
@config_options(StudyConfig, comma_lists={"fold_ids", "losses", "error_rates", "own_splits"})
def study(**options: Any) -> None:
    """Cross-validated loss study on any BEIR folders: every loss against zero-shot and single-positive
    InfoNCE, at several error rates of a simulated judge; one result file per cell, resumable.

    Example: mpr study --data data/beir/cisi --folds 5 --losses lsepair,bixse --error-rates 0,0.4 --steps 30
    """
    cfg = StudyConfig(**options)
    quiet_libraries()  # its stages run without bars; the study logs one line per cell instead
    from mpr.orchestrate.study import run_study

    report = run_study(cfg, command=shlex.join(["mpr", *sys.argv[1:]]), log=log)
    typer.echo(report["markdown"])
