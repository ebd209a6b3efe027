"""IR metrics and the paired tests that compare two rankings, shared by `mpr eval`, the training evaluator,
`mpr run`'s report and `mpr study`.

The metrics are computed by ir_measures on the queries of the split that have at least one judgment
>= 1 (queries with only grade-0 judgments have no defined nDCG/MRR/recall and are counted as skipped):

- ndcg@10: graded nDCG@10 (gain = the qrels score, log2 discount; trec_eval's ndcg_cut.10, as in BEIR)
- mrr@10: reciprocal rank of the first document with score >= 1 within the top 10 (RR@10)
- recall@100 / recall@1000: share of the documents with score >= 1 retrieved in the top 100 / 1000

A judged query missing from a run scores 0 on every metric, and the aggregate is the mean over all
evaluated queries. Rankings order documents by score, ties by document id descending (trec_eval's
order); the ranks, not the raw scores, are what the metrics see, so every ir_measures provider agrees.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ir_measures
import numpy as np

from pipeline.data.readers import BeirDataset
from pipeline.errors import MprError
from pipeline.retrieval.encode import Encoder
from pipeline.retrieval.search import exact_topk

MEASURES: dict[str, Any] = {
    "ndcg@10": ir_measures.nDCG @ 10,
    "mrr@10": ir_measures.RR @ 10,
    "recall@100": ir_measures.R @ 100,
    "recall@1000": ir_measures.R @ 1000,
}
LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@100": "Recall@100", "recall@1000": "Recall@1000"}
PRIMARY = "ndcg@10"
RANDOMIZATION_SAMPLES = 10_000
RANDOMIZATION_SAMPLES = 10_000
#: Passages retrieved per query when evaluating.
DEFAULT_DEPTH = 1000

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def relevant_queries(qrels: Qrels) -> list[str]:
    """The queries that are evaluated: those with a judgment >= 1, in qrels order."""
    return [qid for qid, judged in qrels.items() if any(score >= 1 for score in judged.values())]


def rank_run(run: Run) -> dict[str, list[tuple[str, float]]]:
    """Each query's (pid, score) list best first: score descending, ties by pid descending."""
    return {
        qid: sorted(((pid, float(s)) for pid, s in docs.items()), key=lambda x: (x[1], x[0]), reverse=True)
        for qid, docs in run.items()
    }


def compute_metrics(run: Run, qrels: Qrels) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(aggregate, per query) nDCG@10, MRR@10, Recall@100, Recall@1000 over `relevant_queries(qrels)`."""
    qids = relevant_queries(qrels)
    if not qids:
        raise MprError("no query has a judgment >= 1")
    wanted = set(qids)
    eval_qrels = {qid: {pid: int(s) for pid, s in qrels[qid].items()} for qid in qids}
    eval_run = {
        qid: {pid: float(len(ranking) - i) for i, (pid, _) in enumerate(ranking)}
        for qid, ranking in rank_run(run).items()
        if qid in wanted and ranking
    }
    per_query = {qid: dict.fromkeys(MEASURES, 0.0) for qid in qids}
    names = {str(measure): key for key, measure in MEASURES.items()}
    if eval_run:
        for m in ir_measures.iter_calc(list(MEASURES.values()), eval_qrels, eval_run):
            if m.query_id in per_query:
                per_query[m.query_id][names[str(m.measure)]] = float(m.value)
    aggregate = {key: float(np.mean([per_query[q][key] for q in qids])) for key in MEASURES}
    return aggregate, per_query


def paired_tests(
    a: Sequence[float], b: Sequence[float], *, samples: int = RANDOMIZATION_SAMPLES, seed: int = 0
) -> tuple[float | None, float | None]:
    """Two-sided p-values (t-test, randomization test) of a - b over paired observations; None below 2 pairs.

    Identical observations give p = 1 for both (the t statistic is undefined there).
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diff)
    if n < 2:
        return None, None
    if not np.any(diff):
        return 1.0, 1.0
    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant non-zero differences: t = inf, p = 0
        p_t = float(ttest_rel(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).pvalue)
    observed = abs(diff.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(diff).max()))
    if 2**n <= samples:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        p_r = float(np.mean(np.abs(signs @ diff) / n >= observed - tolerance))
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for start in range(0, samples, 1000):
            signs = rng.choice(np.array([-1.0, 1.0]), size=(min(1000, samples - start), n))
            hits += int(np.sum(np.abs(signs @ diff) / n >= observed - tolerance))
        p_r = (hits + 1) / (samples + 1)
    return (p_t if math.isfinite(p_t) else None), p_r


def retrieve(
    encoder: Encoder,
    ds: BeirDataset,
    qids: list[str],
    depth: int,
    *,
    cache_dir: Path | None,
    progress: bool,
    seconds: dict[str, float],
    passages: list[str] | None = None,
) -> tuple[dict[str, list[tuple[str, float]]], dict[str, int]]:
    start = time.perf_counter()
    if passages is None:
        passages = [ds.corpus.full_text(i) for i in range(len(ds.corpus))]
    corpus_emb, counts = encoder.encode(
        passages, "passage", cache_dir=cache_dir, desc="encode corpus", progress=progress
    )
    seconds["encode_corpus"] = time.perf_counter() - start
    start = time.perf_counter()
    query_emb, _ = encoder.encode(
        [ds.queries[q] for q in qids], "query", cache_dir=cache_dir, desc="encode queries", progress=False
    )
    seconds["encode_queries"] = time.perf_counter() - start
    start = time.perf_counter()
    indices, scores = exact_topk(query_emb, corpus_emb, depth)
    ids = ds.corpus.ids
    run = {
        qid: {ids[i]: float(s) for i, s in zip(idx.tolist(), sc.tolist())}
        for qid, idx, sc in zip(qids, indices, scores)
    }
    seconds["search"] = time.perf_counter() - start
    return rank_run(run), counts


def run_tag(model: str) -> str:
    return re.sub(r"\s+", "_", model.strip()) or "mpr"


def format_run(ranked: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> str:
    """TREC run lines `qid Q0 pid rank score tag`; 9 significant digits keep float32 scores' order."""
    return "".join(
        f"{qid} Q0 {pid} {rank} {score:.9g} {tag}\n"
        for qid, ranking in ranked.items()
        for rank, (pid, score) in enumerate(ranking, start=1)
    )
