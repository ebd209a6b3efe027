"""Group building: judgment shards -> fixed-size training groups for the losses of `train.losses`.

Each group holds one query and k passage slots: its positives first (`label == 1`, or
`grade >= positive_threshold` when a threshold is given; at most `max_positives`, best grade first),
then its hard negatives (`label == 0`: mined negatives by rank, synthetic ones by level), then random
negatives drawn from the other queries' passages to fill. Unjudged candidates (`label` null) are never
used: they may be false negatives. Rows of the same query in several folders are merged (so a
relabeled folder and a synth folder build mixed groups, as SyCL does); a passage in two folders counts
once. Queries without a positive are skipped and counted.

The result is a plain `datasets.Dataset` with columns `query`, `passage_0` ... `passage_{k-1}` and
`label` = [grades, kinds] (shape [2, k]; kind 1 positive, 0 negative, -1 padding), which
sentence-transformers' own data collator carries to the loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import MprError
from pipeline.shards import read_shards

POSITIVE, NEGATIVE, PADDING = 1, 0, -1
SOURCE_ORDER = {"qrels": 0, "mined": 1, "synthetic": 2}


class GroupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[Path] = Field(min_length=1)
    group_size: int = Field(8, ge=2)
    max_positives: int = Field(4, ge=1)
    positive_threshold: float | None = Field(None, ge=0, le=1)
    random_negatives: bool = True
    seed: int = 42


@dataclass
class GroupStats:
    queries: int = 0
    groups: int = 0
    skipped_no_positive: int = 0
    positives: int = 0
    hard_negatives: int = 0
    random_negatives: int = 0
    padding: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["positives_per_group"] = round(self.positives / self.groups, 3) if self.groups else 0.0
        return {**out, **self.extra}


def passage(title: str | None, text: str) -> str:
    """A passage as the encoder sees it: title and text joined by a space (as `mpr mine` encodes it)."""
    return f"{title} {text}" if title else text


def _load(folders: list[Path]) -> pa.Table:
    columns = ["qid", "query", "pid", "title", "text", "source", "rank", "label", "grade", "level"]
    tables = []
    for n, folder in enumerate(folders):
        table = read_shards(folder)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise MprError(f"{folder}: not a judgment shard folder (missing column(s) {', '.join(missing)})")
        table = table.select(columns)
        tables.append(table.append_column("folder", pa.array([n] * table.num_rows, pa.int32())))
    return pa.concat_tables(tables)


def build_groups(cfg: GroupConfig):
    """The training `Dataset` and what went into it."""
    from datasets import Dataset

    table = _load(cfg.data)
    k = cfg.group_size
    rng = random.Random(cfg.seed)
    rows_by_query: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows_by_query.setdefault(row["qid"], []).append(row)
    pool = sorted({(r["pid"], passage(r["title"], r["text"])) for r in table.filter(pc.is_valid(table.column("label"))).to_pylist()})
    stats = GroupStats()
    out: dict[str, list] = {"query": [], **{f"passage_{j}": [] for j in range(k)}, "label": []}

    def is_positive(r: dict) -> bool:
        if r["label"] == 1:
            return True
        return cfg.positive_threshold is not None and r["grade"] is not None and r["grade"] >= cfg.positive_threshold

    for rows in rows_by_query.values():
        stats.queries += 1
        seen: set[str] = set()
        unique = []
        for r in sorted(rows, key=lambda r: r["folder"]):
            if r["pid"] not in seen:
                seen.add(r["pid"])
                unique.append(r)
        positives = [r for r in unique if is_positive(r)]
        if not positives:
            stats.skipped_no_positive += 1
            continue
        positives.sort(key=lambda r: (-(r["grade"] if r["grade"] is not None else 1.0), SOURCE_ORDER.get(r["source"], 3)))
        positives = positives[: min(cfg.max_positives, k - 1)]
        negatives = [r for r in unique if not is_positive(r) and r["label"] == 0]
        negatives.sort(key=lambda r: (SOURCE_ORDER.get(r["source"], 3), r["rank"] if r["rank"] is not None else 1 << 30, -(r["level"] or 0)))
        negatives = negatives[: k - len(positives)]
        slots = [(passage(r["title"], r["text"]), r["grade"] if r["grade"] is not None else 1.0, POSITIVE) for r in positives]
        slots += [(passage(r["title"], r["text"]), r["grade"] if r["grade"] is not None else 0.0, NEGATIVE) for r in negatives]
        stats.positives += len(positives)
        stats.hard_negatives += len(negatives)
        if cfg.random_negatives and len(slots) < k and pool:
            own = {r["pid"] for r in unique} | {passage(r["title"], r["text"]) for r in positives}
            tries = 0
            while len(slots) < k and tries < 20 * k:
                pid, text = pool[rng.randrange(len(pool))]
                tries += 1
                if pid in own or text in own:
                    continue
                own.add(pid)
                slots.append((text, 0.0, NEGATIVE))
                stats.random_negatives += 1
        while len(slots) < k:
            slots.append(("", 0.0, PADDING))
            stats.padding += 1
        out["query"].append(rows[0]["query"])
        for j, (text, _, _) in enumerate(slots):
            out[f"passage_{j}"].append(text)
        out["label"].append([[float(g) for _, g, _ in slots], [float(kind) for _, _, kind in slots]])
        stats.groups += 1
    if not stats.groups:
        raise MprError(f"no training group: none of the {stats.queries} queries in {', '.join(map(str, cfg.data))} has a positive")
    return Dataset.from_dict(out), stats
