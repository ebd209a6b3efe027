"""The simulated judge's "LLM": it reads mpr's prompts like a model would and answers from a qrels file,
wrong on purpose at a settable rate.

It knows the prompts from their templates (`prompts/*.toml`): `PromptReader` turns each template into a
regular expression whose `$fields` are capture groups, finds the template a request was rendered from and
reads the fields back, so rewording a prompt changes what the oracle reads with it. A request that matches
no template, or a template whose answer the oracle cannot give, raises `UnknownPrompt` (the server answers
HTTP 500 with its message) instead of a wrong answer.

Start it with the simulated judge's server (`python -m mpr.simulated_judge --responder
mpr.simulated_judge:oracle_responder --responder-arg data=DIR ...`) to run `mpr relabel` and `mpr synth` end
to end without an LLM. Its labels are the qrels' labels (flipped with probability `error_rate`), not a
model's judgments.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import random
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

from mpr.simulated_judge.responders import ResponderAnswer
from pipeline.data.readers import read_corpus, read_qrels, read_queries, require_file, split_names
from pipeline.errors import MprError
from pipeline.llm.prompt_files import Prompt, available, load_prompt, numbered_block

# passages are recognised by their first characters: prompts clip them (to 100 raw characters at least)
PREFIX = 80

# Synthetic passages (`mpr synth`): one lead sentence per 0-3 grade, recognisable again when the graded
# judge (`--verify`) is asked about the passage, plus filler words drawn per request and level.
SYNTH_LEADS = {
    3: "In short, {topic}: this is answered here directly and completely.",
    2: "Part of what is asked about {topic} is covered here, among other things.",
    1: "This concerns {topic} in general but leaves the question itself open.",
    0: "Apart from the word {word}, nothing here relates to that subject.",
}
SYNTH_MARKERS = {
    3: "answered here directly and completely",
    2: "covered here, among other things",
    1: "leaves the question itself open",
    0: "nothing here relates to that subject",
}
SYNTH_OPENERS = ("Plainly,", "Broadly,", "Notably,", "Clearly,", "Frankly,", "Simply,")
SYNTH_TOPIC_SHARE = {3: 0.3, 2: 0.2, 1: 0.1, 0: 0.0}
SYNTH_FILLER = """harbor lantern meadow quarry violin orchard canyon ledger pigeon marble compass saddle
glacier tapestry lagoon furnace parcel ribbon cellar summit thicket kettle banner ferry pottery rafter
spindle wagon beacon cobble drizzle emblem falcon gadget hammock ivory jigsaw kiosk locket mosaic nectarine
oyster paddle quiver riddle scarecrow trellis umbrella velvet walnut yarn zephyr anchor bramble candle
dune easel fiddle goblet hollow inkwell jasmine kayak lattice mitten nugget olive pebble quilt rustle
satchel tundra urchin vessel willow almanac buckle chimney dagger ember fable garnet hinge icicle juniper
keel lichen mallet nozzle oriole pennant quartz reed shingle thimble utensil vellum wicker apron bellows
carousel dormer eyelet flannel gable hearth ingot jetty kilt lodestone mortar nook ottoman parapet
quay rampart sconce turret upholstery valise wharf attic bobbin cistern""".split()  # noqa: SIM905
SYNTH_STOP = frozenset(
    """a an the and or but of to in on at for with by from as is are was were be been being do
does did how what why when where which who whom whose can could should would will shall may might must my your
our their its it this that these those i you we they he she me us them than then there here about into over
under not no yes if so""".split()  # noqa: SIM905
)


def _norm(text: str) -> str:
    return " ".join(html.unescape(text).split()).lower()


def _key(text: str) -> str:
    return _norm(text)[:PREFIX].rstrip()


def _flip(seed: int, *parts: str) -> float:
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class UnknownPrompt(MprError):
    """A request the simulated judge cannot answer: no prompt template matches it, or the oracle does not
    answer the template's schema."""


# What the oracle reads from a template's fields. Data fields are escaped (`prompt_files.escape`), so they
# hold no "<" or ">"; a field not listed here matches any text.
_DATA = r"[^<>]*"
_NUMBER = r"\d+"
_SENTINEL = "\x00"


def _numbered_item(tag: str, capture: bool) -> str:
    """The pattern of one item of `numbered_block(..., tag)`, from what it renders for a one-item block (so
    numbered 1): (number, text) groups if `capture`."""
    head, _, tail = numbered_block([(None, _SENTINEL)], tag).partition(_SENTINEL)
    number, text = (f"({_NUMBER})", f"({_DATA})") if capture else (_NUMBER, _DATA)
    return re.escape(head).replace("1", number, 1) + text + re.escape(tail)


@cache
def _item_regex(tag: str) -> re.Pattern[str]:
    return re.compile(_numbered_item(tag, capture=True), re.S)


def _block(tag: str) -> str:
    item = _numbered_item(tag, capture=False)
    return rf"{item}(?:\s*{item})*"


FIELD_PATTERNS: dict[str, str] = {
    "query": _DATA,
    "passage": _DATA,
    "style": _DATA,
    "passages": _block("passage"),
    "candidates": _block("candidate"),
    "words": _NUMBER,
    "min_words": _NUMBER,
    "max_words": _NUMBER,
    "n": _NUMBER,
    "top": _NUMBER,
    "levels": rf"{_NUMBER}(?:\D+{_NUMBER})*",
}
_ITEMS = {"passages": "passage", "candidates": "candidate"}

# The schemas the oracle answers and the template fields it needs for each.
ANSWERED_SCHEMAS: dict[str, tuple[str, ...]] = {
    "relevance_grade": ("query", "passage"),
    "relevance_grades": ("query", "passages"),
    "relevant_candidates": ("query", "candidates"),
    "relevant_candidates_with_reasoning": ("query", "candidates"),
    "synthetic_passages": ("query", "words", "levels"),
}


def template_regex(template: str) -> re.Pattern[str]:
    """A regex that matches exactly what `Template(template).substitute(...)` renders, each `$field` a named
    group (a field used twice must hold the same text both times)."""
    parts: list[str] = []
    seen: set[str] = set()
    pos = 0
    for m in Template.pattern.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        pos = m.end()
        name = m.group("named") or m.group("braced")
        if m.group("escaped") is not None:
            parts.append(re.escape("$"))
        elif name is None:
            raise UnknownPrompt(
                f"invalid placeholder in prompt template at {template[m.start() : m.start() + 20]!r}"
            )
        elif name in seen:
            parts.append(f"(?P={name})")
        else:
            seen.add(name)
            parts.append(f"(?P<{name}>{FIELD_PATTERNS.get(name, '.*?')})")
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts), re.S)


@dataclass(frozen=True)
class ReadPrompt:
    """A request read back: the template it was rendered from and its fields' text (still escaped)."""

    prompt: Prompt
    fields: dict[str, str]

    def items(self, name: str) -> list[tuple[int, str]]:
        """(number, text) of each item of a numbered block field (`passages`, `candidates`)."""
        return [(int(n), text) for n, text in _item_regex(_ITEMS[name]).findall(self.fields[name])]


class PromptReader:
    """Finds which prompt template a chat request was rendered from (system and user message) and reads its
    fields back."""

    def __init__(self, prompts: Iterable[Prompt]):
        self.prompts = list(prompts)
        self._patterns = [(p, template_regex(p.system), template_regex(p.user)) for p in self.prompts]
        self._by_system: dict[str, list[int]] = {}

    def read(self, messages: Sequence[Mapping[str, Any]]) -> ReadPrompt:
        system = next((str(m.get("content") or "") for m in messages if m.get("role") == "system"), "")
        user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        if system not in self._by_system:
            if len(self._by_system) > 256:
                self._by_system.clear()
            self._by_system[system] = [i for i, (_, s, _) in enumerate(self._patterns) if s.fullmatch(system)]
        found = []
        for i in self._by_system[system]:
            prompt, _, user_re = self._patterns[i]
            m = user_re.fullmatch(user)
            if m is not None:
                found.append(ReadPrompt(prompt, m.groupdict()))
        if len(found) == 1:
            return found[0]
        names = ", ".join(p.id for p in self.prompts)
        if not found:
            raise UnknownPrompt(
                f"the simulated judge cannot read this request: it matches none of the prompt templates it "
                f"knows ({names}); was a prompt changed or written outside prompts/? The user message starts "
                f"{user[:120]!r}"
            )
        raise UnknownPrompt(
            f"the simulated judge cannot tell which prompt this request uses: it matches "
            f"{', '.join(r.prompt.id for r in found)}"
        )


def check_answerable(prompt: Prompt) -> None:
    """Raise UnknownPrompt if the oracle answers the prompt's schema but its user template lacks a field
    the answer needs."""
    needed = ANSWERED_SCHEMAS.get(prompt.schema)
    if needed is None:
        return
    missing = [f for f in needed if f not in template_regex(prompt.user).groupindex]
    if missing:
        raise UnknownPrompt(
            f"prompt {prompt.id}: the simulated judge answers schema {prompt.schema!r} from the fields "
            f"{', '.join('$' + f for f in needed)}, "
            f"but the user template has no {', '.join('$' + f for f in missing)}"
        )


def asked(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The request as first asked: the turns before the first answer (a re-ask appends the answer and a
    note)."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return list(messages[:first])


class Oracle:
    """Answers relabel (listwise) and graded (pointwise) prompts from qrels; synth prompts with
    deterministic passages per level."""

    def __init__(
        self,
        data: str | Path,
        splits: list[str] | None = None,
        error_rate: float = 0.0,
        seed: int = 0,
        model_error_rates: dict[str, float] | None = None,
        synth_invalid_rate: float = 0.0,
        synth_invalid_attempts: int = 1,
        synth_fail_rate: float = 0.0,
        synth_mislabel_rate: float = 0.0,
        error_confidence: float = 0.85,
        prompts: Iterable[Prompt] | None = None,
    ):
        """`prompts`: the templates it reads requests with (default: every file of prompts/).
        `error_confidence`: the probability a graded answer puts on its grade when the verdict is one of the
        flipped (wrong) ones (0.85 for right ones, the rest spread over the other grades): below 0.85 the
        oracle is a calibrated judge, less sure where it is wrong (what `--zone unsure` relies on).
        `synth_invalid_rate`: this share of synth requests gets an invalid answer (a missing level,
        duplicate passages, a passage too short, the query copied) on its first `synth_invalid_attempts`
        asks; `synth_fail_rate`: this share always does; `synth_mislabel_rate`: this share gets a valid
        answer with the top and bottom passages swapped (what `--verify` should catch)."""
        templates = list(prompts) if prompts is not None else [load_prompt(name) for name in available()]
        for prompt in templates:
            check_answerable(prompt)
        self.reader = PromptReader(templates)
        root = Path(data)
        corpus = read_corpus(require_file(root, "corpus.jsonl"))
        self.pid_by_text: dict[str, str] = {}
        for i, pid in enumerate(corpus.ids):
            self.pid_by_text[_key(corpus.texts[i])] = pid
            if corpus.titles[i]:
                self.pid_by_text[_key(f"{corpus.titles[i]}\n{corpus.texts[i]}")] = pid
        self.qids_by_text: dict[str, list[str]] = {}
        for qid, text in read_queries(require_file(root, "queries.jsonl")).items():
            self.qids_by_text.setdefault(_norm(text), []).append(qid)
        self.relevant: set[tuple[str, str]] = set()
        for split in splits or split_names(root):
            qrels, _ = read_qrels(require_file(root / "qrels", f"{split}.tsv"))
            self.relevant |= {(q, p) for q, judged in qrels.items() for p, s in judged.items() if s > 0}
        self.error_rate = float(error_rate)
        self.model_error_rates = {k: float(v) for k, v in (model_error_rates or {}).items()}
        self.seed = int(seed)
        self.synth_invalid_rate = float(synth_invalid_rate)
        self.synth_invalid_attempts = int(synth_invalid_attempts)
        self.synth_fail_rate = float(synth_fail_rate)
        self.synth_mislabel_rate = float(synth_mislabel_rate)
        self.error_confidence = float(error_confidence)
        self._synth_asks: dict[str, int] = {}
        self._lock = threading.Lock()

    def judge(self, query: str, passage: str, error_rate: float | None = None) -> bool:
        """The qrels' verdict for the pair, flipped for a fixed `error_rate` share of pairs."""
        qids = self.qids_by_text.get(_norm(query), [])
        pid = self.pid_by_text.get(_key(passage))
        truth = pid is not None and any((q, pid) in self.relevant for q in qids)
        rate = self.error_rate if error_rate is None else error_rate
        if rate and _flip(self.seed, query, passage) < rate:
            return not truth
        return truth

    def __call__(self, request: dict[str, Any]) -> ResponderAnswer:
        rate = self.model_error_rates.get(request.get("model", ""), self.error_rate)
        read = self.reader.read(asked(request["messages"]))
        schema = read.prompt.schema
        if schema not in ANSWERED_SCHEMAS:
            raise UnknownPrompt(
                f"the simulated judge does not answer prompt {read.prompt.id} (schema {schema!r}; it answers "
                f"{', '.join(sorted(ANSWERED_SCHEMAS))})"
            )
        query = read.fields["query"]
        if schema == "synthetic_passages":
            levels = 1 + max(int(k) for k in re.findall(r"\d+", read.fields["levels"]))
            return self._synth(request, html.unescape(query), levels, int(read.fields["words"]))
        if schema == "relevance_grade":
            return self._grade(query, [read.fields["passage"]], rate, key="grade")
        if schema == "relevance_grades":
            return self._grade(query, [text for _, text in read.items("passages")], rate, key="grades")
        candidates = read.items("candidates")
        relevant = [n for n, text in candidates if self.judge(query, text, rate)]
        answer: dict[str, Any] = {"relevant": relevant}
        if schema == "relevant_candidates_with_reasoning":
            reasoning = " ".join(
                f"Candidate {n} {'answers' if n in relevant else 'does not answer'} the query."
                for n, _ in candidates
            )
            answer = {"reasoning": reasoning, **answer}
        return ResponderAnswer(json.dumps(answer))

    def _grade(self, query: str, passages: list[str], rate: float, key: str) -> ResponderAnswer:
        """{"grade": g} for one passage or {"grades": [...]} for several, with 0.85 of each grade token's
        probability on the answer and 0.05 on each other grade."""
        grades, sure = [], []
        for passage in passages:
            grade = synthetic_grade(passage)
            verdict = self.judge(query, passage, rate)
            grades.append(grade if grade is not None else 3 if verdict else 0)
            wrong = grade is None and rate > 0 and verdict != self.judge(query, passage, 0.0)
            sure.append(self.error_confidence if wrong else 0.85)
        tokens: list[Any] = [
            ('{"', -0.01),
            (key, -0.01),
            ('":', -0.01),
            (" [" if key == "grades" else " ", -0.01),
        ]
        for n, (grade, p) in enumerate(zip(grades, sure)):
            if n:
                tokens.append((", ", -0.01))
            tokens.append(
                (
                    str(grade),
                    math.log(p),
                    [(str(g), math.log(p if g == grade else (1 - p) / 3)) for g in range(4)],
                )
            )
        tokens.append(("]}" if key == "grades" else "}", -0.01))
        return ResponderAnswer("".join(t[0] for t in tokens), token_logprobs=tokens)

    def _synth(self, request: dict[str, Any], query: str, levels: int, target: int) -> ResponderAnswer:
        """Passages for levels L-1 ... 0 of a synth prompt: distinct, of the target length (in words), built
        from the query's content words (more of them the higher the level; level 0 shares one word only)."""
        key = hashlib.sha256(
            json.dumps([request.get("model"), asked(request["messages"])], sort_keys=True).encode()
        ).hexdigest()
        with self._lock:
            attempt = self._synth_asks.get(key, 0)
            self._synth_asks[key] = attempt + 1
        topic = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if w not in SYNTH_STOP] or ["things"]
        topic = list(dict.fromkeys(reversed(topic)))  # reversed: never the query's own word order
        passages = {k: _synth_passage(key, k, levels, target, topic) for k in range(levels - 1, -1, -1)}
        invalid = (self.synth_fail_rate and _flip(self.seed, "synth-fail", key) < self.synth_fail_rate) or (
            self.synth_invalid_rate
            and attempt < self.synth_invalid_attempts
            and _flip(self.seed, "synth-invalid", key) < self.synth_invalid_rate
        )
        if invalid:
            kinds = ["missing", "duplicate", "short"] + (["verbatim"] if len(query.split()) >= 4 else [])
            kind = kinds[int(_flip(self.seed, "synth-kind", key, str(attempt)) * len(kinds))]
            if kind == "missing":
                del passages[0]
            elif kind == "duplicate":
                passages[0] = passages[1]
            elif kind == "short":
                passages[0] = " ".join(passages[0].split()[:2])
            else:
                passages[levels - 1] = f"{query} {passages[levels - 1]}"
        elif self.synth_mislabel_rate and _flip(self.seed, "synth-mislabel", key) < self.synth_mislabel_rate:
            passages[0], passages[levels - 1] = passages[levels - 1], passages[0]
        return ResponderAnswer(json.dumps({f"level_{k}": v for k, v in passages.items()}))


def _synth_grade_of(level: int, levels: int) -> int:
    return round(3 * level / (levels - 1))


def _synth_passage(key: str, level: int, levels: int, target: int, topic: list[str]) -> str:
    grade = _synth_grade_of(level, levels)
    rng = random.Random(f"{key}|{level}")
    lead = SYNTH_LEADS[grade].format(topic=", ".join(topic[:4]), word=rng.choice(topic))
    words = [SYNTH_OPENERS[level % len(SYNTH_OPENERS)], lead[0].lower() + lead[1:]]
    lead_words = " ".join(words).split()
    filler = []
    for _ in range(max(0, target - len(lead_words))):
        share = SYNTH_TOPIC_SHARE[grade]
        filler.append(rng.choice(topic) if share and rng.random() < share else rng.choice(SYNTH_FILLER))
    sentences = []
    while filler:
        size = rng.randint(6, 11)
        chunk, filler = filler[:size], filler[size:]
        sentences.append(
            chunk[0].capitalize() + " " + " ".join(chunk[1:]) + "."
            if len(chunk) > 1
            else chunk[0].capitalize() + "."
        )
    return " ".join(lead_words + sentences)


def synthetic_grade(passage: str) -> int | None:
    """The 0-3 grade of a passage the oracle wrote for a synth prompt, None for any other passage."""
    text = _norm(passage)
    for grade, marker in SYNTH_MARKERS.items():
        if marker in text:
            return grade
    return None


def oracle_responder(
    data: str,
    splits: str = "",
    error_rate: float = 0.0,
    seed: int = 0,
    model_error_rates: dict[str, float] | None = None,
    synth_invalid_rate: float = 0.0,
    synth_invalid_attempts: int = 1,
    synth_fail_rate: float = 0.0,
    synth_mislabel_rate: float = 0.0,
    error_confidence: float = 0.85,
) -> Oracle:
    """Responder factory for the simulated judge's server; `splits` is a comma-separated list (default:
    all)."""
    return Oracle(
        data,
        [s for s in str(splits).split(",") if s] or None,
        float(error_rate),
        int(seed),
        model_error_rates,
        float(synth_invalid_rate),
        int(synth_invalid_attempts),
        float(synth_fail_rate),
        float(synth_mislabel_rate),
        float(error_confidence),
    )
