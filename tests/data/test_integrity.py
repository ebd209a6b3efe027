"""Integrity at every stage boundary: shard folders open as datasets, consumers verify what they read,
merges keep each stage's labels and each dataset's queries apart, restarts are never blocked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import SCHEMA, to_table
from pipeline.data.shards import InputInfo, ShardRun, fingerprint_shards, read_manifest, verify_shards
from pipeline.errors import MprError
from train.config import GroupOptions
from train.groups import build_groups


def row(qid, pid, source="mined", label=None, rank=None, grade=None, level=None, text=None, query=None):
    return {
        "qid": qid,
        "query": query or f"query {qid}",
        "pid": pid,
        "title": None,
        "text": text or f"text of {pid}",
        "source": source,
        "rank": rank,
        "label": label,
        "grade": grade,
        "level": level,
    }


def folder(path: Path, rows: list[dict], *, stage="test", inputs=(), parts=None) -> Path:
    run = ShardRun(path, stage=stage, config={}, identity={"p": str(path)}, inputs=list(inputs))
    parts = parts or [rows]
    for i, chunk in enumerate(parts):
        run.write(i, to_table({name: [r.get(name) for r in chunk] for name in SCHEMA.names}, SCHEMA))
    run.finish({})
    return path


def queries_input(tmp_path: Path, name: str, text: str) -> InputInfo:
    path = tmp_path / f"{name}-queries.jsonl"
    path.write_text(text)
    from pipeline.data.shards import sha256_file

    return InputInfo(path=str(path), kind="beir:queries.jsonl", fingerprint="sha256:" + sha256_file(path))


def shards_input(path: Path, stage: str) -> InputInfo:
    return InputInfo(path=str(path.resolve()), kind=f"shards:{stage}", fingerprint=fingerprint_shards(path))


def texts_and_kinds(example: dict, k: int) -> dict[str, int]:
    return {example[f"passage_{j}"]: int(example["label"][1][j]) for j in range(k)}


# -- merges ---------------------------------------------------------------------------------------------


@pytest.fixture
def lineage(tmp_path):
    """A mined folder and the relabel of it, which turns the mined negative r1 into a positive."""
    data = queries_input(tmp_path, "d", '{"_id": "a", "text": "query a"}\n')
    mined = folder(
        tmp_path / "mined",
        [row("a", "p1", "qrels", 1), row("a", "r1", label=0, rank=1), row("a", "n1", label=0, rank=2)],
        stage="mine",
        inputs=[data],
    )
    relabeled = folder(
        tmp_path / "relabeled",
        [row("a", "p1", "qrels", 1), row("a", "r1", label=1, rank=1), row("a", "n1", label=0, rank=2)],
        stage="relabel",
        inputs=[shards_input(mined, "mine")],
    )
    return mined, relabeled


@pytest.mark.parametrize("order", ["mined-first", "relabeled-first"])
def test_later_stage_wins_whatever_the_order(lineage, order):
    mined, relabeled = lineage
    data = [mined, relabeled] if order == "mined-first" else [relabeled, mined]
    ds, stats = build_groups(data, GroupOptions(group_size=4, random_negatives=False))
    assert len(ds) == 1
    kinds = texts_and_kinds(ds[0], 4)
    assert kinds["text of r1"] == 1 and kinds["text of p1"] == 1 and kinds["text of n1"] == 0
    assert stats.superseded_rows == 3
    assert read_manifest(relabeled).dataset == read_manifest(mined).dataset is not None


def test_what_a_later_stage_dropped_stays_dropped(tmp_path):
    data = queries_input(tmp_path, "d", '{"_id": "a", "text": "query a"}\n')
    mined = folder(
        tmp_path / "mined",
        [
            row("a", "p1", "qrels", 1),
            row("a", "r1", label=0, rank=1),
            row("a", "n1", label=0, rank=2),
            row("b", "p2", "qrels", 1),
            row("b", "n2", label=0, rank=1),
        ],
        stage="mine",
        inputs=[data],
    )
    # relabel --mode drop removed the flagged r1; --mode drop-query removed query b
    dropped = folder(
        tmp_path / "dropped",
        [row("a", "p1", "qrels", 1), row("a", "n1", label=0, rank=2)],
        stage="relabel",
        inputs=[shards_input(mined, "mine")],
    )
    ds, stats = build_groups([mined, dropped], GroupOptions(group_size=3, random_negatives=False))
    assert len(ds) == 1 and [ds[0][f"passage_{j}"] for j in range(3)] == ["text of p1", "text of n1", ""]
    assert stats.superseded_rows == 5


def test_synth_from_shards_does_not_supersede_its_query_source(tmp_path):
    data = queries_input(tmp_path, "d", '{"_id": "a", "text": "query a"}\n')
    relabeled = folder(
        tmp_path / "relabeled",
        [row("a", "p1", "qrels", 1), row("a", "n1", label=0, rank=1)],
        stage="relabel",
        inputs=[data],
    )
    queries_only = shards_input(relabeled, "relabel").model_copy(update={"carried": False})
    synth = folder(
        tmp_path / "synth",
        [
            row("a", "s1", "synthetic", 1, grade=1.0, level=1),
            row("a", "s0", "synthetic", 0, grade=0.0, level=0),
        ],
        stage="synth",
        inputs=[queries_only],
    )
    assert (
        read_manifest(synth).dataset == read_manifest(relabeled).dataset and not read_manifest(synth).lineage
    )
    ds, stats = build_groups([relabeled, synth], GroupOptions(group_size=4, random_negatives=False))
    assert len(ds) == 1 and stats.superseded_rows == 0
    assert set(texts_and_kinds(ds[0], 4)) == {"text of p1", "text of n1", "text of s1", "text of s0"}


def test_two_datasets_sharing_qids_stay_apart(tmp_path):
    one = folder(
        tmp_path / "cisi",
        [row("1", "c1", "qrels", 1, query="cisi query"), row("1", "c2", label=0, rank=1, query="cisi query")],
        inputs=[queries_input(tmp_path, "cisi", '{"_id": "1", "text": "cisi query"}\n')],
    )
    two = folder(
        tmp_path / "vaswani",
        [
            row("1", "v1", "qrels", 1, query="vaswani query"),
            row("1", "v2", label=0, rank=1, query="vaswani query"),
        ],
        inputs=[queries_input(tmp_path, "vaswani", '{"_id": "1", "text": "vaswani query"}\n')],
    )
    ds, stats = build_groups([one, two], GroupOptions(group_size=3, random_negatives=False))
    assert stats.groups == 2 and sorted(ds["query"]) == ["cisi query", "vaswani query"]
    for example in ds:
        texts = [example[f"passage_{j}"] for j in range(2)]
        own = "c" if example["query"].startswith("cisi") else "v"
        assert texts == [f"text of {own}1", f"text of {own}2"]


def test_unrelated_folders_that_disagree_are_an_error(tmp_path):
    mined = folder(tmp_path / "mined", [row("a", "p1", "qrels", 1), row("a", "r1", label=0, rank=1)])
    a = folder(
        tmp_path / "judge-a",
        [row("a", "p1", "qrels", 1), row("a", "r1", label=1)],
        inputs=[shards_input(mined, "test")],
    )
    b = folder(
        tmp_path / "judge-b",
        [row("a", "p1", "qrels", 1), row("a", "r1", label=0)],
        inputs=[shards_input(mined, "test")],
    )
    with pytest.raises(MprError, match=r"judge-a.*judge-b") as err:
        build_groups([a, b], GroupOptions(group_size=3))
    assert "r1" in str(err.value)


def test_duplicate_text_is_never_positive_and_negative(tmp_path):
    data = folder(
        tmp_path / "d",
        [
            row("a", "p1", "qrels", 1, text="same words"),
            row("a", "n1", label=0, rank=1, text="same words"),
            row("a", "n2", label=0, rank=2),
        ],
    )
    ds, stats = build_groups([data], GroupOptions(group_size=3, random_negatives=False))
    texts = [ds[0][f"passage_{j}"] for j in range(3)]
    assert texts == ["same words", "text of n2", ""] and stats.duplicate_negatives_dropped == 1


def test_max_positives_cap_is_reported(tmp_path):
    data = folder(
        tmp_path / "d", [row("a", f"p{i}", "qrels", 1) for i in range(5)] + [row("a", "n", label=0, rank=1)]
    )
    _, stats = build_groups([data], GroupOptions(group_size=4, max_positives=2, random_negatives=False))
    assert stats.positives == 2 and stats.positives_capped == 3 and stats.as_dict()["positives_capped"] == 3


# -- consumers verify what they read -----------------------------------------------------------------------


def two_parts(tmp_path) -> Path:
    return folder(
        tmp_path / "s",
        [],
        parts=[
            [row("a", "p1", "qrels", 1), row("a", "n1", label=0, rank=1)],
            [row("b", "p2", "qrels", 1), row("b", "n2", label=0, rank=1), row("b", "n3", label=0, rank=2)],
        ],
    )


def damage(folder: Path, how: str) -> None:
    part0, part1 = folder / "part-00000.parquet", folder / "part-00001.parquet"
    manifest = folder / "_manifest.json"
    if how == "missing":
        part1.unlink()
    elif how == "duplicated":
        shutil.copy(part1, folder / "part-00002.parquet")
    elif how == "truncated":
        part1.write_bytes(part1.read_bytes()[:-40])
    elif how == "rewritten":  # same size and row count, other content
        table = pq.read_table(part0)
        i = table.schema.get_field_index("pid")
        pq.write_table(
            table.set_column(i, table.schema.field(i), pa.array(["x1", "y1"], pa.string())),
            part0,
            compression="zstd",
        )
        assert part0.stat().st_size == json.loads(manifest.read_text())["shards"][0]["bytes"]
    elif how in ("counts", "checksum"):
        doc = json.loads(manifest.read_text())
        if how == "counts":
            doc["shards"][1]["rows"] = 2
        else:
            doc["shards"][0]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "part-00001.parquet: listed in _manifest.json but missing"),
        ("duplicated", "part-00002.parquet: not listed in _manifest.json (a copy of part-00001.parquet)"),
        ("truncated", "part-00001.parquet: "),
        ("rewritten", "part-00000.parquet: checksum differs"),
        ("counts", "part-00001.parquet: 3 rows, _manifest.json says 2"),
        ("checksum", "part-00000.parquet: checksum differs"),
    ],
)
def test_damaged_folder_is_refused_by_train(tmp_path, how, message):
    data = two_parts(tmp_path)
    verify_shards(data)
    build_groups([data], GroupOptions(group_size=3))
    damage(data, how)
    with pytest.raises(MprError) as err:
        build_groups([data], GroupOptions(group_size=3))
    assert message in str(err.value) and str(data) in str(err.value) and "\n" not in str(err.value)


def test_full_verify_hashes_every_part(tmp_path, monkeypatch):
    import pipeline.data.shards as shards

    data = two_parts(tmp_path)
    damage(data, "rewritten")
    monkeypatch.setattr(shards, "HASH_LIMIT", 0)  # a large folder: fast mode checks sizes and counts only
    verify_shards(data, "fast")
    with pytest.raises(MprError, match="checksum differs"):
        verify_shards(data, "full")
    monkeypatch.setenv("MPR_VERIFY", "full")
    with pytest.raises(MprError, match="checksum differs"):
        build_groups([data], GroupOptions(group_size=3))


# -- restartable starts --------------------------------------------------------------------------------------


def test_folder_without_finished_part_never_blocks_a_rerun(tmp_path):
    out = tmp_path / "out"
    ShardRun(
        out, stage="relabel", config={"model": "a"}, identity={"model": "a"}
    )  # started, then its server was down
    run = ShardRun(out, stage="relabel", config={"model": "b"}, identity={"model": "b"})
    assert read_manifest(out).config == {"model": "b"} and not run.manifest.shards


def test_folder_with_finished_parts_names_the_options_that_differ(tmp_path):
    out = tmp_path / "out"
    run = ShardRun(out, stage="relabel", config={}, identity={"model": "a", "mode": "relabel", "seed": 1})
    run.write(
        0,
        to_table(
            {name: [r.get(name) for r in [row("a", "p1", "qrels", 1)]] for name in SCHEMA.names}, SCHEMA
        ),
    )
    with pytest.raises(MprError, match=r"options that differ: mode, model\)"):
        ShardRun(out, stage="relabel", config={}, identity={"model": "b", "mode": "graded", "seed": 1})


def test_old_manifest_names_are_still_read(tmp_path):
    data = two_parts(tmp_path)
    (data / "_manifest.json").rename(data / "manifest.json")
    assert read_manifest(data).complete and verify_shards(data).shards
    build_groups([data], GroupOptions(group_size=3))


# -- failures are retried and counted ------------------------------------------------------------------------


def test_failure_line_and_max_failure_rate(tmp_path):
    from pipeline.llm.stage import failure_line

    assert failure_line("relabel", tmp_path, {"retryable": 0, "attempted": 10}, 0.0) is None
    assert failure_line("relabel", tmp_path, {"retryable": 3, "attempted": 10}, 0.5) is None
    line = failure_line("relabel", tmp_path, {"retryable": 3, "attempted": 10}, 0.2)
    assert line is not None and "3 of 10 (30.0%)" in line and "_failures.jsonl" in line and "\n" not in line


@pytest.fixture(scope="module")
def mined_example(tmp_path_factory, cache_dir):
    from pipeline.stages import mine
    from pipeline.stages.mine import MineConfig

    from ..conftest import EXAMPLE, SEQ

    out = tmp_path_factory.mktemp("mined-example") / "mined"
    mine.run(
        MineConfig(
            data=EXAMPLE,
            split="train",
            out=out,
            cache_dir=cache_dir,
            max_seq_length=SEQ,
            depth=10,
            num_negatives=5,
            queries_per_shard=4,
            progress=False,
        ),
        log=lambda _: None,
    )
    return out


def test_relabel_rerun_retries_exactly_the_failed_rows(mined_example, tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app
    from mpr.simulated_judge import Oracle, start_server
    from pipeline.data.shards import read_shards

    from ..conftest import EXAMPLE

    runner = CliRunner()
    model = "judge-model"

    def args(out, url, cache, *extra):
        return [
            "relabel",
            "--in",
            str(mined_example),
            "--out",
            str(out),
            "--model",
            model,
            "--mode",
            "graded",
            "--base-url",
            url,
            "--candidates",
            "all",
            "--queries-per-shard",
            "2",
            "--llm-cache",
            str(cache),
            "--max-invalid-retries",
            "0",
            "-q",
            *extra,
        ]

    with start_server(responder=Oracle(EXAMPLE), models=(model,)) as clean:
        reference = runner.invoke(app, args(tmp_path / "reference", clean.url, tmp_path / "ref.sqlite"))
        assert reference.exit_code == 0, reference.output
    out = tmp_path / "out"
    with start_server(
        responder=Oracle(EXAMPLE), models=(model,), faults={"p_malformed": 0.4, "seed": 5}
    ) as handle:
        first = runner.invoke(app, args(out, handle.url, tmp_path / "llm.sqlite"))
        manifest = read_manifest(out)
        failed = manifest.summary["failed"]
        assert first.exit_code == 3 and failed > 0, first.output
        assert f"{failed:,} of {manifest.summary['attempted']:,}" in first.output
        records = [json.loads(line) for line in (out / "_failures.jsonl").read_text().splitlines()]
        table = read_shards(out).to_pandas()
        assert len(records) == failed == int(table.error.notna().sum())
        assert {(r["qid"], r["pid"]) for r in records} == set(
            zip(table[table.error.notna()].qid, table[table.error.notna()].pid)
        )
        received = handle.stats()["received"]
        answered_before = handle.stats()["answered"]

        handle.control(p_malformed=0.0)
        second = runner.invoke(app, args(out, handle.url, tmp_path / "llm.sqlite"))
        assert second.exit_code == 0, second.output
        stats = handle.stats()
        assert (
            stats["received"] - received == failed
        )  # exactly the failed rows, nothing answered is asked again
        assert stats["answered"] == answered_before + failed
        manifest = read_manifest(out)
        assert manifest.summary["failed"] == 0 and manifest.summary["llm_sent"] == stats["received"]
        assert not (out / "_failures.jsonl").read_text().strip()
        assert read_shards(out).equals(read_shards(tmp_path / "reference"))

        third = runner.invoke(app, args(out, handle.url, tmp_path / "llm.sqlite"))
        assert (
            third.exit_code == 0
            and "already complete" in third.output
            and handle.stats()["received"] == stats["received"]
        )


def test_synth_rerun_retries_exactly_the_failed_sets(tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app
    from mpr.simulated_judge import Oracle, start_server
    from pipeline.data.shards import read_shards

    from ..conftest import EXAMPLE

    runner = CliRunner()
    model = "gen-model"

    def args(out, url, cache, *extra):
        return [
            "synth",
            "--data",
            str(EXAMPLE),
            "--split",
            "all",
            "--per-query",
            "2",
            "--out",
            str(out),
            "--model",
            model,
            "--base-url",
            url,
            "--queries-per-shard",
            "4",
            "--llm-cache",
            str(cache),
            "--max-invalid-retries",
            "0",
            "-q",
            *extra,
        ]

    with start_server(responder=Oracle(EXAMPLE), models=(model,)) as clean:
        assert (
            runner.invoke(app, args(tmp_path / "reference", clean.url, tmp_path / "ref.sqlite")).exit_code
            == 0
        )
    out = tmp_path / "out"
    with start_server(
        responder=Oracle(EXAMPLE), models=(model,), faults={"p_malformed": 0.3, "seed": 2}
    ) as handle:
        first = runner.invoke(app, args(out, handle.url, tmp_path / "llm.sqlite"))
        failed = read_manifest(out).summary["retryable"]
        assert first.exit_code == 3 and failed > 0, first.output
        records = [json.loads(line) for line in (out / "_failures.jsonl").read_text().splitlines()]
        assert len(records) == failed
        received = handle.stats()["received"]
        accepted = runner.invoke(
            app, [*args(out, handle.url, tmp_path / "llm.sqlite"), "--max-failure-rate", "1"]
        )
        assert accepted.exit_code == 0, accepted.output  # some fail again, and that is accepted
        assert handle.stats()["received"] - received == failed  # exactly the failed sets were asked again
        failed, received = read_manifest(out).summary["retryable"], handle.stats()["received"]

        handle.control(p_malformed=0.0)
        second = runner.invoke(app, args(out, handle.url, tmp_path / "llm.sqlite"))
        assert second.exit_code == 0, second.output
        manifest = read_manifest(out)
        assert handle.stats()["received"] - received == failed
        assert (
            manifest.summary["retryable"] == 0 and manifest.summary["requests"] == handle.stats()["received"]
        )
        assert not (out / "_failures.jsonl").read_text().strip()
        assert read_shards(out).equals(read_shards(tmp_path / "reference"))


# -- shard folders open as folders -------------------------------------------------------------------------


def open_every_way(out: Path) -> None:
    """The folder opens by its path with pandas, pyarrow.dataset, duckdb and datasets, and with the glob
    form data/README.md gives for polars and `load_dataset("parquet", ...)`; every reader sees every row."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads
    from datasets import load_dataset

    from pipeline.data.shards import read_shards

    expected = read_shards(out)
    assert (out / "_manifest.json").exists() and not (out / "manifest.json").exists()
    df = pd.read_parquet(out)
    assert len(df) == expected.num_rows and df.pid.tolist() == expected.column("pid").to_pylist()
    nullable = pd.read_parquet(out, dtype_backend="numpy_nullable")
    assert (
        str(nullable.label.dtype) == "Int8"
        and nullable.label.isna().sum() == expected.column("label").null_count
    )
    assert pads.dataset(out).to_table().num_rows == expected.num_rows
    assert duckdb.sql(f"select count(*) from read_parquet('{out}')").fetchall() == [(expected.num_rows,)]
    assert load_dataset(str(out), split="train").num_rows == expected.num_rows
    assert pl.read_parquet(f"{out}/*.parquet").height == expected.num_rows
    assert load_dataset("parquet", data_files=f"{out}/*.parquet", split="train").num_rows == expected.num_rows


def test_every_stage_output_opens_as_a_folder(mined_example, tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app
    from mpr.simulated_judge import Oracle, start_server

    from ..conftest import EXAMPLE

    runner = CliRunner()
    open_every_way(mined_example)
    src = tmp_path / "train.jsonl"
    src.write_text(
        json.dumps(
            {
                "query_id": "1",
                "query": "q one",
                "positive_passages": [{"docid": "p1", "title": "", "text": "one"}],
                "negative_passages": [{"docid": "n1", "title": "", "text": "two"}],
            }
        )
        + "\n"
    )
    assert runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "ingested")]).exit_code == 0
    open_every_way(tmp_path / "ingested")
    with start_server(
        responder=Oracle(EXAMPLE), models=("m",), faults={"p_malformed": 0.3, "seed": 1}
    ) as handle:
        common = [
            "--model",
            "m",
            "--base-url",
            handle.url,
            "--llm-cache",
            str(tmp_path / "llm.sqlite"),
            "--max-invalid-retries",
            "0",
            "-q",
        ]
        relabeled = runner.invoke(
            app,
            [
                "relabel",
                "--in",
                str(mined_example),
                "--out",
                str(tmp_path / "relabeled"),
                "--mode",
                "graded",
                *common,
            ],
        )
        synthesized = runner.invoke(
            app,
            ["synth", "--data", str(EXAMPLE), "--split", "all", "--out", str(tmp_path / "synth"), *common],
        )
    assert (
        relabeled.exit_code == synthesized.exit_code == 3
    )  # with failed rows: `_failures.jsonl` sits among the parts
    for name in ("relabeled", "synth"):
        assert (tmp_path / name / "_failures.jsonl").read_text().strip()
        open_every_way(tmp_path / name)


# -- caches keyed by content ---------------------------------------------------------------------------------


def test_llm_cache_never_shares_answers_between_servers(tmp_path):
    import sqlite3

    from mpr.simulated_judge import start_server
    from pipeline.llm.cache import ResultCache
    from pipeline.llm.client import OpenAIBackend
    from pipeline.llm.types import ChatRequest

    reqs = [ChatRequest(messages=[{"role": "user", "content": f"item {i}"}]) for i in range(5)]
    db = tmp_path / "llm.sqlite"
    with start_server(models=("same-name",)) as one, start_server(models=("same-name",)) as two:
        first = OpenAIBackend("same-name", one.url, cache=db).run_sync(reqs)
        assert one.stats()["received"] == 5 and all(r.ok and not r.cached for r in first)
        other = OpenAIBackend("same-name", two.url, cache=db).run_sync(reqs)
        assert two.stats()["received"] == 5 and not any(r.cached for r in other)  # another server is asked
        again = OpenAIBackend("same-name", [one.url], cache=db).run_sync(reqs)
        assert one.stats()["received"] == 5 and all(r.cached for r in again)  # each server keeps its answers
    with ResultCache(db) as cache:
        assert len(cache) == 10 and len(cache.keys()) == 5

    legacy = tmp_path / "old.sqlite"  # a cache written before answers were keyed by server
    con = sqlite3.connect(legacy)
    con.execute(
        "CREATE TABLE answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, value TEXT NOT NULL, "
        "created REAL NOT NULL) WITHOUT ROWID"
    )
    con.execute("INSERT INTO answers VALUES ('k1', 'm', '{\"content\": \"x\"}', 0)")
    con.commit()
    con.close()
    with ResultCache(legacy) as cache:
        assert cache.get("k1").content == "x" and cache.get("k1", "openai:http://a/v1") is None


def retrain_in_place(model_dir: Path, scale: float) -> None:
    """Stand-in for `mpr train --out` into the same folder: other weights of the same shapes (same size)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    with safe_open(weights, "np") as fh:
        metadata = fh.metadata()
    tensors = load_file(weights)
    rng = np.random.default_rng(0)
    tensors = {
        k: (v + rng.normal(0, scale, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
        for k, v in tensors.items()
    }
    save_file(tensors, weights, metadata=metadata)
    assert weights.stat().st_size == size


def test_embedding_cache_sees_a_model_retrained_into_the_same_folder(encoder_path, tmp_path):
    import numpy as np

    from pipeline.retrieval.encode import Encoder

    model_dir = tmp_path / "models" / "x"
    shutil.copytree(encoder_path, model_dir)
    texts = ["a passage about cells", "another about stars", "and one about rivers"]
    cache = tmp_path / "emb"
    first, counts = Encoder.load(str(model_dir), max_seq_length=32).encode(
        texts, "passage", cache_dir=cache, progress=False
    )
    assert counts == {"encoded": 3, "cached": 0}
    again, counts = Encoder.load(str(model_dir), max_seq_length=32).encode(
        texts, "passage", cache_dir=cache, progress=False
    )
    assert counts == {"encoded": 0, "cached": 3} and np.array_equal(first, again)
    retrain_in_place(model_dir, 0.05)
    retrained, counts = Encoder.load(str(model_dir), max_seq_length=32).encode(
        texts, "passage", cache_dir=cache, progress=False
    )
    assert counts == {"encoded": 3, "cached": 0} and not np.allclose(first, retrained, atol=1e-3)


def test_eval_of_a_model_retrained_into_the_same_folder_reports_new_numbers(encoder_path, tmp_path):
    from pipeline.stages import evaluate
    from pipeline.stages.evaluate import EvalConfig

    from ..conftest import EXAMPLE

    model_dir = tmp_path / "models" / "x"
    shutil.copytree(encoder_path, model_dir)

    def run():
        return evaluate.run(
            EvalConfig(
                data=EXAMPLE,
                model=str(model_dir),
                cache_dir=tmp_path / "emb",
                max_seq_length=64,
                progress=False,
            ),
            log=lambda _: None,
        ).result

    before = run()
    assert before.corpus_encoded == 60
    assert run().corpus_cached == 60  # unchanged model: served from the cache
    retrain_in_place(model_dir, 0.5)
    after = run()
    assert after.corpus_encoded == 60 and after.corpus_cached == 0
    assert after.metrics != before.metrics


# -- honest skips ------------------------------------------------------------------------------------------


def test_empty_documents_and_queries_are_skipped_and_counted(tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app
    from pipeline.data.shards import read_shards

    from ..conftest import write_beir

    corpus = [
        {"_id": f"d{i}", "title": "", "text": f"passage number {i} about topic {i % 3}"} for i in range(8)
    ]
    corpus += [{"_id": "blank", "title": " ", "text": "  \n"}, {"_id": "none", "text": ""}]
    queries = [{"_id": f"q{i}", "text": f"question about topic {i}"} for i in range(3)] + [
        {"_id": "qblank", "text": "   "}
    ]
    qrels = [(f"q{i}", f"d{i}", 1) for i in range(3)] + [("q0", "blank", 1), ("qblank", "d4", 1)]
    data = write_beir(tmp_path / "data", corpus, queries, {"train": qrels})
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "mine",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "-q",
            "--retriever",
            "bm25",
            "--depth",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "left out 2 empty document(s) and 1 empty query(ies) with their 2 judgment(s)" in result.output
    summary = read_manifest(tmp_path / "out").summary
    assert (
        summary["empty_documents"],
        summary["empty_queries"],
        summary["qrels_of_empty"],
        summary["dropped_qrels"],
    ) == (2, 1, 2, 0)
    table = read_shards(tmp_path / "out").to_pandas()
    assert set(table.qid) == {"q0", "q1", "q2"} and not {"blank", "none"} & set(table.pid)
    strict = runner.invoke(
        app,
        [
            "mine",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "strict"),
            "-q",
            "--retriever",
            "bm25",
            "--on-empty",
            "error",
        ],
    )
    assert strict.exit_code == 2 and "document 'blank' has an empty title and text" in strict.output


def test_old_folder_resumes_under_the_new_names(tmp_path):
    out = tmp_path / "s"
    run = ShardRun(out, stage="test", config={}, identity={"x": 1}, planned_shards=2)
    run.write(
        0,
        to_table(
            {name: [r.get(name) for r in [row("a", "p1", "qrels", 1)]] for name in SCHEMA.names}, SCHEMA
        ),
    )
    (out / "_manifest.json").rename(out / "manifest.json")  # killed under an older version
    again = ShardRun(out, stage="test", config={}, identity={"x": 1}, planned_shards=2)
    assert again.done(0) and not again.done(1)
    assert (out / "_manifest.json").exists() and not (out / "manifest.json").exists()


def test_inspect_reports_a_damaged_folder(tmp_path):
    from pipeline.data.inspection import format_report, inspect_shards

    data = two_parts(tmp_path)
    assert inspect_shards(data)["integrity"] == "ok"
    damage(data, "counts")
    report = inspect_shards(data)
    assert "3 rows, _manifest.json says 2" in report["integrity"] and "integrity: " in format_report(report)


def test_relabel_that_could_not_start_never_blocks_a_rerun_with_other_options(mined_example, tmp_path):
    import socket

    from typer.testing import CliRunner

    from mpr.cli import app

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runner = CliRunner()
    out = tmp_path / "out"
    base = [
        "relabel",
        "--in",
        str(mined_example),
        "--out",
        str(out),
        "--model",
        "m",
        "--base-url",
        f"http://127.0.0.1:{port}/v1",
        "--timeout",
        "2",
        "-q",
        "--llm-cache",
        str(tmp_path / "llm.sqlite"),
    ]
    first = runner.invoke(app, base)
    assert (
        first.exit_code != 0 and f"127.0.0.1:{port}" in first.output and not list(out.glob("part-*.parquet"))
    ), first.output
    second = runner.invoke(app, [*base, "--mode", "graded"])
    assert (
        second.exit_code != 0
        and f"127.0.0.1:{port}" in second.output
        and "other options" not in second.output
    ), second.output


def test_relabel_refuses_a_damaged_input_before_sending_anything(tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app

    data = two_parts(tmp_path)
    damage(data, "missing")
    result = CliRunner().invoke(
        app,
        [
            "relabel",
            "--in",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--model",
            "m",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "-q",
        ],
    )
    assert (
        result.exit_code == 2 and "part-00001.parquet: listed in _manifest.json but missing" in result.output
    )
    assert not (tmp_path / "out").exists()


def test_ingest_skips_and_counts_empty_queries_and_passages(tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app
    from pipeline.data.shards import read_shards

    rows = [
        {
            "query_id": "1",
            "query": "q one",
            "positive_passages": [{"docid": "p1", "text": "one"}, {"docid": "p0", "text": " "}],
            "negative_passages": [{"docid": "n1", "text": "two"}, {"docid": "n0", "text": ""}],
        },
        {"query_id": "2", "query": "  ", "positive_passages": [{"docid": "p2", "text": "x"}]},
        {"query_id": "3", "query": "q three", "positive_passages": [{"docid": "p3", "text": ""}]},
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "empty passages: 3, empty queries: 1, queries without positive: 1" in result.output
    assert [(r["qid"], r["pid"]) for r in read_shards(tmp_path / "out").to_pylist()] == [
        ("1", "p1"),
        ("1", "n1"),
    ]
    summary = read_manifest(tmp_path / "out").summary
    assert (summary["empty_passages"], summary["empty_queries"], summary["queries_without_positive"]) == (
        3,
        1,
        1,
    )
