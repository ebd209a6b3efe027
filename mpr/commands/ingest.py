"""`mpr ingest`: its options are the fields of `pipeline.stages.ingest.IngestConfig`."""

from __future__ import annotations

from typing import Any

from mpr.commands._common import DryRun, Encoding, log, one_line_errors, print_plan, print_summary
from mpr.commands.options import config_options
from pipeline.stages.ingest import IngestConfig


@one_line_errors
@config_options(IngestConfig, arguments={"files"})
def ingest(encoding: Encoding = None, dry_run: DryRun = False, **options: Any) -> None:
    """Turn Tevatron/RLHN-style training rows into judgment shards, so published data can be relabeled
    without re-mining."""
    from pipeline.data import checks

    for path in options["files"]:
        checks.in_file(path, "FILES")
    checks.out_folder(options["out"])
    from pipeline.stages import ingest as stage

    cfg = IngestConfig(**options)
    if dry_run:
        print_plan(stage.plan(cfg))
        return
    manifest = stage.run(cfg, log=log)
    print_summary("ingest", cfg.out, manifest.summary)
