"""The local OpenAI-compatible test server: protocol conformance with the official client, faults, stats."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from mpr.simulated_judge import ResponderAnswer, load_responder, minimal_instance, start_server
from pipeline.errors import MprError


class Judgment(BaseModel):
    label: Literal["relevant", "partial", "irrelevant"]
    score: int = Field(ge=1, le=3)
    reasons: list[str] = Field(min_length=2)


class Nested(BaseModel):
    judgment: Judgment
    note: str | None


MESSAGES = [{"role": "system", "content": "You judge."}, {"role": "user", "content": "query: q1 passage: p1"}]


@pytest.fixture
def server():
    with start_server(models=["test-model", "other-model"]) as h:
        yield h


def oracle(label: int = 2) -> object:
    """A responder factory, as a stage would plug in: answers a fixed grade with token logprobs."""

    def respond(request: dict) -> ResponderAnswer:
        grade = str(label)
        alts = [(grade, -0.1), ("1", -2.5), ("0", -4.0)]
        return ResponderAnswer(content=grade, token_logprobs=[(grade, -0.1, alts)])

    return respond


def test_sync_client_logprobs_and_usage(server):
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
    resp = client.chat.completions.create(
        model="test-model", messages=MESSAGES, logprobs=True, top_logprobs=3
    )
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == "test-model"
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == "OK"
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == "OK"
    assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in tokens)
    assert tokens[0].top_logprobs[0].token == tokens[0].token
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.completion_tokens == len(tokens)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["test-model", "other-model"]


def test_async_client_json_schema_and_parse(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as client:
            rf = {
                "type": "json_schema",
                "json_schema": {"name": "nested", "schema": Nested.model_json_schema()},
            }
            resp = await client.chat.completions.create(
                model="test-model", messages=MESSAGES, response_format=rf
            )
            parsed = Nested.model_validate_json(resp.choices[0].message.content)
            assert parsed.judgment.label == "relevant" and len(parsed.judgment.reasons) == 2
            # The SDK's own structured-output helper (strict schema built from the pydantic model).
            done = await client.chat.completions.parse(
                model="test-model", messages=MESSAGES, response_format=Judgment
            )
            assert isinstance(done.choices[0].message.parsed, Judgment)
            resp = await client.chat.completions.create(
                model="test-model", messages=MESSAGES, response_format={"type": "json_object"}
            )
            assert json.loads(resp.choices[0].message.content) == {}

    asyncio.run(go())


def test_minimal_instance_covers_common_schema_features():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 5},
            "b": {"type": "number", "exclusiveMinimum": 0},
            "c": {"type": ["null", "string"], "minLength": 2},
            "d": {"$ref": "#/$defs/D"},
            "e": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1},
            "f": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
            "g": {"const": 7},
            "h": {"type": "string"},
        },
        "required": ["a", "b", "c", "d", "e", "f", "g"],
        "$defs": {
            "D": {
                "type": "object",
                "properties": {"z": {"type": "integer", "maximum": -3}},
                "required": ["z"],
            }
        },
    }
    assert minimal_instance(schema) == {
        "a": 5,
        "b": 1.0,
        "c": "aa",
        "d": {"z": -3},
        "e": ["x"],
        "f": False,
        "g": 7,
    }


def test_pluggable_responder_by_dotted_path():
    responder = load_responder(f"{__name__}:oracle", {"label": 3})
    with start_server(responder=responder) as h:
        client = openai.OpenAI(base_url=h.url, api_key="k", max_retries=0)
        resp = client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=2)
        lp = resp.choices[0].logprobs.content
        assert resp.choices[0].message.content == "3"
        assert [(t.token, t.logprob) for t in lp[0].top_logprobs] == [("3", -0.1), ("1", -2.5)]
    with pytest.raises(MprError, match=r"module\.path:factory"):
        load_responder("no_colon_here")


def test_subprocess_mode_with_responder_args():
    with start_server(
        mode="subprocess",
        responder="mpr.simulated_judge:default_responder",
        responder_args={"text": "hi"},
    ) as h:
        client = openai.OpenAI(base_url=h.url, api_key="k", max_retries=0)
        assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "hi"
        assert h.stats()["received"] == 1


def test_max_tokens_truncates_with_finish_reason_length(server):
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
    rf = {"type": "json_schema", "json_schema": {"name": "j", "schema": Judgment.model_json_schema()}}
    resp = client.chat.completions.create(model="m", messages=MESSAGES, response_format=rf, max_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_faults_and_runtime_control(server):
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)

    def ask(i: int, **kw):
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"fault {i}"}], timeout=5, **kw
        )

    server.control(p_500=1.0)
    with pytest.raises(openai.InternalServerError):
        ask(1)
    server.control(p_500=0.0, p_429=1.0, retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as e429:
        ask(2)
    assert e429.value.response.headers["retry-after"] == "7"
    server.control(p_429=0.0, p_drop=1.0)
    with pytest.raises(openai.APIConnectionError):
        ask(3)
    server.control(p_drop=0.0, p_bad_body=1.0)
    with pytest.raises((openai.APIResponseValidationError, ValueError)):
        ask(4)
    server.control(p_bad_body=0.0, p_truncate=1.0)
    rf = {"type": "json_schema", "json_schema": {"name": "j", "schema": Judgment.model_json_schema()}}
    resp = ask(5, response_format=rf)
    assert resp.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(resp.choices[0].message.content)
    server.control(p_truncate=0.0, p_malformed=1.0)
    resp = ask(6, response_format=rf)
    assert resp.choices[0].finish_reason == "stop"
    with pytest.raises(ValueError):
        json.loads(resp.choices[0].message.content)
    server.control(p_malformed=0.0, reject_response_format=True)
    with pytest.raises(openai.BadRequestError):
        ask(7, response_format=rf)
    assert ask(8).choices[0].message.content == "OK"
    server.control(reject_response_format=False, require_api_key="right-key")
    with pytest.raises(openai.AuthenticationError):
        ask(9)
    server.control(require_api_key=None, delay_s=0.3)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="m", messages=MESSAGES, timeout=0.1)

    stats = server.stats()
    assert stats["status"] == {"200": 4, "400": 1, "401": 1, "429": 1, "500": 1}
    assert stats["dropped"] == 1
    assert server.control(reset_stats=True, delay_s=0)["delay_s"] == 0
    assert server.stats()["received"] == 0


def test_faulty_attempts_and_seeded_probabilities(server):
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
    server.control(p_500=1.0, faulty_attempts=2)
    msgs = [{"role": "user", "content": "x"}]
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=msgs)
    assert client.chat.completions.create(model="m", messages=msgs).choices[0].message.content == "OK"

    def failures(seed: int) -> list[int]:
        server.control(p_500=0.5, faulty_attempts=0, seed=seed, reset_stats=True)
        out = []
        for i in range(40):
            try:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"s{i}"}])
            except openai.InternalServerError:
                out.append(i)
        return out

    first = failures(1)
    assert 8 < len(first) < 32
    assert failures(1) == first
    assert failures(2) != first


def test_stats_count_per_request_key(server):
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
    for content in ["a", "b", "a"]:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], logprobs=True)
    # sampling parameters do not make another question: a retry that samples is the same key asked again
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "b"}], temperature=0.7, seed=1
    )
    stats = server.stats(keys=True)
    assert stats["received"] == 5 and stats["unique_keys"] == 3
    assert stats["repeated_keys"] == 2 and stats["max_answered_per_key"] == 2
    assert sorted((v["label"], v["received"]) for v in stats["keys"].values()) == [
        ("a", 1),
        ("a", 2),
        ("b", 2),
    ]


def test_raw_http_chunked_body_keepalive_and_404(server):
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        for _ in range(2):  # two requests on one keep-alive connection
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                + chunked
            )
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                data += s.recv(65536)
            head, _, payload = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert json.loads(payload)["choices"][0]["message"]["content"] == "OK"
        s.sendall(b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 404")
