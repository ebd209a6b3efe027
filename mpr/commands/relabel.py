"""`mpr relabel`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mpr.commands._common import Overwrite, Quiet, log, one_line_errors, print_summary


@one_line_errors
def relabel(
    input: Annotated[Path, typer.Option("--in", help="Shard folder from mpr mine or mpr ingest.")],
    out: Annotated[Path, typer.Option(help="Output shard folder.")],
    model: Annotated[str, typer.Option(help="Judge model id or alias (Qwen2.5-7B = Qwen/Qwen2.5-7B-Instruct).")],
    mode: Annotated[Literal["relabel", "drop", "drop-query", "graded"], typer.Option(help="What to do with flagged false negatives, or grade every pair 0-3.")] = "relabel",
    backend: Annotated[Literal["auto", "openai", "vllm"], typer.Option(help="openai: any OpenAI-compatible server; vllm: in-process (pip install 'mpr[vllm]'); auto: vLLM with a GPU, else $OPENAI_BASE_URL or localhost:8000.")] = "auto",
    base_url: Annotated[list[str] | None, typer.Option(help="OpenAI-compatible base URL; repeat to spread the load over several servers.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key (never written anywhere).")] = "OPENAI_API_KEY",
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
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds per request before it is retried.")] = 300.0,
    shard: Annotated[str | None, typer.Option(help="K/N: process one slice (whole queries) of N; N jobs together fill one folder.")] = None,
    queries_per_shard: Annotated[int, typer.Option(help="Queries per output part (the unit of resumption and of --shard).")] = 1000,
    llm_cache: Annotated[Path | None, typer.Option(help="SQLite request cache (default: $MPR_CACHE/llm.sqlite).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count requests and tokens, send nothing.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Ask an LLM which mined negatives are really relevant: relabel, drop, or grade them.

    Example: mpr relabel --in runs/x/mined --out runs/x/relabeled --model Qwen2.5-7B --base-url http://localhost:8000/v1
    """
    options = {k: v for k, v in locals().items() if k != "quiet"}
    from mpr.pipeline.relabel import RelabelConfig
    from mpr.pipeline.relabel import relabel as run_relabel

    cfg = RelabelConfig(**{**options, "base_url": base_url or []}, progress=not quiet)
    result = run_relabel(cfg, log=log)
    if isinstance(result, dict):
        typer.echo("relabel --dry-run: nothing was sent")
        for key, value in result.items():
            typer.echo(f"  {key:<28} {value:,}" if isinstance(value, int) else f"  {key:<28} {value}")
        return
    print_summary("relabel", cfg.out, result.summary)
