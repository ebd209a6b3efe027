"""Where a stage's queries come from: a queries file (`.jsonl`, or `.tsv` as id<TAB>text), a BEIR folder
(one split's judged queries, or all, with the judged positives' texts when asked), or the queries of a
shard folder. Each source is recorded as an `InputInfo` with its fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.readers import (
    InputError,
    OnEmpty,
    find_file,
    open_text,
    read_corpus,
    read_qrels,
    read_queries,
    split_names,
)
from pipeline.data.shards import (
    InputInfo,
    VerifyMode,
    fingerprint_shards,
    read_part,
    sha256_file,
    shard_files,
    verify_shards,
)
from pipeline.errors import MprError


@dataclass
class Queries:
    """The queries to write passages for, in order, with their judged positives (for `with_qrels`)."""

    items: list[tuple[str, str]]
    inputs: list[InputInfo]
    positives: dict[str, list[tuple[str, str | None, str]]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)


def input_info(path: Path, kind: str) -> InputInfo:
    return InputInfo(path=str(path.resolve()), kind=kind, fingerprint="sha256:" + sha256_file(path))


def read_queries_tsv(path: Path) -> dict[str, str]:
    """`id<TAB>text` per line; a header line (`id`/`_id`/`qid`/`query-id` then `text`/`query`) is skipped."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise InputError(
                    path, f"expected 2 tab-separated fields (id, text), got {len(fields)}", lineno
                )
            qid, text = fields[0].strip(), fields[1].strip()
            if (
                lineno == 1
                and qid.lower() in {"id", "_id", "qid", "query-id", "query_id"}
                and text.lower() in {"text", "query"}
            ):
                continue
            if not qid:
                raise InputError(path, "empty query id", lineno)
            if not text:
                raise InputError(path, f"query '{qid}' has an empty text", lineno)
            if qid in first_line:
                raise InputError(path, f"duplicate id '{qid}' (first seen on line {first_line[qid]})", lineno)
            first_line[qid] = lineno
            queries[qid] = text
    return queries


def read_queries_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise InputError(path, "no such file (--queries)")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".json"):
        queries = read_queries(path)
    elif kind in (".tsv", ".txt"):
        queries = read_queries_tsv(path)
    else:
        raise InputError(
            path, 'unknown queries format: use .jsonl ({"_id", "text"} per line) or .tsv (id<TAB>text)'
        )
    if not queries:
        raise InputError(path, "no queries")
    return queries


def queries_from_shards(folder: Path, verify: VerifyMode | None = None) -> Queries:
    if not folder.is_dir():
        raise MprError(f"{folder}: no such shard folder (--from-shards)")
    manifest = verify_shards(folder, verify)
    seen: dict[str, str] = {}
    for path in shard_files(folder):
        table = read_part(path, columns=["qid", "query"])
        for qid, query in zip(table.column("qid").to_pylist(), table.column("query").to_pylist()):
            seen.setdefault(qid, query)
    kind = f"shards:{manifest.stage}"
    return Queries(
        list(seen.items()),
        [
            InputInfo(
                path=str(folder.resolve()), kind=kind, fingerprint=fingerprint_shards(folder), carried=False
            )
        ],
    )


def queries_from_beir(root: Path, split: str, with_qrels: bool, on_empty: OnEmpty = "skip") -> Queries:
    if not root.is_dir():
        raise MprError(f"{root}: no such data folder")
    qpath = find_file(root, "queries.jsonl")
    if qpath is None:
        raise InputError(
            root / "queries.jsonl",
            "missing file (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv)",
        )
    empty: list[str] = []
    queries = read_queries(qpath, on_empty=on_empty, empty=empty)
    inputs = [input_info(qpath, "beir:queries.jsonl")]
    splits = split_names(root) if split == "all" else [split]
    qrels: dict[str, dict[str, int]] = {}
    if split != "all" or with_qrels:
        for name in splits:
            path = find_file(root / "qrels", f"{name}.tsv")
            if path is None:
                available = ", ".join(split_names(root)) or "none"
                raise InputError(
                    root / "qrels" / f"{name}.tsv",
                    f"split '{name}' does not exist (available: {available}, or all)",
                )
            inputs.append(input_info(path, f"beir:qrels/{name}"))
            for qid, judged in read_qrels(path)[0].items():
                qrels.setdefault(qid, {}).update(judged)
    notes: dict[str, int] = {"empty_queries": len(empty)} if empty else {}
    if split == "all":
        items = list(queries.items())
    else:
        unknown = [q for q in qrels if q not in queries and q not in set(empty)]
        if unknown:
            notes["qrels_unknown_queries"] = len(unknown)
        items = [(q, queries[q]) for q in qrels if q in queries]
        if not items:
            raise InputError(inputs[-1].path, "no judged query is in queries.jsonl")
    positives: dict[str, list[tuple[str, str | None, str]]] = {}
    if with_qrels:
        cpath = find_file(root, "corpus.jsonl")
        if cpath is None:
            raise InputError(root / "corpus.jsonl", "missing file (--with-qrels reads the positives' texts)")
        corpus = read_corpus(cpath, on_empty=on_empty)
        if corpus.empty:
            notes["empty_documents"] = len(corpus.empty)
        inputs.append(input_info(cpath, "beir:corpus.jsonl"))
        missing = 0
        for qid, judged in qrels.items():
            for pid, score in judged.items():
                if score < 1:
                    continue
                i = corpus.index.get(pid)
                if i is None:
                    missing += pid not in corpus.empty
                    continue
                positives.setdefault(qid, []).append((pid, corpus.titles[i], corpus.texts[i]))
        if missing:
            notes["qrels_unknown_documents"] = missing
    return Queries(items, inputs, positives, notes)
