"""`mpr eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpr.commands._common import Encoding, Quiet, log, one_line_errors


@one_line_errors
def eval(
    data: Annotated[Path, typer.Option(help="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv.")],
    model: Annotated[str, typer.Option(help="Model to evaluate: a folder from mpr train, or any sentence-transformers id/path.")] = "sentence-transformers/all-MiniLM-L6-v2",
    split: Annotated[str, typer.Option(help="qrels split; only the queries judged in it count.")] = "test",
    baseline: Annotated[str | None, typer.Option(help="A second model evaluated in the same command, with the differences and paired significance tests.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    run_out: Annotated[Path | None, typer.Option("--run", help="Write the model's ranking as a TREC run file.")] = None,
    depth: Annotated[int, typer.Option(help="Passages retrieved per query.")] = 1000,
    max_seq_length: Annotated[int | None, typer.Option(help="Truncate inputs to this many tokens.")] = None,
    query_prompt: Annotated[str | None, typer.Option(help="Text prepended to queries.")] = None,
    query_prompt_name: Annotated[str | None, typer.Option(help="Name of a query prompt in the model's config.")] = None,
    passage_prompt: Annotated[str | None, typer.Option(help="Text prepended to passages.")] = None,
    passage_prompt_name: Annotated[str | None, typer.Option(help="Name of a passage prompt in the model's config.")] = None,
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: best available).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache folder (default: $MPR_CACHE or ~/.cache/mpr).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the embedding cache.")] = False,
    encoding: Encoding = None,
    quiet: Quiet = False,
) -> None:
    """nDCG@10, MRR@10, Recall@100 and Recall@1000 of a model on a BEIR split (exact search).

    Example: mpr eval --model models/x-lsepair --baseline sentence-transformers/all-MiniLM-L6-v2 --data ../shared/data/scifact
    """
    options = {k: v for k, v in locals().items() if k not in {"quiet", "encoding"}}
    from pipeline import checks

    checks.beir_folder(data, split)
    checks.model(model)
    if baseline is not None:
        checks.model(baseline, "--baseline")
    checks.out_file(json_out, "--json")
    checks.out_file(run_out, "--run")
    from train.evaluate import EvalConfig, evaluate, format_table

    report = evaluate(EvalConfig(**options, progress=not quiet), log=log)
    typer.echo(format_table(report))
