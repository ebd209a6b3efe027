"""`mpr relabel`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mpr.commands._common import (
    RAY_DEFAULTS,
    ApiKeyEnv,
    Backend,
    BaseUrl,
    Concurrency,
    DryRun,
    Engine,
    HttpClient,
    LLMCache,
    MaxFailureRate,
    MaxInvalidRetries,
    Overwrite,
    QueriesPerShard,
    Quiet,
    RayAddress,
    RayBatchSize,
    RayProcessor,
    RayWorkers,
    Shard,
    Timeout,
    VerifyInputs,
    exit_on_failures,
    log,
    one_line_errors,
    print_dry_run,
    print_summary,
)
from pipeline.audit import AuditOptions
from pipeline.zone import ZoneMode, ZoneOptions

# the defaults are written once, in the pydantic configs
AUDIT_DEFAULTS = {name: field.default for name, field in AuditOptions.model_fields.items()}
ZONE_DEFAULTS = {name: field.default for name, field in ZoneOptions.model_fields.items()}


@one_line_errors
def relabel(
    input: Annotated[Path, typer.Option("--in", help="Shard folder from mpr mine or mpr ingest.")],
    out: Annotated[Path, typer.Option(help="Output shard folder.")],
    model: Annotated[str, typer.Option(help="Judge model id or alias (Qwen2.5-7B = Qwen/Qwen2.5-7B-Instruct).")],
    mode: Annotated[Literal["relabel", "drop", "drop-query", "graded"], typer.Option(help="What to do with flagged false negatives, or grade every pair 0-3.")] = "relabel",
    backend: Backend = "auto",
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    confirm_model: Annotated[str | None, typer.Option(help="Cascade: a stronger model re-judges what --model flagged.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt file from prompts/ (relabel, relabel_cot, graded, graded_batch).")] = None,
    candidates: Annotated[Literal["negatives", "all"], typer.Option(help="Judge the kept hard negatives, or every mined candidate.")] = "negatives",
    max_candidates: Annotated[int, typer.Option(help="Candidates judged per query, best-ranked first.")] = 20,
    batch_candidates: Annotated[int | None, typer.Option(help="Candidates per request: default 20 listwise; graded default 1 (pointwise), more packs several pairs into one request.")] = None,
    grade_positives: Annotated[bool, typer.Option(help="Graded mode: grade the qrels positives too.")] = False,
    max_flagged: Annotated[int | None, typer.Option(help="Remove a query with more flagged candidates than this (every mode).")] = None,
    positive_level: Annotated[int, typer.Option(help="Graded mode: grade from which a pair is labelled positive.")] = 2,
    max_tokens: Annotated[int | None, typer.Option(help="Completion token limit per request.")] = None,
    logprobs: Annotated[bool, typer.Option(help="Graded mode: expected grade from the grade tokens' log-probabilities.")] = True,
    zone: Annotated[ZoneMode, typer.Option(help="Judge all candidates, or only the ambiguity zone: margin (score near the lowest positive's), top (best-ranked), unsure (a cheap judge is not sure they are negative).")] = ZONE_DEFAULTS["zone"],
    zone_margin: Annotated[float, typer.Option(help="--zone margin: judge candidates scoring at least the query's lowest positive score minus this.")] = ZONE_DEFAULTS["zone_margin"],
    zone_top: Annotated[int, typer.Option(help="--zone top: judge the R best-ranked candidates.")] = ZONE_DEFAULTS["zone_top"],
    zone_model: Annotated[str | None, typer.Option(help="--zone unsure: the cheap judge (default: --model).")] = ZONE_DEFAULTS["zone_model"],
    zone_unsure: Annotated[float, typer.Option(help="--zone unsure: judge candidates the cheap judge gives P(relevant) above this.")] = ZONE_DEFAULTS["zone_unsure"],
    audit: Annotated[int, typer.Option(help="First judge N known positives and N likely negatives; report precision, recall, Cohen's kappa and the full run's projected tokens.")] = AUDIT_DEFAULTS["audit"],
    min_agreement: Annotated[float, typer.Option(help="Stop (exit 2) before the full run when the audit's kappa is below this.")] = AUDIT_DEFAULTS["min_agreement"],
    force: Annotated[bool, typer.Option("--force", help="Run even when the audit is below --min-agreement.")] = AUDIT_DEFAULTS["force"],
    engine: Engine = RAY_DEFAULTS["engine"],
    ray_address: RayAddress = RAY_DEFAULTS["ray_address"],
    ray_processor: RayProcessor = RAY_DEFAULTS["ray_processor"],
    ray_workers: RayWorkers = RAY_DEFAULTS["ray_workers"],
    ray_batch_size: RayBatchSize = RAY_DEFAULTS["ray_batch_size"],
    concurrency: Concurrency = 64,
    http_client: HttpClient = "aiohttp",
    timeout: Timeout = 300.0,
    max_invalid_retries: MaxInvalidRetries = 2,
    shard: Shard = None,
    queries_per_shard: QueriesPerShard = 1000,
    llm_cache: LLMCache = None,
    dry_run: DryRun = False,
    overwrite: Overwrite = False,
    max_failure_rate: MaxFailureRate = 0.0,
    verify_inputs: VerifyInputs = None,
    quiet: Quiet = False,
) -> None:
    """Ask an LLM which mined negatives are really relevant: relabel, drop, or grade them.

    Example: mpr relabel --in runs/x/mined --out runs/x/relabeled --model Qwen2.5-7B --base-url http://localhost:8000/v1
    """
    options = {k: v for k, v in locals().items() if k != "quiet"}
    from pipeline import checks

    checks.shard_folder(input, "--in")
    checks.out_folder(out)
    checks.distinct(input, out)
    checks.out_file(llm_cache, "--llm-cache")
    from pipeline.relabel import RelabelConfig
    from pipeline.relabel import relabel as run_relabel

    cfg = RelabelConfig(**{**options, "base_url": base_url or []}, progress=not quiet)
    result = run_relabel(cfg, log=log)
    if isinstance(result, dict):
        print_dry_run("relabel", result)
        return
    print_summary("relabel", cfg.out, {k: v for k, v in result.summary.items() if k != "audit"})  # the audit printed its own line
    exit_on_failures("relabel", cfg.out, result.summary, cfg.max_failure_rate)
