"""`mpr synth`: an LLM writes passages at graded relevance levels for each query, after SyCL.

SyCL trains retrievers on LLM-written passages at graded relevance levels: one request per query asks for
passages at levels L-1 ... 0 of a rubric (for 4 levels: 3 answers the query fully and directly; 2 partly or
with extraneous text; 1 is on the topic but does not answer; 0 shares surface words only), and graded
losses learn from the levels. Here:

- Queries come from a BEIR split (`--split all`: every query), a queries JSONL (`{"_id", "text"}`) or TSV
  (`id<TAB>text`), or a shard folder (its qid/query).
- Per query, `per_query` sets are drawn; a set's writing style and target length (words) are drawn from
  `styles` and `lengths` by a generator seeded with (seed, qid, set index) only, so a draw never depends
  on run order. Two sets of one query that draw the same style and length get a "variant" line in the
  prompt, so their requests differ (identical requests are answered once).
- The draws are reproducible from the seed; the texts through the request cache (every answer is stored
  under a key of model, messages and sampling parameters, so a resumed or repeated run sends nothing it
  has an answer for). With a fresh cache and `temperature` > 0 (default 0.7) a real model writes new texts.
- One request per set asks for all levels at once, highest first, as a JSON object `{"level_3": ...,
  ..., "level_0": ...}` (the request's json_schema). The answer is validated before anything is written;
  an invalid answer makes the client ask again (up to `max_invalid_retries` times), then the set is
  recorded as failed. Valid means: every level present exactly once and a non-empty string; each passage
  between ceil(0.5 x target) and 2 x target words (whitespace-separated); no two passages of the set with
  a token-set Jaccard similarity above 0.9 (lower-cased word tokens; identical passages score 1); no
  passage containing a query of its request batch verbatim (the whole lower-cased word sequence of a
  query of 4 or more words). A set repeating a passage of an earlier set of the same query fails too.
- `verify`: the graded judge of `mpr relabel` (prompt `graded`, 0-3) scores every passage of the valid
  sets; a judged grade g in [0, 1] is read as level g x (L-1). A set is dropped when the mean absolute
  difference between judged and intended levels exceeds `verify_tolerance`, or when the Spearman
  correlation between them is negative (its order is inverted; a constant judgment has no correlation
  and is left to the first rule), or when the judge could not grade one of its passages.
- Failed and dropped sets are not written to the shards. Each one is a line of `_failures.jsonl` in the
  output folder (`_failures.K-of-N.jsonl` per `--shard` job, merged into `_failures.jsonl` by the last job)
  with qid, query, set, style, target_words, kind (`invalid`: the answers kept failing validation;
  `request`: no answer, e.g. HTTP errors; `duplicate`: repeats an earlier set; `verify`: dropped by the
  judge), error and part; the manifest summary counts them.

Rows: `source=synthetic`, `pid` = `syn-` + sha256(text)[:16], `title` null, `level`, `grade` =
level/(L-1), `label` = grade >= `positive_threshold` (pipeline.data.labels; default 2/3: of 4 levels the
top two, as in SyCL's binary baseline; of 3 levels the top one), `judge` = the model id. Added columns:
`style`, `target_words`, `set`, `prompt` (`synth@version`), `judged_grade` (the verifier's grade in
[0, 1], null without `verify`). With `with_qrels` (BEIR input) the query's judged positives (qrels score
>= 1) come first in its group as `source=qrels`, `label=1`, `grade=1.0`, `level=L-1`, `judge=qrels`;
then the synthetic rows, highest level first, then by set.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from string import Template
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from pipeline.data.identity import RUNTIME, identity
from pipeline.data.labels import (
    DEFAULT_POSITIVE_THRESHOLD,
    NEGATIVE,
    POSITIVE,
    check_threshold,
    is_positive,
    level_grade,
)
from pipeline.data.queries import (
    Queries,
    input_info,
    queries_from_beir,
    queries_from_shards,
    read_queries_file,
)
from pipeline.data.readers import (
    OnEmpty,
)
from pipeline.data.schema import with_extra
from pipeline.data.shards import (
    FAILURES,
    RETRYABLE,
    FailureLog,
    Manifest,
    ShardRun,
    shard_name,
)
from pipeline.errors import MprError
from pipeline.llm.base import ChatBackend
from pipeline.llm.jsonparse import parse_json
from pipeline.llm.judge import Judge, JudgeOptions
from pipeline.llm.models import TokenCounter, resolve_llm_alias
from pipeline.llm.prompt_files import Prompt, escape, load_prompt
from pipeline.llm.stage import LLMStageConfig, add_llm_stats, close_backends, open_backends
from pipeline.llm.types import ChatRequest, ChatResult
from pipeline.stages.plan import StagePlan

DEFAULT_STYLES: tuple[str, ...] = (
    "encyclopedia article",
    "forum answer",
    "news report",
    "scientific abstract",
    "textbook section",
    "blog post",
    "FAQ entry",
    "technical documentation",
)
DEFAULT_LENGTHS: tuple[int, ...] = (40, 80, 120)
MIN_LEVELS, MAX_LEVELS = 2, 6
MAX_JACCARD = 0.9
VERBATIM_MIN_WORDS = 4
TOKENS_PER_WORD = 1.5
SYNTH_FIELDS = (
    pa.field("style", pa.string()),
    pa.field("target_words", pa.int32()),
    pa.field("set", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("judged_grade", pa.float32()),
)
SCHEMA = with_extra(*SYNTH_FIELDS)
FailureKind = Literal["invalid", "request", "duplicate", "verify"]
_WORD = re.compile(r"\w+")
_LEVEL_KEY = re.compile(r'"level_(\d+)"\s*:')


def split_list(value: Any) -> Any:
    """A comma-separated option value (`--lengths 40,80`) as a list; anything else as it is."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str) and "," in value[0]:
        return split_list(value[0])
    return value


class SynthConfig(LLMStageConfig):
    """Every option of `mpr synth` (see the module docstring for what they mean)."""

    out: Path = Field(description="Output shard folder.", json_schema_extra=RUNTIME)
    model: str = Field(description="Generator model id or alias (Qwen2.5-7B = Qwen/Qwen2.5-7B-Instruct).")
    data: Path | None = Field(
        None,
        description="BEIR-layout folder: the queries of --split (queries.jsonl, qrels/SPLIT.tsv).",
        json_schema_extra=RUNTIME,
    )
    split: str = Field(
        "train",
        description="qrels split whose queries get passages, or 'all' for every query of queries.jsonl.",
    )
    queries: Path | None = Field(
        None,
        description=(
            'Queries file instead of --data: JSONL {"_id", "text"} or TSV id<TAB>text (.gz accepted).'
        ),
        json_schema_extra=RUNTIME,
    )
    from_shards: Path | None = Field(
        None,
        description="Shard folder instead of --data: its queries (qid, query).",
        json_schema_extra=RUNTIME,
    )
    levels: int = Field(
        4,
        ge=MIN_LEVELS,
        le=MAX_LEVELS,
        description=f"Relevance levels per set, {MIN_LEVELS}-{MAX_LEVELS}: passages for "
        "levels L-1 down to 0.",
    )
    per_query: int = Field(1, ge=1, le=100, description="Independent sets (one request each) per query.")
    styles: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STYLES),
        min_length=1,
        description="Comma-separated writing styles drawn per set "
        f"(default: {', '.join(DEFAULT_STYLES[:3])}, ...).",
    )
    lengths: list[int] = Field(
        default_factory=lambda: list(DEFAULT_LENGTHS),
        min_length=1,
        description="Comma-separated target lengths in words drawn per set "
        f"(default: {','.join(map(str, DEFAULT_LENGTHS))}).",
    )
    seed: int = Field(
        42, description="Seed of the style/length draws (a function of seed, query id and set only)."
    )
    positive_threshold: float = Field(
        DEFAULT_POSITIVE_THRESHOLD,
        ge=0,
        le=1,
        description="A passage whose grade, level / (L-1) on the 0-1 scale, is "
        "at least this is labelled positive.",
    )
    with_qrels: bool = Field(
        False,
        description=(
            "Also write the query's qrels positives (label 1, grade 1.0) into its group (--data only)."
        ),
    )
    verify: bool = Field(
        False,
        description="Grade every passage with the graded judge of mpr relabel; "
        "drop sets that disagree with their levels.",
    )
    verify_model: str | None = Field(None, description="Judge model for --verify (default: --model).")
    verify_tolerance: float = Field(
        1.0,
        ge=0,
        description="--verify drops a set whose mean |judged - intended level| exceeds this "
        "(or whose order is inverted).",
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the generator.")
    max_tokens: int | None = Field(
        None,
        ge=16,
        description="Completion token limit per request (default: from the levels and the target length).",
    )
    max_queries: int | None = Field(None, ge=1, description="Only the first N queries.")
    on_empty: OnEmpty = Field(
        "skip",
        description=(
            "Empty or blank queries and documents: leave them out and count them, or refuse the data."
        ),
        json_schema_extra=RUNTIME,
    )

    @field_validator("styles", mode="before")
    @classmethod
    def _styles(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("lengths", mode="before")
    @classmethod
    def _lengths(cls, value: Any) -> Any:
        value = split_list(value)
        if isinstance(value, list) and not all(isinstance(x, int) or str(x).strip().isdigit() for x in value):
            raise ValueError("expected comma-separated word counts, e.g. 40,80,120")
        return value

    @field_validator("lengths")
    @classmethod
    def _length_range(cls, value: list[int]) -> list[int]:
        bad = [x for x in value if not 10 <= x <= 2000]
        if bad:
            raise ValueError(f"target lengths must be 10-2000 words, got {bad}")
        return value

    @field_validator("positive_threshold")
    @classmethod
    def _threshold(cls, value: float, info: ValidationInfo) -> float:
        return check_threshold(value, info.data.get("levels", 4))

    def identity(self, model: str, verify_model: str | None, prompt: Prompt) -> dict[str, Any]:
        """The options that determine the shards (not where or how fast they are computed)."""
        return {
            **identity(self),
            "model": model,
            "verify_model": verify_model,
            "prompt": prompt.id,
        }


# -- inputs ------------------------------------------------------------------------------------------


def load_queries(cfg: SynthConfig) -> Queries:
    given = [
        name
        for name, value in (
            ("--data", cfg.data),
            ("--queries", cfg.queries),
            ("--from-shards", cfg.from_shards),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise MprError(
            f"give exactly one of --data, --queries, --from-shards (got {', '.join(given) or 'none'})"
        )
    if cfg.with_qrels and cfg.data is None:
        raise MprError("--with-qrels needs a BEIR folder (--data): the positives come from its qrels")
    if cfg.queries is not None:
        out = Queries(list(read_queries_file(cfg.queries).items()), [input_info(cfg.queries, "queries")])
    elif cfg.from_shards is not None:
        out = queries_from_shards(cfg.from_shards, cfg.verify_inputs)
    else:
        assert cfg.data is not None
        out = queries_from_beir(cfg.data, cfg.split, cfg.with_qrels, cfg.on_empty)
    if cfg.max_queries:
        out.items = out.items[: cfg.max_queries]
    if not out.items:
        raise MprError(f"{out.inputs[0].path}: no queries")
    return out


# -- the prompt, the draws and the validation ------------------------------------------------------------


@dataclass(frozen=True)
class SetSpec:
    """One set of passages to write: which query, which set, and what was drawn for it."""

    qid: str
    query: str
    index: int
    style: str
    words: int
    variant: int = 1


def draw(seed: int, qid: str, set_index: int, styles: list[str], lengths: list[int]) -> tuple[str, int]:
    """The style and target length of a set: a function of (seed, qid, set index) only."""
    rng = random.Random(hashlib.sha256(f"mpr-synth|{seed}|{qid}|{set_index}".encode()).digest())
    return rng.choice(styles), rng.choice(lengths)


def plan_sets(cfg: SynthConfig, qid: str, query: str) -> list[SetSpec]:
    out: list[SetSpec] = []
    for s in range(cfg.per_query):
        style, words = draw(cfg.seed, qid, s, cfg.styles, cfg.lengths)
        variant = 1 + sum(1 for o in out if (o.style, o.words) == (style, words))
        out.append(SetSpec(qid, query, s, style, words, variant))
    return out


def word_bounds(words: int) -> tuple[int, int]:
    """The accepted passage length for a target: from half to twice the target, in words."""
    return math.ceil(words / 2), 2 * words


def passage_id(text: str) -> str:
    return "syn-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@cache
def rubric_lines(levels: int) -> tuple[str, ...]:
    """`k = description` for k = L-1 ... 0, from the [rubric] table of prompts/synth.toml."""
    lines = load_prompt("synth").tables.get("rubric", {}).get(str(levels))
    if not isinstance(lines, list) or len(lines) != levels or not all(isinstance(x, str) for x in lines):
        raise MprError(f"prompts/synth.toml: [rubric] needs {levels} lines for --levels {levels}")
    return tuple(f"{levels - 1 - i} = {line}" for i, line in enumerate(lines))


class SynthPrompt:
    """The synth prompt for L levels: a system message shared by every request (instruction and rubric),
    then the query, the drawn style and length, and the JSON shape of the answer."""

    def __init__(self, levels: int, prompt: Prompt | None = None):
        self.prompt = prompt or load_prompt("synth")
        self.levels = levels
        top = levels - 1
        self.keys = [f"level_{k}" for k in range(top, -1, -1)]
        self.system = Template(self.prompt.system).substitute(
            n=levels, top=top, rubric="\n".join(rubric_lines(levels))
        )
        self.shape = "{" + ", ".join(f'"{k}": "..."' for k in self.keys) + "}"
        self.schema: dict[str, Any] = {
            "type": "object",
            "properties": {k: {"type": "string"} for k in self.keys},
            "required": list(self.keys),
            "additionalProperties": False,
        }

    def messages(self, spec: SetSpec) -> list[dict[str, str]]:
        lo, hi = word_bounds(spec.words)
        variant = (
            ""
            if spec.variant == 1
            else (
                f" This is variant {spec.variant} of this request: "
                "write passages that differ from those of the other variants."
            )
        )
        user = Template(self.prompt.user).substitute(
            query=escape(spec.query),
            style=escape(spec.style),
            words=spec.words,
            min_words=lo,
            max_words=hi,
            levels=", ".join(str(k) for k in range(self.levels - 1, -1, -1)),
            variant=variant,
            shape=self.shape,
        )
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def request(self, spec: SetSpec, cfg: SynthConfig) -> ChatRequest:
        budget = math.ceil(self.levels * 2 * spec.words * TOKENS_PER_WORD) + 16 * self.levels + 16
        return ChatRequest(
            messages=self.messages(spec),
            json_schema=self.schema,
            schema_name=self.prompt.schema,
            max_tokens=cfg.max_tokens or budget,
            temperature=cfg.temperature,
        )


class VerbatimIndex:
    """Finds, in a passage, the whole word sequence of any of a set of queries (of 4 or more words)."""

    def __init__(self, queries: set[str] | list[str]):
        self.by_head: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for query in queries:
            words = tuple(_tokens(query))
            if len(words) >= VERBATIM_MIN_WORDS:
                self.by_head.setdefault(words[:VERBATIM_MIN_WORDS], []).append(words)

    def found_in(self, text: str | list[str]) -> bool:
        words = _tokens(text) if isinstance(text, str) else text
        n = VERBATIM_MIN_WORDS
        for i in range(len(words) - n + 1):
            for query in self.by_head.get(tuple(words[i : i + n]), ()):
                if tuple(words[i : i + len(query)]) == query:
                    return True
        return False


def check_answer(content: str, levels: int, words: int, verbatim: VerbatimIndex) -> dict[int, str]:
    """The passages of a valid answer by level, or a ValueError naming the first problem."""
    counts = Counter(_LEVEL_KEY.findall(content))
    twice = sorted((k for k, n in counts.items() if n > 1), key=int, reverse=True)
    if twice:
        raise ValueError(f"level {twice[0]} appears {counts[twice[0]]} times")
    value = parse_json(content)
    if not isinstance(value, dict):
        raise ValueError("the answer is not a JSON object")
    unknown = sorted(k for k in value if re.fullmatch(r"level_\d+", k) and int(k[6:]) >= levels)
    if unknown:
        raise ValueError(f"unexpected key(s) {unknown}; expected level_{levels - 1} ... level_0")
    missing = [k for k in range(levels - 1, -1, -1) if f"level_{k}" not in value]
    if missing:
        raise ValueError(f"missing level(s) {missing}")
    lo, hi = word_bounds(words)
    passages: dict[int, str] = {}
    vocab: dict[int, set[str]] = {}
    for k in range(levels - 1, -1, -1):
        text = value[f"level_{k}"]
        if not isinstance(text, str):
            raise ValueError(f"level {k} is a {type(text).__name__}, not a passage")
        text = text.strip()
        if not text:
            raise ValueError(f"level {k} is empty")
        n = len(text.split())
        if not lo <= n <= hi:
            raise ValueError(f"level {k} has {n} words; expected {lo}-{hi} (target {words})")
        tokens = _tokens(text)
        if verbatim.found_in(tokens):
            raise ValueError(f"level {k} repeats the query verbatim")
        passages[k] = text
        vocab[k] = set(tokens)
    ks = list(passages)
    for i, a in enumerate(ks):
        for b in ks[i + 1 :]:
            union = vocab[a] | vocab[b]
            similarity = len(vocab[a] & vocab[b]) / len(union) if union else 1.0
            if similarity > MAX_JACCARD:
                raise ValueError(
                    f"levels {a} and {b} are near-identical (token Jaccard {similarity:.2f} > {MAX_JACCARD})"
                )
    return passages


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(vx * vy)


# -- one part ---------------------------------------------------------------------------------------------

STAT_KEYS = (
    "queries",
    "queries_without_sets",
    "sets_requested",
    "sets_written",
    "sets_failed",
    "failed_invalid",
    "failed_request",
    "failed_duplicate",
    "sets_verified",
    "sets_dropped_by_verify",
    "passages_generated",
    "passages",
    "qrels_rows",
    "rows",
    "verify_passages",
    "verify_abs_diff_milli",
    "verify_failed",
    RETRYABLE,
)


@dataclass
class KeptSet:
    spec: SetSpec
    passages: dict[int, str]
    judged: dict[int, float] = field(default_factory=dict)


class Synthesizer:
    """Writes, validates and (optionally) verifies the sets of one part's queries."""

    def __init__(
        self,
        cfg: SynthConfig,
        backend: ChatBackend,
        verifier: ChatBackend | None,
        model: str,
        verify_model: str | None,
    ):
        self.cfg = cfg
        self.prompt = SynthPrompt(cfg.levels)
        self.backend, self.verifier = backend, verifier
        self.model, self.verify_model = model, verify_model
        self.judge: Judge | None = None
        if cfg.verify:
            self.judge = Judge(load_prompt("graded"), JudgeOptions(max_passage_chars=50_000))
            self.judge.fit = (verifier or backend).fit

    def _fitted(self, request: ChatRequest, stats: dict[str, int]) -> ChatRequest:
        """The request with its completion limit cut to what the server's context window leaves after the
        prompt (counted in `capped_requests`); the answer may then be cut short and fail validation."""
        room = self.backend.fit.completion_room(request.messages) if self.backend.fit is not None else None
        if room is None or request.max_tokens is None or request.max_tokens <= room:
            return request
        stats["capped_requests"] = stats.get("capped_requests", 0) + 1
        return request.model_copy(update={"max_tokens": max(16, room)})

    def _run(
        self,
        backend: ChatBackend,
        requests: list[ChatRequest],
        check: Callable[[str], Any],
        desc: str,
        stats: dict[str, int],
        prefix: str,
    ) -> list[ChatResult]:
        results = backend.run_sync(requests, validate=check, progress=desc if self.cfg.progress else False)
        add_llm_stats(stats, prefix, backend.last_stats)
        return results

    def process(
        self,
        queries: list[tuple[str, str]],
        positives: dict[str, list[tuple[str, str | None, str]]],
        desc: str,
    ) -> tuple[list[dict[str, Any]], dict[str, int], list[dict[str, Any]]]:
        cfg, levels = self.cfg, self.cfg.levels
        stats = dict.fromkeys(STAT_KEYS, 0)
        specs = [spec for qid, query in queries for spec in plan_sets(cfg, qid, query)]
        stats["queries"], stats["sets_requested"] = len(queries), len(specs)
        results: list[ChatResult | None] = [None] * len(specs)
        by_words: dict[int, list[int]] = {}
        for i, spec in enumerate(specs):
            by_words.setdefault(spec.words, []).append(i)
        # the validator cannot see which request it checks: one run per target length, and the verbatim
        # rule checks the queries of that run
        for words, idx in sorted(by_words.items()):
            verbatim = VerbatimIndex({specs[i].query for i in idx})

            def check(content: str, words: int = words, verbatim: VerbatimIndex = verbatim) -> dict[int, str]:
                return check_answer(content, levels, words, verbatim)

            label = desc if len(by_words) == 1 else f"{desc} ({words} words)"
            requests = [self._fitted(self.prompt.request(specs[i], cfg), stats) for i in idx]
            got = self._run(self.backend, requests, check, label, stats, "llm")
            for i, answer in zip(idx, got):
                results[i] = answer

        failures: list[dict[str, Any]] = []

        def fail(spec: SetSpec, kind: FailureKind, error: str) -> None:
            failures.append(
                {
                    "qid": spec.qid,
                    "query": spec.query,
                    "set": spec.index,
                    "style": spec.style,
                    "target_words": spec.words,
                    "kind": kind,
                    "error": error,
                }
            )

        kept: list[KeptSet] = []
        seen: dict[str, dict[str, int]] = {}
        for spec, result in zip(specs, results):
            assert result is not None
            if not result.ok:
                kind: FailureKind = (
                    "invalid" if (result.error or "").startswith("invalid answer") else "request"
                )
                stats[f"failed_{kind}"] += 1
                fail(spec, kind, result.error or "failed")
                continue
            passages: dict[int, str] = result.parsed
            stats["passages_generated"] += len(passages)
            pids = seen.setdefault(spec.qid, {})
            earlier = next((pids[p] for p in map(passage_id, passages.values()) if p in pids), None)
            if earlier is not None:
                stats["failed_duplicate"] += 1
                fail(spec, "duplicate", f"repeats a passage of set {earlier}")
                continue
            pids.update((passage_id(t), spec.index) for t in passages.values())
            kept.append(KeptSet(spec, passages))
        stats["sets_failed"] = stats["failed_invalid"] + stats["failed_request"] + stats["failed_duplicate"]

        if self.judge is not None and kept:
            kept = self._verify(kept, desc, stats, fail)

        rows: list[dict[str, Any]] = []
        by_qid: dict[str, list[KeptSet]] = {}
        for item in kept:
            by_qid.setdefault(item.spec.qid, []).append(item)
        top = levels - 1
        for qid, query in queries:
            group: list[dict[str, Any]] = []
            if cfg.with_qrels:
                for pid, title, text in positives.get(qid, []):
                    group.append(
                        {
                            "qid": qid,
                            "query": query,
                            "pid": pid,
                            "title": title,
                            "text": text,
                            "source": "qrels",
                            "label": POSITIVE,
                            "grade": 1.0,
                            "level": top,
                            "judge": "qrels",
                        }
                    )
                stats["qrels_rows"] += len(group)
            synthetic = [
                (level, item, text) for item in by_qid.get(qid, []) for level, text in item.passages.items()
            ]
            synthetic.sort(key=lambda x: (-x[0], x[1].spec.index))
            for level, item, text in synthetic:
                grade = level_grade(level, levels)
                group.append(
                    {
                        "qid": qid,
                        "query": query,
                        "pid": passage_id(text),
                        "title": None,
                        "text": text,
                        "source": "synthetic",
                        "label": POSITIVE if is_positive(grade, cfg.positive_threshold) else NEGATIVE,
                        "grade": grade,
                        "level": level,
                        "judge": self.model,
                        "style": item.spec.style,
                        "target_words": item.spec.words,
                        "set": item.spec.index,
                        "prompt": self.prompt.prompt.id,
                        "judged_grade": item.judged.get(level),
                    }
                )
            stats["passages"] += len(synthetic)
            stats["queries_without_sets"] += not synthetic
            rows += group
        stats["sets_written"] = len(kept)
        stats["rows"] = len(rows)
        # sets without an answer (HTTP errors, answers that kept failing validation, a judge that could not
        # grade): a rerun asks for exactly these again; the answered ones come back from the request cache
        stats[RETRYABLE] = stats["failed_invalid"] + stats["failed_request"] + stats["verify_failed"]
        return rows, stats, failures

    def _verify(
        self,
        kept: list[KeptSet],
        desc: str,
        stats: dict[str, int],
        fail: Callable[[SetSpec, FailureKind, str], None],
    ) -> list[KeptSet]:
        assert self.judge is not None and self.verifier is not None
        judge, levels = self.judge, self.cfg.levels
        requests: list[ChatRequest] = []
        where: list[tuple[int, int]] = []
        for j, item in enumerate(kept):
            for level, text in item.passages.items():
                for request, _ in judge.requests(item.spec.query, [], [{"title": None, "text": text}]):
                    requests.append(request)
                    where.append((j, level))
        results = self._run(self.verifier, requests, judge.validator(1), f"{desc} (verify)", stats, "verify")
        errors: dict[int, str] = {}
        judge_id = self.verify_model or self.model
        for (j, level), result in zip(where, results):
            verdict = judge.verdicts(result, 1, judge_id)[0]
            if verdict.error is not None or verdict.grade is None:
                errors.setdefault(j, f"the judge could not grade level {level}: {verdict.error}")
            else:
                kept[j].judged[level] = float(verdict.grade)
        out: list[KeptSet] = []
        for j, item in enumerate(kept):
            stats["sets_verified"] += 1
            if j in errors:
                stats["sets_dropped_by_verify"] += 1
                stats["verify_failed"] += 1
                fail(item.spec, "verify", errors[j])
                continue
            intended = sorted(item.passages, reverse=True)
            judged = [item.judged[k] * (levels - 1) for k in intended]
            diffs = [abs(a - b) for a, b in zip(judged, intended)]
            mad = sum(diffs) / len(diffs)
            rho = spearman([float(k) for k in intended], judged)
            stats["verify_passages"] += len(diffs)
            stats["verify_abs_diff_milli"] += round(sum(diffs) * 1000)
            if mad > self.cfg.verify_tolerance or (rho is not None and rho < 0):
                stats["sets_dropped_by_verify"] += 1
                shown = ", ".join(f"{k}:{g:.2f}" for k, g in zip(intended, judged))
                why = (
                    f"mean |judged - intended| {mad:.2f} > {self.cfg.verify_tolerance:g}"
                    if mad > self.cfg.verify_tolerance
                    else f"Spearman {rho:.2f} < 0"
                )
                fail(item.spec, "verify", f"judged levels (intended:judged) {shown}; {why}")
                continue
            out.append(item)
        return out


# -- the stage ---------------------------------------------------------------------------------------------


def _estimate(cfg: SynthConfig, queries: Queries, model: str, verify_model: str | None) -> StagePlan:
    """Build every generation request (nothing is sent) and count them and their prompt tokens."""
    prompt = SynthPrompt(cfg.levels)
    counter = TokenCounter(model)
    sets = prompt_tokens = completion_tokens = 0
    for qid, query in queries.items:
        for spec in plan_sets(cfg, qid, query):
            request = prompt.request(spec, cfg)
            sets += 1
            prompt_tokens += counter.count_messages(request.messages)
            completion_tokens += request.max_tokens or 0
    passages = sets * cfg.levels
    return StagePlan(
        stage="synth",
        out=cfg.out,
        inputs=[i.path for i in queries.inputs],
        queries=len(queries.items),
        parts=len(_parts(queries, cfg.queries_per_shard)),
        models=list(dict.fromkeys(m for m in (model, verify_model) if m)),
        sets=sets,
        passages=passages,
        requests=sets,
        verify_requests_max=passages if cfg.verify else None,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=completion_tokens,
        token_counts="exact" if counter.exact else "estimated (~4 characters per token)",
        notes=[f"{key.replace('_', ' ')}: {value:,} (left out)" for key, value in queries.notes.items()],
    )


def _models(cfg: SynthConfig) -> tuple[str, str | None]:
    """The generator and the --verify judge (None without --verify), aliases resolved."""
    model = resolve_llm_alias(cfg.model)
    return model, (resolve_llm_alias(cfg.verify_model) if cfg.verify_model else model) if cfg.verify else None


def _parts(queries: Queries, size: int) -> list[list[tuple[str, str]]]:
    return [queries.items[s : s + size] for s in range(0, len(queries.items), size)]


def plan(cfg: SynthConfig) -> StagePlan:
    """The queries, parts, sets, requests and prompt tokens of `run`, counted without sending anything."""
    model, verify_model = _models(cfg)
    SynthPrompt(cfg.levels)  # a broken rubric fails here, before anything is read
    return _estimate(cfg, load_queries(cfg), model, verify_model)


def summarize(totals: dict[str, int], cfg: SynthConfig, seconds: float, sent_now: int) -> dict[str, Any]:
    """The manifest summary: the summed part statistics plus the figures a user reads first."""
    generated = totals.get("passages_generated", 0)
    summary: dict[str, Any] = {
        **totals,
        "requests": totals.get("llm_sent", 0) + totals.get("verify_sent", 0),
        "tokens_in": totals.get("llm_prompt_tokens", 0) + totals.get("verify_prompt_tokens", 0),
        "tokens_out": totals.get("llm_completion_tokens", 0) + totals.get("verify_completion_tokens", 0),
        "tokens_out_per_passage": round(totals.get("llm_completion_tokens", 0) / generated, 1)
        if generated
        else 0.0,
        "seconds": round(seconds, 2),
        "requests_per_s": round(sent_now / seconds, 1) if seconds else 0.0,
    }
    reasons = {k: totals.get(f"failed_{k}", 0) for k in ("invalid", "request", "duplicate")}
    reasons["verify"] = totals.get("sets_dropped_by_verify", 0)
    summary["failures"] = {k: v for k, v in reasons.items() if v}
    summary["attempted"] = totals.get("sets_requested", 0)
    if summary["failures"]:
        summary["failures_file"] = FAILURES
    if cfg.verify:
        judged = totals.get("verify_passages", 0)
        verified = totals.get("sets_verified", 0)
        summary["verify"] = {
            "mean_abs_level_diff": round(totals.get("verify_abs_diff_milli", 0) / 1000 / judged, 3)
            if judged
            else None,
            "kept_share": round((verified - totals.get("sets_dropped_by_verify", 0)) / verified, 3)
            if verified
            else None,
            "tolerance": cfg.verify_tolerance,
        }
    return summary


def run(
    cfg: SynthConfig,
    *,
    log: Callable[[str], None] = print,
    backends: tuple[ChatBackend, ChatBackend | None] | None = None,
) -> Manifest:
    """Run (or resume) `mpr synth` into `cfg.out`; returns the manifest."""
    started = time.perf_counter()
    model, verify_model = _models(cfg)
    prompt = SynthPrompt(cfg.levels)  # a broken rubric fails here, before anything is read or sent
    queries = load_queries(cfg)
    parts = _parts(queries, cfg.queries_per_shard)
    identity = {
        **cfg.identity(model, verify_model, prompt.prompt),
        "inputs": [i.fingerprint for i in queries.inputs],
    }
    prompts = {prompt.prompt.name: prompt.prompt.version}
    if cfg.verify:
        graded = load_prompt("graded")
        prompts[graded.name] = graded.version
    shards = ShardRun(
        cfg.out,
        stage="synth",
        config=cfg.model_dump(mode="json"),
        identity=identity,
        inputs=queries.inputs,
        models={"generator": model, **({"verifier": verify_model} if verify_model else {})},
        prompts=prompts,
        planned_shards=len(parts),
        overwrite=cfg.overwrite,
        job=cfg.job,
    )
    failures = FailureLog(shards)
    pending = [i for i in range(len(parts)) if shards.owns(i) and not shards.done(i)]
    if shards.complete or not pending:
        log(f"{cfg.out}: already complete; nothing to do")
        return _finish(
            shards,
            failures,
            shards.manifest.summary or {**summarize(shards.totals(), cfg, 0.0, 0), **queries.notes},
        )
    for key, value in queries.notes.items():
        log(f"synth: {key.replace('_', ' ')}: {value:,} (left out)")
    owned = backends is None
    if backends is None:
        backend, (verifier,) = open_backends(cfg, cfg.model, [verify_model], stage="synth", log=log)
        model = backend.model
        if verifier is not None:
            verify_model = verifier.model
    else:
        backend, verifier = backends
        verifier = verifier or (backend if cfg.verify else None)
    synthesizer = Synthesizer(cfg, backend, verifier, model, verify_model)
    sent_now = 0
    try:
        for count, index in enumerate(pending, start=1):
            rows, stats, failed = synthesizer.process(
                parts[index], queries.positives, f"synth part {count}/{len(pending)}"
            )
            sent_now += stats.get("llm_sent", 0) + stats.get("verify_sent", 0)
            failures.add(shard_name(index), failed)
            shards.write(index, pa.Table.from_pylist(rows, schema=SCHEMA), stats)
    finally:
        if owned:
            close_backends(backend, verifier)
    summary = {**summarize(shards.totals(), cfg, time.perf_counter() - started, sent_now), **queries.notes}
    if backend.endpoint is not None:
        summary["endpoint"] = backend.endpoint.model_dump(exclude={"url"})
    return _finish(shards, failures, summary)


def _finish(shards: ShardRun, failures: FailureLog, summary: dict[str, Any]) -> Manifest:
    manifest = shards.finish(summary)
    if shards.job is not None and manifest is not shards.manifest:  # the last of the N jobs
        failures.merge_jobs()
    return manifest
