"""The simulated judge: the oracle reads every prompt file through its template, fails loudly on a prompt it
cannot read, and the server says it is simulated; no stage imports the package."""

from __future__ import annotations

import ast
import dataclasses
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from mpr.simulated_judge import ANSWERED_SCHEMAS, Oracle, UnknownPrompt, start_server, synthetic_grade
from pipeline.llm.judge import Judge
from pipeline.llm.prompt_files import Prompt, available, load_prompt
from pipeline.stages.relabel import RelabelConfig
from pipeline.stages.synth import SetSpec, SynthPrompt

from ..conftest import REPO, write_beir

QUERY = "How do bees make <honey> & wax?"
PASSAGES = {
    "pos": ("Honey", "Bees make honey from nectar they collect from flowers."),
    "good": ("", "Worker bees turn nectar into <b>honey</b> & secrete wax from glands on their abdomen."),
    "bad1": ("", "Volcanoes erupt lava when pressure builds up under the crust."),
    "bad2": ("Trains", "The first steam locomotives ran on iron rails in the early nineteenth century."),
    "good2": ("", "Beeswax is made by young bees; honey is nectar that bees evaporate in the hive."),
}
CANDIDATES = ["good", "bad1", "bad2", "good2"]
RELEVANT = {"pos", "good", "good2"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    corpus = [{"_id": pid, "title": t, "text": x} for pid, (t, x) in PASSAGES.items()]
    qrels = {"train": [("q1", pid, 1) for pid in sorted(RELEVANT)]}
    return write_beir(tmp_path_factory.mktemp("judge"), corpus, [{"_id": "q1", "text": QUERY}], qrels)


def rows(pids: list[str]) -> list[dict]:
    return [{"title": PASSAGES[p][0], "text": PASSAGES[p][1]} for p in pids]


def judge_requests(prompt: Prompt, **cfg: object) -> list[dict]:
    """The requests mpr relabel sends with `prompt`, as the server receives them."""
    config = RelabelConfig(input=Path("in"), out=Path("out"), model="m", **cfg)
    made = Judge(prompt, config).requests(QUERY, rows(["pos"]), rows(CANDIDATES))
    return [{"model": "m", "messages": [m.model_dump() for m in req.messages]} for req, _ in made]


def answers(oracle: Oracle, requests: list[dict]) -> list[dict]:
    return [json.loads(oracle(r).content) for r in requests]


def check_listwise(oracle: Oracle, prompt: Prompt) -> None:
    (answer,) = answers(oracle, judge_requests(prompt))
    assert answer["relevant"] == [n for n, pid in enumerate(CANDIDATES, start=1) if pid in RELEVANT]
    assert ("reasoning" in answer) == (prompt.schema == "relevant_candidates_with_reasoning")


def check_graded(oracle: Oracle, prompt: Prompt) -> None:
    expected = [3 if pid in RELEVANT else 0 for pid in CANDIDATES]
    if prompt.schema == "relevance_grade":
        got = [a["grade"] for a in answers(oracle, judge_requests(prompt, mode="graded"))]
    else:
        (answer,) = answers(oracle, judge_requests(prompt, mode="graded", batch_candidates=len(CANDIDATES)))
        got = answer["grades"]
    assert got == expected


def check_synth(oracle: Oracle, prompt: Prompt) -> None:
    for levels in (2, 4, 6):
        synth = SynthPrompt(levels, prompt)
        spec = SetSpec("q1", QUERY, 0, "an encyclopedia", 40, variant=2)
        (answer,) = answers(oracle, [{"model": "m", "messages": synth.messages(spec)}])
        assert list(answer) == synth.keys
        for key, passage in answer.items():
            level = int(key.removeprefix("level_"))
            assert synthetic_grade(passage) == round(3 * level / (levels - 1))
            assert 30 <= len(passage.split()) <= 60


CHECKS: dict[str, Callable[[Oracle, Prompt], None]] = {
    "relevant_candidates": check_listwise,
    "relevant_candidates_with_reasoning": check_listwise,
    "relevance_grade": check_graded,
    "relevance_grades": check_graded,
    "synthetic_passages": check_synth,
}


@pytest.mark.parametrize("name", available())
def test_oracle_answers_every_prompt_file_from_the_qrels(data, name):
    prompt = load_prompt(name)
    assert prompt.schema in ANSWERED_SCHEMAS, (
        f"prompts/{name}.toml: the simulated judge does not answer {prompt.schema!r}"
    )
    CHECKS[prompt.schema](Oracle(data), prompt)


def test_a_reworded_prompt_is_read_through_its_template(data):
    shipped = load_prompt("relabel")
    reworded = dataclasses.replace(
        shipped,
        system=shipped.system.replace("You judge search results", "You review search results"),
        user="Candidates:\n$candidates\n\nKnown relevant:\n$positives\n\n"
        "Query: <query>$query</query>\nWhich answer it?",
    )
    check_listwise(Oracle(data, prompts=[reworded]), reworded)
    with pytest.raises(UnknownPrompt, match="matches none of the prompt templates"):
        Oracle(data)(judge_requests(reworded)[0])


def test_a_prompt_the_oracle_cannot_answer_fails_loudly(data):
    summary = Prompt(
        name="summary", version="1", schema="summary", system="Summarise.", user="<query>$query</query>"
    )
    request = {"model": "m", "messages": summary.render(query="bees")}
    with pytest.raises(UnknownPrompt, match=r"does not answer prompt summary@1 \(schema 'summary'"):
        Oracle(data, prompts=[summary])(request)
    # A template that lost a field the answer needs is refused when the oracle is built, not guessed around.
    no_passage = dataclasses.replace(load_prompt("graded"), user="<query>$query</query>\nGrade it.")
    with pytest.raises(UnknownPrompt, match=r"graded@1: .* has no \$passage"):
        Oracle(data, prompts=[no_passage])
    # Through the server: an HTTP 500 that says why, never an answer.
    with start_server(responder=Oracle(data), models=("m",)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
        with pytest.raises(
            openai.InternalServerError, match="UnknownPrompt: the simulated judge cannot read"
        ):
            client.chat.completions.create(model="m", messages=request["messages"])


def test_the_server_says_it_is_simulated():
    with start_server(models=("m",)) as server:
        with urllib.request.urlopen(f"http://{server.host}:{server.port}/health", timeout=5) as resp:
            assert resp.headers["Server"] == "mpr-simulated-judge"
            assert json.loads(resp.read()) == {"server": "mpr simulated judge"}
        client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
        assert [m.owned_by for m in client.models.list().data] == ["mpr-simulated-judge"]


def _imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_only_orchestration_imports_the_simulated_judge():
    users = {
        str(path.relative_to(REPO))
        for folder in ("mpr", "pipeline", "train", "prompts")
        for path in (REPO / folder).rglob("*.py")
        if not path.is_relative_to(REPO / "mpr" / "simulated_judge")
        and any(m == "mpr.simulated_judge" or m.startswith("mpr.simulated_judge.") for m in _imports_of(path))
    }
    assert users and all(u.startswith("mpr/orchestrate/") for u in users), users
