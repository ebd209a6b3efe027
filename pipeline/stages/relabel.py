"""`mpr relabel`: an LLM judges the mined candidates; false negatives are relabeled, dropped or graded.

Modes, after RLHN (Thakur et al., 2025) and BiXSE:
- `relabel`: per query, the LLM sees the query, its known positives and up to `batch_candidates`
  numbered candidates and names the relevant ones; those become positives (`label=1`).
- `drop`: flagged candidates are removed. `drop-query`: a query with any flagged candidate is removed.
- `graded`: per (query, candidate) pair, a 0-3 rubric grade, read as `pipeline.llm.judge` says: `grade`
  on the 0-1 scale, `level` the sampled grade, `label` = grade >= `positive_threshold` (qrels rows keep
  theirs). The label follows the grade written, not the sampled level, so `mpr train
  --positive-threshold` with the same value keeps every label: a judge that samples 2 but puts weight
  on 1 gives a grade under 2/3.
A query with more than `max_flagged` flags is removed in every mode. With `confirm_model`, what the
first model flagged is judged again by the second, whose verdict stands (a cascade).

Every input row is written out, or counted as dropped by the mode. Added columns: `prior_label` (the
label before this stage), `llm_label` (the verdict, 1/0), `rationale`, `error` (why a row could not be
judged; its label is then left as it was), `prompt` (`name@version` of the prompt used).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import pyarrow as pa
from pydantic import Field

from pipeline.data.identity import RUNTIME, identity
from pipeline.data.labels import (
    NEGATIVE,
    POSITIVE,
)
from pipeline.data.schema import with_extra
from pipeline.data.shards import (
    FAILURES,
    RETRYABLE,
    FailureLog,
    InputInfo,
    Manifest,
    ShardRun,
    fingerprint_shards,
    iter_groups,
    read_part,
    read_part_schema,
    shard_files,
    shard_name,
    verify_shards,
)
from pipeline.errors import MprError
from pipeline.llm.base import ChatBackend
from pipeline.llm.judge import GRADED_SCHEMAS, Judge, JudgeOptions, Verdict
from pipeline.llm.models import TokenCounter, resolve_llm_alias
from pipeline.llm.prompt_files import Prompt, load_prompt
from pipeline.llm.stage import LLMStageConfig, add_llm_stats, close_backends, open_backends
from pipeline.llm.types import ChatResult
from pipeline.stages.audit import AuditOptions, run_audit
from pipeline.stages.plan import StagePlan
from pipeline.stages.zone import ZONE_FIELD, Reasons, ZoneOptions
from pipeline.stages.zone import select as zone_select
from pipeline.stages.zone import unsure as zone_unsure

Mode = Literal["relabel", "drop", "drop-query", "graded"]
RELABEL_FIELDS = (
    pa.field("prior_label", pa.int8()),
    pa.field("llm_label", pa.int8()),
    pa.field("rationale", pa.string()),
    pa.field("error", pa.string()),
    pa.field("prompt", pa.string()),
    ZONE_FIELD,
)


class RelabelConfig(LLMStageConfig, JudgeOptions, AuditOptions, ZoneOptions):
    input: Path = Field(description="Shard folder from mpr mine or mpr ingest.", json_schema_extra=RUNTIME)
    out: Path = Field(description="Output shard folder.", json_schema_extra=RUNTIME)
    model: str = Field(description="Judge model id or alias (Qwen2.5-7B = Qwen/Qwen2.5-7B-Instruct).")
    mode: Mode = Field(
        "relabel", description="What to do with flagged false negatives, or grade every pair 0-3."
    )
    confirm_model: str | None = Field(
        None, description="Cascade: a stronger model re-judges what --model flagged."
    )
    prompt: str | None = Field(
        None,
        description="Prompt file from prompts/ (relabel, relabel_cot, graded, graded_batch; "
        "default: relabel, "
        "or graded in graded mode).",
    )
    candidates: Literal["negatives", "all"] = Field(
        "negatives", description="Judge the kept hard negatives, or every mined candidate."
    )
    max_candidates: int = Field(20, ge=1, description="Candidates judged per query, best-ranked first.")
    grade_positives: bool = Field(False, description="Graded mode: grade the qrels positives too.")
    max_flagged: int | None = Field(
        None, ge=0, description="Remove a query with more flagged candidates than this (every mode)."
    )

    @property
    def prompt_name(self) -> str:
        if self.prompt:
            return self.prompt
        if self.mode == "graded":
            return "graded" if self.per_request(graded=True) == 1 else "graded_batch"
        return "relabel"

    def identity(self, model: str, confirm: str | None, prompt: Prompt) -> dict[str, Any]:
        return {
            **identity(self),
            "model": model,
            "confirm_model": confirm,
            "prompt": prompt.id,
        }


def _pick_candidates(rows: list[dict], cfg: RelabelConfig) -> list[int]:
    if cfg.candidates == "negatives":
        picked = [i for i, r in enumerate(rows) if r["source"] == "mined" and r["label"] == NEGATIVE]
    else:
        picked = [i for i, r in enumerate(rows) if r["source"] == "mined" and r["label"] != POSITIVE]
    picked.sort(key=lambda i: (rows[i]["rank"] is None, rows[i]["rank"] or 0))
    picked = picked[: cfg.max_candidates]
    if cfg.mode == "graded" and cfg.grade_positives:
        picked = [i for i, r in enumerate(rows) if r["source"] == "qrels" and r["label"] == POSITIVE] + picked
    return picked


def _judge_items(
    groups: list[tuple[str, list[dict]]], cfg: RelabelConfig
) -> tuple[list[list[int]], list[tuple[str, list[dict], list[dict]]], list[Reasons]]:
    """Per query: the indices of its rows to judge, (query, known positives, those rows) for the judge, and
    why the candidates outside the ambiguity zone (pipeline.stages.zone) are not judged."""
    picked, reasons = [], []
    for _, rows in groups:
        idx, why = zone_select(rows, _pick_candidates(rows, cfg), cfg)
        picked.append(idx)
        reasons.append(why)
    items = [
        (
            rows[0]["query"],
            [r for r in rows if r["label"] == POSITIVE and r["source"] != "synthetic"],
            [rows[i] for i in idx],
        )
        for (_, rows), idx in zip(groups, picked)
    ]
    return picked, items, reasons


@dataclass
class Part:
    index: int
    groups: list[tuple[str, list[dict]]]


def plan_parts(folder: Path, queries_per_shard: int) -> tuple[list[Path], list[tuple[int, int, int]]]:
    """Output parts as (input file index, first query, end query); a part never spans two input files."""
    files = shard_files(folder)
    parts = []
    for f, path in enumerate(files):
        qids = read_part(path, columns=["qid"]).column("qid").to_pylist()
        n = sum(1 for i, q in enumerate(qids) if i == 0 or qids[i - 1] != q)
        parts += [(f, s, min(s + queries_per_shard, n)) for s in range(0, n, queries_per_shard)]
    return files, parts


def _load_part(
    files: list[Path], parts: list[tuple[int, int, int]], index: int, cache: dict[int, list]
) -> Part:
    f, start, end = parts[index]
    if f not in cache:
        cache.clear()
        cache[f] = [(qid, rows.to_pylist()) for qid, rows in iter_groups(read_part(files[f]))]
    return Part(index, cache[f][start:end])


class Relabeler:
    def __init__(
        self,
        cfg: RelabelConfig,
        backend: ChatBackend,
        confirm: ChatBackend | None,
        model: str,
        confirm_model: str | None,
    ):
        self.cfg = cfg
        self.judge = Judge(load_prompt(cfg.prompt_name), cfg)
        self.judge.fit = backend.fit
        self.backend, self.confirm = backend, confirm
        self.model, self.confirm_model = model, confirm_model
        self.cheap: ChatBackend | None = None  # zone=unsure: the cheap judge (default: `backend`)

    def _ask(
        self,
        backend: ChatBackend,
        items: list[tuple[str, list[dict], list[dict]]],
        judge_id: str,
        desc: str,
        stats: dict[str, int],
    ) -> list[list[Verdict]]:
        """Judge each (query, positives, candidates); one verdict per candidate, in order."""
        requests, where = [], []
        for item, (query, positives, candidates) in enumerate(items):
            for request, idx in self.judge.requests(query, positives, candidates):
                requests.append(request)
                where.append((item, idx))
        n_of = [len(idx) for _, idx in where]
        validators = {n: self.judge.validator(n) for n in set(n_of)}
        results: list[tuple[int, ChatResult]] = []
        # one validator per candidate count: group requests by it so each run validates its own answers
        for n, check in validators.items():
            picked = [i for i, m in enumerate(n_of) if m == n]
            got = backend.run_sync(
                [requests[i] for i in picked], validate=check, progress=desc if self.cfg.progress else False
            )
            add_llm_stats(stats, "llm", backend.last_stats)
            results += list(zip(picked, got))
        verdicts: list[list[Verdict | None]] = [[None] * len(c) for _, _, c in items]
        for i, result in sorted(results, key=lambda x: x[0]):
            item, idx = where[i]
            for j, verdict in zip(idx, self.judge.verdicts(result, len(idx), judge_id)):
                verdicts[item][j] = verdict
        for key, n in self.judge.counts.items():
            stats[key] = stats.get(key, 0) + n
        self.judge.counts.clear()
        return cast(list[list[Verdict]], verdicts)  # every slot is filled: each candidate is in one request

    def process(self, part: Part, desc: str) -> tuple[list[dict], dict[str, int]]:
        cfg = self.cfg
        stats = dict.fromkeys(
            (
                "queries",
                "rows_in",
                "judged",
                "flagged",
                "relabeled",
                "confirmed",
                "overturned",
                "failed",
                "dropped_rows",
                "dropped_queries",
                "rows_out",
                "zone_skipped",
            ),
            0,
        )
        picked, items, reasons = _judge_items(part.groups, cfg)
        if cfg.zone == "unsure":
            picked = zone_unsure(self, self.cheap or self.backend, part.groups, picked, reasons, desc, stats)
            items = [
                (q, p, [rows[i] for i in idx])
                for (q, p, _), (_, rows), idx in zip(items, part.groups, picked)
            ]
        stats["zone_skipped"] = sum(len(r) for r in reasons)
        verdicts = self._ask(self.backend, items, self.model, desc, stats)
        if self.confirm is not None:
            confirm_id = self.confirm_model or self.confirm.model
            again = [[j for j, v in enumerate(vs) if v.flagged] for vs in verdicts]
            second = self._ask(
                self.confirm,
                [(q, p, [c[j] for j in js]) for (q, p, c), js in zip(items, again)],
                confirm_id,
                desc + " (confirm)",
                stats,
            )
            for vs, js, ws in zip(verdicts, again, second):
                for j, w in zip(js, ws):
                    stats["confirmed"] += bool(w.flagged)
                    stats["overturned"] += w.flagged is False
                    vs[j] = w if w.error is None else Verdict(error=f"confirm: {w.error}", judge=w.judge)
        out_rows: list[dict] = []
        for (_, rows), idx, vs, why in zip(part.groups, picked, verdicts, reasons):
            stats["queries"] += 1
            stats["rows_in"] += len(rows)
            by_row = dict(zip(idx, vs))
            flagged = sum(1 for v in vs if v.flagged)
            stats["flagged"] += flagged
            drop_query = (cfg.max_flagged is not None and flagged > cfg.max_flagged) or (
                cfg.mode == "drop-query" and flagged > 0
            )
            if drop_query:
                stats["dropped_queries"] += 1
                stats["dropped_rows"] += len(rows)
                continue
            for i, row in enumerate(rows):
                row = {
                    **row,
                    "prior_label": row["label"],
                    "llm_label": None,
                    "rationale": None,
                    "error": None,
                    "prompt": None,
                    "unjudged": why.get(i),
                }
                verdict = by_row.get(i)
                if verdict is not None:
                    row["prompt"] = self.judge.prompt.id
                    if verdict.error is not None:
                        stats["failed"] += 1
                        row["error"] = verdict.error
                    else:
                        stats["judged"] += 1
                        if cfg.mode == "drop" and verdict.flagged:
                            stats["dropped_rows"] += 1
                            continue
                        verdict_label = POSITIVE if verdict.flagged else NEGATIVE
                        row["llm_label"] = verdict_label
                        row["rationale"] = verdict.rationale
                        row["judge"] = verdict.judge
                        if cfg.mode == "graded":
                            row["grade"], row["level"] = verdict.grade, verdict.level
                        if row["source"] != "qrels":
                            row["label"] = verdict_label
                            stats["relabeled"] += verdict_label == POSITIVE and row["prior_label"] != POSITIVE
                out_rows.append(row)
        stats["rows_out"] = len(out_rows)
        stats[RETRYABLE] = stats[
            "failed"
        ]  # a rerun asks again for these rows; the answered ones come from the cache
        return out_rows, stats


def _schema_for(folder: Path) -> pa.Schema:
    base = read_part_schema(shard_files(folder)[0])
    return with_extra(
        *RELABEL_FIELDS, base=pa.schema([f for f in base if f.name not in {x.name for x in RELABEL_FIELDS}])
    )


def _prompt(cfg: RelabelConfig) -> Prompt:
    prompt = load_prompt(cfg.prompt_name)
    if (prompt.schema in GRADED_SCHEMAS) != (cfg.mode == "graded"):
        raise MprError(
            f"--prompt {prompt.name}: a {'graded' if prompt.schema in GRADED_SCHEMAS else 'listwise'} "
            f"prompt does not fit --mode {cfg.mode}"
        )
    return prompt


def _models(cfg: RelabelConfig) -> tuple[str, str | None, str | None]:
    """The judge, the cascade's second judge and the zone's cheap judge, aliases resolved."""
    confirm = resolve_llm_alias(cfg.confirm_model) if cfg.confirm_model else None
    zone = resolve_llm_alias(cfg.zone_model) if cfg.zone == "unsure" and cfg.zone_model else None
    return resolve_llm_alias(cfg.model), confirm, zone


def _verified_input(cfg: RelabelConfig) -> Manifest:
    if not cfg.input.is_dir():
        raise MprError(f"{cfg.input}: no such shard folder (--in)")
    return verify_shards(cfg.input, cfg.verify_inputs)


def _estimate(
    cfg: RelabelConfig, model: str, files: list[Path], parts: list[tuple[int, int, int]]
) -> StagePlan:
    """Build every request of the run (nothing is sent) and count them and their prompt tokens."""
    judge = Judge(load_prompt(cfg.prompt_name), cfg)
    counter = TokenCounter(model)
    cache: dict[int, list] = {}
    queries = candidates = requests = prompt_tokens = completion_tokens = 0
    for index in range(len(parts)):
        for query, positives, judged in _judge_items(_load_part(files, parts, index, cache).groups, cfg)[1]:
            queries += 1
            candidates += len(judged)
            for request, _ in judge.requests(query, positives, judged):
                requests += 1
                prompt_tokens += counter.count_messages(request.messages)
                completion_tokens += request.max_tokens or 0
    _, confirm, zone = _models(cfg)
    return StagePlan(
        stage="relabel",
        out=cfg.out,
        inputs=[str(cfg.input)],
        queries=queries,
        parts=len(parts),
        models=[m for m in (model, confirm, zone) if m],
        candidates=candidates,
        requests=requests,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=completion_tokens,
        prompt_tokens_per_candidate=round(prompt_tokens / max(candidates, 1), 1),
        token_counts="exact" if counter.exact else "estimated (~4 characters per token)",
        notes=[f"plus the requests of {cfg.confirm_model} for what the first model flags"]
        if cfg.confirm_model
        else [],
    )


def plan(cfg: RelabelConfig) -> StagePlan:
    """The queries, parts, candidates, requests and prompt tokens of `run`, counted without sending
    anything."""
    _verified_input(cfg)
    _prompt(cfg)
    files, parts = plan_parts(cfg.input, cfg.queries_per_shard)
    return _estimate(cfg, _models(cfg)[0], files, parts)


def run(
    cfg: RelabelConfig,
    *,
    log: Callable[[str], None] = print,
    backends: tuple[ChatBackend, ChatBackend | None] | None = None,
) -> Manifest:
    """Run (or resume) relabeling into `cfg.out`; returns the manifest."""
    started = time.perf_counter()
    source = _verified_input(cfg)
    model, confirm_model, zone_model = _models(cfg)
    prompt = _prompt(cfg)
    files, parts = plan_parts(cfg.input, cfg.queries_per_shard)
    inputs = [
        InputInfo(
            path=str(cfg.input.resolve()),
            kind=f"shards:{source.stage}",
            fingerprint=fingerprint_shards(cfg.input),
        )
    ]
    identity = {**cfg.identity(model, confirm_model, prompt), "inputs": [i.fingerprint for i in inputs]}
    shards = ShardRun(
        cfg.out,
        stage="relabel",
        config=cfg.model_dump(mode="json"),
        identity=identity,
        inputs=inputs,
        models={
            "judge": model,
            **({"confirm": confirm_model} if confirm_model else {}),
            **({"zone": zone_model} if zone_model else {}),
        },
        prompts={prompt.name: prompt.version},
        planned_shards=len(parts),
        overwrite=cfg.overwrite,
        job=cfg.job,
    )
    failures = FailureLog(shards)
    pending = [i for i in range(len(parts)) if shards.owns(i) and not shards.done(i)]
    if shards.complete or not pending:
        log(f"{cfg.out}: already complete; nothing to do")
        return _finish(shards, failures, shards.manifest.summary or _summary(shards.totals(), 0.0))
    retry = sum(s.retryable for s in shards.manifest.shards)
    if retry:
        log(f"relabel: retrying {retry:,} row(s) that failed in an earlier run")
    if backends is None:
        backend, (confirm, cheap) = open_backends(
            cfg, cfg.model, [confirm_model, zone_model], stage="relabel", log=log
        )
        model = backend.model
    else:
        backend, confirm = backends
        cheap = None
    relabeler = Relabeler(cfg, backend, confirm, model, confirm_model)
    relabeler.cheap = cheap
    schema = _schema_for(cfg.input)
    cache_parts: dict[int, list] = {}
    sent_now = 0
    audit: dict[str, Any] | None = None
    try:
        if cfg.audit:  # before any request of the full run
            audit = run_audit(cfg, relabeler, files, lambda: _estimate(cfg, model, files, parts), log=log)
        for n, index in enumerate(pending, start=1):
            part = _load_part(files, parts, index, cache_parts)
            rows, stats = relabeler.process(part, f"relabel part {n}/{len(pending)}")
            sent_now += stats.get("llm_sent", 0)
            failures.add(
                shard_name(index),
                [
                    {
                        "qid": r["qid"],
                        "pid": r["pid"],
                        "query": r["query"],
                        "kind": "invalid" if r["error"].startswith("invalid answer") else "request",
                        "error": r["error"],
                    }
                    for r in rows
                    if r["error"] is not None
                ],
            )
            shards.write(index, pa.Table.from_pylist(rows, schema=schema), stats)
    finally:
        if backends is None:
            close_backends(backend, confirm, cheap)
    summary = _summary(shards.totals(), time.perf_counter() - started, sent_now)
    if backend.endpoint is not None:
        summary["endpoint"] = backend.endpoint.model_dump(exclude={"url"})
    if audit is not None:
        summary["audit"] = audit
    return _finish(shards, failures, summary)


def _summary(totals: dict[str, int], seconds: float, sent_now: int = 0) -> dict[str, Any]:
    """The summed part statistics (`llm_sent`: every request any run sent for these parts), the items
    judged or failed (`attempted`), and this run's time and request rate."""
    summary: dict[str, Any] = {
        **totals,
        "attempted": totals.get("judged", 0) + totals.get("failed", 0),
        "seconds": round(seconds, 2),
        "requests_per_s": round(sent_now / seconds, 1) if seconds else 0.0,
    }
    if totals.get("failed"):
        summary["failures_file"] = FAILURES
    return summary


def _finish(shards: ShardRun, failures: FailureLog, summary: dict[str, Any]) -> Manifest:
    manifest = shards.finish(summary)
    if shards.job is not None and manifest is not shards.manifest:  # the last of the N jobs
        failures.merge_jobs()
    return manifest
