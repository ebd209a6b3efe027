"""Shards read back with every reader users use; validate and inspect catch what they should."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mpr.cli import app
from pipeline.data.inspection import inspect_shards, validate_shards
from pipeline.data.schema import SCHEMA, to_table
from pipeline.data.shards import ShardRun, read_manifest, read_shards, sha256_file

runner = CliRunner()

ROWS = {
    "qid": ["q1", "q1", "q1", "q2", "q2"],
    "query": ["what is a", "what is a", "what is a", "b?", "b?"],
    "pid": ["d1", "d2", "d3", "d2", "d4"],
    "title": ["T", None, "", None, "x"],
    "text": ["alpha", "beta", "gamma", "beta", "delta"],
    "source": ["qrels", "mined", "mined", "qrels", "synthetic"],
    "rank": [1, 2, None, 3, None],
    "score": [0.9, 0.5, 0.25, 0.75, None],
    "label": [1, 0, None, 1, 0],
    "grade": [1.0, None, 0.5, 1.0, 0.0],
    "level": [3, None, 1, 3, 0],
    "judge": ["qrels", None, "Qwen/Qwen2.5-7B-Instruct", "qrels", "m"],
}


def write_folder(path, rows=ROWS, parts=((0, 3), (3, 5))):
    run = ShardRun(path, stage="test", config={"x": 1}, identity={"x": 1}, planned_shards=len(parts))
    for i, (a, b) in enumerate(parts):
        run.write(i, to_table({k: v[a:b] for k, v in rows.items()}, SCHEMA), {"queries": 1})
    run.finish({"queries": 2})
    return path


def test_round_trip_with_every_reader(tmp_path):
    folder = write_folder(tmp_path / "s")
    expected = to_table(ROWS, SCHEMA).to_pylist()
    assert read_shards(folder).to_pylist() == expected

    import pandas as pd

    df = pd.concat(pd.read_parquet(p) for p in sorted(folder.glob("*.parquet")))
    assert df.pid.tolist() == ROWS["pid"] and df.label.isna().sum() == 1

    import polars as pl

    pl_df = pl.read_parquet(str(folder / "*.parquet"))
    assert pl_df["grade"].to_list() == ROWS["grade"] and pl_df.schema["label"] == pl.Int8

    import duckdb

    rows = duckdb.sql(
        f"select source, label, count(*) as n from '{folder}/*.parquet' group by all order by all"
    ).fetchall()
    assert rows == [("mined", 0, 1), ("mined", None, 1), ("qrels", 1, 2), ("synthetic", 0, 1)]

    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(folder / "*.parquet"), split="train")
    assert ds["pid"] == ROWS["pid"] and ds["title"] == ROWS["title"]
    assert ds.features["rank"].dtype == "int32" and ds.features["score"].dtype == "float32"


def test_manifest_records_counts_and_checksums(tmp_path):
    folder = write_folder(tmp_path / "s")
    manifest = read_manifest(folder)
    assert manifest.complete and [s.rows for s in manifest.shards] == [3, 2]
    assert all(s.sha256 == sha256_file(folder / s.name) for s in manifest.shards)
    assert not list(folder.glob("*.tmp"))
    assert validate_shards(folder) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        ("split_query", "not contiguous"),
        ("both_labels", "both positive and negative"),
        ("checksum", "checksum does not match"),
        ("bad_label", "label values"),
        ("missing_column", "missing column 'judge'"),
        ("missing_part", "listed in _manifest.json but missing"),
    ],
)
def test_validate_finds_violations(tmp_path, damage, message):
    folder = write_folder(tmp_path / "s")
    part0 = folder / "part-00000.parquet"
    table = pq.read_table(part0)
    if damage == "split_query":  # q1 also in the second part
        rows = {k: list(v) for k, v in ROWS.items()}
        rows["qid"][3] = "q1"
        shutil.rmtree(folder)
        write_folder(folder, rows)
    elif damage == "both_labels":
        rows = {k: list(v) for k, v in ROWS.items()}
        rows["pid"][1] = "d1"
        shutil.rmtree(folder)
        write_folder(folder, rows)
    elif damage == "checksum":
        pq.write_table(table.slice(0, 2), part0)
    elif damage == "bad_label":
        labels = pa.array([1, 2, None], pa.int8())
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), part0)
    elif damage == "missing_column":
        pq.write_table(table.drop_columns(["judge"]), part0)
    elif damage == "missing_part":
        (folder / "part-00001.parquet").unlink()
    errors = validate_shards(folder)
    assert any(message in e for e in errors), errors
    result = runner.invoke(app, ["validate", str(folder)])
    assert result.exit_code == 2 and message in result.output


def test_inspect_report(tmp_path):
    folder = write_folder(tmp_path / "s")
    report = inspect_shards(folder)
    assert report["rows"] == 5 and report["queries"] == 2 and report["shards"] == 2
    assert {"source": "qrels", "label": 1, "rows": 2} in report["counts"]
    assert report["positives_per_query"]["mean"] == 1.0
    assert report["levels"] == {"0": 1, "1": 1, "3": 2}
    assert sum(report["grades"]["histogram"].values()) == 4
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["rows"] == 5
    text = runner.invoke(app, ["inspect", str(folder)]).output
    assert "rows by source and label" in text and "synthetic" in text


def test_other_run_is_refused_without_overwrite(tmp_path):
    folder = write_folder(tmp_path / "s")
    from pipeline.errors import MprError

    with pytest.raises(MprError, match="other options"):
        ShardRun(folder, stage="test", config={"x": 2}, identity={"x": 2})
    ShardRun(folder, stage="test", config={"x": 2}, identity={"x": 2}, overwrite=True)
    assert not list(folder.glob("*.parquet"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(MprError, match="not an mpr shard folder"):
        ShardRun(tmp_path / "user", stage="test", config={}, identity={})
