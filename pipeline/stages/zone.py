"""Ambiguity-zone judging for `mpr relabel`: judge only the candidates where false negatives sit.

Most mined candidates are plainly negative; the false negatives score close to the known positives.
`zone` picks, per query, which of the candidates `mpr relabel` would judge are sent to the judge:

- `all` (default): every one.
- `margin`: those whose retrieval score is at least the query's lowest positive score minus
  `zone_margin` (in the mining run's score units: cosine similarity for the default dense miner). A
  query whose positives have no score keeps all its candidates.
- `top`: the `zone_top` best-ranked ones.
- `unsure`: a cheap judge (`zone_model`, default the judge model) grades every candidate pointwise
  (prompt `graded`, with logprobs); the candidates whose probability of a positive grade
  (grade / 3 >= `positive_threshold`, from the grade tokens' probabilities) is above `zone_unsure` go to the
  judge. What the cheap judge is sure is negative is not judged; what it thinks may be positive, or
  cannot grade, is.

Candidates left out keep their mined label and get the reason in the `unjudged` column (null for
every other row); `zone_skipped` in the part statistics counts them. bench/zone.py measures the false
negatives found against the candidates judged (bench/README.md, bench/results/zone/); the defaults come
from it: on CISI and Vaswani with one kept positive per query, `zone_margin` 0.1 is the smallest margin
that finds >= 95% of the false negatives (at 94-97% of the candidates judged), `zone_unsure` 0.2 finds all
of them at 39-42% with a calibrated cheap judge, no `zone_top` reaches 95% below judging everything (10:
47-52% at 34%), so `zone` stays `all`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from pipeline.data.labels import positive_levels

if TYPE_CHECKING:
    from pipeline.llm.base import ChatBackend
    from pipeline.llm.types import ChatResult
    from pipeline.stages.relabel import RelabelConfig, Relabeler

ZoneMode = Literal["all", "margin", "top", "unsure"]
ZONE_FIELD = pa.field("unjudged", pa.string())
Reasons = dict[int, str]  # row index in its query's group -> why it was not judged


class ZoneOptions(BaseModel):
    """The zone's options (part of `RelabelConfig`; they change what is judged, so they are in its
    identity)."""

    zone: ZoneMode = Field(
        "all",
        description="Judge all candidates, or only the ambiguity zone: margin (score near the lowest "
        "positive's), top (best-ranked), unsure (a cheap judge is not sure they are negative).",
    )
    zone_margin: float = Field(
        0.1,
        ge=0,
        description=(
            "--zone margin: judge candidates scoring at least the query's lowest positive score minus this."
        ),
    )
    zone_top: int = Field(10, ge=1, description="--zone top: judge the R best-ranked candidates.")
    zone_model: str | None = Field(None, description="--zone unsure: the cheap judge (default: --model).")
    zone_unsure: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="--zone unsure: judge candidates the cheap judge gives P(relevant) above this.",
    )


def select(rows: list[dict[str, Any]], picked: list[int], cfg: RelabelConfig) -> tuple[list[int], Reasons]:
    """`picked` (indices into one query's rows, best-ranked first) narrowed to the zone, and the reasons."""
    if cfg.zone == "margin":
        scores = [
            r["score"] for r in rows if r["source"] == "qrels" and r["label"] == 1 and r["score"] is not None
        ]
        if not scores:
            return picked, {}
        floor = min(scores) - cfg.zone_margin
        kept = [i for i in picked if rows[i]["score"] is not None and rows[i]["score"] >= floor]
        reasons = {
            i: f"zone margin: score {_score(rows[i]['score'])} < "
            f"lowest positive {min(scores):.4f} - {cfg.zone_margin:g}"
            for i in picked
            if i not in set(kept)
        }
        return kept, reasons
    if cfg.zone == "top":
        return picked[: cfg.zone_top], {
            i: f"zone top: below the {cfg.zone_top} best-ranked candidates" for i in picked[cfg.zone_top :]
        }
    return picked, {}


def _score(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def positive_probability(result: ChatResult, positive: Collection[int]) -> float | None:
    """P(the 0-3 grade is one of the `positive` grades) from the grade token's probabilities (renormalised
    over 0-3); the sampled grade's label as 0/1 without logprobs; None when the answer failed."""
    if not result.ok or result.parsed is None:
        return None
    grade = result.parsed["grades"][0]
    for token in result.logprobs or []:
        if token.token.strip() == str(grade):
            probs: dict[int, float] = {}
            for alt, lp in [(token.token, token.logprob), *token.top]:
                if alt.strip() in {"0", "1", "2", "3"}:
                    probs.setdefault(int(alt.strip()), math.exp(lp))
            total = sum(probs.values())
            if total > 0:
                return sum(p for g, p in probs.items() if g in positive) / total
    return float(grade in positive)


def unsure(
    relabeler: Relabeler,
    cheap: ChatBackend,
    groups: list[tuple[str, list[dict]]],
    picked: list[list[int]],
    reasons: list[Reasons],
    desc: str,
    stats: dict[str, int],
) -> list[list[int]]:
    """`zone=unsure`: keep the candidates the cheap judge may call relevant; fills `reasons` for the rest."""
    from pipeline.llm.judge import GRADES, Judge
    from pipeline.llm.prompt_files import load_prompt
    from pipeline.llm.stage import add_llm_stats

    cfg = relabeler.cfg
    judge = Judge(load_prompt("graded"), cfg.model_copy(update={"batch_candidates": 1, "logprobs": True}))
    judge.fit = cheap.fit
    requests, where = [], []
    for q, ((_, rows), idx) in enumerate(zip(groups, picked)):
        for i in idx:
            request, _ = judge.requests(rows[i]["query"], [], [rows[i]])[0]
            requests.append(request)
            where.append((q, i))
    results = (
        cheap.run_sync(
            requests, validate=judge.validator(1), progress=f"{desc} (zone)" if cfg.progress else False
        )
        if requests
        else []
    )
    add_llm_stats(stats, "zone", cheap.last_stats)
    positive = positive_levels(cfg.positive_threshold, len(GRADES))
    drop: set[tuple[int, int]] = set()
    for (q, i), result in zip(where, results):
        p = positive_probability(result, positive)
        if p is not None and p <= cfg.zone_unsure:
            drop.add((q, i))
            reasons[q][i] = f"zone unsure: the cheap judge gives P(relevant) {p:.3f} <= {cfg.zone_unsure:g}"
    return [[i for i in idx if (q, i) not in drop] for q, idx in enumerate(picked)]
