"""`mpr ingest`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mpr.commands._common import Encoding, Overwrite, log, one_line_errors, print_summary


@one_line_errors
def ingest(
    files: Annotated[list[Path], typer.Argument(help="Tevatron/RLHN rows: JSONL(.gz) or Parquet with query_id, query, positive_passages, negative_passages.")],
    out: Annotated[Path, typer.Option(help="Output shard folder.")],
    max_negatives: Annotated[int | None, typer.Option(help="Keep at most N negatives per query.")] = None,
    queries_per_shard: Annotated[int, typer.Option(help="Queries per Parquet part.")] = 1000,
    on_empty: Annotated[Literal["skip", "error"], typer.Option(help="Empty or blank queries and passages: leave them out and count them, or refuse the file.")] = "skip",
    overwrite: Overwrite = False,
    encoding: Encoding = None,
) -> None:
    """Turn Tevatron/RLHN-style training rows into judgment shards, so published data can be relabeled without re-mining."""
    from pipeline import checks

    for path in files:
        checks.in_file(path, "FILES")
    checks.out_folder(out)
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import ingest as run_ingest

    cfg = IngestConfig(files=files, out=out, max_negatives=max_negatives, queries_per_shard=queries_per_shard, on_empty=on_empty,
                       overwrite=overwrite)
    manifest = run_ingest(cfg, log=log)
    print_summary("ingest", cfg.out, manifest.summary)
