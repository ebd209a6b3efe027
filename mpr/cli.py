"""The `mpr` command line: each command parses its options into a pydantic config and calls one stage."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import ValidationError

from mpr import __version__
from mpr.pipeline.errors import MprError

app = typer.Typer(
    name="mpr",
    help="Dense supervision for retrieval training: mine hard negatives, relabel them with an LLM, "
    "synthesise graded passages, and train bi-encoders with multi-positive and graded losses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def one_line_errors(fn: F) -> F:
    """User errors end the command with one line on stderr and exit code 2; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MprError as exc:
            raise fail(str(exc)) from None
        except ValidationError as exc:
            err = exc.errors()[0]
            option = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            raise fail(f"{option}: {err['msg']}") from None
        except KeyboardInterrupt:
            raise fail("interrupted; rerun the same command to resume") from None

    return wrapper  # type: ignore[return-value]


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mpr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder written with other options.")]


@app.command(rich_help_panel="Stages")
@one_line_errors
def mine(
    data: Annotated[Path, typer.Option(help="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv (.gz accepted).")],
    out: Annotated[Path, typer.Option(help="Output shard folder.")],
    split: Annotated[str, typer.Option(help="qrels split whose queries are mined.")] = "train",
    model: Annotated[str, typer.Option(help="sentence-transformers model id or local path.")] = "sentence-transformers/all-MiniLM-L6-v2",
    retriever: Annotated[Literal["dense", "bm25", "union"], typer.Option(help="dense, bm25 (bm25s), or their union ranked by reciprocal rank fusion.")] = "dense",
    depth: Annotated[int, typer.Option(help="Candidates retrieved per query (range_max).")] = 100,
    skip_top: Annotated[int, typer.Option(help="Ranks 1..N are never negatives (range_min).")] = 0,
    num_negatives: Annotated[int, typer.Option(help="Hard negatives kept per query.")] = 15,
    sampling: Annotated[Literal["top", "random"], typer.Option(help="Keep the top-ranked eligible candidates or a random sample of them.")] = "top",
    absolute_margin: Annotated[float | None, typer.Option(help="Negatives must score <= weakest positive - margin.")] = None,
    relative_margin: Annotated[float | None, typer.Option(help="Negatives must score <= weakest positive x (1 - margin).")] = None,
    max_score: Annotated[float | None, typer.Option(help="Negatives must score <= this.")] = None,
    min_score: Annotated[float | None, typer.Option(help="Negatives must score >= this.")] = None,
    keep_candidates: Annotated[bool, typer.Option(help="Also write the candidates that were not kept as negatives (label null, with the filter that rejected them).")] = True,
    query_prompt: Annotated[str | None, typer.Option(help="Text prepended to queries (e.g. 'query: ').")] = None,
    query_prompt_name: Annotated[str | None, typer.Option(help="Name of a prompt stored in the model's config.")] = None,
    passage_prompt: Annotated[str | None, typer.Option(help="Text prepended to passages.")] = None,
    passage_prompt_name: Annotated[str | None, typer.Option(help="Name of a passage prompt stored in the model's config.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Truncate inputs to this many tokens (default: the model's).")] = None,
    min_relevance: Annotated[int, typer.Option(help="qrels score from which a judgment is a positive.")] = 1,
    max_bad_qrels: Annotated[float, typer.Option(help="Fraction of qrels pointing at unknown ids tolerated (dropped and reported).")] = 0.05,
    max_queries: Annotated[int | None, typer.Option(help="Mine only the first N queries of the split.")] = None,
    queries_per_shard: Annotated[int, typer.Option(help="Queries per Parquet part (the unit of resumption).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed for random sampling.")] = 42,
    faiss: Annotated[bool, typer.Option("--faiss", help="Search with FAISS (pip install 'mpr[faiss]').")] = False,
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps ... (default: best available).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache folder (default: $MPR_CACHE or ~/.cache/mpr).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the embedding cache.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Retrieve candidates for each query of a split and keep hard negatives.

    Example: mpr mine --data ../shared/data/scifact --split train --out runs/scifact/mined
    """
    options = {k: v for k, v in locals().items() if k != "quiet"}
    from mpr.pipeline.mine import MineConfig
    from mpr.pipeline.mine import mine as run_mine

    cfg = MineConfig(**options, progress=not quiet)
    manifest = run_mine(cfg, log=lambda m: typer.echo(m, err=True))
    print_summary("mine", cfg.out, manifest.summary)


def print_summary(stage: str, out: Path, summary: dict[str, Any]) -> None:
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict) and v not in (0, None)}
    typer.echo(f"{stage}: wrote {out}")
    width = max((len(k) for k in flat), default=0)
    for key, value in flat.items():
        typer.echo(f"  {key:<{width}}  {value:,}" if isinstance(value, int) else f"  {key:<{width}}  {value}")
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            typer.echo(f"  {key:<{width}}  " + ", ".join(f"{k}={v}" for k, v in value.items()))


@app.command(rich_help_panel="Stages")
@one_line_errors
def ingest(
    files: Annotated[list[Path], typer.Argument(help="Tevatron/RLHN rows: JSONL(.gz) or Parquet with query_id, query, positive_passages, negative_passages.")],
    out: Annotated[Path, typer.Option(help="Output shard folder.")],
    max_negatives: Annotated[int | None, typer.Option(help="Keep at most N negatives per query.")] = None,
    queries_per_shard: Annotated[int, typer.Option(help="Queries per Parquet part.")] = 1000,
    overwrite: Overwrite = False,
) -> None:
    """Turn Tevatron/RLHN-style training rows into judgment shards, so published data can be relabeled without re-mining."""
    from mpr.pipeline.ingest import IngestConfig
    from mpr.pipeline.ingest import ingest as run_ingest

    cfg = IngestConfig(files=files, out=out, max_negatives=max_negatives, queries_per_shard=queries_per_shard, overwrite=overwrite)
    manifest = run_ingest(cfg, log=lambda m: typer.echo(m, err=True))
    print_summary("ingest", cfg.out, manifest.summary)


@app.command(rich_help_panel="Stages")
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
    prompt: Annotated[str | None, typer.Option(help="Prompt file from prompts/ (relabel, relabel_cot, graded).")] = None,
    candidates: Annotated[Literal["negatives", "all"], typer.Option(help="Judge the kept hard negatives, or every mined candidate.")] = "negatives",
    max_candidates: Annotated[int, typer.Option(help="Candidates judged per query, best-ranked first.")] = 20,
    batch_candidates: Annotated[int, typer.Option(help="Numbered candidates per listwise request.")] = 20,
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
    result = run_relabel(cfg, log=lambda m: typer.echo(m, err=True))
    if isinstance(result, dict):
        typer.echo("relabel --dry-run: nothing was sent")
        for key, value in result.items():
            typer.echo(f"  {key:<28} {value:,}" if isinstance(value, int) else f"  {key:<28} {value}")
        return
    print_summary("relabel", cfg.out, result.summary)


@app.command(rich_help_panel="Shards")
@one_line_errors
def inspect(
    folder: Annotated[Path, typer.Argument(help="A shard folder written by any mpr stage.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    samples: Annotated[int, typer.Option(help="Sample rows to show.")] = 3,
) -> None:
    """Counts by source and label, positives and candidates per query, grades, levels and sample rows."""
    from mpr.pipeline.inspect import format_report, inspect_shards

    report = inspect_shards(folder, samples=samples)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@app.command(rich_help_panel="Shards")
@one_line_errors
def validate(folder: Annotated[Path, typer.Argument(help="A shard folder written by any mpr stage.")]) -> None:
    """Check the schema and invariants of a shard folder; exit non-zero on any violation."""
    from mpr.pipeline.inspect import validate_shards

    errors = validate_shards(folder)
    for line in errors:
        typer.echo(line, err=True)
    if errors:
        raise fail(f"{folder}: {len(errors)} problem(s)")
    typer.echo(f"{folder}: valid")


def run() -> None:  # pragma: no cover - console entry alias
    app(prog_name="mpr")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
