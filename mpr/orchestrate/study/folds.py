"""The k folds: each written as a BEIR folder whose train qrels keep one positive per query."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpr.orchestrate.study.config import (
    StudyConfig,
)
from pipeline.data.readers import find_file, open_text, read_qrels, split_names
from pipeline.errors import MprError

if TYPE_CHECKING:
    pass


# -- data --------------------------------------------------------------------------------------------------


def _qid_key(qid: str) -> tuple[int, int, str]:
    return (0, int(qid), qid) if qid.isdigit() else (1, 0, qid)


def fold_assignment(qids: list[str], k: int, seed: int) -> dict[str, int]:
    order = sorted(qids, key=_qid_key)
    random.Random(seed).shuffle(order)
    return {qid: i % k for i, qid in enumerate(order)}


def kept_positive(qid: str, judged: dict[str, int], seed: int) -> str:
    return random.Random(f"{seed}:{qid}").choice(sorted(p for p, s in judged.items() if s >= 1))


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target.resolve())


def _qrels_tsv(rows: list[tuple[str, str, int]]) -> str:
    return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t{s}\n" for q, p, s in rows)


def _blank(obj: Any, fields: tuple[str, ...]) -> bool:
    return isinstance(obj, dict) and not any(isinstance(obj.get(f), str) and obj[f].strip() for f in fields)


def _jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(line, parsed object or None when it does not parse) for every non-blank line; the readers judge the
    rest."""
    with open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    yield line, json.loads(line)
                except ValueError:
                    yield line, None


def prepare_source(src: Path, dst: Path) -> tuple[Path, dict[str, int]]:
    """The collection the study reads: `src` itself, or, when it has documents with an empty title and text or
    queries with an empty text, a copy under `dst` without them and without the judgments that point at them.
    Returns (folder, counts of what was skipped)."""
    corpus, queries = find_file(src, "corpus.jsonl"), find_file(src, "queries.jsonl")
    if corpus is None or queries is None:
        raise MprError(
            f"{src}: not a BEIR folder (needs corpus.jsonl and queries.jsonl, each optionally .gz)"
        )
    if not split_names(src):
        raise MprError(f"{src}: no qrels/*.tsv")
    docs = list(_jsonl_lines(corpus))
    blank_docs = {str(o.get("_id")) for _, o in docs if _blank(o, ("title", "text"))}
    qs = list(_jsonl_lines(queries))
    blank_queries = {str(o.get("_id")) for _, o in qs if _blank(o, ("text",))}
    counts = {
        "documents": len(docs) - len(blank_docs),
        "queries": len(qs) - len(blank_queries),
        "empty_documents": len(blank_docs),
        "empty_queries": len(blank_queries),
        "judgments_dropped": 0,
    }
    if not blank_docs and not blank_queries:
        return src, counts
    _write_if_changed(
        dst / "corpus.jsonl",
        "".join(
            line if line.endswith("\n") else line + "\n"
            for line, o in docs
            if not (o is not None and str(o.get("_id")) in blank_docs and _blank(o, ("title", "text")))
        ),
    )
    _write_if_changed(
        dst / "queries.jsonl",
        "".join(
            line if line.endswith("\n") else line + "\n"
            for line, o in qs
            if not (o is not None and str(o.get("_id")) in blank_queries and _blank(o, ("text",)))
        ),
    )
    for split in split_names(src):
        qrels, _ = read_qrels(_qrels_file(src, split))
        rows = [(q, p, sc) for q, judged in qrels.items() for p, sc in judged.items()]
        kept = [(q, p, sc) for q, p, sc in rows if q not in blank_queries and p not in blank_docs]
        counts["judgments_dropped"] += len(rows) - len(kept)
        _write_if_changed(dst / "qrels" / f"{split}.tsv", _qrels_tsv(kept))
    return dst, counts


def _qrels_file(src: Path, split: str) -> Path:
    found = find_file(src / "qrels", f"{split}.tsv")
    if found is None:
        raise MprError(f"{src}: no qrels/{split}.tsv")
    return found


def pooled_qrels(src: Path) -> dict[str, dict[str, int]]:
    """The judgments of every qrels file of a collection together (the highest score of a pair judged
    twice)."""
    pooled: dict[str, dict[str, int]] = {}
    for split in split_names(src):
        qrels, _ = read_qrels(_qrels_file(src, split))
        for q, judged in qrels.items():
            for p, score in judged.items():
                pooled.setdefault(q, {})[p] = max(score, pooled.get(q, {}).get(p, score))
    return pooled


def write_fold(src: Path, dst: Path, cfg: StudyConfig, fold: int) -> dict[str, int]:
    """The BEIR folder of one fold: train = one kept positive per training query, test = the fold's full
    qrels."""
    qrels = pooled_qrels(src)
    judged = {q: j for q, j in qrels.items() if any(s >= 1 for s in j.values())}
    if len(judged) < cfg.folds:
        raise MprError(
            f"{src}: {len(judged)} judged queries with a positive, fewer than the {cfg.folds} folds"
        )
    assign = fold_assignment(list(judged), cfg.folds, cfg.fold_seed)
    train: list[tuple[str, str, int]] = []
    test: list[tuple[str, str, int]] = []
    for qid in sorted(judged, key=_qid_key):
        if assign[qid] == fold:
            test += [(qid, p, s) for p, s in judged[qid].items()]
        else:
            keep = kept_positive(qid, judged[qid], cfg.fold_seed)
            train.append((qid, keep, judged[qid][keep]))
    for name in ("corpus.jsonl", "queries.jsonl"):
        found = find_file(src, name)
        if found is None:
            raise MprError(f"{src}: no {name}")
        dst.mkdir(parents=True, exist_ok=True)
        _link(found, dst / found.name)
    _write_if_changed(dst / "qrels" / "train.tsv", _qrels_tsv(train))
    _write_if_changed(dst / "qrels" / "test.tsv", _qrels_tsv(test))
    return {
        "train_queries": len(train),
        "test_queries": len({q for q, _, _ in test}),
        "dropped_positives": sum(sum(1 for s in judged[q].values() if s >= 1) - 1 for q, _, _ in train),
    }
