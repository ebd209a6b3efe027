"""Group building: judgment shards -> fixed-size training groups for the losses of `train.losses`.

Each group holds one query and k passage slots: its positives first (at most `max_positives`, best grade
first), then its hard negatives (mined negatives by rank, synthetic ones by level), then random negatives
drawn from the other queries' passages to fill. A row's label is its `label`, unless `positive_threshold`
is given and the row has a grade: then the grade decides (`pipeline.data.labels.is_positive`), which can
add positives (a graded negative at or above the threshold) and remove them (a labelled positive below
it; `threshold_positives` and `threshold_negatives` count both); qrels rows without a grade keep their
label. Unjudged candidates (`label` null, no grade) are never used: they may be false negatives. Every
folder is checked against its manifest first (`pipeline.data.shards.verify_shards`; `verify_inputs`,
default $MPR_VERIFY or fast).

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
`label` = [grades, kinds] (shape [2, k]; kinds POSITIVE, NEGATIVE, PADDING of pipeline.data.labels), which
sentence-transformers' own data collator carries to the loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.labels import NEGATIVE, PADDING, POSITIVE, encoder_text, is_positive
from pipeline.data.shards import VerifyMode, fingerprint_shards, read_shards, verify_shards
from pipeline.errors import MprError
from train.config import GroupOptions

SOURCE_ORDER = {"qrels": 0, "mined": 1, "synthetic": 2}


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
    threshold_positives: int = 0
    threshold_negatives: int = 0
    superseded_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["positives_per_group"] = round(self.positives / self.groups, 3) if self.groups else 0.0
        return {**out, **self.extra}


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
        sources.append(
            Source(Path(folder), fingerprint_shards(folder), manifest.dataset or "", set(manifest.lineage))
        )
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
                f"query '{r['qid']}', passage '{r['pid']}': label {kept['label']} in "
                f"{sources[kept['folder']].folder} but {r['label']} in {sources[r['folder']].folder}, "
                "and neither folder is derived from the other; train on one of them"
            )
    return list(by_pid.values())


def training_label(row: dict[str, Any], threshold: float | None) -> int | None:
    """A row's label in training: with a threshold, its grade decides when it has one; else its `label`."""
    if threshold is not None and row["grade"] is not None:
        return POSITIVE if is_positive(row["grade"], threshold) else NEGATIVE
    return row["label"]


def build_groups(data: list[Path], cfg: GroupOptions):
    """The training `Dataset` of the shard folders `data`, and what went into it."""
    from datasets import Dataset

    table, sources = _load(data, cfg.verify_inputs)
    stats = GroupStats()
    # the later stage wins: a folder whose rows another given folder carries forward (the mining a relabel
    # read) is left out whole, so what the later stage changed, dropped or relabeled stands
    superseded = [
        n for n, s in enumerate(sources) if any(o is not s and s.fingerprint in o.lineage for o in sources)
    ]
    if superseded:
        keep = pc.invert(pc.is_in(table.column("folder"), pa.array(superseded, pa.int32())))
        stats.superseded_rows = table.num_rows - pc.sum(keep.cast(pa.int64())).as_py()
        table = table.filter(keep)
    k = cfg.group_size
    rng = random.Random(cfg.seed)
    rows_by_query: dict[tuple[str, str], list[dict]] = {}
    for row in table.to_pylist():
        rows_by_query.setdefault((sources[row["folder"]].dataset, row["qid"]), []).append(row)
    pool = sorted(
        {
            (r["pid"], encoder_text(r["title"], r["text"]))
            for r in table.filter(pc.is_valid(table.column("label"))).to_pylist()
        }
    )
    out: dict[str, list] = {"query": [], **{f"passage_{j}": [] for j in range(k)}, "label": []}
    for rows in rows_by_query.values():
        stats.queries += 1
        unique = _merge(sorted(rows, key=lambda r: r["folder"]), sources)
        labels = [training_label(r, cfg.positive_threshold) for r in unique]
        stats.threshold_positives += sum(
            r["label"] != POSITIVE and lab == POSITIVE for r, lab in zip(unique, labels)
        )
        stats.threshold_negatives += sum(
            r["label"] == POSITIVE and lab == NEGATIVE for r, lab in zip(unique, labels)
        )
        positives = [r for r, lab in zip(unique, labels) if lab == POSITIVE]
        if not positives:
            stats.skipped_no_positive += 1
            continue
        positive_texts = {encoder_text(r["title"], r["text"]) for r in positives}
        positives.sort(
            key=lambda r: (-(r["grade"] if r["grade"] is not None else 1.0), SOURCE_ORDER.get(r["source"], 3))
        )
        cap = min(cfg.max_positives, k - 1)
        stats.positives_capped += max(0, len(positives) - cap)
        positives = positives[:cap]
        negatives = [r for r, lab in zip(unique, labels) if lab == NEGATIVE]
        kept_negatives = [r for r in negatives if encoder_text(r["title"], r["text"]) not in positive_texts]
        stats.duplicate_negatives_dropped += len(negatives) - len(kept_negatives)
        negatives = kept_negatives
        negatives.sort(
            key=lambda r: (
                SOURCE_ORDER.get(r["source"], 3),
                r["rank"] if r["rank"] is not None else 1 << 30,
                -(r["level"] or 0),
            )
        )
        negatives = negatives[: k - len(positives)]
        slots = [
            (encoder_text(r["title"], r["text"]), r["grade"] if r["grade"] is not None else 1.0, POSITIVE)
            for r in positives
        ]
        slots += [
            (encoder_text(r["title"], r["text"]), r["grade"] if r["grade"] is not None else 0.0, NEGATIVE)
            for r in negatives
        ]
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
        raise MprError(
            f"no training group: none of the {stats.queries} queries in {', '.join(map(str, data))} "
            "has a positive"
        )
    return Dataset.from_dict(out), stats
