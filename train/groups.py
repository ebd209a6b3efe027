"""Group building: judgment shards -> fixed-size training groups for the losses of `train.losses`.

Each group holds one query and k passage slots: its positives first (`label == 1`, or
`grade >= positive_threshold` when a threshold is given; at most `max_positives`, best grade first),
then its hard negatives (`label == 0`: mined negatives by rank, synthetic ones by level), then random
negatives drawn from the other queries' passages to fill. Unjudged candidates (`label` null) are never
used: they may be false negatives. Every folder is checked against its manifest first
(`pipeline.data.shards.verify_shards`; `verify`, default $MPR_VERIFY or fast).

Merging: a query is (dataset, qid), the dataset being the query source its manifest records, so queries
of two datasets that share a qid stay apart. Rows of one query in several folders are merged (a relabeled
folder and a synth folder build mixed groups, as SyCL does); a passage in two folders counts once. The
later stage in the lineage wins: a folder whose rows another given folder carries forward (the mining a
relabel read) is left out whole, so the relabel's new positives, drops and grades stand whatever the
order of the folders; two unrelated folders that give a (qid, pid) different labels are an error naming
both. A passage whose
text equals a positive's (a duplicate under another pid) is never a negative of that query. Queries
without a positive are skipped, and positives left out by `max_positives` are counted.

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

from pipeline.data.shards import VerifyMode, fingerprint_shards, read_shards, verify_shards
from pipeline.errors import MprError

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
    verify: VerifyMode | None = None


@dataclass
class GroupStats:
    queries: int = 0
    groups: int = 0
    skipped_no_positive: int = 0
    positives: int = 0
    hard_negatives: int = 0
    random_negatives: int = 0
    padding: int = 0
    positives_capped: int = 0
    duplicate_negatives_dropped: int = 0
    superseded_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["positives_per_group"] = round(self.positives / self.groups, 3) if self.groups else 0.0
        return {**out, **self.extra}


def passage(title: str | None, text: str) -> str:
    """A passage as the encoder sees it: title and text joined by a space (as `mpr mine` encodes it)."""
    return f"{title} {text}" if title else text


@dataclass
class Source:
    """One input folder: where it sits, its dataset, and the folders upstream of it."""

    folder: Path
    fingerprint: str
    dataset: str
    lineage: set[str]


def _load(folders: list[Path], verify: VerifyMode | None = None) -> tuple[pa.Table, list[Source]]:
    columns = ["qid", "query", "pid", "title", "text", "source", "rank", "label", "grade", "level"]
    tables, sources = [], []
    for n, folder in enumerate(folders):
        manifest = verify_shards(folder, verify)
        sources.append(Source(Path(folder), fingerprint_shards(folder), manifest.dataset or "", set(manifest.lineage)))
        table = read_shards(folder)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise MprError(f"{folder}: not a judgment shard folder (missing column(s) {', '.join(missing)})")
        table = table.select(columns)
        tables.append(table.append_column("folder", pa.array([n] * table.num_rows, pa.int32())))
    return pa.concat_tables(tables), sources


def _merge(rows: list[dict], sources: list[Source]) -> list[dict]:
    """One row per pid of a query: the first folder's among folders that agree; an error when two
    unrelated folders give the pair different labels (a judged row beats an unjudged one)."""
    by_pid: dict[str, dict] = {}
    for r in rows:
        kept = by_pid.get(r["pid"])
        if kept is None or (kept["label"] is None and r["label"] is not None):
            by_pid[r["pid"]] = r
        elif kept["folder"] != r["folder"] and r["label"] is not None and r["label"] != kept["label"]:
            raise MprError(
                f"query '{r['qid']}', passage '{r['pid']}': label {kept['label']} in {sources[kept['folder']].folder} but "
                f"{r['label']} in {sources[r['folder']].folder}, and neither folder is derived from the other; train on one of them"
            )
    return list(by_pid.values())


def build_groups(cfg: GroupConfig):
    """The training `Dataset` and what went into it."""
    from datasets import Dataset

    table, sources = _load(cfg.data, cfg.verify)
    stats = GroupStats()
    # the later stage wins: a folder whose rows another given folder carries forward (the mining a relabel
    # read) is left out whole, so what the later stage changed, dropped or relabeled stands
    superseded = [n for n, s in enumerate(sources) if any(o is not s and s.fingerprint in o.lineage for o in sources)]
    if superseded:
        keep = pc.invert(pc.is_in(table.column("folder"), pa.array(superseded, pa.int32())))
        stats.superseded_rows = table.num_rows - pc.sum(keep.cast(pa.int64())).as_py()
        table = table.filter(keep)
    k = cfg.group_size
    rng = random.Random(cfg.seed)
    rows_by_query: dict[tuple[str, str], list[dict]] = {}
    for row in table.to_pylist():
        rows_by_query.setdefault((sources[row["folder"]].dataset, row["qid"]), []).append(row)
    pool = sorted({(r["pid"], passage(r["title"], r["text"])) for r in table.filter(pc.is_valid(table.column("label"))).to_pylist()})
    out: dict[str, list] = {"query": [], **{f"passage_{j}": [] for j in range(k)}, "label": []}

    def is_positive(r: dict) -> bool:
        if r["label"] == 1:
            return True
        return cfg.positive_threshold is not None and r["grade"] is not None and r["grade"] >= cfg.positive_threshold

    for rows in rows_by_query.values():
        stats.queries += 1
        unique = _merge(sorted(rows, key=lambda r: r["folder"]), sources)
        positives = [r for r in unique if is_positive(r)]
        if not positives:
            stats.skipped_no_positive += 1
            continue
        positive_texts = {passage(r["title"], r["text"]) for r in positives}
        positives.sort(key=lambda r: (-(r["grade"] if r["grade"] is not None else 1.0), SOURCE_ORDER.get(r["source"], 3)))
        cap = min(cfg.max_positives, k - 1)
        stats.positives_capped += max(0, len(positives) - cap)
        positives = positives[:cap]
        negatives = [r for r in unique if not is_positive(r) and r["label"] == 0]
        kept_negatives = [r for r in negatives if passage(r["title"], r["text"]) not in positive_texts]
        stats.duplicate_negatives_dropped += len(negatives) - len(kept_negatives)
        negatives = kept_negatives
        negatives.sort(key=lambda r: (SOURCE_ORDER.get(r["source"], 3), r["rank"] if r["rank"] is not None else 1 << 30, -(r["level"] or 0)))
        negatives = negatives[: k - len(positives)]
        slots = [(passage(r["title"], r["text"]), r["grade"] if r["grade"] is not None else 1.0, POSITIVE) for r in positives]
        slots += [(passage(r["title"], r["text"]), r["grade"] if r["grade"] is not None else 0.0, NEGATIVE) for r in negatives]
        stats.positives += len(positives)
        stats.hard_negatives += len(negatives)
        if cfg.random_negatives and len(slots) < k and pool:
            own = {r["pid"] for r in unique} | positive_texts
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
