"""The relevance judge that `mpr relabel`, its audit and zone, and `mpr synth --verify` share: one prompt's
requests for a query's candidates, and the answers read back as verdicts.

Listwise prompts (schema `relevant_candidates*`) name the relevant candidates among up to
`batch_candidates` numbered ones, shown next to the query's known positives (RLHN, Thakur et al., 2025).
Graded prompts (`relevance_grade`, one pair per request; `relevance_grades`, several) give each pair a
0-3 rubric grade; with logprobs its grade is the expected grade over the grade tokens' probabilities
divided by 3 (BiXSE), and it is flagged relevant when that is at least `positive_threshold`.

judge = Judge(load_prompt("graded"), JudgeOptions())
(request, indices), = judge.requests(query, [], [row])
verdicts = judge.verdicts(
    backend.run_sync([request], validate=judge.validator(len(indices)))[0], len(indices), "Qwen2.5-7B"
)
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from pipeline.data.labels import DEFAULT_POSITIVE_THRESHOLD, check_threshold, is_positive, level_grade
from pipeline.llm.jsonparse import parse_json
from pipeline.llm.prompt_files import Prompt, escape, known_relevant_block, numbered_block, passage_text
from pipeline.llm.types import ChatRequest, ChatResult, Message, TokenLogprob

if TYPE_CHECKING:
    from pipeline.llm.endpoint import ContextFit

GRADED_SCHEMAS = ("relevance_grade", "relevance_grades")
GRADES = (0, 1, 2, 3)


class JudgeOptions(BaseModel):
    """How the judge is asked and how a grade becomes a label (part of `RelabelConfig`)."""

    batch_candidates: int | None = Field(
        None,
        ge=1,
        description="Candidates per request: default 20 listwise; graded default 1 (pointwise), more packs "
        "several pairs into one request.",
    )
    positive_threshold: float = Field(
        DEFAULT_POSITIVE_THRESHOLD,
        ge=0,
        le=1,
        description="Graded mode: a pair whose grade (on the 0-1 scale: the "
        "expected 0-3 grade / 3 with --logprobs, else the sampled one / 3) is at least this is labelled "
        "positive.",
    )
    max_positives_shown: int = Field(3, ge=0, description="Known positives shown to the judge per request.")
    max_passage_chars: int = Field(
        2000,
        ge=100,
        description="Passages are cut to this many characters in a request, and further (counted as "
        "trimmed_passages) where the prompt would not fit the server's context window.",
    )
    max_tokens: int | None = Field(None, ge=1, description="Completion token limit per request.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the judge.")
    logprobs: bool = Field(
        True, description="Graded mode: expected grade from the grade tokens' log-probabilities."
    )

    @field_validator("positive_threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        return check_threshold(value, len(GRADES))

    def per_request(self, graded: bool) -> int:
        """Candidates judged in one request."""
        return self.batch_candidates or (1 if graded else 20)


@dataclass
class Verdict:
    flagged: bool | None = None
    level: int | None = None
    grade: float | None = None
    rationale: str | None = None
    error: str | None = None
    judge: str | None = None


@dataclass
class Judge:
    """Builds the requests of one prompt and reads its answers."""

    prompt: Prompt
    cfg: JudgeOptions
    listwise: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fit: ContextFit | None = (
            None  # the server's context window and tokenizer (pipeline.llm.endpoint)
        )
        # trimmed_passages: cut below max_passage_chars to fit the context window;
        # logprobs_read / logprobs_unusable: graded answers whose grade came from the grade tokens'
        # probabilities, or from the sampled grade instead
        self.counts: Counter[str] = Counter()
        self.graded = self.prompt.schema in GRADED_SCHEMAS
        self.listwise = not self.graded
        self.pointwise = self.prompt.schema == "relevance_grade"
        self.reasoning = "reasoning" in self.prompt.schema

    def _clip(self, row: dict[str, Any], limit: int | None = None) -> tuple[str | None, str]:
        return row["title"], row["text"][: self.cfg.max_passage_chars if limit is None else limit]

    def requests(
        self, query: str, positives: list[dict], candidates: list[dict]
    ) -> list[tuple[ChatRequest, list[int]]]:
        """(request, indices into `candidates` it judges)."""
        if self.pointwise:

            def one(limit: int | None, row: dict) -> list[dict[str, str]]:
                return self.prompt.render(query=escape(query), passage=passage_text(*self._clip(row, limit)))

            return [
                (self._fitted(functools.partial(one, row=row), [row], self._grade_schema(1), 1), [i])
                for i, row in enumerate(candidates)
            ]
        shown_rows = positives[: self.cfg.max_positives_shown]

        def shown(limit: int | None) -> str:
            return (
                known_relevant_block([self._clip(r, limit) for r in shown_rows])
                or "(no known relevant passage)"
            )

        out = []
        step = self.cfg.per_request(self.graded)
        for start in range(0, len(candidates), step):
            chunk = list(range(start, min(start + step, len(candidates))))
            rows = [candidates[i] for i in chunk]
            if self.graded:

                def build(lim: int | None, rows: list[dict] = rows) -> list[dict[str, str]]:
                    return self.prompt.render(
                        query=escape(query),
                        passages=numbered_block([self._clip(r, lim) for r in rows], "passage"),
                    )

                out.append((self._fitted(build, rows, self._grade_schema(len(chunk)), len(chunk)), chunk))
            else:

                def build(lim: int | None, rows: list[dict] = rows) -> list[dict[str, str]]:
                    return self.prompt.render(
                        query=escape(query),
                        positives=shown(lim),
                        candidates=numbered_block([self._clip(r, lim) for r in rows]),
                    )

                out.append(
                    (
                        self._fitted(build, [*shown_rows, *rows], self._list_schema(len(chunk)), len(chunk)),
                        chunk,
                    )
                )
        return out

    def _fitted(
        self,
        build: Callable[[int | None], list[dict[str, str]]],
        rows: list[dict],
        schema: dict[str, Any],
        n: int,
    ) -> ChatRequest:
        """The request with every passage cut to `max_passage_chars`, and, when the prompt would not fit the
        server's context window next to the completion limit, cut further (the same limit for every passage
        of the request) until it does, counting the passages cut below `max_passage_chars`."""
        messages = build(None)
        request = self._request(messages, schema, n)
        fit = self.fit
        room = fit.room(request.max_tokens) if fit is not None else None
        if fit is None or room is None:
            return request
        limit = self.cfg.max_passage_chars
        fixed: int | None = None
        for _ in range(8):
            used = fit.count_messages(messages)
            if used <= room:
                break
            if fixed is None:
                fixed = fit.count_messages(build(0))
            longest = max((min(len(r["text"]), limit) for r in rows), default=0)
            if fixed >= room or longest == 0:
                break  # the instructions and the query alone fill the context: the server will refuse it
            limit = int(longest * (room - fixed) / (used - fixed) * 0.95)
            messages = build(limit)
        if limit < self.cfg.max_passage_chars:
            self.counts["trimmed_passages"] += sum(1 for r in rows if len(r["text"]) > limit)
            return request.model_copy(update={"messages": [Message(**m) for m in messages]})
        return request

    def _request(self, messages: list[dict[str, str]], schema: dict[str, Any], n: int) -> ChatRequest:
        # Room for each grade or candidate number with its separator and JSON's whitespace.
        default_tokens = 16 + 4 * n if self.graded else (64 * n + 128 if self.reasoning else 16 + 5 * n)
        return ChatRequest(
            messages=messages,
            json_schema=schema,
            schema_name=self.prompt.schema,
            max_tokens=self.cfg.max_tokens or default_tokens,
            temperature=self.cfg.temperature,
            logprobs=self.graded and self.cfg.logprobs,
            top_logprobs=5 if self.graded and self.cfg.logprobs else 0,
        )

    def _list_schema(self, n: int) -> dict[str, Any]:
        props: dict[str, Any] = {}
        if self.reasoning:
            props["reasoning"] = {"type": "string"}
        props["relevant"] = {
            "type": "array",
            "items": {"type": "integer", "enum": list(range(1, n + 1))},
            "uniqueItems": True,
            "maxItems": n,
        }  # a grammar without uniqueItems still stops after n
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    def _grade_schema(self, n: int) -> dict[str, Any]:
        grade = {"type": "integer", "enum": list(GRADES)}
        if self.pointwise:
            return {
                "type": "object",
                "properties": {"grade": grade},
                "required": ["grade"],
                "additionalProperties": False,
            }
        grades = {"type": "array", "items": grade, "minItems": n, "maxItems": n}
        return {
            "type": "object",
            "properties": {"grades": grades},
            "required": ["grades"],
            "additionalProperties": False,
        }

    def validator(self, n: int) -> Callable[[str], Any]:
        """Parse an answer or raise, so the client asks again; an answer is never guessed."""

        def check(content: str) -> Any:
            value = parse_json(content)
            if not isinstance(value, dict):
                raise ValueError("the answer is not a JSON object")
            if self.listwise:
                numbers = value.get("relevant")
                if not isinstance(numbers, list) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in numbers
                ):
                    raise ValueError("'relevant' must be a list of candidate numbers")
                bad = [x for x in numbers if not 1 <= x <= n]
                if bad:
                    raise ValueError(f"candidate number(s) {bad} out of range 1..{n}")
                return {"relevant": sorted(set(numbers)), "reasoning": value.get("reasoning")}
            grades = [value.get("grade")] if self.pointwise else value.get("grades")
            if not isinstance(grades, list) or len(grades) != n:
                raise ValueError(f"expected {n} grade(s), got {grades!r}")
            grades = [int(g.strip()) if isinstance(g, str) and g.strip().isdigit() else g for g in grades]
            bad = [g for g in grades if isinstance(g, bool) or g not in GRADES]
            if bad:
                raise ValueError(f"grades must be 0, 1, 2 or 3, got {bad!r}")
            return {"grades": grades}

        return check

    def verdicts(self, result: ChatResult, n: int, judge: str) -> list[Verdict]:
        if not result.ok:
            return [Verdict(error=result.error or "failed", judge=judge) for _ in range(n)]
        if self.listwise:
            flagged = set(result.parsed["relevant"])
            rationale = result.parsed.get("reasoning")
            return [Verdict(flagged=i + 1 in flagged, rationale=rationale, judge=judge) for i in range(n)]
        levels = result.parsed["grades"]
        expected = expected_grades(result.logprobs, levels)
        if self.cfg.logprobs:
            self.counts[
                "logprobs_read" if logprobs_usable(result.logprobs, levels) else "logprobs_unusable"
            ] += len(levels)
        grades = [level_grade(e, len(GRADES)) for e in expected]
        return [
            Verdict(flagged=is_positive(g, self.cfg.positive_threshold), level=lv, grade=g, judge=judge)
            for lv, g in zip(levels, grades)
        ]


def _expectation(token: TokenLogprob) -> float | None:
    probs: dict[int, float] = {}
    for alt, lp in [(token.token, token.logprob), *token.top]:
        text = alt.strip()
        if text in {"0", "1", "2", "3"}:
            probs.setdefault(int(text), math.exp(lp))
    total = sum(probs.values())
    return sum(g * p for g, p in probs.items()) / total if total > 0 else None


def _grade_tokens(logprobs: list[TokenLogprob] | None, sampled: list[int]) -> list[TokenLogprob] | None:
    """The generated single-digit grade tokens, in order, when they line up with the sampled grades."""
    digits = [t for t in logprobs or () if t.token.strip() in {"0", "1", "2", "3"}]
    return digits if logprobs and [int(t.token.strip()) for t in digits] == list(sampled) else None


def logprobs_usable(logprobs: list[TokenLogprob] | None, sampled: list[int]) -> bool:
    """Whether `expected_grades` reads these grades from probabilities: the grade tokens line up with the
    answer and each has another grade among its alternatives."""
    digits = _grade_tokens(logprobs, sampled)
    return bool(digits) and all(
        sum(a.strip() in {"0", "1", "2", "3"} for a, _ in t.top) >= 2 for t in digits or ()
    )


def expected_grades(logprobs: list[TokenLogprob] | None, sampled: list[int]) -> list[float]:
    """Per grade, the expectation over the grade tokens' probabilities at the position where it was
    generated (renormalised over 0-3). The grade tokens are the generated single-digit tokens, in order;
    when they cannot be lined up with the answer (no logprobs, or a tokenizer that merges a digit with
    other characters), the sampled grades are used."""
    digits = _grade_tokens(logprobs, sampled)
    if digits is not None:
        expected = [_expectation(t) for t in digits]
        return [e if e is not None else float(g) for e, g in zip(expected, sampled)]
    return [float(g) for g in sampled]
