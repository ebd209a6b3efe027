"""`--engine ray`: relabel and synth through Ray Data's LLM processors (Ray local mode, 2 CPUs) write
row-for-row the same shards as the local engine, against the simulated judge."""

from __future__ import annotations

import functools

import pytest

from mpr.simulated_judge import Oracle, start_server
from pipeline.data.shards import FAILURES, read_manifest, read_shards
from pipeline.stages import relabel, synth
from pipeline.stages.relabel import RelabelConfig
from pipeline.stages.synth import SynthConfig

from ..conftest import EXAMPLE
from ..handmade import handmade_mined, vaswani_slice

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data.llm")
pytestmark = [pytest.mark.ray, pytest.mark.slow]
MODEL = "judge-model"
quiet = {"log": lambda _: None}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """mpr starts the local Ray itself, as it does from the CLI (limited here to 2 CPUs); a Ray started from
    a round's worker thread would die with that thread and hang the next round."""
    ray.shutdown()
    init = ray.init
    ray.init = functools.partial(init, num_cpus=2)
    yield
    ray.init = init
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return vaswani_slice(tmp_path_factory.mktemp("ray") / "vaswani")


@pytest.fixture(scope="module")
def mined(data, tmp_path_factory):
    return handmade_mined(data, tmp_path_factory.mktemp("ray-mined") / "mined", queries_per_shard=6)


def test_relabel_ray_equals_local_and_resumes_per_part(mined, data, tmp_path):
    outs, sent = {}, {}
    for engine in ("local", "ray"):
        with start_server(responder=Oracle(data, error_rate=0.1, seed=2), models=(MODEL,)) as server:
            cfg = RelabelConfig(
                input=mined,
                out=tmp_path / engine,
                model=MODEL,
                base_url=[server.url],
                candidates="all",
                llm_cache=tmp_path / f"{engine}.sqlite",
                progress=False,
                engine=engine,
                ray_processor="ray-llm",
            )  # ray.data.llm's HTTP processor; synth below uses mpr's client in Ray actors
            manifest = relabel.run(cfg, **quiet)
            sent[engine] = server.stats()["received"]
        outs[engine] = read_shards(tmp_path / engine)
        assert manifest.summary["llm_sent"] == sent[engine] > 0
    assert outs["ray"].equals(outs["local"])  # row for row, every column
    assert outs["ray"].column("llm_label").null_count < len(outs["ray"])
    # resume: a lost part is rewritten from the cache, nothing is sent again
    (tmp_path / "ray" / read_manifest(tmp_path / "ray").shards[0].name).unlink()
    with start_server(responder=Oracle(data), models=(MODEL,)) as server:
        cfg = RelabelConfig(
            input=mined,
            out=tmp_path / "ray",
            model=MODEL,
            base_url=[server.url],
            candidates="all",
            llm_cache=tmp_path / "ray.sqlite",
            progress=False,
            engine="ray",
            ray_processor="ray-llm",
        )
        relabel.run(cfg, **quiet)
        assert server.stats()["received"] == 0
    assert read_shards(tmp_path / "ray").equals(outs["local"])


def test_synth_ray_equals_local_with_invalid_answers_and_verify(tmp_path):
    outs = {}
    for engine in ("local", "ray"):
        # a fresh oracle per run: it answers a request's first ask invalidly for some requests
        oracle = Oracle(EXAMPLE, synth_invalid_rate=0.3, synth_mislabel_rate=0.2, seed=4)
        with start_server(responder=oracle, models=(MODEL,)) as server:
            cfg = SynthConfig(
                data=EXAMPLE,
                split="all",
                out=tmp_path / engine,
                model=MODEL,
                base_url=[server.url],
                lengths=[40],
                verify=True,
                queries_per_shard=30,
                llm_cache=tmp_path / f"{engine}.sqlite",
                progress=False,
                engine=engine,
            )
            manifest = synth.run(cfg, **quiet)
        outs[engine] = (read_shards(tmp_path / engine), manifest.summary)
    local, ray_ = outs["local"], outs["ray"]
    assert ray_[0].equals(local[0])
    for key in (
        "sets_written",
        "sets_dropped_by_verify",
        "llm_invalid",
        "llm_sent",
        "verify_sent",
        "passages",
    ):
        assert ray_[1][key] == local[1][key], key
    assert local[1]["llm_invalid"] > 0 and local[1]["sets_dropped_by_verify"] > 0
    assert (tmp_path / "ray" / FAILURES).read_text() == (tmp_path / "local" / FAILURES).read_text()


def test_postprocess_reads_what_ray_hands_back_from_arrow():
    """Ray Data turns the response's lists into numpy arrays between stages; mpr's parser still reads the
    answer and its logprobs, and an error body becomes a failed row, not an exception."""
    import numpy as np

    from pipeline.llm.ray_engine import _http_postprocess
    from pipeline.llm.types import ChatResult

    token = {
        "token": "3",
        "logprob": -0.1,
        "top_logprobs": np.array([{"token": "3", "logprob": -0.1}, {"token": "0", "logprob": -2.5}]),
    }
    response = {
        "choices": np.array(
            [
                {
                    "message": {"content": '{"grade": 3}'},
                    "finish_reason": "stop",
                    "logprobs": {"content": np.array([token])},
                }
            ]
        ),
        "usage": {"prompt_tokens": np.int64(12), "completion_tokens": 3},
    }
    row = _http_postprocess({"i": np.int64(4), "key": "k", "http_response": response})
    assert row["i"] == 4 and row["ok"]
    result = ChatResult.model_validate_json(row["answer"])
    assert result.content == '{"grade": 3}' and result.prompt_tokens == 12
    assert result.logprobs[0].top == [("3", -0.1), ("0", -2.5)]
    failed = _http_postprocess(
        {"i": 1, "key": "k", "http_response": {"error": {"message": "model overloaded"}}}
    )
    assert failed == {"i": 1, "ok": False, "answer": "model overloaded"}
