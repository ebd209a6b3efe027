"""`mpr eval`: its options are the fields of `pipeline.stages.evaluate.EvalConfig`."""

from __future__ import annotations

from typing import Any

import typer

from mpr.commands._common import DryRun, Encoding, Quiet, log, one_line_errors, print_plan
from mpr.commands.options import config_options
from pipeline.stages.evaluate import EvalConfig


@one_line_errors
@config_options(EvalConfig, exclude={"progress"}, flags={"json_out": "--json", "run_out": "--run"})
def evaluate(
    encoding: Encoding = None, dry_run: DryRun = False, quiet: Quiet = False, **options: Any
) -> None:
    """nDCG@10, MRR@10, Recall@100 and Recall@1000 of a model on a BEIR split (exact search).

    Example: mpr eval --model models/x-lsepair --baseline sentence-transformers/all-MiniLM-L6-v2
    --data data/example
    """
    from pipeline.data import checks

    checks.beir_folder(options["data"], options["split"])
    checks.model(options["model"])
    if options["baseline"] is not None:
        checks.model(options["baseline"], "--baseline")
    checks.out_file(options["json_out"], "--json")
    checks.out_file(options["run_out"], "--run")
    from pipeline.stages import evaluate as stage

    cfg = EvalConfig(**options, progress=not quiet)
    if dry_run:
        print_plan(stage.plan(cfg))
        return
    typer.echo(stage.format_table(stage.run(cfg, log=log)))
