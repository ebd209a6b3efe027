"""`mpr mine`: retrieve candidates for each training query and keep hard negatives.

Rows per query (grouped, positives first):
- `source=qrels`: the judged passages (label 1 at or above `min_relevance`, else 0), with their rank
  and score in this retrieval when they were found within `depth`;
- `source=mined`: every retrieved candidate down to `depth` that is not a judged passage, with its
  rank and score. Candidates kept as hard negatives get `label=0`; the others keep `label=null` and
  name the first filter that rejected them in the `filter` column (`same_text_as_positive`,
  `skip_top`, `max_score`, `min_score`, `absolute_margin`, `relative_margin`, `not_sampled`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field

from pipeline.data.identity import RUNTIME, identity
from pipeline.data.locations import DEFAULT_ENCODER
from pipeline.data.readers import BeirDataset, OnEmpty, load_beir
from pipeline.data.schema import MINE_SCHEMA, to_table
from pipeline.data.shards import InputInfo, Manifest, ShardRun, read_manifest, sha256_file
from pipeline.errors import MprError
from pipeline.retrieval.encode import Encoder, EncoderOptions, embedding_cache_dir
from pipeline.retrieval.search import BM25Index, FaissIndex, exact_topk
from pipeline.stages.plan import StagePlan

FILTERS = (
    "same_text_as_positive",
    "skip_top",
    "max_score",
    "min_score",
    "absolute_margin",
    "relative_margin",
    "not_sampled",
)
RRF_K = 60


class MineConfig(EncoderOptions):
    """Options of `mpr mine` (the names follow sentence-transformers' `mine_hard_negatives` where they
    can)."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(
        description="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv (.gz accepted)."
    )
    split: str = Field("train", description="qrels split whose queries are mined.")
    out: Path = Field(description="Output shard folder.", json_schema_extra=RUNTIME)
    model: str = Field(DEFAULT_ENCODER, description="sentence-transformers model id or local path.")
    retriever: Literal["dense", "bm25", "union"] = Field(
        "dense", description="dense, bm25 (bm25s), or their union ranked by reciprocal rank fusion."
    )
    depth: int = Field(100, ge=1, description="Candidates retrieved per query (range_max).")
    skip_top: int = Field(0, ge=0, description="Ranks 1..N are never negatives (range_min).")
    num_negatives: int = Field(15, ge=0, description="Hard negatives kept per query.")
    sampling: Literal["top", "random"] = Field(
        "top", description="Keep the top-ranked eligible candidates or a random sample of them."
    )
    absolute_margin: float | None = Field(
        None, description="Negatives must score <= weakest positive - margin."
    )
    relative_margin: float | None = Field(
        None, ge=0, le=1, description="Negatives must score <= weakest positive x (1 - margin)."
    )
    max_score: float | None = Field(None, description="Negatives must score <= this.")
    min_score: float | None = Field(None, description="Negatives must score >= this.")
    keep_candidates: bool = Field(
        True,
        description="Also write the candidates that were not kept as negatives "
        "(label null, with the filter that rejected them).",
    )
    min_relevance: int = Field(1, description="qrels score from which a judgment is a positive.")
    max_bad_qrels: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fraction of qrels pointing at unknown ids tolerated (dropped and reported).",
    )
    on_empty: OnEmpty = Field(
        "skip",
        description="Empty or blank documents and queries: leave them out and count them, "
        "or refuse the data.",
        json_schema_extra=RUNTIME,
    )
    max_queries: int | None = Field(None, ge=1, description="Mine only the first N queries of the split.")
    queries_per_shard: int = Field(
        1000, ge=1, description="Queries per Parquet part (the unit of resumption)."
    )
    seed: int = Field(42, description="Seed for random sampling.")
    faiss: bool = Field(
        False, description="Search with FAISS (pip install 'mpr[faiss]').", json_schema_extra=RUNTIME
    )
    cache_dir: Path | None = Field(
        None,
        description="Embedding cache folder (default: $MPR_CACHE or ~/.cache/mpr).",
        json_schema_extra=RUNTIME,
    )
    no_cache: bool = Field(
        False, description="Do not read or write the embedding cache.", json_schema_extra=RUNTIME
    )
    overwrite: bool = Field(
        False,
        description="Replace an existing output folder written with other options.",
        json_schema_extra=RUNTIME,
    )
    progress: bool = Field(True, json_schema_extra=RUNTIME)

    def identity(self) -> dict[str, Any]:
        """The options that determine the shards (not where or how fast they are computed)."""
        return identity(self)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _inputs(ds: BeirDataset) -> list[InputInfo]:
    return [
        InputInfo(path=str(p.resolve()), kind=f"beir:{k}", fingerprint="sha256:" + sha256_file(p))
        for k, p in ds.files.items()
    ]


def plan_queries(ds: BeirDataset, cfg: MineConfig) -> tuple[list[str], int]:
    """The split's queries that have a positive, in qrels order; and how many were skipped without one."""
    qids = [q for q, judged in ds.qrels.items() if any(s >= cfg.min_relevance for s in judged.values())]
    skipped = len(ds.qrels) - len(qids)
    if cfg.max_queries:
        qids = qids[: cfg.max_queries]
    if not qids:
        raise MprError(
            f"{ds.files['qrels']}: no query has a judgment >= {cfg.min_relevance} (--min-relevance)"
        )
    return qids, skipped


def select_negatives(
    candidates: list[tuple[int, int, float]],
    *,
    positive_texts: set[str],
    texts: Callable[[int], str],
    min_positive_score: float,
    cfg: MineConfig,
    rng: random.Random,
) -> list[str | None]:
    """For (corpus index, rank, score) candidates in rank order: None for a kept hard negative,
    otherwise the name of the first filter that rejected it."""
    reasons: list[str | None] = []
    for idx, rank, score in candidates:
        reason = None
        if _norm(texts(idx)) in positive_texts:
            reason = "same_text_as_positive"
        elif rank <= cfg.skip_top:
            reason = "skip_top"
        elif cfg.max_score is not None and score > cfg.max_score:
            reason = "max_score"
        elif cfg.min_score is not None and score < cfg.min_score:
            reason = "min_score"
        elif cfg.absolute_margin is not None and score > min_positive_score - cfg.absolute_margin:
            reason = "absolute_margin"
        elif cfg.relative_margin is not None and score > min_positive_score * (1 - cfg.relative_margin):
            reason = "relative_margin"
        reasons.append(reason)
    eligible = [i for i, r in enumerate(reasons) if r is None]
    if cfg.sampling == "top":
        chosen = set(eligible[: cfg.num_negatives])
    else:
        chosen = set(rng.sample(eligible, min(cfg.num_negatives, len(eligible))))
    return [r if r is not None or i in chosen else "not_sampled" for i, r in enumerate(reasons)]


class _Retriever:
    """Ranks the corpus for a block of queries with the configured retriever."""

    def __init__(self, ds: BeirDataset, cfg: MineConfig, timings: dict[str, float], counts: dict[str, int]):
        self.ds, self.cfg = ds, cfg
        self.encoder: Encoder | None = None
        self.bm25: BM25Index | None = None
        self.faiss: FaissIndex | None = None
        cache = self.cache = embedding_cache_dir(cfg)
        self.timings = timings
        passages = [ds.corpus.full_text(i) for i in range(len(ds.corpus))]
        if cfg.retriever in ("dense", "union"):
            start = time.perf_counter()
            self.encoder = Encoder.from_config(cfg)
            timings["load_model"] = time.perf_counter() - start
            start = time.perf_counter()
            self.corpus_emb, got = self.encoder.encode(
                passages, "passage", cache_dir=cache, desc="encode corpus", progress=cfg.progress
            )
            counts["corpus_encoded"], counts["corpus_cached"] = got["encoded"], got["cached"]
            timings["encode_corpus"] = time.perf_counter() - start
            if cfg.faiss:
                self.faiss = FaissIndex(self.corpus_emb)
        if cfg.retriever in ("bm25", "union"):
            start = time.perf_counter()
            self.bm25 = BM25Index(passages, progress=cfg.progress)
            timings["index_bm25"] = time.perf_counter() - start

    def rank(
        self, qids: list[str]
    ) -> tuple[list[list[tuple[int, float]]], Callable[[int, list[int]], np.ndarray]]:
        """Per query, (corpus index, score) best first; and a scorer for arbitrary passages of a query."""
        queries = [self.ds.queries[q] for q in qids]
        depth = self.cfg.depth
        dense: list[list[tuple[int, float]]] = []
        if self.encoder is not None:
            start = time.perf_counter()
            q_emb, _ = self.encoder.encode(
                queries, "query", cache_dir=self.cache, desc="encode queries", progress=False
            )
            self.timings["encode_queries"] = (
                self.timings.get("encode_queries", 0.0) + time.perf_counter() - start
            )
            start = time.perf_counter()
            if self.faiss is not None:
                idx, scores = self.faiss.topk(q_emb, depth)
            else:
                idx, scores = exact_topk(q_emb, self.corpus_emb, depth)
            self.timings["search"] = self.timings.get("search", 0.0) + time.perf_counter() - start
            dense = [list(zip(i.tolist(), s.tolist())) for i, s in zip(idx, scores)]

            def dense_score(row: int, indices: list[int]) -> np.ndarray:
                return self.corpus_emb[indices] @ q_emb[row]

        if self.bm25 is None:
            return dense, dense_score
        start = time.perf_counter()
        b_idx, b_scores = self.bm25.topk(queries, depth)
        self.timings["search"] = self.timings.get("search", 0.0) + time.perf_counter() - start
        lexical = [list(zip(i.tolist(), s.tolist())) for i, s in zip(b_idx, b_scores)]
        if self.encoder is None:
            return lexical, lambda row, indices: self.bm25.scores(queries[row], indices)
        fused = []
        for row, (d, b) in enumerate(zip(dense, lexical)):
            rrf: dict[int, float] = {}
            for ranking in (d, b):
                for r, (i, _) in enumerate(ranking, start=1):
                    rrf[i] = rrf.get(i, 0.0) + 1.0 / (RRF_K + r)
            order = sorted(rrf, key=lambda i: (-rrf[i], i))[:depth]
            fused.append(list(zip(order, dense_score(row, order).tolist())))
        return fused, dense_score


def _rows_for_block(
    ds: BeirDataset, cfg: MineConfig, qids: list[str], retriever: _Retriever
) -> tuple[pa.Table, dict[str, int]]:
    ranked, scorer = retriever.rank(qids)
    corpus = ds.corpus
    cols: dict[str, list] = {name: [] for name in MINE_SCHEMA.names}
    stats = {
        k: 0
        for k in (
            "queries",
            "positives",
            "judged_negatives",
            "positives_retrieved",
            "candidates",
            "negatives",
            "queries_short",
        )
    }
    stats.update({f"filtered_{f}": 0 for f in FILTERS})
    max_level = max((s for judged in ds.qrels.values() for s in judged.values()), default=1) or 1

    def add(qid, idx, source, rank, score, label, grade, level, judge, reason):
        cols["qid"].append(qid)
        cols["query"].append(ds.queries[qid])
        cols["pid"].append(corpus.ids[idx])
        cols["title"].append(corpus.titles[idx])
        cols["text"].append(corpus.texts[idx])
        cols["source"].append(source)
        cols["rank"].append(rank)
        cols["score"].append(score)
        cols["label"].append(label)
        cols["grade"].append(grade)
        cols["level"].append(level)
        cols["judge"].append(judge)
        cols["filter"].append(reason)

    for row, qid in enumerate(qids):
        stats["queries"] += 1
        judged = ds.qrels[qid]
        judged_idx = [corpus.index[p] for p in judged]
        found = {i: (r, s) for r, (i, s) in enumerate(ranked[row], start=1)}
        judged_scores = scorer(row, judged_idx).tolist()
        positive_scores = []
        for idx, score in zip(judged_idx, judged_scores):
            rel = judged[corpus.ids[idx]]
            positive = rel >= cfg.min_relevance
            rank = found[idx][0] if idx in found else None
            add(qid, idx, "qrels", rank, score, int(positive), max(rel, 0) / max_level, rel, "qrels", None)
            if positive:
                positive_scores.append(score)
                stats["positives"] += 1
                stats["positives_retrieved"] += rank is not None
            else:
                stats["judged_negatives"] += 1
        judged_set = set(judged_idx)
        candidates = [(i, r, s) for r, (i, s) in enumerate(ranked[row], start=1) if i not in judged_set]
        positive_texts = {
            _norm(corpus.texts[corpus.index[p]]) for p, s in judged.items() if s >= cfg.min_relevance
        }
        reasons = select_negatives(
            candidates,
            positive_texts=positive_texts,
            texts=lambda i: corpus.texts[i],
            min_positive_score=min(positive_scores),
            cfg=cfg,
            rng=random.Random(f"{cfg.seed}:{qid}"),
        )
        kept = 0
        for (idx, rank, score), reason in zip(candidates, reasons):
            if reason is None:
                kept += 1
            else:
                stats[f"filtered_{reason}"] += 1
                if not cfg.keep_candidates:
                    continue
            add(qid, idx, "mined", rank, score, 0 if reason is None else None, None, None, None, reason)
        stats["candidates"] += len(candidates)
        stats["negatives"] += kept
        stats["queries_short"] += kept < cfg.num_negatives
    return to_table(cols, MINE_SCHEMA), stats


def _load(cfg: MineConfig) -> BeirDataset:
    return load_beir(cfg.data, cfg.split, max_bad_qrels=cfg.max_bad_qrels, on_empty=cfg.on_empty)


def _left_out(ds: BeirDataset, cfg: MineConfig) -> list[str]:
    """Warnings about what the data loader left out."""
    lines = []
    if ds.empty_documents or ds.empty_queries:
        lines.append(
            f"{cfg.data}: left out {ds.empty_documents} empty document(s) "
            f"and {ds.empty_queries} empty query(ies) "
            f"with their {ds.qrels_of_empty} judgment(s) (--on-empty error refuses them)"
        )
    if ds.dropped_qrels:
        lines.append(
            f"{ds.files['qrels']}: dropped {ds.dropped_qrels} judgments "
            "that point at unknown queries or documents"
        )
    return lines


def _blocks(qids: list[str], size: int) -> list[list[str]]:
    return [qids[i : i + size] for i in range(0, len(qids), size)]


def plan(cfg: MineConfig) -> StagePlan:
    """The queries and parts `run` would write, from the data alone (no model is loaded)."""
    ds = _load(cfg)
    qids, no_positive = plan_queries(ds, cfg)
    notes = _left_out(ds, cfg) + (
        [f"{no_positive:,} judged queries without a positive are skipped"] if no_positive else []
    )
    return StagePlan(
        stage="mine",
        out=cfg.out,
        inputs=[str(p) for p in ds.files.values()],
        queries=len(qids),
        parts=len(_blocks(qids, cfg.queries_per_shard)),
        corpus=len(ds.corpus),
        models=[] if cfg.retriever == "bm25" else [cfg.model],
        notes=notes,
    )


def run(cfg: MineConfig, *, log: Callable[[str], None] = print) -> Manifest:
    """Run (or resume) mining into `cfg.out`; returns the completed manifest."""
    started = time.perf_counter()
    ds = _load(cfg)
    for line in _left_out(ds, cfg):
        log(f"warning: {line}")
    inputs = _inputs(ds)
    qids, no_positive = plan_queries(ds, cfg)
    blocks = _blocks(qids, cfg.queries_per_shard)
    identity = {**cfg.identity(), "inputs": [i.fingerprint for i in inputs]}
    previous = read_manifest(cfg.out) if cfg.out.exists() else None
    shards = ShardRun(
        cfg.out,
        stage="mine",
        config=cfg.model_dump(mode="json"),
        identity=identity,
        inputs=inputs,
        models={"encoder": cfg.model} if cfg.retriever != "bm25" else {},
        planned_shards=len(blocks),
        overwrite=cfg.overwrite,
    )
    if shards.complete:
        log(f"{cfg.out}: already complete ({len(shards.manifest.shards)} shards); nothing to do")
        return shards.manifest
    if previous is not None and shards.manifest.shards:
        log(f"{cfg.out}: resuming, {len(shards.manifest.shards)} of {len(blocks)} shards already complete")
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    retriever = _Retriever(ds, cfg, timings, counts)
    from tqdm.auto import tqdm

    pending = [i for i in range(len(blocks)) if not shards.done(i)]
    for index in tqdm(pending, desc="mine", unit="shard", disable=not cfg.progress, dynamic_ncols=True):
        table, stats = _rows_for_block(ds, cfg, blocks[index], retriever)
        shards.write(index, table, stats)
    summary: dict[str, Any] = {
        **shards.totals(),
        "queries_without_positive": no_positive,
        "dropped_qrels": ds.dropped_qrels,
        "empty_documents": ds.empty_documents,
        "empty_queries": ds.empty_queries,
        "qrels_of_empty": ds.qrels_of_empty,
        **counts,
        "seconds": round(time.perf_counter() - started, 2),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    return shards.finish(summary)
