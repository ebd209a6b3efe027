"""The LLM client layer against the local test server: cache, kill/restart, retries, validation, keys."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from mpr.simulated_judge import ResponderAnswer, start_server
from pipeline.errors import MprError
from pipeline.llm.base import schema_shape_error
from pipeline.llm.cache import ResultCache
from pipeline.llm.client import OpenAIBackend
from pipeline.llm.jsonparse import parse_json
from pipeline.llm.models import TokenCounter, load_aliases, resolve_backend, resolve_llm_alias
from pipeline.llm.types import ChatRequest, ChatResult

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "integer", "minimum": 0, "maximum": 3}, "why": {"type": "string"}},
    "required": ["label", "why"],
}


def requests(n: int, **kw) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": f"item {i}"}], **kw) for i in range(n)]


def backend(url, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("concurrency", 16)
    return OpenAIBackend("test-model", url, **kw)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(params=["aiohttp", "openai"])
def transport(request) -> str:
    """The client's two HTTP paths; the fault tests run on both."""
    return request.param


@pytest.fixture
def server():
    with start_server() as h:
        yield h


def test_run_answers_in_order_with_schema_logprobs_and_stats(server):
    reqs = requests(50, json_schema=SCHEMA, logprobs=True, top_logprobs=2)
    seen: list[int] = []
    b = backend(server.url)
    results = b.run_sync(reqs + reqs[:5], on_result=lambda i, r: seen.append(i))
    assert len(results) == 55 and sorted(seen) == list(range(55))
    assert all(r.ok and r.parsed == {"label": 0, "why": ""} for r in results)
    assert [r.key for r in results] == [r.with_model("test-model").key for r in reqs + reqs[:5]]
    assert results[0].logprobs and len(results[0].logprobs[0].top) == 2
    assert "".join(t.token for t in results[0].logprobs) == results[0].content
    st = b.last_stats
    assert (st.requests, st.unique, st.sent, st.answered, st.failures) == (55, 50, 50, 50, 0)
    assert st.completion_tokens == sum(r.completion_tokens for r in results[:50]) > 0
    assert server.stats()["received"] == 50  # duplicates in one run are asked once


def test_cache_hits_send_nothing(server, tmp_path):
    db = tmp_path / "llm.sqlite"
    reqs = requests(30, json_schema=SCHEMA)
    with backend(server.url, cache=db) as b:
        first = b.run_sync(reqs)
    assert server.stats()["received"] == 30
    with backend(server.url, cache=db) as b:
        again = b.run_sync(reqs)
        assert b.last_stats.cache_hits == 30 and b.last_stats.sent == 0
    assert server.stats()["received"] == 30
    assert all(r.cached and r.parsed == {"label": 0, "why": ""} for r in again)
    assert [r.content for r in again] == [r.content for r in first]


def test_failed_answers_are_not_cached_and_cached_invalid_is_asked_again(server, tmp_path):
    db = tmp_path / "llm.sqlite"
    reqs = requests(5, json_schema=SCHEMA)
    with backend(server.url, cache=db) as b:
        b.run_sync(reqs)
        # A stricter validator than the one that filled the cache: the cached answers are asked again.
        results = b.run_sync(reqs, validate=lambda c: 1 / json.loads(c)["label"], progress="judging")
    assert all(not r.ok and "ZeroDivisionError" in r.error for r in results)
    assert b.last_stats.cache_hits == 0 and b.last_stats.failures == 5
    assert server.stats()["received"] == 5 + 5 * 3
    with ResultCache(db) as cache:
        assert len(cache) == 5  # the earlier successes stay; failures never enter


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys
    from pipeline.llm.client import OpenAIBackend
    url, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = OpenAIBackend("test-model", url, cache=db, concurrency=8)
    reqs = [{"messages": [{"role": "user", "content": f"item {i}"}]} for i in range(n)]
    results = b.run_sync(reqs)
    assert all(r.ok for r in results)
    print(b.last_stats.model_dump_json())
    """
)


def test_killed_client_restarted_sends_no_answered_request(server, tmp_path):
    n = 300
    db = tmp_path / "llm.sqlite"
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    server.control(delay_s=0.02)  # 8 in flight: at most ~400 answers/s, so the kill lands mid-run
    proc = subprocess.Popen(
        [sys.executable, str(script), server.url, str(db), str(n)], stdout=subprocess.PIPE
    )
    deadline = time.monotonic() + 20
    done = 0
    while time.monotonic() < deadline and done < 50:
        time.sleep(0.02)
        try:
            with sqlite3.connect(db, timeout=5) as con:
                done = con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        except sqlite3.OperationalError:
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with ResultCache(db) as cache:
        cached_at_kill = set(cache.keys())
    assert 50 <= len(cached_at_kill) < n
    before = {v["label"]: v["received"] for v in server.stats(keys=True)["keys"].values()}
    in_flight_lost = sum(before.values()) - len(cached_at_kill)
    assert 0 <= in_flight_lost <= 8  # answered by the server but never handed to the dead client

    out = subprocess.run(
        [sys.executable, str(script), server.url, str(db), str(n)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    stats = json.loads(out.stdout)
    after = {v["label"]: v["received"] for v in server.stats(keys=True)["keys"].values()}
    key_of = {f"item {i}": r.with_model("test-model").key for i, r in enumerate(requests(n))}
    resent = {label for label, count in after.items() if count > before.get(label, 0)}
    assert not {key_of[label] for label in resent} & cached_at_kill
    assert stats["cache_hits"] == len(cached_at_kill) and stats["sent"] == n - len(cached_at_kill)
    assert max(after.values()) <= 2 and sum(1 for c in after.values() if c == 2) == in_flight_lost
    with ResultCache(db) as cache:
        assert len(cache) == n


def test_retries_on_500_and_dropped_connections_then_success(server, transport):
    server.control(p_500=1.0, faulty_attempts=1)
    b = backend(server.url, transport=transport)
    results = b.run_sync(requests(20))
    assert all(r.ok and r.attempts == 2 for r in results)
    server.control(p_500=0.0, p_drop=1.0, reset_stats=True)
    results = b.run_sync(requests(20, seed=1))
    assert all(r.ok and r.attempts == 2 for r in results)
    assert server.stats()["dropped"] == 20 and b.last_stats.retries == 20


def test_mixed_faults_end_answered_or_failed_with_error(server, transport):
    server.control(
        p_500=0.3, p_429=0.1, retry_after_s=0.05, p_drop=0.2, p_malformed=0.1, p_truncate=0.1, seed=7
    )
    b = backend(server.url, transport=transport, max_attempts=3, max_invalid_retries=1)
    results = b.run_sync(requests(200, json_schema=SCHEMA))
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    assert len(ok) + len(failed) == 200 and len(ok) > 100 and failed
    assert all(r.parsed is not None for r in ok)
    assert all(r.error and r.parsed is None for r in failed)
    assert all(re.match(r"(gave up|invalid answer) after \d+ attempts: ", r.error) for r in failed)
    assert b.last_stats.failures == len(failed)


def test_persistent_500_is_recorded_failed(server, transport):
    server.control(p_500=1.0)
    results = backend(server.url, transport=transport, max_attempts=3).run_sync(requests(5))
    assert all(
        not r.ok and r.attempts == 3 and r.error.startswith("gave up after 3 attempts: HTTP 500")
        for r in results
    )


def test_429_retry_after_is_honoured(server, transport):
    server.control(p_429=1.0, retry_after_s=0.6, faulty_attempts=1)
    b = backend(server.url, transport=transport, backoff_base_s=0.0)
    t0 = time.perf_counter()
    results = b.run_sync(requests(10))
    elapsed = time.perf_counter() - t0
    assert all(r.ok and r.attempts == 2 for r in results)
    assert 0.6 <= elapsed < 3.0


def test_timeouts_are_retried_then_recorded(server, transport):
    server.control(delay_s=1.0, faulty_attempts=1)
    t0 = time.perf_counter()
    results = backend(server.url, transport=transport, timeout_s=0.2).run_sync(requests(8))
    assert all(r.ok and r.attempts == 2 for r in results)
    assert time.perf_counter() - t0 < 1.5
    server.control(faulty_attempts=0)
    results = backend(server.url, transport=transport, timeout_s=0.1, max_attempts=2).run_sync(
        requests(3, seed=2)
    )
    assert all(not r.ok and "timed out" in r.error for r in results)


def test_malformed_answers_are_retried_then_recorded_failed(server, transport):
    server.control(p_malformed=1.0, faulty_attempts=2)
    b = backend(server.url, transport=transport, max_invalid_retries=2)
    results = b.run_sync(requests(10, json_schema=SCHEMA))
    assert all(r.ok and r.attempts == 3 for r in results)
    server.control(faulty_attempts=0, p_malformed=0.0, p_truncate=1.0)
    results = b.run_sync(requests(10, json_schema=SCHEMA, seed=3))
    assert all(not r.ok and r.error.startswith("invalid answer after 3 attempts") for r in results)
    assert all(r.content and r.finish_reason == "length" for r in results)
    assert b.last_stats.invalid == 30


def test_schema_keywords_a_server_lacks_are_dropped_before_the_schema_is(transport):
    """A grammar engine without uniqueItems or maxLength refuses the full schema (HTTP 400): the request is
    sent again with the schema's core, the answers still come back schema-shaped, and the server is
    remembered."""
    schema = {
        "type": "object",
        "properties": {
            "relevant": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
        },
        "required": ["relevant"],
    }
    # random delays interleave the requests: one refused at the full schema after another has learnt the
    # core must still be asked with the core, not with no schema at all
    for seed in range(6):
        faults = {"reject_schema_keywords": ["uniqueItems", "maxItems"], "delay_s": 0.05, "p_delay": 0.5}
        with start_server(faults={**faults, "seed": seed}) as h:
            b = backend(h.url, transport=transport, concurrency=8)
            results = b.run_sync(requests(24, json_schema=schema))
            assert all(r.ok and isinstance(r.parsed["relevant"], list) for r in results), seed
            assert b.servers[0].schema_level == 1 and h.stats()["status"]["400"] <= 8, seed
            assert h.stats(keys=True)["status"]["200"] == 24


def test_a_greedy_invalid_answer_is_asked_again_sampled_and_a_cut_one_with_more_room():
    """A greedy model gives the same invalid answer every time: the retry samples (new seed each time), and an
    answer cut at max_tokens is asked again with twice the limit, until it closes."""
    seen: list[dict] = []

    def repeats_until_room(request: dict) -> ResponderAnswer:
        seen.append(request)
        if request["max_tokens"] < 30:
            return ResponderAnswer('{"relevant": [1, 2, 2, 2, 2, 2, 2', finish_reason="length")
        return ResponderAnswer('{"relevant": [1, 2]}')

    with start_server(responder=repeats_until_room) as h:
        schema = {"type": "object", "properties": {"relevant": {"type": "array"}}, "required": ["relevant"]}
        results = backend(h.url).run_sync(requests(1, json_schema=schema, max_tokens=20, temperature=0.0))
    assert results[0].ok and results[0].attempts == 2 and results[0].parsed == {"relevant": [1, 2]}
    assert [r["max_tokens"] for r in seen] == [20, 40]
    assert [r["temperature"] for r in seen] == [0.0, 0.7] and [r.get("seed") for r in seen] == [None, 1]
    # the model sees its cut answer and why it was refused; the original request is what the cache keys
    assert [len(r["messages"]) for r in seen] == [1, 3]
    assert seen[1]["messages"][1] == {"role": "assistant", "content": '{"relevant": [1, 2, 2, 2, 2, 2, 2'}
    assert "not accepted: no complete JSON value" in seen[1]["messages"][2]["content"]


def test_response_format_rejected_falls_back_and_is_remembered(transport):
    def fenced(request):
        return ResponderAnswer('Here you go:\n```json\n{"label": 2, "why": "matches"}\n```')

    with start_server(responder=fenced, faults={"reject_response_format": True}) as h:
        b = backend(h.url, transport=transport, concurrency=4)
        results = b.run_sync(requests(40, json_schema=SCHEMA))
        assert all(r.ok and r.parsed == {"label": 2, "why": "matches"} for r in results)
        assert h.stats()["status"]["400"] <= 16 and b.servers[0].schema_level == 0
        b.run_sync(requests(10, json_schema=SCHEMA, seed=1))
        assert h.stats()["status"]["400"] <= 16


def test_several_base_urls_share_load_and_survive_a_dead_one(transport):
    with start_server() as a, start_server() as b_srv:
        b = backend([a.url, b_srv.url], transport=transport, concurrency=8)
        results = b.run_sync(requests(200))
        assert all(r.ok for r in results)
        got_a, got_b = a.stats()["received"], b_srv.stats()["received"]
        assert got_a + got_b == 200 and min(got_a, got_b) >= 50
        assert set(b.last_stats.per_server.values()) == {got_a, got_b}
        dead = closed_port_url()
        b = backend([dead, a.url], transport=transport, concurrency=8)
        results = b.run_sync(requests(100, seed=5))
        assert all(r.ok for r in results)
        assert b.last_stats.per_server.get(dead, 0) < 30


def test_api_key_never_leaks(server, transport, tmp_path, monkeypatch, caplog):
    secret = "sk-test-DO-NOT-LEAK-4f9a8b7c6d5e"
    monkeypatch.setenv("MPR_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "llm.sqlite"
    server.control(require_api_key="sk-some-other-key-123456")
    b = backend(server.url, transport=transport, cache=db, api_key_env="MPR_TEST_KEY")
    with pytest.raises(MprError) as refused:
        b.run_sync(requests(3))
    assert "401" in str(refused.value) and "$MPR_TEST_KEY" in str(refused.value)
    server.control(require_api_key=secret, p_500=0.5, p_drop=0.2, seed=1)
    results = b.run_sync(requests(30, json_schema=SCHEMA), progress=True)
    assert any(r.ok for r in results)
    b.close()
    texts = [
        str(refused.value),
        repr(refused.value.__cause__),
        repr(b),
        caplog.text,
        b.last_stats.model_dump_json(),
        *(r.model_dump_json() for r in results),
    ]
    assert not any(secret in t for t in texts)
    assert not any("DO-NOT-LEAK" in t for t in texts)
    for f in tmp_path.iterdir():
        assert secret.encode() not in f.read_bytes()


def test_resolve_backend(server, monkeypatch, tmp_path):
    dead = closed_port_url()
    monkeypatch.setenv("OPENAI_BASE_URL", dead)
    with pytest.raises(MprError) as err:
        resolve_backend("auto", [], "Qwen2.5-7B")
    message = str(err.value)
    assert "\n" not in message and dead in message and "vllm serve Qwen/Qwen2.5-7B-Instruct" in message
    with pytest.raises(MprError, match="connection refused"):
        resolve_backend("openai", [dead], None)

    with start_server(models=["Qwen/Qwen2.5-7B-Instruct"]) as h:
        spec = resolve_backend("auto", [h.url, dead], "Qwen2.5-7B")
        assert (spec.kind, spec.model, spec.base_urls) == ("openai", "Qwen/Qwen2.5-7B-Instruct", [h.url])
        monkeypatch.setenv("OPENAI_BASE_URL", h.url + "/")
        spec = resolve_backend("openai", [], None)
        assert spec.model == "Qwen/Qwen2.5-7B-Instruct" and spec.base_urls == [h.url]
        assert spec.create().run_sync(requests(2))[1].ok
    with start_server(faults={"require_api_key": "x"}) as h, pytest.raises(MprError, match="API key"):
        resolve_backend("openai", [h.url], "m")


def test_vllm_backend_without_vllm_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    from pipeline.llm.vllm_backend import VLLMBackend

    with pytest.raises(MprError, match=r'pip install "mpr\[vllm\]"'):
        VLLMBackend("Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(MprError, match=r'pip install "mpr\[vllm\]"'):
        resolve_backend("vllm", [], None)


def test_aliases_and_overrides(tmp_path, monkeypatch):
    assert resolve_llm_alias("Qwen2.5-7B") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_llm_alias("llama-3.1-8b") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_llm_alias("org/custom") == "org/custom"
    toml = tmp_path / "aliases.toml"
    toml.write_text('[aliases]\nmine = "org/mine-7b"\n"Qwen2.5-7B" = "local/qwen"\n')
    monkeypatch.setenv("MPR_MODEL_ALIASES", str(toml))
    assert resolve_llm_alias("mine") == "org/mine-7b" and resolve_llm_alias("Qwen2.5-7B") == "local/qwen"
    monkeypatch.setenv("MPR_MODEL_ALIASES", '{"tiny": "org/tiny"}')
    assert resolve_llm_alias("tiny") == "org/tiny"
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(MprError, match="JSON object"):
        load_aliases(bad)


def test_token_counter_falls_back_to_characters():
    counter = TokenCounter("org/not-on-disk")
    assert not counter.exact and counter.count("a" * 40) == 10
    assert counter.count_messages([{"role": "user", "content": "a" * 8}]) == 2 + 4 + 2


def test_parse_json_and_shape_check():
    assert parse_json('  {"a": 1} ') == {"a": 1}
    assert parse_json('<think>{"no"}</think>Sure: {"a": [1, 2]} hope this helps') == {"a": [1, 2]}
    assert parse_json("```json\n[1, 2]\n```") == [1, 2]
    for broken in ['{"a": ', "no json here", '[{"x": 1}, {']:
        with pytest.raises(ValueError):
            parse_json(broken)
    assert schema_shape_error(SCHEMA, {"label": 1}) == "missing required field(s) why"
    assert schema_shape_error(SCHEMA, [1]) == "expected a JSON object, got list"
    assert schema_shape_error(SCHEMA, {"label": 1, "why": ""}) is None


def test_request_key_covers_every_parameter():
    base = ChatRequest(messages=[{"role": "user", "content": "q"}], model="m")
    variants = [
        base.model_copy(update={"model": "m2"}),
        base.model_copy(update={"temperature": 0.7}),
        base.model_copy(update={"top_p": 0.9}),
        base.model_copy(update={"seed": 1}),
        base.model_copy(update={"max_tokens": 9}),
        base.model_copy(update={"logprobs": True}),
        base.model_copy(update={"top_logprobs": 2}),
        base.model_copy(update={"json_schema": SCHEMA}),
        base.model_copy(update={"stop": ["\n"]}),
        ChatRequest(messages=[{"role": "system", "content": "q"}], model="m"),
    ]
    keys = {v.key for v in variants} | {base.key}
    assert len(keys) == len(variants) + 1
    assert ChatRequest(messages=[{"role": "user", "content": "q"}], model="m").key == base.key


def _writer(path: str, start: int) -> None:
    with ResultCache(path) as cache:
        for i in range(start, start + 150):
            cache.put(ChatResult(key=f"k{i}", content=str(i)), "m")


def test_cache_shared_by_several_writer_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 150, 300, 450)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    with ResultCache(path) as cache:
        assert len(cache) == 600 and cache.get("k451").content == "451"
        with pytest.raises(ValueError):
            cache.put(ChatResult(key="bad", error="boom"))


def test_run_sync_inside_a_running_loop(server):
    async def inside():
        return backend(server.url).run_sync(requests(3))

    assert all(r.ok for r in asyncio.run(inside()))


def test_async_on_result_sees_cached_answers(server, tmp_path):
    db = tmp_path / "llm.sqlite"
    b = backend(server.url, cache=db)

    async def go():
        order = []

        async def on_result(i, r):
            assert r.key in b.cache  # committed before the caller sees it
            order.append(i)

        await b.run(requests(20), on_result=on_result)
        return order

    assert sorted(asyncio.run(go())) == list(range(20))
    assert Path(db).exists()


def fake_vllm(monkeypatch) -> list[dict]:
    """A stand-in `vllm` module with the documented offline API: LLM.chat, SamplingParams,
    StructuredOutputsParams."""
    calls: list[dict] = []
    seen: dict[str, int] = {}

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, model, **kwargs):
            self.model = model

        def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template_kwargs=None):
            calls.append({"n": len(messages), "params": sampling_params, "template": chat_template_kwargs})
            outputs = []
            for conv, sp in zip(messages, sampling_params, strict=True):
                content = conv[-1]["content"]
                seen[content] = seen.get(content, 0) + 1
                so = sp.kwargs.get("structured_outputs")
                text = '{"label": 1, "why": "w"}' if so is not None and seen[content] > 1 else '{"label": '
                k = sp.kwargs.get("logprobs")
                logprobs = None
                if k is not None:
                    lp = types.SimpleNamespace
                    logprobs = [
                        {
                            7: lp(logprob=-0.5, rank=2, decoded_token="{"),
                            3: lp(logprob=-0.1, rank=1, decoded_token="["),
                        },
                        {8: lp(logprob=-0.2, rank=1, decoded_token='"label"')},
                    ]
                out = types.SimpleNamespace(
                    text=text, token_ids=[7, 8], logprobs=logprobs, finish_reason="stop"
                )
                outputs.append(types.SimpleNamespace(prompt_token_ids=[0] * 11, outputs=[out]))
            return outputs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = StructuredOutputsParams
    sampling.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return calls


def test_vllm_backend_against_the_documented_offline_api(monkeypatch, tmp_path):
    calls = fake_vllm(monkeypatch)
    from pipeline.llm.vllm_backend import VLLMBackend

    b = VLLMBackend(
        "Qwen/Qwen3-8B",
        cache=tmp_path / "c.sqlite",
        batch_size=4,
        chat_template_kwargs={"enable_thinking": False},
    )
    reqs = requests(6, json_schema=SCHEMA, logprobs=True, top_logprobs=1, max_tokens=None)
    results = b.run_sync(reqs)
    assert all(r.ok and r.parsed == {"label": 1, "why": "w"} and r.attempts == 2 for r in results)
    assert [c["n"] for c in calls] == [4, 4, 2, 2]  # two batches, each asked again after invalid answers
    params = calls[0]["params"][0].kwargs
    assert (
        params["structured_outputs"].json == SCHEMA
        and params["logprobs"] == 1
        and params["max_tokens"] is None
    )
    assert calls[0]["template"] == {"enable_thinking": False}
    first = results[0].logprobs[0]
    assert (first.token, first.logprob, first.top) == ("{", -0.5, [("[", -0.1)])
    assert (results[0].prompt_tokens, results[0].completion_tokens) == (11, 2)
    assert b.last_stats.retries == 6 and b.last_stats.invalid == 6
    assert b.run_sync(reqs)[0].cached and len(calls) == 4


@pytest.mark.parametrize("http_client", ["aiohttp", "openai"])
def test_stage_option_chooses_the_http_path(server, tmp_path, http_client):
    from pipeline.llm.stage import LLMStageConfig, close_backends, open_backends

    cfg = LLMStageConfig(
        backend="openai", base_url=[server.url], http_client=http_client, llm_cache=tmp_path / "c.sqlite"
    )
    backend_, _ = open_backends(cfg, "test-model", [], stage="test", log=lambda _: None)
    try:
        assert isinstance(backend_, OpenAIBackend) and backend_.transport == http_client
        assert all(r.ok for r in backend_.run_sync(requests(3, json_schema=SCHEMA)))
        assert server.stats()["received"] == 3
    finally:
        close_backends(backend_)
