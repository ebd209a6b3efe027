"""Retrieval evaluation on a BEIR split: `plan` and `run` (the `mpr eval` stage) and `IREvaluator`
(for trainers).

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

import csv
import functools
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ir_measures
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.locations import DEFAULT_MODEL
from pipeline.data.readers import BeirDataset, load_beir
from pipeline.errors import MprError
from pipeline.formatting import number
from pipeline.stages.encode import ENCODE_DEFAULTS, Encoder, EncoderOptions, embedding_cache_dir
from pipeline.stages.plan import StagePlan
from pipeline.stages.search import exact_topk

MEASURES: dict[str, Any] = {
    "ndcg@10": ir_measures.nDCG @ 10,
    "mrr@10": ir_measures.RR @ 10,
    "recall@100": ir_measures.R @ 100,
    "recall@1000": ir_measures.R @ 1000,
}
LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@100": "Recall@100", "recall@1000": "Recall@1000"}
PRIMARY = "ndcg@10"
RANDOMIZATION_SAMPLES = 10_000
SIGNIFICANCE = (
    "paired two-sided tests over queries: t-test (scipy.stats.ttest_rel) and randomization test "
    "(sign flips of the per-query differences; exact up to 13 queries, "
    f"else {RANDOMIZATION_SAMPLES:,} samples, seed 0)"
)

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


class EvalConfig(EncoderOptions):
    """Options of `mpr eval`."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv.")
    model: str = Field(
        DEFAULT_MODEL,
        description="Model to evaluate: a folder from mpr train, or any sentence-transformers id/path.",
    )
    split: str = Field("test", description="qrels split; only the queries judged in it count.")
    baseline: str | None = Field(
        None,
        description="A second model evaluated in the same command, "
        "with the differences and paired significance tests.",
    )
    json_out: Path | None = Field(None, description="Also write the report as JSON to this file.")
    run_out: Path | None = Field(None, description="Write the model's ranking as a TREC run file.")
    depth: int = Field(1000, ge=1, description="Passages retrieved per query.")
    cache_dir: Path | None = Field(
        None, description="Embedding cache folder (default: $MPR_CACHE or ~/.cache/mpr)."
    )
    no_cache: bool = Field(False, description="Do not read or write the embedding cache.")
    progress: bool = True


class ModelResult(BaseModel):
    model: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    corpus_encoded: int = 0
    corpus_cached: int = 0
    seconds: dict[str, float] = Field(default_factory=dict)


class Comparison(BaseModel):
    """Model minus baseline on one metric, with the p-values of the paired tests over queries."""

    metric: str
    model: float
    baseline: float
    delta: float
    p_ttest: float | None
    p_randomization: float | None


class EvalReport(BaseModel):
    data: str
    split: str
    queries: int
    skipped_queries: int = Field(description="judged queries without any judgment >= 1")
    dropped_qrels: int
    corpus_size: int
    depth: int
    max_seq_length: int | None
    result: ModelResult
    baseline: ModelResult | None = None
    comparison: list[Comparison] = Field(default_factory=list)
    significance: str | None = None
    run_out: str | None = None
    seconds: float = 0.0


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


def _retrieve(
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


def _evaluate_model(
    name: str, cfg: EvalConfig, ds: BeirDataset, qids: list[str], log: Callable[[str], None]
) -> tuple[ModelResult, dict[str, list[tuple[str, float]]]]:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    encoder = Encoder.from_config(cfg, name)
    seconds["load_model"] = time.perf_counter() - start
    ranked, counts = _retrieve(
        encoder,
        ds,
        qids,
        cfg.depth,
        cache_dir=embedding_cache_dir(cfg),
        progress=cfg.progress,
        seconds=seconds,
    )
    start = time.perf_counter()
    metrics, per_query = compute_metrics({q: dict(r) for q, r in ranked.items()}, ds.qrels)
    seconds["metrics"] = time.perf_counter() - start
    log(
        f"eval: {name}: nDCG@10 {metrics[PRIMARY]:.4f} "
        f"(corpus: {counts['encoded']:,} encoded, {counts['cached']:,} cached; "
        f"{sum(seconds.values()):.1f}s)"
    )
    return ModelResult(
        model=name,
        metrics=metrics,
        per_query=per_query,
        corpus_encoded=counts["encoded"],
        corpus_cached=counts["cached"],
        seconds={k: round(v, 3) for k, v in seconds.items()},
    ), ranked


def compare(result: ModelResult, baseline: ModelResult) -> list[Comparison]:
    qids = list(result.per_query)
    rows = []
    for key in MEASURES:
        a = [result.per_query[q][key] for q in qids]
        b = [baseline.per_query[q][key] for q in qids]
        p_t, p_r = paired_tests(a, b)
        rows.append(
            Comparison(
                metric=key,
                model=result.metrics[key],
                baseline=baseline.metrics[key],
                delta=result.metrics[key] - baseline.metrics[key],
                p_ttest=p_t,
                p_randomization=p_r,
            )
        )
    return rows


def run_tag(model: str) -> str:
    return re.sub(r"\s+", "_", model.strip()) or "mpr"


def format_run(ranked: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> str:
    """TREC run lines `qid Q0 pid rank score tag`; 9 significant digits keep float32 scores' order."""
    return "".join(
        f"{qid} Q0 {pid} {rank} {score:.9g} {tag}\n"
        for qid, ranking in ranked.items()
        for rank, (pid, score) in enumerate(ranking, start=1)
    )


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise MprError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _load(cfg: EvalConfig) -> tuple[BeirDataset, list[str]]:
    for path in (cfg.json_out, cfg.run_out):
        if path is not None and path.is_dir():
            raise MprError(f"{path}: is a folder; give a file name")
    ds = load_beir(cfg.data, cfg.split)
    qids = relevant_queries(ds.qrels)
    if not qids:
        raise MprError(f"{ds.files['qrels']}: no query has a judgment >= 1")
    return ds, qids


def plan(cfg: EvalConfig) -> StagePlan:
    """The queries, corpus and models `run` would evaluate, from the data alone (no model is loaded)."""
    ds, qids = _load(cfg)
    skipped = len(ds.qrels) - len(qids)
    notes = [f"{skipped:,} judged queries without a judgment >= 1 are skipped"] if skipped else []
    notes += [
        f"writes {what} to {path}"
        for what, path in (("the report", cfg.json_out), ("the run", cfg.run_out))
        if path is not None
    ]
    return StagePlan(
        stage="eval",
        out=None,
        inputs=[str(p) for p in ds.files.values()],
        queries=len(qids),
        corpus=len(ds.corpus),
        models=[m for m in (cfg.model, cfg.baseline) if m is not None],
        notes=notes,
    )


def run(cfg: EvalConfig, *, log: Callable[[str], None] = print) -> EvalReport:
    """Encode the corpus and the evaluated queries of a BEIR split, search exactly to `depth`, score the run;
    with a baseline, the same for it plus per-metric differences and paired significance tests. The stage
    writes no shards, so it returns its report (written to `json_out` as well when that is set)."""
    started = time.perf_counter()
    ds, qids = _load(cfg)
    skipped = len(ds.qrels) - len(qids)
    depth = min(cfg.depth, len(ds.corpus))
    log(
        f"eval: {cfg.data} ({cfg.split}): {len(qids):,} queries"
        + (f" ({skipped:,} judged queries without a judgment >= 1 skipped)" if skipped else "")
        + f", {len(ds.corpus):,} passages, depth {depth:,}"
    )
    if ds.empty_documents or ds.empty_queries:
        log(
            f"eval: left out {ds.empty_documents:,} empty document(s) "
            f"and {ds.empty_queries:,} empty query(ies) "
            f"with their {ds.qrels_of_empty:,} judgment(s)"
        )
    if depth < 1000:
        log(f"eval: depth {depth:,} < 1000, so recall@1000 counts only the top {depth:,}")
    cfg = cfg.model_copy(update={"depth": depth})
    result, ranked = _evaluate_model(cfg.model, cfg, ds, qids, log)
    report = EvalReport(
        data=str(cfg.data),
        split=cfg.split,
        queries=len(qids),
        skipped_queries=skipped,
        dropped_qrels=ds.dropped_qrels,
        corpus_size=len(ds.corpus),
        depth=depth,
        max_seq_length=cfg.max_seq_length,
        result=result,
    )
    if cfg.run_out is not None:
        _write_text(cfg.run_out, format_run(ranked, run_tag(cfg.model)))
        report.run_out = str(cfg.run_out)
    del ranked
    if cfg.baseline is not None:
        report.baseline, _ = _evaluate_model(cfg.baseline, cfg, ds, qids, log)
        report.comparison = compare(result, report.baseline)
        report.significance = SIGNIFICANCE
    report.seconds = round(time.perf_counter() - started, 3)
    if cfg.json_out is not None:
        _write_text(cfg.json_out, report.model_dump_json(indent=2) + "\n")
    return report


def format_table(report: EvalReport) -> str:
    """Metrics as rows; with a baseline, its column, the delta and both p-values."""
    lines = [
        f"{report.data} ({report.split}): {number(report.queries, 'count')} queries, "
        f"{number(report.corpus_size, 'count')} passages, "
        f"depth {number(report.depth, 'count')}",
        f"model     {report.result.model}",
    ]
    if report.baseline is None:
        header = ["metric", "model"]
        rows = [[LABELS[k], number(report.result.metrics[k], "metric")] for k in MEASURES]
    else:
        lines.append(f"baseline  {report.baseline.model}")
        header = ["metric", "model", "baseline", "delta", "p t-test", "p random."]
        rows = [
            [
                LABELS[c.metric],
                number(c.model, "metric"),
                number(c.baseline, "metric"),
                number(c.delta, "delta"),
                number(c.p_ttest, "p"),
                number(c.p_randomization, "p"),
            ]
            for c in report.comparison
        ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
    if report.significance:
        lines.append(f"p: {report.significance}")
    return "\n".join(lines)


def __getattr__(name: str) -> Any:
    """`IREvaluator` is built on first use: sentence-transformers takes seconds to import, and `mpr eval`
    checks its inputs before paying for it."""
    if name == "IREvaluator":
        return _ir_evaluator()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _ir_evaluator() -> type:
    import importlib

    try:  # sentence-transformers >= 6
        evaluation = importlib.import_module("sentence_transformers.base.evaluation")
    except ImportError:  # pragma: no cover - sentence-transformers 5.x
        evaluation = importlib.import_module("sentence_transformers.evaluation")
    base: Any = evaluation.SentenceEvaluator

    class IREvaluator(base):
        """nDCG@10 (primary), MRR@10, Recall@100 and Recall@1000 on a BEIR split, for
        SentenceTransformerTrainer.

        Each call encodes the corpus and the evaluated queries afresh with the model being trained (no cache)
        and scores exactly as `evaluate` does. Prompts resolve as in `Encoder.load`: explicit text, else the
        named prompt, else the model's "query" / "document" ("passage") prompts.
        """

        def __init__(
            self,
            data: str | Path | BeirDataset,
            split: str = "test",
            *,
            name: str = "",
            depth: int = EvalConfig.model_fields["depth"].default,
            max_queries: int | None = None,
            batch_size: int = ENCODE_DEFAULTS.batch_size,
            query_prompt: str | None = None,
            query_prompt_name: str | None = None,
            passage_prompt: str | None = None,
            passage_prompt_name: str | None = None,
            show_progress_bar: bool = False,
            write_csv: bool = True,
        ):
            super().__init__()
            self.ds = data if isinstance(data, BeirDataset) else load_beir(data, split)
            self.qids = relevant_queries(self.ds.qrels)[:max_queries]
            if not self.qids:
                raise MprError(f"{self.ds.files.get('qrels', self.ds.root)}: no query has a judgment >= 1")
            self.passages = [self.ds.corpus.full_text(i) for i in range(len(self.ds.corpus))]
            self.qrels = {q: self.ds.qrels[q] for q in self.qids}
            self.name = name
            self.depth = min(depth, len(self.ds.corpus))
            self.batch_size = batch_size
            self.query_prompt, self.query_prompt_name = query_prompt, query_prompt_name
            self.passage_prompt, self.passage_prompt_name = passage_prompt, passage_prompt_name
            self.show_progress_bar = show_progress_bar
            self.write_csv = write_csv
            self.csv_file = f"IR_evaluation{'_' + name if name else ''}_results.csv"
            self.primary_metric = PRIMARY

        def _encoder(self, model: Any) -> Encoder:
            return Encoder.from_model(
                "<training>",
                model,
                query_prompt=self.query_prompt,
                query_prompt_name=self.query_prompt_name,
                passage_prompt=self.passage_prompt,
                passage_prompt_name=self.passage_prompt_name,
                batch_size=self.batch_size,
            )

        def __call__(
            self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
        ) -> dict[str, float]:
            seconds: dict[str, float] = {}
            ranked, _ = _retrieve(
                self._encoder(model), self.ds, self.qids, self.depth,
                cache_dir=None, progress=self.show_progress_bar, seconds=seconds, passages=self.passages,
            )  # fmt: skip
            aggregate, _ = compute_metrics({q: dict(r) for q, r in ranked.items()}, self.qrels)
            if output_path is not None and self.write_csv:
                path = Path(output_path) / self.csv_file
                path.parent.mkdir(parents=True, exist_ok=True)
                new = not path.exists()
                with open(path, "a", newline="", encoding="utf-8") as fh:
                    writer = csv.writer(fh)
                    if new:
                        writer.writerow(["epoch", "steps", *MEASURES])
                    writer.writerow([epoch, steps, *(aggregate[k] for k in MEASURES)])
            metrics = self.prefix_name_to_metrics(aggregate, self.name)
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

        def get_config_dict(self) -> dict[str, Any]:
            return {
                "split": self.ds.split,
                "queries": len(self.qids),
                "corpus_size": len(self.passages),
                "depth": self.depth,
            }

    IREvaluator.__qualname__ = "IREvaluator"
    return IREvaluator
