"""`mpr synth`: its options are the fields of `pipeline.stages.synth.SynthConfig` (with the LLM stages' shared
`LLMStageConfig`)."""

from __future__ import annotations

from typing import Any

from mpr.commands._common import (
    DryRun,
    Encoding,
    Quiet,
    exit_on_failures,
    log,
    one_line_errors,
    print_plan,
    print_summary,
)
from mpr.commands.options import config_options
from pipeline.stages.synth import SynthConfig

SHOWN = (
    "queries",
    "sets_requested",
    "sets_written",
    "sets_failed",
    "sets_dropped_by_verify",
    "passages",
    "qrels_rows",
    "rows",
    "requests",
    "llm_cache_hits",
    "llm_retries",
    "tokens_in",
    "tokens_out",
    "tokens_out_per_passage",
    "seconds",
    "requests_per_s",
    "failures_file",
    "failures",
    "verify",
    "empty_queries",
    "empty_documents",
)


@one_line_errors
@config_options(SynthConfig, exclude={"progress", "max_attempts"}, comma_lists={"styles", "lengths"})
def synth(encoding: Encoding = None, dry_run: DryRun = False, quiet: Quiet = False, **options: Any) -> None:
    """Write synthetic passages at graded relevance levels for each query (after SyCL).

    Example: mpr synth --data data/example --split train --out runs/x/synth --levels 4 --model Qwen2.5-7B
    --base-url http://localhost:8000/v1
    """
    from pipeline.data import checks

    data, queries, from_shards, out = (
        options["data"],
        options["queries"],
        options["from_shards"],
        options["out"],
    )
    if data is not None:
        checks.beir_folder(data, options["split"])
    if queries is not None:
        checks.in_file(queries, "--queries")
    if from_shards is not None:
        checks.shard_folder(from_shards, "--from-shards")
        checks.distinct(from_shards, out, "--from-shards")
    checks.out_folder(out)
    checks.out_file(options["llm_cache"], "--llm-cache")
    from pipeline.stages import synth as stage

    cfg = SynthConfig(**options, progress=not quiet)
    if dry_run:
        print_plan(stage.plan(cfg))
        return
    manifest = stage.run(cfg, log=log)
    print_summary("synth", cfg.out, {k: manifest.summary[k] for k in SHOWN if k in manifest.summary})
    exit_on_failures("synth", cfg.out, manifest.summary, cfg.max_failure_rate)
