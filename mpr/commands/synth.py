"""`mpr synth`."""

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
    Encoding,
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


@one_line_errors
def synth(
    out: Annotated[Path, typer.Option(help="Output shard folder.")],
    model: Annotated[str, typer.Option(help="Generator model id or alias (Qwen2.5-7B = Qwen/Qwen2.5-7B-Instruct).")],
    data: Annotated[Path | None, typer.Option(help="BEIR-layout folder: the queries of --split (queries.jsonl, qrels/SPLIT.tsv).")] = None,
    split: Annotated[str, typer.Option(help="qrels split whose queries get passages, or 'all' for every query of queries.jsonl.")] = "train",
    queries: Annotated[Path | None, typer.Option(help="Queries file instead of --data: JSONL {\"_id\", \"text\"} or TSV id<TAB>text (.gz accepted).")] = None,
    from_shards: Annotated[Path | None, typer.Option(help="Shard folder instead of --data: its queries (qid, query).")] = None,
    levels: Annotated[int, typer.Option(help="Relevance levels per set, 2-6: passages for levels L-1 down to 0.")] = 4,
    per_query: Annotated[int, typer.Option(help="Independent sets (one request each) per query.")] = 1,
    styles: Annotated[str | None, typer.Option(help="Comma-separated writing styles drawn per set (default: encyclopedia article, forum answer, news report, ...).")] = None,
    lengths: Annotated[str | None, typer.Option(help="Comma-separated target lengths in words drawn per set (default: 40,80,120).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the style/length draws (a function of seed, query id and set only).")] = 42,
    positive_level: Annotated[int | None, typer.Option(help="Lowest level labelled positive (default: the top two levels, at least level 1).")] = None,
    with_qrels: Annotated[bool, typer.Option("--with-qrels", help="Also write the query's qrels positives (label 1, grade 1.0) into its group (--data only).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Grade every passage with the graded judge of mpr relabel; drop sets that disagree with their levels.")] = False,
    verify_model: Annotated[str | None, typer.Option(help="Judge model for --verify (default: --model).")] = None,
    verify_tolerance: Annotated[float, typer.Option(help="--verify drops a set whose mean |judged - intended level| exceeds this (or whose order is inverted).")] = 1.0,
    backend: Backend = "auto",
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the generator.")] = 0.7,
    max_tokens: Annotated[int | None, typer.Option(help="Completion token limit per request (default: from the levels and the target length).")] = None,
    max_queries: Annotated[int | None, typer.Option(help="Only the first N queries.")] = None,
    on_empty: Annotated[Literal["skip", "error"], typer.Option(help="Empty or blank queries and documents: leave them out and count them, or refuse the data.")] = "skip",
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
    encoding: Encoding = None,
    max_failure_rate: MaxFailureRate = 0.0,
    verify_inputs: VerifyInputs = None,
    quiet: Quiet = False,
) -> None:
    """Write synthetic passages at graded relevance levels for each query (after SyCL).

    Example: mpr synth --data ../shared/data/scifact --split train --out runs/x/synth --levels 4 --model Qwen2.5-7B --base-url http://localhost:8000/v1
    """
    options = {k: v for k, v in locals().items() if k not in {"quiet", "styles", "lengths", "encoding"} and v is not None}
    from pipeline import checks

    if data is not None:
        checks.beir_folder(data, split)
    if queries is not None:
        checks.in_file(queries, "--queries")
    if from_shards is not None:
        checks.shard_folder(from_shards, "--from-shards")
        checks.distinct(from_shards, out, "--from-shards")
    checks.out_folder(out)
    checks.out_file(llm_cache, "--llm-cache")
    from pipeline.synth import SynthConfig
    from pipeline.synth import synth as run_synth

    if styles is not None:
        options["styles"] = styles
    if lengths is not None:
        options["lengths"] = lengths
    cfg = SynthConfig(**{**options, "base_url": base_url or []}, progress=not quiet)
    result = run_synth(cfg, log=log)
    if isinstance(result, dict):
        print_dry_run("synth", result)
        return
    shown = ("queries", "sets_requested", "sets_written", "sets_failed", "sets_dropped_by_verify", "passages", "qrels_rows",
             "rows", "requests", "llm_cache_hits", "llm_retries", "tokens_in", "tokens_out", "tokens_out_per_passage",
             "seconds", "requests_per_s", "failures_file", "failures", "verify", "empty_queries", "empty_documents")
    print_summary("synth", cfg.out, {k: result.summary[k] for k in shown if k in result.summary})
    exit_on_failures("synth", cfg.out, result.summary, cfg.max_failure_rate)
