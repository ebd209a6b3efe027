"""`mpr synth` end to end against the local OpenAI-compatible server, the oracle writing the passages."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from mpr.simulated_judge import SYNTH_MARKERS, Oracle, start_server
from pipeline.data.inspection import inspect_shards, validate_shards
from pipeline.data.readers import load_beir
from pipeline.data.shards import read_manifest, read_shards
from pipeline.stages import synth
from pipeline.stages.synth import (
    DEFAULT_LENGTHS,
    DEFAULT_STYLES,
    SynthConfig,
    SynthPrompt,
    VerbatimIndex,
    check_answer,
    plan_sets,
    spearman,
    word_bounds,
)

from ..conftest import EXAMPLE, REPO

runner = CliRunner()
MODEL = "gen-model"


def cli_app() -> typer.Typer:
    """`mpr` itself once `synth` is registered there; until then an app with the one command."""
    from mpr.cli import app

    if any((c.name or getattr(c.callback, "__name__", "")) == "synth" for c in app.registered_commands):
        return app
    from mpr.commands.synth import synth as command

    local = typer.Typer()
    local.callback()(lambda: None)
    local.command()(command)
    return local


def cli_argv() -> list[str]:
    return [sys.executable, "-c", "from tests.stages.test_synth import cli_app; cli_app()(prog_name='mpr')"]


@pytest.fixture(scope="module")
def server():
    with start_server(responder=Oracle(EXAMPLE), models=(MODEL,)) as handle:
        yield handle


def run(out: Path, url: str, cache: Path, **kw):
    kw.setdefault("data", EXAMPLE)
    return synth.run(
        SynthConfig(out=out, model=MODEL, base_url=[url], llm_cache=cache, progress=False, **kw),
        log=lambda _: None,
    )


def sets_of(df: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    syn = df[df.source == "synthetic"]
    return {(q, int(s)): g for (q, s), g in syn.groupby(["qid", "set"])}


@pytest.fixture(scope="module")
def written(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    manifest = run(
        root / "out",
        server.url,
        root / "llm.sqlite",
        split="all",
        per_query=2,
        with_qrels=True,
        queries_per_shard=8,
    )
    return root / "out", manifest, read_shards(root / "out").to_pandas()


def test_output_schema_and_invariants(written):
    out, manifest, df = written
    assert validate_shards(out) == []
    assert (
        manifest.stage == "synth"
        and manifest.prompts == {"synth": "1"}
        and manifest.models == {"generator": MODEL}
    )
    s = manifest.summary
    assert (
        s["queries"] == 30 and s["sets_requested"] == 60 and s["sets_written"] == 60 and s["sets_failed"] == 0
    )
    assert s["passages"] == 240 and s["requests"] == s["llm_sent"] == 60 and s["tokens_out"] > 0
    syn = df[df.source == "synthetic"]
    assert len(syn) == 240 and syn.title.isna().all() and syn["rank"].isna().all() and syn.score.isna().all()
    for (_, _), group in sets_of(df).items():
        assert sorted(group.level) == [0, 1, 2, 3]  # every level exactly once per set
        assert group["style"].nunique() == 1 and group.target_words.nunique() == 1
        lo, hi = word_bounds(int(group.target_words.iloc[0]))
        assert all(lo <= len(t.split()) <= hi for t in group.text)
    assert ((syn.grade - syn.level / 3).abs() < 1e-6).all()
    assert (syn.label == (syn.level >= 2).astype(int)).all()  # default: the top two of 4 levels
    assert (syn.pid == ["syn-" + hashlib.sha256(t.encode()).hexdigest()[:16] for t in syn.text]).all()
    assert set(syn.judge) == {MODEL} and set(syn.prompt) == {"synth@1"} and syn.judged_grade.isna().all()
    assert set(syn["style"]) <= set(DEFAULT_STYLES) and set(syn.target_words) <= set(DEFAULT_LENGTHS)
    # rows grouped by query: the qrels positives first, then the synthetic rows, highest level first
    qids = df.qid.tolist()
    assert [q for i, q in enumerate(qids) if i == 0 or qids[i - 1] != q] == list(dict.fromkeys(qids))
    for _, group in df.groupby("qid", sort=False):
        sources = group.source.tolist()
        assert sources == sorted(sources, key=lambda x: x != "qrels")
        levels = group[group.source == "synthetic"].level.tolist()
        assert levels == sorted(levels, reverse=True)
    # --with-qrels: the real positives of every split
    truth = {
        (q, p)
        for split in ("train", "test")
        for q, judged in load_beir(EXAMPLE, split).qrels.items()
        for p in judged
    }
    real = df[df.source == "qrels"]
    assert set(zip(real.qid, real.pid)) == truth
    assert (
        (real.label == 1).all()
        and (real.grade == 1.0).all()
        and (real.judge == "qrels").all()
        and real.set.isna().all()
    )
    report = inspect_shards(out)
    assert report["levels"] == {"0": 60, "1": 60, "2": 60, "3": 60 + len(real)}


def test_rerun_is_a_no_op_and_dry_run_sends_nothing(written, server, tmp_path):
    out, manifest, _ = written
    before = server.stats()["received"]
    again = run(
        out,
        server.url,
        tmp_path / "other.sqlite",
        split="all",
        per_query=2,
        with_qrels=True,
        queries_per_shard=8,
    )
    assert server.stats()["received"] == before and again.shards == manifest.shards
    result = runner.invoke(
        cli_app(),
        [
            "synth",
            "--data",
            str(EXAMPLE),
            "--split",
            "all",
            "--out",
            str(tmp_path / "dry"),
            "--model",
            MODEL,
            "--per-query",
            "3",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert server.stats()["received"] == before and not (tmp_path / "dry").exists()
    assert re.search(r"requests\s+90\b", result.output) and "prompt_tokens" in result.output


def test_invalid_answers_are_retried_then_recorded(tmp_path):
    oracle = Oracle(EXAMPLE, synth_invalid_rate=0.5, synth_fail_rate=0.2, seed=3)
    with start_server(responder=oracle, models=(MODEL,)) as handle:
        manifest = run(
            tmp_path / "out",
            handle.url,
            tmp_path / "llm.sqlite",
            split="all",
            per_query=2,
            max_invalid_retries=2,
        )
        keys = handle.stats(keys=True)["keys"]
    asks = Counter(v["received"] for v in keys.values())
    assert (
        set(asks) == {1, 2, 3} and asks[2] > 0 and asks[3] > 0
    )  # retried once and recovered; failed 3 times
    s = manifest.summary
    assert s["llm_retries"] == sum(v["received"] - 1 for v in keys.values())
    assert s["sets_failed"] == s["failed_invalid"] == asks[3] and s["failures"] == {"invalid": asks[3]}
    assert s["sets_written"] == 60 - asks[3]
    records = [json.loads(line) for line in (tmp_path / "out" / "_failures.jsonl").read_text().splitlines()]
    assert len(records) == asks[3] and all(
        r["kind"] == "invalid" and "invalid answer after 3 attempts" in r["error"] for r in records
    )
    assert {"qid", "query", "set", "style", "target_words", "error", "part"} <= set(records[0])
    df = read_shards(tmp_path / "out").to_pandas()
    assert validate_shards(tmp_path / "out") == []
    assert not {(r["qid"], r["set"]) for r in records} & set(sets_of(df))
    assert all(sorted(g.level) == [0, 1, 2, 3] for g in sets_of(df).values())


def test_check_answer_rules():
    verbatim = VerbatimIndex({"How does a bicycle chain work?"})
    good = {f"level_{k}": " ".join(f"w{k}x{i}" for i in range(20)) for k in range(3, -1, -1)}
    assert set(check_answer(json.dumps(good), 4, 20, verbatim)) == {3, 2, 1, 0}

    def problem(answer: str) -> str:
        with pytest.raises(ValueError) as exc:
            check_answer(answer, 4, 20, verbatim)
        return str(exc.value)

    assert "missing level(s) [0]" in problem(json.dumps({k: v for k, v in good.items() if k != "level_0"}))
    assert "level 1 appears 2 times" in problem(json.dumps(good)[:-1] + ', "level_1": "again"}')
    assert "level 2 is empty" in problem(json.dumps({**good, "level_2": "  "}))
    assert "has 9 words; expected 10-40" in problem(json.dumps({**good, "level_2": "a " * 9}))
    assert "near-identical" in problem(json.dumps({**good, "level_0": good["level_1"] + " extra"}))
    assert "repeats the query verbatim" in problem(
        json.dumps({**good, "level_3": "So: how does a bicycle chain work? " + good["level_3"]})
    )
    assert "unexpected key(s) ['level_4']" in problem(json.dumps({**good, "level_4": good["level_3"]}))
    assert spearman([3, 2, 1, 0], [0.3, 1.9, 1.1, 2.7]) < 0 and spearman([1, 0], [2, 2]) is None


def test_sigkill_then_resume_repeats_no_answered_request(tmp_path):
    oracle = Oracle(EXAMPLE)
    reference = tmp_path / "reference"
    common = dict(split="all", per_query=3, queries_per_shard=4)
    with start_server(responder=oracle, models=(MODEL,)) as fast:
        run(reference, fast.url, tmp_path / "ref.sqlite", **common)
    out = tmp_path / "killed"
    with start_server(responder=oracle, models=(MODEL,), faults={"delay_s": 0.03}) as slow:
        args = [
            *cli_argv(),
            "synth",
            "--data",
            str(EXAMPLE),
            "--split",
            "all",
            "--per-query",
            "3",
            "--queries-per-shard",
            "4",
            "--out",
            str(out),
            "--model",
            MODEL,
            "--base-url",
            slow.url,
            "--concurrency",
            "4",
            "--llm-cache",
            str(tmp_path / "llm.sqlite"),
            "-q",
        ]
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while slow.stats()["answered"] < 30 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = slow.stats(keys=True)
        assert 0 < at_kill["answered"] < 90
        assert not (out / "_manifest.json").exists() or not read_manifest(out).complete
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        after = slow.stats(keys=True)
    assert read_shards(out).equals(read_shards(reference))
    assert read_manifest(out).summary["sets_written"] == 90
    repeated = [
        k
        for k, v in at_kill["keys"].items()
        if v["answered"] and after["keys"][k]["answered"] > v["answered"]
    ]
    assert len(repeated) <= 4  # only what the killed client had in flight (answered, not yet stored)


def test_same_seed_same_shards_other_seed_other_draws(server, tmp_path):
    first = run(tmp_path / "a", server.url, tmp_path / "a.sqlite", split="train", per_query=2, seed=7)
    run(tmp_path / "b", server.url, tmp_path / "b.sqlite", split="train", per_query=2, seed=7)
    assert read_shards(tmp_path / "a").equals(read_shards(tmp_path / "b"))
    run(tmp_path / "c", server.url, tmp_path / "c.sqlite", split="train", per_query=2, seed=8)
    a, c = (read_shards(tmp_path / x).to_pandas() for x in ("a", "c"))
    draws = {
        x: {k: (g["style"].iloc[0], g.target_words.iloc[0]) for k, g in sets_of(df).items()}
        for x, df in (("a", a), ("c", c))
    }
    assert draws["a"].keys() == draws["c"].keys() and draws["a"] != draws["c"]
    assert first.config["seed"] == 7
    # a draw depends on (seed, qid, set) only: not on the other queries, the input or the number of sets
    cfg = SynthConfig(out=tmp_path / "x", model=MODEL, data=EXAMPLE, seed=7, per_query=5)
    for (qid, s), (style, words) in draws["a"].items():
        spec = plan_sets(cfg, qid, "another text")[s]
        assert (spec.style, spec.words) == (style, words)


def test_custom_styles_lengths_and_variants(server, tmp_path):
    run(
        tmp_path / "out",
        server.url,
        tmp_path / "llm.sqlite",
        split="train",
        per_query=3,
        styles="haiku-like note, court ruling",
        lengths="30",
    )
    df = read_shards(tmp_path / "out").to_pandas()
    assert set(df["style"]) <= {"haiku-like note", "court ruling"} and set(df.target_words) == {30}
    assert (
        len(sets_of(df)) == 60
    )  # 3 sets over 2 styles: repeated draws are asked as variants, not deduplicated


def test_queries_from_jsonl_and_tsv_files(server, tmp_path):
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(
        '{"_id": "a1", "text": "How do tides depend on the moon?"}\n'
        '{"_id": 7, "text": "What makes sourdough rise?"}\n'
    )
    tsv = tmp_path / "q.tsv"
    tsv.write_text("id\ttext\nt1\tWhy do volcanoes erupt?\nt2\tHow do honeybees make honey?\n")
    for path, qids in ((jsonl, {"a1", "7"}), (tsv, {"t1", "t2"})):
        out = tmp_path / path.suffix[1:]
        result = runner.invoke(
            cli_app(),
            [
                "synth",
                "--queries",
                str(path),
                "--out",
                str(out),
                "--model",
                MODEL,
                "--base-url",
                server.url,
                "--llm-cache",
                str(tmp_path / "llm.sqlite"),
                "--levels",
                "3",
                "-q",
            ],
        )
        assert result.exit_code == 0, result.output
        df = read_shards(out).to_pandas()
        assert set(df.qid) == qids and sorted(Counter(df.level).items()) == [(0, 2), (1, 2), (2, 2)]
        assert validate_shards(out) == [] and "sets_written" in result.output
    result = runner.invoke(
        cli_app(),
        [
            "synth",
            "--from-shards",
            str(tmp_path / "tsv"),
            "--out",
            str(tmp_path / "again"),
            "--model",
            MODEL,
            "--base-url",
            server.url,
            "--llm-cache",
            str(tmp_path / "llm.sqlite"),
            "--levels",
            "2",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    again = read_shards(tmp_path / "again").to_pandas()
    assert (
        set(again.qid) == {"t1", "t2"} and read_manifest(tmp_path / "again").inputs[0].kind == "shards:synth"
    )
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("t1\tWhy do volcanoes erupt?\nt2\tHow?\nt3 no tab here\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n')
    for path, line in ((bad_tsv, 3), (bad_jsonl, 2)):
        result = runner.invoke(
            cli_app(),
            [
                "synth",
                "--queries",
                str(path),
                "--out",
                str(tmp_path / "never"),
                "--model",
                MODEL,
                "--base-url",
                server.url,
            ],
        )
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"{path}:{line}:" in result.output


@pytest.mark.parametrize("levels", [2, 6])
def test_levels_adapt_the_rubric(levels, tmp_path):
    prompt = SynthPrompt(levels)
    listed = [int(m) for m in re.findall(r"^(\d+) = ", prompt.system, re.M)]
    assert listed == list(range(levels - 1, -1, -1))
    seen: list[dict] = []
    oracle = Oracle(EXAMPLE)

    def spy(request):
        seen.append(request)
        return oracle(request)

    with start_server(responder=spy, models=(MODEL,)) as handle:
        manifest = run(tmp_path / "out", handle.url, tmp_path / "llm.sqlite", levels=levels, max_queries=4)
    system = seen[0]["messages"][0]["content"]
    assert [int(m) for m in re.findall(r"^(\d+) = ", system, re.M)] == list(range(levels - 1, -1, -1))
    schema = seen[0]["response_format"]["json_schema"]["schema"]
    assert schema["required"] == [f"level_{k}" for k in range(levels - 1, -1, -1)]
    df = read_shards(tmp_path / "out").to_pandas()
    assert manifest.summary["sets_written"] == 4 and all(
        sorted(g.level) == list(range(levels)) for g in sets_of(df).values()
    )
    assert ((df.grade - df.level / (levels - 1)).abs() < 1e-6).all()
    lowest_positive = {2: 1, 6: 4}[
        levels
    ]  # the default threshold 2/3 on level / (L-1): 1/1, and 4/5 (3/5 is below)
    assert (df.label == (df.level >= lowest_positive).astype(int)).all()


def test_verify_drops_sets_the_judge_disagrees_with(tmp_path):
    oracle = Oracle(EXAMPLE, synth_mislabel_rate=0.3, seed=5)
    with start_server(responder=oracle, models=(MODEL,)) as handle:
        manifest = run(
            tmp_path / "out", handle.url, tmp_path / "llm.sqlite", split="all", per_query=2, verify=True
        )
    s = manifest.summary
    assert manifest.prompts == {"synth": "1", "graded": "1"} and manifest.models == {
        "generator": MODEL,
        "verifier": MODEL,
    }
    assert s["sets_verified"] == 60 and 0 < s["sets_dropped_by_verify"] < 30
    assert (
        s["verify"]["kept_share"] == round(s["sets_written"] / 60, 3)
        and 0 < s["verify"]["mean_abs_level_diff"] < 1
    )
    assert s["verify_sent"] == 240 and s["requests"] == 300
    df = read_shards(tmp_path / "out").to_pandas()
    assert validate_shards(tmp_path / "out") == [] and df.judged_grade.notna().all()
    # every kept set has its passages in the intended order; every swapped one was dropped
    top = df[df.level == 3]
    assert top.text.str.contains(SYNTH_MARKERS[3]).all()
    records = [json.loads(line) for line in (tmp_path / "out" / "_failures.jsonl").read_text().splitlines()]
    assert len(records) == s["sets_dropped_by_verify"] and {r["kind"] for r in records} == {"verify"}
    assert all("mean |judged - intended|" in r["error"] for r in records)


def test_shard_jobs_fill_one_folder_and_merge_failures(tmp_path):
    oracle = Oracle(EXAMPLE, synth_fail_rate=0.3, seed=11)
    with start_server(responder=oracle, models=(MODEL,)) as handle:
        single = run(
            tmp_path / "single",
            handle.url,
            tmp_path / "llm.sqlite",
            split="all",
            queries_per_shard=5,
            max_invalid_retries=0,
        )
        for k in range(2):
            run(
                tmp_path / "jobs",
                handle.url,
                tmp_path / "llm.sqlite",
                split="all",
                queries_per_shard=5,
                max_invalid_retries=0,
                shard=f"{k}/2",
            )
    assert validate_shards(tmp_path / "jobs") == []
    assert read_shards(tmp_path / "jobs").equals(read_shards(tmp_path / "single"))

    def failed(folder: str) -> list[tuple]:
        records = [
            json.loads(line) for line in (tmp_path / folder / "_failures.jsonl").read_text().splitlines()
        ]
        return sorted((r["part"], r["qid"], r["set"], r["kind"]) for r in records)

    # (the oracle picks another way to be wrong on each ask, so the errors themselves may differ)
    assert failed("jobs") == failed("single") and len(failed("jobs")) == single.summary["sets_failed"] > 0
    assert not list((tmp_path / "jobs").glob("*.tmp"))


def test_one_line_errors(server, tmp_path):
    app = cli_app()
    base = ["synth", "--out", str(tmp_path / "o"), "--model", MODEL, "--base-url", server.url]
    cases = [
        (
            ["--data", str(EXAMPLE), "--queries", str(EXAMPLE / "queries.jsonl")],
            "exactly one of --data, --queries, --from-shards",
        ),
        ([], "exactly one of --data, --queries, --from-shards"),
        (["--queries", str(EXAMPLE / "queries.jsonl"), "--with-qrels"], "--with-qrels needs a BEIR folder"),
        (["--data", str(EXAMPLE), "--levels", "7"], "--levels"),
        (
            ["--data", str(EXAMPLE), "--positive-threshold", "0", "--levels", "3"],
            "--positive-threshold: 0 makes every level positive (grades of the 3 levels: 0, 0.5, 1)",
        ),
        (["--data", str(EXAMPLE), "--lengths", "40,x"], "--lengths"),
        (["--data", str(EXAMPLE), "--split", "dev"], "split 'dev' does not exist"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert (
            result.exit_code == 2
            and message in result.output
            and len(result.output.strip().splitlines()) == 1
        ), result.output


def test_the_token_limit_is_cut_to_what_the_context_window_leaves(tmp_path):
    """A server whose context cannot hold the prompt and the full token budget gets a request that fits;
    the cut is counted. Without a known context nothing changes."""
    from pipeline.llm.client import OpenAIBackend
    from pipeline.llm.endpoint import ContextFit, EndpointInfo
    from pipeline.stages.synth import SetSpec, Synthesizer

    cfg = SynthConfig(out=tmp_path / "out", model=MODEL, data=EXAMPLE, progress=False)
    backend = OpenAIBackend(MODEL, "http://127.0.0.1:9/v1")
    maker = Synthesizer(cfg, backend, None, MODEL, None)
    request = maker.prompt.request(
        SetSpec("q", "Why does my coffee taste bitter?", 0, "blog post", 120, 1), cfg
    )
    stats: dict[str, int] = {}
    assert maker._fitted(request, stats) is request and not stats
    fit = ContextFit(EndpointInfo(url="x", context_length=1024), None)  # ~4 characters a token
    backend.fit = fit
    prompt = fit.count_messages(request.messages)
    cut = maker._fitted(request, stats)
    assert request.max_tokens is not None and request.max_tokens > 1024 - prompt
    assert cut.max_tokens == 1024 - prompt - fit.SAFETY and stats == {"capped_requests": 1}
