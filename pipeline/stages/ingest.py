"""`mpr ingest`: Tevatron / RLHN-style rows straight into judgment shards, without re-mining.

Positives become `source=qrels, label=1`; negatives become `source=mined, label=0` with `rank` =
their position in `negative_passages` (1-based) and no score, so `mpr relabel` can judge them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.readers import OnEmpty, TevatronRow, iter_tevatron
from pipeline.data.schema import MINE_SCHEMA, to_table
from pipeline.data.shards import InputInfo, Manifest, ShardRun, sha256_file
from pipeline.stages.plan import StagePlan


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[Path] = Field(
        min_length=1,
        description="Tevatron/RLHN rows: JSONL(.gz) or Parquet with query_id, query, "
        "positive_passages, negative_passages.",
    )
    out: Path = Field(description="Output shard folder.")
    max_negatives: int | None = Field(None, ge=0, description="Keep at most N negatives per query.")
    queries_per_shard: int = Field(1000, ge=1, description="Queries per Parquet part.")
    on_empty: OnEmpty = Field(
        "skip",
        description="Empty or blank queries and passages: leave them out and count them, or refuse the file.",
    )
    overwrite: bool = Field(
        False, description="Replace an existing output folder written with other options."
    )


def _blocks(
    files: list[Path], size: int, on_empty: OnEmpty = "skip", empty: dict[str, int] | None = None
) -> Iterator[list[TevatronRow]]:
    block: list[TevatronRow] = []
    seen: set[str] = set()
    for path in files:
        for row in iter_tevatron(path, on_empty=on_empty, empty=empty):
            if row.qid in seen:  # across files; a repeat inside one file is caught by the reader
                from pipeline.errors import InputError

                raise InputError(path, f"query_id '{row.qid}' also appears in an earlier file")
            seen.add(row.qid)
            block.append(row)
            if len(block) == size:
                yield block
                block = []
    if block:
        yield block


def _empty_line(empty: dict[str, int]) -> str:
    counts = ", ".join(f"{name.replace('_', ' ')}: {n:,}" for name, n in sorted(empty.items()))
    return f"left out {counts} (--on-empty error refuses them)"


def plan(cfg: IngestConfig) -> StagePlan:
    """The queries and parts `run` would write: one pass over the rows, which are checked as `run` checks
    them."""
    empty: dict[str, int] = {}
    queries = parts = 0
    for block in _blocks(cfg.files, cfg.queries_per_shard, cfg.on_empty, empty):
        queries += len(block)
        parts += 1
    return StagePlan(
        stage="ingest",
        out=cfg.out,
        inputs=[str(p) for p in cfg.files],
        queries=queries,
        parts=parts,
        notes=[_empty_line(empty)] if empty else [],
    )


def run(cfg: IngestConfig, *, log: Callable[[str], None] = print) -> Manifest:
    started = time.perf_counter()
    inputs = [
        InputInfo(path=str(p.resolve()), kind="tevatron", fingerprint="sha256:" + sha256_file(p))
        for p in cfg.files
        if p.is_file()
    ]
    identity = {
        **cfg.model_dump(mode="json", exclude={"out", "overwrite", "files", "on_empty"}),
        "inputs": [i.fingerprint for i in inputs],
    }
    shards = ShardRun(
        cfg.out,
        stage="ingest",
        config=cfg.model_dump(mode="json"),
        identity=identity,
        inputs=inputs,
        overwrite=cfg.overwrite,
    )
    if shards.complete:
        log(f"{cfg.out}: already complete ({len(shards.manifest.shards)} shards); nothing to do")
        return shards.manifest
    empty: dict[str, int] = {}
    for index, block in enumerate(_blocks(cfg.files, cfg.queries_per_shard, cfg.on_empty, empty)):
        if shards.done(index):
            continue
        cols: dict[str, list] = {
            name: [] for name in ("qid", "query", "pid", "title", "text", "source", "rank", "label", "judge")
        }
        stats = {"queries": len(block), "positives": 0, "negatives": 0}
        for row in block:
            negatives = row.negatives[: cfg.max_negatives] if cfg.max_negatives is not None else row.negatives
            positive_ids = {p[0] for p in row.positives}
            entries: list[tuple[tuple[str, str | None, str], str, int | None, int, str | None]]
            entries = [(p, "qrels", None, 1, "qrels") for p in row.positives]
            entries += [
                (p, "mined", r, 0, None) for r, p in enumerate(negatives, start=1) if p[0] not in positive_ids
            ]
            for (pid, title, text), source, rank, label, judge in entries:
                for key, value in zip(
                    cols, (row.qid, row.query, pid, title, text, source, rank, label, judge)
                ):
                    cols[key].append(value)
            stats["positives"] += len(row.positives)
            stats["negatives"] += len(entries) - len(row.positives)
        shards.write(index, to_table(cols, MINE_SCHEMA), stats)
    if empty:
        log(f"ingest: {_empty_line(empty)}")
    return shards.finish({**shards.totals(), **empty, "seconds": round(time.perf_counter() - started, 2)})
