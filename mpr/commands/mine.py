"""`mpr mine`: its options are the fields of `pipeline.stages.mine.MineConfig`."""

from __future__ import annotations

from typing import Any

from mpr.commands._common import DryRun, Encoding, Quiet, log, one_line_errors, print_plan, print_summary
from mpr.commands.options import config_options
from pipeline.stages.mine import MineConfig


@one_line_errors
@config_options(MineConfig, exclude={"progress"})
def mine(encoding: Encoding = None, dry_run: DryRun = False, quiet: Quiet = False, **options: Any) -> None:
    """Retrieve candidates for each query of a split and keep hard negatives.

    Example: mpr mine --data data/example --split train --out runs/example/mined
    """
    from pipeline.data import checks

    checks.beir_folder(options["data"], options["split"])
    checks.out_folder(options["out"])
    if options["retriever"] != "bm25":
        checks.model(options["model"])
    from pipeline.stages import mine as stage

    cfg = MineConfig(**options, progress=not quiet)
    if dry_run:
        print_plan(stage.plan(cfg))
        return
    manifest = stage.run(cfg, log=log)
    print_summary("mine", cfg.out, manifest.summary)
