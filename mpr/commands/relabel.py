"""`mpr relabel`: its options are the fields of `pipeline.stages.relabel.RelabelConfig` (with the LLM stages'
shared `LLMStageConfig`, and the zone's and the audit's options)."""

from __future__ import annotations

from typing import Any

from mpr.commands._common import (
    DryRun,
    Quiet,
    exit_on_failures,
    log,
    one_line_errors,
    print_plan,
    print_summary,
)
from mpr.commands.options import config_options
from pipeline.stages.relabel import RelabelConfig

# Not on the command line (the config's defaults; `mpr run`'s [relabel] table can set them).
INTERNAL = {"progress", "max_attempts", "max_positives_shown", "temperature", "audit_seed"}


@one_line_errors
@config_options(RelabelConfig, exclude=INTERNAL, flags={"input": "--in"})
def relabel(dry_run: DryRun = False, quiet: Quiet = False, **options: Any) -> None:
    """Ask an LLM which mined negatives are really relevant: relabel, drop, or grade them.

    Example: mpr relabel --in runs/x/mined --out runs/x/relabeled --model Qwen2.5-7B --base-url http://localhost:8000/v1
    """
    from pipeline.data import checks

    checks.shard_folder(options["input"], "--in")
    checks.out_folder(options["out"])
    checks.distinct(options["input"], options["out"])
    checks.out_file(options["llm_cache"], "--llm-cache")
    from pipeline.stages import relabel as stage

    cfg = RelabelConfig(**options, progress=not quiet)
    if dry_run:
        print_plan(stage.plan(cfg))
        return
    manifest = stage.run(cfg, log=log)
    print_summary(
        "relabel", cfg.out, {k: v for k, v in manifest.summary.items() if k != "audit"}
    )  # the audit printed its own line
    exit_on_failures("relabel", cfg.out, manifest.summary, cfg.max_failure_rate)
