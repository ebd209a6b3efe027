"""`mpr eval`: nDCG@10, MRR@10, Recall@100 and Recall@1000 of a model (and a baseline, with paired tests) on a
BEIR split, with exact search over the whole corpus. The metrics are `pipeline.retrieval.metrics`'."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.locations import DEFAULT_ENCODER
from pipeline.data.readers import BeirDataset, load_beir
from pipeline.errors import MprError
from pipeline.formatting import number
from pipeline.retrieval.encode import Encoder, EncoderOptions, embedding_cache_dir
from pipeline.retrieval.metrics import (
    DEFAULT_DEPTH,
    LABELS,
    MEASURES,
    PRIMARY,
    RANDOMIZATION_SAMPLES,
    compute_metrics,
    format_run,
    paired_tests,
    relevant_queries,
    retrieve,
    run_tag,
)
from pipeline.stages.plan import StagePlan

SIGNIFICANCE = (
    "paired two-sided tests over queries: t-test (scipy.stats.ttest_rel) and randomization test "
    "(sign flips of the per-query differences; exact up to 13 queries, "
    f"else {RANDOMIZATION_SAMPLES:,} samples, seed 0)"
)


class EvalConfig(EncoderOptions):
    """Options of `mpr eval`."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv.")
    model: str = Field(
        DEFAULT_ENCODER,
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
    depth: int = Field(DEFAULT_DEPTH, ge=1, description="Passages retrieved per query.")
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


def _evaluate_model(
    name: str, cfg: EvalConfig, ds: BeirDataset, qids: list[str], log: Callable[[str], None]
) -> tuple[ModelResult, dict[str, list[tuple[str, float]]]]:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    encoder = Encoder.from_config(cfg, name)
    seconds["load_model"] = time.perf_counter() - start
    ranked, counts = retrieve(
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
