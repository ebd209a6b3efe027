"""`mpr relabel --audit N`: measure the judge before paying for the full run.

What is known is kept apart from what is only likely. The audit judges, with the same prompt, mode,
batching and cascade as the full run:
- N known positives (rows with `source=qrels`, `label=1`): the judge's **recall**;
- N known negatives: judged negatives of the qrels (`source=qrels`, `label=0`) where there are any,
  else passages drawn at random from *other* queries' rows that the query's own rows do not hold. A
  random passage of the collection is negative with high confidence even on sparse qrels: the judge's
  **false-positive rate**;
- N likely negatives (mined candidates kept as negatives, from the lower half of their query's ranks):
  on sparsely labelled data these hold unlabelled positives (26-31% of CISI's and Vaswani's mined hard
  negatives are relevant), so their flag rate is reported as an **estimate of unlabelled positives**
  (and corrected for the judge's recall and false-positive rate, Rogan-Gladen), never held against it.

For each query the judge sees the audited passages in a seeded shuffled order and, as known positives,
only the query's other qrels positives (never the passage it is asked about). Cohen's kappa is computed
on the known positives and known negatives only, so a judge without errors scores 1; `--min-agreement`
applies to it (a judge wrong on a share e of its answers gets about 1 - 2e). Intervals are 95% (Wilson for
rates, a seeded percentile bootstrap for kappa). The projected requests and tokens of the full run come
with it (the dry-run count of prompt tokens; completion tokens from the audit's own answers, or the
request limit when every answer came from the cache). The result goes to `_audit.json` in the output
folder, into the manifest summary (`audit`) and into the report of `mpr run`. Below `min_agreement` the
stage stops before any full-run request is sent (`AuditFailed`, exit code 2), unless `force` is set.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline.data.identity import RUNTIME
from pipeline.data.shards import write_json_atomic
from pipeline.errors import MprError
from pipeline.formatting import number

if TYPE_CHECKING:
    from pipeline.llm.judge import Verdict
    from pipeline.stages.plan import StagePlan
    from pipeline.stages.relabel import RelabelConfig, Relabeler

AUDIT_FILE = "_audit.json"
BOOTSTRAP = 1000


class AuditOptions(BaseModel):
    """The audit's options (part of `RelabelConfig`; none of them changes what the stage writes)."""

    audit: int = Field(
        0,
        ge=0,
        description="First judge N known positives, N known negatives (random passages of other queries) "
        "and N likely negatives; report recall, false-positive rate, Cohen's kappa, the estimated share of "
        "unlabelled positives and the full run's projected tokens.",
        json_schema_extra=RUNTIME,
    )
    min_agreement: float = Field(
        0.4,
        ge=-1,
        le=1,
        description="Stop (exit 2) before the full run when the audit's kappa on the known positives "
        "and negatives is below this.",
        json_schema_extra=RUNTIME,
    )
    force: bool = Field(
        False, description="Run even when the audit is below --min-agreement.", json_schema_extra=RUNTIME
    )
    audit_seed: int = Field(0, description="Seed of the audit's sample.", json_schema_extra=RUNTIME)


class AuditFailed(MprError):
    """The judge disagrees with the known labels; nothing of the full run was sent (`_audit.json` stays)."""

    keeps_output = True


Kind = Literal["positive", "negative", "likely_negative"]


@dataclass
class AuditItem:
    qid: str
    row: dict[str, Any]
    kind: Kind  # a known positive, a known negative, or a likely negative (maybe an unlabelled positive)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def cohen_kappa(pairs: list[tuple[int, int]]) -> float | None:
    """Cohen's kappa of (truth, verdict) pairs; None when chance agreement is 1 (one class only)."""
    n = len(pairs)
    if n == 0:
        return None
    agree = sum(a == b for a, b in pairs) / n
    t1 = sum(a for a, _ in pairs) / n
    v1 = sum(b for _, b in pairs) / n
    chance = t1 * v1 + (1 - t1) * (1 - v1)
    if chance >= 1:
        return None
    return (agree - chance) / (1 - chance)


def kappa_interval(pairs: list[tuple[int, int]], seed: int) -> tuple[float, float] | None:
    rng = random.Random(seed)
    values = []
    for _ in range(BOOTSTRAP):
        k = cohen_kappa([pairs[rng.randrange(len(pairs))] for _ in pairs])
        if k is not None:
            values.append(k)
    if len(values) < BOOTSTRAP // 2:
        return None
    values.sort()
    return round(values[int(0.025 * len(values))], 4), round(
        values[min(len(values) - 1, int(0.975 * len(values)))], 4
    )


def agreement(pairs: list[tuple[int, int]], seed: int = 0) -> dict[str, Any]:
    """Precision, recall and Cohen's kappa of the verdicts against the known labels, with 95% intervals."""
    tp = sum(1 for t, v in pairs if t and v)
    fp = sum(1 for t, v in pairs if not t and v)
    fn = sum(1 for t, v in pairs if t and not v)
    tn = sum(1 for t, v in pairs if not t and not v)
    kappa = cohen_kappa(pairs)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "precision_ci": wilson(tp, tp + fp),
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "recall_ci": wilson(tp, tp + fn),
        "kappa": round(kappa, 4) if kappa is not None else None,
        "kappa_ci": kappa_interval(pairs, seed) if pairs else None,
    }


def unlabelled_share(flag_rate: float | None, recall: float | None, fpr: float | None) -> float | None:
    """The share of positives among the likely negatives, from their flag rate corrected for the judge's
    recall and false-positive rate (Rogan and Gladen, 1978), clipped to [0, 1]; None when the judge does
    not tell positives from negatives (recall <= false-positive rate)."""
    if flag_rate is None or recall is None or fpr is None or recall <= fpr:
        return None
    return round(min(1.0, max(0.0, (flag_rate - fpr) / (recall - fpr))), 4)


def sample(files: list[Path], n: int, seed: int, negatives_from: str) -> list[AuditItem]:
    """N known positives, N known negatives and N likely negatives, drawn with `seed`; texts are read for
    the drawn rows only. A random negative is another query's passage, shown as a candidate of a query
    that has drawn positives (so the judge sees it next to that query's other known positives)."""
    light = ["qid", "pid", "source", "label", "rank"]
    positives: list[tuple[int, int]] = []
    positive_qid: dict[tuple[int, int], str] = {}
    judged_negatives: list[tuple[int, int]] = []
    mined: dict[tuple[int, str], list[tuple[int, int]]] = {}  # (file, qid) -> [(rank, row)]
    rows_of: dict[str, tuple[int, int]] = {}  # qid -> one of its rows (for its query text)
    pids_of: dict[str, set[str]] = {}
    everything: list[tuple[int, int, str, str]] = []  # (file, row, qid, pid)
    for f, path in enumerate(files):
        table = pq.read_table(path, columns=light)
        cols = {c: table.column(c).to_pylist() for c in light}
        for i, (qid, pid, source, label, rank) in enumerate(zip(*(cols[c] for c in light))):
            rows_of.setdefault(qid, (f, i))
            pids_of.setdefault(qid, set()).add(pid)
            everything.append((f, i, qid, pid))
            if source == "qrels" and label == 1:
                positives.append((f, i))
                positive_qid[(f, i)] = qid
            elif source == "qrels" and label == 0:
                judged_negatives.append((f, i))
            elif (
                source == "mined"
                and rank is not None
                and (label == 0 or (negatives_from == "all" and label is None))
            ):
                mined.setdefault((f, qid), []).append((rank, i))
    likely: list[tuple[int, int]] = []
    for (f, _), ranked in mined.items():
        ranked.sort()
        likely += [(f, i) for _, i in ranked[len(ranked) // 2 :]]
    rng = random.Random(f"mpr-audit|{seed}")
    picked: list[tuple[tuple[int, int], Kind, str | None]] = [
        (p, "positive", None) for p in rng.sample(positives, min(n, len(positives)))
    ]
    picked += [(p, "negative", None) for p in rng.sample(judged_negatives, min(n, len(judged_negatives)))]
    hosts = sorted({positive_qid[p] for p, kind, _ in picked if kind == "positive"}) or sorted(pids_of)
    for _ in range(n - len(picked) + min(n, len(positives))):
        for _try in range(50):
            host = rng.choice(hosts)
            f, i, qid, pid = everything[rng.randrange(len(everything))]
            if qid != host and pid not in pids_of[host]:
                picked.append(((f, i), "negative", host))
                break
    picked += [(p, "likely_negative", None) for p in rng.sample(likely, min(n, len(likely)))]
    need = {p for p, _, _ in picked} | {rows_of[h] for _, _, h in picked if h is not None}
    by_file: dict[int, list[int]] = {}
    for f, i in need:
        by_file.setdefault(f, []).append(i)
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for f, idx in by_file.items():
        table = pq.read_table(files[f]).take(sorted(idx)).to_pylist()
        rows.update({(f, i): r for i, r in zip(sorted(idx), table)})
    items = []
    for p, kind, asked_for in picked:
        row = rows[p]
        if asked_for is not None:  # another query's passage, asked about for `asked_for`
            row = {
                **row,
                "qid": asked_for,
                "query": rows[rows_of[asked_for]]["query"],
                "source": "audit",
                "label": 0,
                "rank": None,
            }
        items.append(AuditItem(row["qid"], row, kind))
    return items


def _other_positives(
    files: list[Path], qids: set[str], audited: set[tuple[str, str]]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        table = pq.read_table(path, columns=["qid", "pid", "title", "text", "source", "label"])
        for row in table.to_pylist():
            if (
                row["qid"] in qids
                and row["source"] == "qrels"
                and row["label"] == 1
                and (row["qid"], row["pid"]) not in audited
            ):
                out.setdefault(row["qid"], []).append(row)
    return out


def run_audit(
    cfg: RelabelConfig,
    relabeler: Relabeler,
    files: list[Path],
    full_run: Callable[[], StagePlan],
    *,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Judge the sample with the stage's own judge; the result, also written to `_audit.json`.
    Raises `AuditFailed` when kappa is below `min_agreement` and `force` is not set."""
    items = sample(files, cfg.audit, cfg.audit_seed, cfg.candidates)
    if not items:
        raise MprError(
            f"{cfg.input}: --audit needs known positives (source=qrels) or mined negatives; found neither"
        )
    by_query: dict[str, list[AuditItem]] = {}
    for item in items:
        by_query.setdefault(item.qid, []).append(item)
    rng = random.Random(f"mpr-audit-order|{cfg.audit_seed}")
    for group in by_query.values():
        rng.shuffle(group)
    shown = _other_positives(files, set(by_query), {(i.qid, i.row["pid"]) for i in items})
    judge_items = [
        (group[0].row["query"], shown.get(qid, []), [i.row for i in group]) for qid, group in by_query.items()
    ]
    stats: dict[str, int] = {}
    verdicts = relabeler._ask(relabeler.backend, judge_items, relabeler.model, "audit", stats)
    if relabeler.confirm is not None:
        verdicts = _confirm(relabeler, judge_items, verdicts, stats)
    pairs: list[tuple[int, int]] = []  # (truth, verdict) on the known positives and negatives
    likely: list[int] = []
    failed = 0
    for group, vs in zip(by_query.values(), verdicts):
        for item, verdict in zip(group, vs):
            if verdict.error is not None or verdict.flagged is None:
                failed += 1
            elif item.kind == "likely_negative":
                likely.append(int(verdict.flagged))
            else:
                pairs.append((int(item.kind == "positive"), int(verdict.flagged)))
    known = agreement(pairs, cfg.audit_seed)
    negatives = known["fp"] + known["tn"]
    fpr = known["fp"] / negatives if negatives else None
    flag_rate = sum(likely) / len(likely) if likely else None
    result: dict[str, Any] = {
        "positives": sum(i.kind == "positive" for i in items),
        "negatives": sum(i.kind == "negative" for i in items),
        "likely_negatives": sum(i.kind == "likely_negative" for i in items),
        "failed": failed,
        **known,
        "false_positive_rate": round(fpr, 4) if fpr is not None else None,
        "false_positive_rate_ci": wilson(known["fp"], negatives),
        "likely_flag_rate": round(flag_rate, 4) if flag_rate is not None else None,
        "likely_flag_rate_ci": wilson(sum(likely), len(likely)),
        "unlabelled_positive_estimate": unlabelled_share(flag_rate, known["recall"], fpr),
        "min_agreement": cfg.min_agreement,
        "requests": stats.get("llm_sent", 0) + stats.get("llm_cache_hits", 0),
        "sent": stats.get("llm_sent", 0),
        "projected": _project(full_run(), stats),
    }
    kappa = result["kappa"]
    result["passed"] = kappa is not None and kappa >= cfg.min_agreement
    result["forced"] = not result["passed"] and cfg.force
    write_json_atomic(cfg.out / AUDIT_FILE, result)
    log(describe(result))
    if not result["passed"] and not cfg.force:
        raise AuditFailed(
            "audit: the judge agrees with the known labels at Cohen's kappa (95% CI) "
            f"{_fmt(kappa, result['kappa_ci'])}, below --min-agreement {cfg.min_agreement:g}; "
            f"recall {_fmt(result['recall'])}, false-positive rate "
            f"{_fmt(result['false_positive_rate'])} on {len(pairs)} known pairs. "
            f"Nothing of the full run was sent ({result['projected']['requests']:,} requests, "
            f"~{result['projected']['total_tokens']:,} tokens). Check the model and prompt, or pass --force. "
            f"Details: {cfg.out / AUDIT_FILE}"
        )
    return result


def _confirm(
    relabeler: Relabeler,
    items: list[tuple[str, list[dict], list[dict]]],
    verdicts: list[list[Verdict]],
    stats: dict[str, int],
) -> list[list[Verdict]]:
    from pipeline.llm.judge import Verdict

    assert relabeler.confirm is not None
    again = [[j for j, v in enumerate(vs) if v.flagged] for vs in verdicts]
    second = relabeler._ask(
        relabeler.confirm,
        [(q, p, [c[j] for j in js]) for (q, p, c), js in zip(items, again)],
        relabeler.confirm_model or relabeler.model,
        "audit (confirm)",
        stats,
    )
    for vs, js, ws in zip(verdicts, again, second):
        for j, w in zip(js, ws):
            vs[j] = w if w.error is None else Verdict(error=f"confirm: {w.error}", judge=w.judge)
    return verdicts


def _project(estimate: StagePlan, stats: dict[str, int]) -> dict[str, Any]:
    """The full run's requests and tokens: the plan's prompt tokens, completion tokens per request as
    measured."""
    requests = estimate.requests or 0
    sent = stats.get("llm_sent", 0)
    if sent and stats.get("llm_completion_tokens", 0):
        completion = round(stats["llm_completion_tokens"] / sent * requests)
        basis = "measured on the audit's answers"
    else:
        completion = estimate.max_completion_tokens or 0
        basis = "the request limit (the audit's answers came from the cache)"
    prompt = estimate.prompt_tokens or 0
    out = {
        "requests": requests,
        "candidates": estimate.candidates or 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_basis": basis,
        "token_counts": estimate.token_counts,
    }
    if estimate.notes:
        out["note"] = "; ".join(estimate.notes)
    return out


def _fmt(value: float | None, interval: list[float] | tuple[float, float] | None = None) -> str:
    """A metric, with its 95% interval when given; "n/a" where it is undefined."""
    text = "n/a" if value is None else number(value, "metric")
    return (
        text
        if interval is None
        else f"{text} [{number(interval[0], 'metric')}, {number(interval[1], 'metric')}]"
    )


def describe(result: dict[str, Any]) -> str:
    p = result["projected"]
    verdict = (
        "passed"
        if result["passed"]
        else ("below --min-agreement, run forced" if result["forced"] else "FAILED")
    )
    return (
        f"audit: {result['positives']} known positives, {result['negatives']} known negatives, "
        f"{result.get('likely_negatives', 0)} likely negatives, {result['failed']} failed; "
        f"recall {_fmt(result['recall'], result['recall_ci'])}, false-positive rate "
        f"{_fmt(result.get('false_positive_rate'), result.get('false_positive_rate_ci'))}, "
        f"kappa {_fmt(result['kappa'], result['kappa_ci'])} (min {result['min_agreement']:g}): {verdict}; "
        f"likely negatives flagged {_fmt(result.get('likely_flag_rate'), result.get('likely_flag_rate_ci'))} "
        f"(unlabelled positives estimated at {_fmt(result.get('unlabelled_positive_estimate'))}). "
        f"Full run: {p['requests']:,} requests, ~{p['prompt_tokens']:,} prompt + "
        f"~{p['completion_tokens']:,} completion tokens"
    )


def read_audit(folder: Path) -> dict[str, Any] | None:
    path = folder / AUDIT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def report_lines(folder: Path) -> list[str]:
    """The audit's section of the `mpr run` report (nothing when the stage ran without `--audit`)."""
    result = read_audit(folder)
    if result is None:
        return []
    p = result["projected"]
    verdict = (
        "passed"
        if result["passed"]
        else (
            "below the minimum; run forced"
            if result["forced"]
            else "**failed: the run stopped before the full run**"
        )
    )
    rows = [
        (
            "known positives / known negatives / likely negatives judged",
            f"{result['positives']} / {result['negatives']} / {result.get('likely_negatives', 0)} "
            f"({result['failed']} failed)",
        ),
        ("recall on known positives (95% CI)", f"{_fmt(result['recall'], result['recall_ci'])}"),
        (
            "false-positive rate on known negatives (95% CI)",
            f"{_fmt(result.get('false_positive_rate'), result.get('false_positive_rate_ci'))}",
        ),
        ("Cohen's kappa, known pairs (95% CI)", f"{_fmt(result['kappa'], result['kappa_ci'])}"),
        (
            "likely negatives flagged (95% CI)",
            f"{_fmt(result.get('likely_flag_rate'), result.get('likely_flag_rate_ci'))}",
        ),
        ("unlabelled positives among them (estimate)", _fmt(result.get("unlabelled_positive_estimate"))),
        ("minimum kappa", f"{result['min_agreement']:g}: {verdict}"),
        ("full run: requests", f"{p['requests']:,}"),
        (
            "full run: prompt + completion tokens",
            f"{p['prompt_tokens']:,} + {p['completion_tokens']:,} ({p['completion_basis']})",
        ),
    ]
    return [
        "Judge audit against the known labels (`_audit.json`):",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
