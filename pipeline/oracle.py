"""An oracle "LLM" for the local test server: it reads mpr's prompts like a model would (by their tags)
and answers from a qrels file, wrong on purpose at a settable rate.

Start it with the test server (`python -m mpr.pipeline.llm.testserver --responder
mpr.pipeline.oracle:oracle --responder-arg data=DIR ...`) to run `mpr relabel` and `mpr synth` end to
end without an LLM. Its labels are the qrels' labels (flipped with probability `error_rate`), not a
model's judgments.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from mpr.pipeline.llm.responders import ResponderAnswer
from mpr.pipeline.readers import find_file, read_corpus, read_qrels, read_queries, split_names

TAG = r"<{0}(?:\s+number=\"(\d+)\")?>(.*?)</{0}>"


def _norm(text: str) -> str:
    return " ".join(html.unescape(text).split()).lower()


def _flip(seed: int, *parts: str) -> float:
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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
    ):
        root = Path(data)
        corpus = read_corpus(find_file(root, "corpus.jsonl"))
        self.pid_by_text: dict[str, str] = {}
        for i, pid in enumerate(corpus.ids):
            self.pid_by_text[_norm(corpus.texts[i])] = pid
            if corpus.titles[i]:
                self.pid_by_text[_norm(f"{corpus.titles[i]}\n{corpus.texts[i]}")] = pid
        self.qids_by_text: dict[str, list[str]] = {}
        for qid, text in read_queries(find_file(root, "queries.jsonl")).items():
            self.qids_by_text.setdefault(_norm(text), []).append(qid)
        self.relevant: set[tuple[str, str]] = set()
        for split in splits or split_names(root):
            qrels, _ = read_qrels(find_file(root / "qrels", f"{split}.tsv"))
            self.relevant |= {(q, p) for q, judged in qrels.items() for p, s in judged.items() if s > 0}
        self.error_rate = float(error_rate)
        self.model_error_rates = {k: float(v) for k, v in (model_error_rates or {}).items()}
        self.seed = int(seed)

    def judge(self, query: str, passage: str, error_rate: float | None = None) -> bool:
        """The qrels' verdict for the pair, flipped for a fixed `error_rate` share of pairs."""
        qids = self.qids_by_text.get(_norm(query), [])
        pid = self.pid_by_text.get(_norm(passage))
        truth = pid is not None and any((q, pid) in self.relevant for q in qids)
        rate = self.error_rate if error_rate is None else error_rate
        if rate and _flip(self.seed, query, passage) < rate:
            return not truth
        return truth

    def __call__(self, request: dict[str, Any]) -> ResponderAnswer:
        rate = self.model_error_rates.get(request.get("model", ""), self.error_rate)
        prompt = "\n".join(m["content"] for m in request["messages"] if m["role"] == "user")
        query = re.search(TAG.format("query"), prompt, re.S)
        if query is None:
            return ResponderAnswer(json.dumps({"error": "no query"}))
        query_text = query.group(2)
        candidates = re.findall(TAG.format("candidate"), prompt, re.S)
        if candidates:
            relevant = [int(n) for n, text in candidates if self.judge(query_text, text, rate)]
            answer: dict[str, Any] = {"relevant": relevant}
            if "reasoning" in json.dumps(request.get("response_format") or {}) or '"reasoning"' in prompt:
                answer = {"reasoning": " ".join(f"Candidate {n} {'answers' if int(n) in relevant else 'does not answer'} the query." for n, _ in candidates), **answer}
            return ResponderAnswer(json.dumps(answer))
        passage = re.search(TAG.format("passage"), prompt, re.S)
        if passage is not None:
            return self._grade(query_text, passage.group(2), rate)
        return ResponderAnswer(json.dumps({"error": "unknown task"}))

    def _grade(self, query: str, passage: str, rate: float) -> ResponderAnswer:
        grade = 3 if self.judge(query, passage, rate) else 0
        alternatives = [(str(g), math.log(0.85 if g == grade else 0.05)) for g in range(4)]
        tokens = [('{"', -0.01), ("grade", -0.01), ('":', -0.01), (" ", -0.01), (str(grade), math.log(0.85), alternatives), ("}", -0.01)]
        return ResponderAnswer(f'{{"grade": {grade}}}', token_logprobs=tokens)


def oracle(data: str, splits: str = "", error_rate: float = 0.0, seed: int = 0, model_error_rates: dict[str, float] | None = None) -> Oracle:
    """Responder factory for the test server; `splits` is a comma-separated list (default: all)."""
    return Oracle(data, [s for s in str(splits).split(",") if s] or None, float(error_rate), int(seed), model_error_rates)
