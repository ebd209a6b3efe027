"""Every LLM stage against a real model behind a real server: SmolLM2-135M-Instruct served by llama.cpp's
`llama-server` (the harness of `mpr serve`). They run whenever a llama-server and the model are found
(`make test`), and always under `make test-real-llm` (MPR_REAL_LLM=1), which builds and fetches what is
missing. The simulated server stays the place for fault injection and known answers; these tests check
that a model nobody here wrote gets complete, valid shards out of every mode at default options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpr.llama.build import default_model_path, ensure_binary, ensure_default_model, find_binary
from mpr.llama.server import LlamaServer, served_name
from pipeline.data.inspection import validate_shards
from pipeline.data.shards import read_shards
from pipeline.errors import MprError
from pipeline.llm.endpoint import probe_endpoint
from pipeline.stages import relabel, synth
from pipeline.stages.audit import AuditFailed
from pipeline.stages.relabel import RelabelConfig
from pipeline.stages.synth import SynthConfig

from ..conftest import EXAMPLE, read_jsonl, write_beir
from ..handmade import handmade_mined

pytestmark = pytest.mark.real_llm
REQUIRED = os.environ.get("MPR_REAL_LLM") == "1"


def _tools() -> tuple[Path, Path]:
    if REQUIRED:
        return ensure_binary(None, build=True, log=print), ensure_default_model(print)
    binary = find_binary()
    if binary is None or not default_model_path().is_file():
        pytest.skip("no llama-server or SmolLM2 GGUF cached: `make test-real-llm` builds them")
    return binary, default_model_path()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Iterator[LlamaServer]:
    binary, gguf = _tools()
    names = (
        "SmolLM2-135M-Instruct,SmolLM2-135M-Instruct-confirm"  # the second name: the cascade's confirm model
    )
    with LlamaServer(
        binary, gguf, alias=names, log_path=tmp_path_factory.mktemp("llama") / "server.log"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """Three queries of the built-in example, 8 mined candidates each (their hidden positives among them)."""
    root = tmp_path_factory.mktemp("real")
    qrels = [line.split("\t") for line in (EXAMPLE / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(q for q, _, _ in qrels))[:3]
    data = write_beir(
        root / "data",
        read_jsonl(EXAMPLE / "corpus.jsonl"),
        [q for q in read_jsonl(EXAMPLE / "queries.jsonl") if q["_id"] in qids],
        {"train": [(q, d, int(s)) for q, d, s in qrels if q in qids]},
    )
    return data, handmade_mined(data, root / "mined", candidates=8)


def _relabel(server: LlamaServer, mined: Path, out: Path, **kw: object) -> dict:
    cfg = RelabelConfig(
        input=mined,
        out=out,
        model=server.model_name,
        base_url=[server.base_url],
        llm_cache=out.parent / "llm.sqlite",
        progress=False,
        **kw,
    )
    manifest = relabel.run(cfg, log=print)
    assert manifest.complete and validate_shards(out) == []
    return manifest.summary


def test_harness_names_and_refuses_clearly(tmp_path):
    assert served_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert served_name(Path("model.gguf")) == "model"
    not_a_binary = tmp_path / "llama-server"
    not_a_binary.write_text("")
    with pytest.raises(MprError, match="not an executable llama-server"):
        find_binary(not_a_binary)
    with pytest.raises(MprError, match="no such GGUF file"):
        LlamaServer(not_a_binary, tmp_path / "missing.gguf")


def test_endpoint_is_known_before_the_work(llama):
    info, fit = probe_endpoint(llama.base_url, llama.model_name)
    assert info.server == "llama.cpp" and info.context_length == 8192 and info.slots == 1
    assert info.tokenizer == "server" and info.json_schema is True and info.logprobs == "top"
    assert info.logprobs_constrained is False  # llama.cpp's alternatives are those before the grammar
    text = "Over-extraction makes coffee bitter."
    assert 0 < fit.count_text(text) < len(text)  # the model's tokens, not the 4-characters estimate
    assert info.template_tokens is not None and info.template_tokens > 0


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prompt": "relabel_cot"},
        {"mode": "drop"},
        {"mode": "drop-query"},
        {"mode": "graded"},
        {"mode": "graded", "prompt": "graded_batch", "batch_candidates": 4},
        {"confirm_model": "SmolLM2-135M-Instruct-confirm"},
        {"zone": "unsure"},
    ],
    ids=["relabel", "relabel_cot", "drop", "drop-query", "graded", "graded_batch", "cascade", "zone-unsure"],
)
def test_every_relabel_mode_completes_without_losing_a_row(llama, small, tmp_path, options):
    _, mined = small
    s = _relabel(llama, mined, tmp_path / "out", **options)
    # 8 mined candidates a query, every one answered (or left out by the zone, with its reason; a dropped
    # query's rows are counted as dropped, not judged)
    answered = s["judged"] + s.get("zone_skipped", 0)
    if options.get("mode") == "drop-query":
        answered += (
            s["dropped_rows"] - s["dropped_queries"]
        )  # a dropped query's candidates, not its qrels row
    assert s["failed"] == 0 and answered == 3 * 8
    assert s["rows_out"] + s.get("dropped_rows", 0) == s["rows_in"]
    assert s["endpoint"]["server"] == "llama.cpp"
    rows = read_shards(tmp_path / "out").to_pylist()
    judged = [r for r in rows if r["source"] == "mined" and r["unjudged"] is None]
    assert all(r["llm_label"] in (0, 1) and r["error"] is None for r in judged)
    if options.get("mode") == "graded":
        assert all(r["grade"] is not None and 0 <= r["grade"] <= 1 for r in judged)
        assert s.get("logprobs_read", 0) + s.get("logprobs_unusable", 0) == s["judged"]


def test_audit_runs_and_reports_its_verdict(llama, small, tmp_path):
    _, mined = small
    try:
        s = _relabel(llama, mined, tmp_path / "out", audit=3)
        audit = s["audit"]
    except AuditFailed:  # a 135M judge is expected to be stopped; the figures are written all the same
        audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
        assert not audit["passed"]
    assert audit["positives"] == 3 and audit["negatives"] == 3 and audit["failed"] == 0
    assert audit["recall"] is not None and audit["false_positive_rate"] is not None


def test_a_prompt_longer_than_the_context_is_trimmed_to_fit(small, tmp_path):
    """At -c 1024, 20 candidates of ~2,000 characters cannot fit: every passage is cut to the same length, the
    cut passages are counted, and the server answers every request."""
    binary, gguf = _tools()
    data, _ = small
    corpus = read_jsonl(data / "corpus.jsonl")
    long = [{**d, "text": " ".join([d["text"]] * 6)[:2000]} for d in corpus]
    qrels = [line.split("\t") for line in (data / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    big = write_beir(
        tmp_path / "long",
        long,
        read_jsonl(data / "queries.jsonl")[:1],
        {"train": [(q, d, int(s)) for q, d, s in qrels if q == qrels[0][0]]},
    )
    mined = handmade_mined(big, tmp_path / "mined", candidates=21)
    with LlamaServer(binary, gguf, ctx_size=1024, log_path=tmp_path / "server.log") as server:
        s = _relabel(server, mined, tmp_path / "out")
    assert s["endpoint"]["context_length"] == 1024
    assert s["failed"] == 0 and s["judged"] == 20 and s["trimmed_passages"] >= 20
    assert s["llm_prompt_tokens"] <= 1024 - 16 - 5 * 20  # the prompt left room for the answer


def test_synth_four_levels_with_verify_accounts_for_every_set(llama, small, tmp_path):
    data, _ = small
    cfg = SynthConfig(
        data=data,
        split="train",
        out=tmp_path / "synth",
        model=llama.model_name,
        base_url=[llama.base_url],
        llm_cache=tmp_path / "llm.sqlite",
        levels=4,
        verify=True,
        max_queries=2,
        progress=False,
        max_failure_rate=1.0,
    )
    manifest = synth.run(cfg, log=print)
    s = manifest.summary
    assert manifest.complete and validate_shards(tmp_path / "synth") == []
    # every set is written, recorded as failed (a 135M model often writes passages too short), or dropped by
    # the verifier; none is lost
    assert (
        s["sets_requested"] == 2 and s["sets_written"] + s["sets_failed"] + s["sets_dropped_by_verify"] == 2
    )
    failed = (
        [json.loads(line) for line in (tmp_path / "synth" / "_failures.jsonl").read_text().splitlines()]
        if s["sets_failed"] or s["sets_dropped_by_verify"]
        else []
    )
    assert len(failed) == s["sets_failed"] + s["sets_dropped_by_verify"] and all(f["error"] for f in failed)
    assert s["endpoint"]["json_schema"] is True
    rows = read_shards(tmp_path / "synth").to_pylist()
    assert len(rows) % 4 == 0 and len(rows) <= 4 * s["sets_written"]
    assert all(r["source"] == "synthetic" and r["level"] in (0, 1, 2, 3) for r in rows)


def test_mpr_serve_serves_until_stopped(tmp_path):
    binary, gguf = _tools()
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mpr"),
            "serve",
            "--gguf",
            str(gguf),
            "--port",
            str(port),
            "--llama-server",
            str(binary),
            "--ctx-size",
            "512",
            "--log-file",
            str(tmp_path / "log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/v1" in line
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10).read())
        assert any(m["id"] == "SmolLM2-135M-Instruct" for m in models["data"])
    finally:
        proc.terminate()
        started = time.monotonic()
        proc.wait(20)
    assert time.monotonic() - started < 20 and proc.returncode == 0
