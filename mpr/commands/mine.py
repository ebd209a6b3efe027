"""`mpr mine`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mpr.commands._common import Encoding, Overwrite, Quiet, log, one_line_errors, print_summary


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
    on_empty: Annotated[Literal["skip", "error"], typer.Option(help="Empty or blank documents and queries: leave them out and count them, or refuse the data.")] = "skip",
    max_queries: Annotated[int | None, typer.Option(help="Mine only the first N queries of the split.")] = None,
    queries_per_shard: Annotated[int, typer.Option(help="Queries per Parquet part (the unit of resumption).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed for random sampling.")] = 42,
    faiss: Annotated[bool, typer.Option("--faiss", help="Search with FAISS (pip install 'mpr[faiss]').")] = False,
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps ... (default: best available).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache folder (default: $MPR_CACHE or ~/.cache/mpr).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the embedding cache.")] = False,
    overwrite: Overwrite = False,
    encoding: Encoding = None,
    quiet: Quiet = False,
) -> None:
    """Retrieve candidates for each query of a split and keep hard negatives.

    Example: mpr mine --data ../shared/data/scifact --split train --out runs/scifact/mined
    """
    options = {k: v for k, v in locals().items() if k not in {"quiet", "encoding"}}
    from pipeline import checks

    checks.beir_folder(data, split)
    checks.out_folder(out)
    if retriever != "bm25":
        checks.model(model)
    from pipeline.mine import MineConfig
    from pipeline.mine import mine as run_mine

    cfg = MineConfig(**options, progress=not quiet)
    manifest = run_mine(cfg, log=log)
    print_summary("mine", cfg.out, manifest.summary)
