"""A mined-looking shard folder built by hand from a vaswani slice, with no encoder: per query one
qrels positive, and as mined candidates the query's other qrels positives (the hidden false
negatives, scored close to the positive) among non-relevant passages. Fast enough for any test."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.data.schema import SCHEMA
from pipeline.data.shards import ShardRun

from .conftest import SHARED_DATA, read_jsonl, write_beir


def vaswani_slice(root: Path, n_queries: int = 12, n_filler: int = 200) -> Path:
    src = SHARED_DATA / "vaswani"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    rows = [line.split("\t") for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(q for q, _, _ in rows))[:n_queries]
    rows = [(q, d, int(s)) for q, d, s in rows if q in qids]
    needed = {d for _, d, _ in rows}
    corpus = read_jsonl(src / "corpus.jsonl")
    docs = [d for d in corpus if d["_id"] in needed] + [d for d in corpus if d["_id"] not in needed][
        :n_filler
    ]
    queries = [q for q in read_jsonl(src / "queries.jsonl") if q["_id"] in set(qids)]
    return write_beir(root, docs, queries, {"train": rows})


def handmade_mined(
    data: Path, out: Path, *, candidates: int = 16, queries_per_shard: int = 4, seed: int = 0
) -> Path:
    """Shards as `mpr mine` writes them (stage mine, manifest), from the full qrels of `data`."""
    corpus = {d["_id"]: d for d in read_jsonl(data / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_jsonl(data / "queries.jsonl")}
    qrels: dict[str, list[str]] = {}
    for line in (data / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        if int(s) > 0:
            qrels.setdefault(q, []).append(d)
    relevant = {d for ds in qrels.values() for d in ds}
    filler = sorted(set(corpus) - relevant)
    rng = random.Random(seed)
    rows: list[dict] = []
    for qid, positives in qrels.items():
        pos_score = 0.8
        rows.append(
            {
                "qid": qid,
                "query": queries[qid],
                "pid": positives[0],
                "title": None,
                "text": corpus[positives[0]]["text"],
                "source": "qrels",
                "rank": 1,
                "score": pos_score,
                "label": 1,
            }
        )
        scored = [(p, pos_score - abs(rng.gauss(0.0, 0.05))) for p in positives[1 : candidates // 2]]
        scored += [
            (p, pos_score - 0.02 - abs(rng.gauss(0.0, 0.2)))
            for p in rng.sample(filler, candidates - len(scored))
        ]
        scored.sort(key=lambda x: -x[1])
        for rank, (pid, score) in enumerate(scored, start=2):
            rows.append(
                {
                    "qid": qid,
                    "query": queries[qid],
                    "pid": pid,
                    "title": None,
                    "text": corpus[pid]["text"],
                    "source": "mined",
                    "rank": rank,
                    "score": score,
                    "label": 0,
                }
            )
    run = ShardRun(
        out, stage="mine", config={"handmade": True}, identity={"handmade": seed}, planned_shards=None
    )
    qids = list(qrels)
    for index, start in enumerate(range(0, len(qids), queries_per_shard)):
        part = set(qids[start : start + queries_per_shard])
        run.write(index, pa.Table.from_pylist([r for r in rows if r["qid"] in part], schema=SCHEMA))
    run.finish({})
    return out
