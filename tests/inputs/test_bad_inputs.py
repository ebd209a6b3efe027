"""Every wrong input a user can make: exit code 2, exactly one `error:` line on stderr that names the
file or option, no traceback, no output left behind, and never the API key anywhere."""

from __future__ import annotations

import gzip
import json
import logging
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mpr.cli import app
from pipeline.data.readers import iter_tevatron, read_corpus, read_qrels, read_queries
from pipeline.data.shards import read_part, write_json_atomic
from pipeline.errors import MprError
from pipeline.redact import MARKER, redact, redact_logging, register

from ..conftest import REPO, write_beir

runner = CliRunner()
KEY = "sk-test-ECHOED-0123456789abcdef"

CORPUS = [{"_id": f"d{i}", "title": f"T{i}", "text": f"passage {i} about topic {i % 3}"} for i in range(8)]
QUERIES = [{"_id": f"q{i}", "text": f"question about topic {i}"} for i in range(3)]
QRELS = [(f"q{i}", f"d{i}", 1) for i in range(3)]
TEVATRON = [
    {
        "query_id": str(i),
        "query": f"query {i}",
        "positive_passages": [{"docid": f"p{i}", "title": "", "text": f"positive {i}"}],
        "negative_passages": [{"docid": f"n{i}", "title": "", "text": f"negative {i}"}],
    }
    for i in range(4)
]


def error_line(result, *named: str) -> str:
    """The single stderr line of a failed command, checked: exit 2, no traceback, names everything in
    `named`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in named:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def leftovers(before: set[Path], root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p not in before and ".hypothesis" not in p.parts}


# -- building blocks -------------------------------------------------------------------------------


def beir(tmp: Path) -> Path:
    return write_beir(tmp / "data", CORPUS, QUERIES, {"train": QRELS, "test": QRELS})


def tevatron(tmp: Path) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEVATRON))
    return path


def shards(tmp: Path) -> Path:
    out = tmp / "shards"
    if not out.exists():
        result = runner.invoke(
            app, ["ingest", str(tevatron(tmp)), "--out", str(out), "--queries-per-shard", "2"]
        )
        assert result.exit_code == 0, result.output
    return out


def gz(path: Path) -> Path:
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def latin1(path: Path) -> None:
    path.write_bytes(
        path.read_text()
        .replace("passage 2", "café 2")
        .replace("question about topic 1", "café 1")
        .encode("latin-1")
    )


def part(folder: Path, n: int = 0) -> Path:
    return sorted(folder.glob("part-*.parquet"))[n]


# -- the cases: (command line built in tmp, text the error line must contain) ---------------------------

Case = Callable[[Path], tuple[list[str], list[str]]]


def _mine(tmp: Path, *extra: str) -> list[str]:
    return [
        "mine",
        "--data",
        str(tmp / "data"),
        "--out",
        str(tmp / "out"),
        "-q",
        "--retriever",
        "bm25",
        *extra,
    ]


def c_mine(change: Callable[[Path], object], *named: str, extra: tuple[str, ...] = ()) -> Case:
    def case(tmp: Path) -> tuple[list[str], list[str]]:
        data = beir(tmp)
        change(data)
        return _mine(tmp, *extra), list(named)

    return case


def c_ingest(make: Callable[[Path], Path], *named: str, extra: tuple[str, ...] = ()) -> Case:
    def case(tmp: Path) -> tuple[list[str], list[str]]:
        return ["ingest", str(make(tmp)), "--out", str(tmp / "out"), *extra], list(named)

    return case


def c_cmd(build: Callable[[Path], list[str]], *named: str) -> Case:
    return lambda tmp: (build(tmp), list(named))


def broken_part(kind: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = shards(tmp)
        target = part(folder, 1)
        if kind == "corrupt":
            data = bytearray(target.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
            data[-8:-4] = b"\xff\xff\xff\x7f"  # footer length past the file
            target.write_bytes(bytes(data))
        elif kind == "truncated":
            truncate(target, 0.6)
        elif kind == "foreign":
            pq.write_table(pa.table({"x": [1, 2]}), target)
        elif kind == "text":
            target.write_text("not parquet at all\n")
        return folder

    return make


def parquet_rows(tmp: Path, rows: list[dict]) -> Path:
    path = tmp / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def model_folder(tmp: Path, files: dict[str, str]) -> str:
    folder = tmp / "models" / "half"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def run_file(tmp: Path, text: str) -> str:
    path = tmp / "exp.toml"
    path.write_text(text.replace("DATA", str(tmp / "data")).replace("OUT", str(tmp / "out")))
    beir(tmp)
    return str(path)


CASES: dict[str, Case] = {
    # BEIR inputs (mine)
    "corpus_latin1": c_mine(
        lambda d: latin1(d / "corpus.jsonl"), "corpus.jsonl:3:", "not valid utf-8", "--encoding"
    ),
    "queries_latin1": c_mine(lambda d: latin1(d / "queries.jsonl"), "queries.jsonl:2:", "--encoding"),
    "corpus_utf16": c_mine(
        lambda d: (d / "corpus.jsonl").write_bytes((d / "corpus.jsonl").read_text().encode("utf-16")),
        "corpus.jsonl:1:",
        "UTF-16",
    ),
    "corpus_gz_truncated": c_mine(
        lambda d: truncate(gz(d / "corpus.jsonl")), "corpus.jsonl.gz", "truncated gzip"
    ),
    "qrels_gz_truncated": c_mine(
        lambda d: truncate(gz(d / "qrels" / "train.tsv"), 0.7), "train.tsv.gz", "truncated gzip"
    ),
    "corpus_gz_not_gzip": c_mine(
        lambda d: (d / "corpus.jsonl").rename(d / "corpus.jsonl.gz"), "corpus.jsonl.gz", "not a valid gzip"
    ),
    "corpus_zero_bytes": c_mine(
        lambda d: (d / "corpus.jsonl").write_bytes(b""), "corpus.jsonl", "empty file"
    ),
    "queries_zero_bytes": c_mine(
        lambda d: (d / "queries.jsonl").write_bytes(b""), "queries.jsonl", "empty file"
    ),
    "qrels_zero_bytes": c_mine(
        lambda d: (d / "qrels" / "train.tsv").write_bytes(b""), "train.tsv", "empty file"
    ),
    "corpus_is_folder": c_mine(
        lambda d: ((d / "corpus.jsonl").unlink(), (d / "corpus.jsonl").mkdir()), "corpus.jsonl", "is a folder"
    ),
    "queries_is_folder": c_mine(
        lambda d: ((d / "queries.jsonl").unlink(), (d / "queries.jsonl").mkdir()),
        "queries.jsonl",
        "is a folder",
    ),
    "corpus_missing": c_mine(lambda d: (d / "corpus.jsonl").unlink(), "corpus.jsonl", "missing file"),
    "corpus_malformed": c_mine(
        lambda d: (d / "corpus.jsonl").write_text('{"_id": "d0", "text": "x"}\n{"_id": \n'),
        "corpus.jsonl:2:",
        "malformed JSON",
    ),
    "corpus_not_object": c_mine(
        lambda d: (d / "corpus.jsonl").write_text('["d0", "x"]\n'), "corpus.jsonl:1:", "JSON object"
    ),
    "corpus_duplicate": c_mine(
        lambda d: (d / "corpus.jsonl").write_text('{"_id": "d0", "text": "x"}\n{"_id": "d0", "text": "y"}\n'),
        "corpus.jsonl:2:",
        "duplicate _id",
    ),
    "corpus_text_not_string": c_mine(
        lambda d: (d / "corpus.jsonl").write_text('{"_id": "d0", "text": ["x"]}\n'),
        "corpus.jsonl:1:",
        "'text' must be a string",
    ),
    "qrels_nan_score": c_mine(
        lambda d: (d / "qrels" / "train.tsv").write_text("q0\td0\tnan\n"), "train.tsv:1:", "not a number"
    ),
    "qrels_inf_score": c_mine(
        lambda d: (d / "qrels" / "train.tsv").write_text("q0\td0\tinf\n"), "train.tsv:1:", "not a number"
    ),
    "qrels_two_fields": c_mine(
        lambda d: (d / "qrels" / "train.tsv").write_text("q0\td0\n"), "train.tsv:1:", "3 tab-separated"
    ),
    "qrels_only_header": c_mine(
        lambda d: (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n"),
        "train.tsv",
        "no judgments",
    ),
    "qrels_unknown_doc": c_mine(
        lambda d: (d / "qrels" / "train.tsv").write_text("q0\tnope\t1\n"), "train.tsv:1:", "unknown document"
    ),
    "split_missing": c_mine(lambda d: None, "qrels/dev.tsv", "split 'dev'", extra=("--split", "dev")),
    "data_missing": c_mine(lambda d: (d / "corpus.jsonl").rename(d.parent / "c"), "corpus.jsonl"),
    "encoding_unknown": c_mine(
        lambda d: None, "--encoding", "unknown encoding", extra=("--encoding", "klingon-8")
    ),
    "mine_bad_depth": c_mine(lambda d: None, "--depth", extra=("--depth", "0")),
    "mine_bad_margin": c_mine(lambda d: None, "--relative-margin", extra=("--relative-margin", "2")),
    "mine_model_missing": c_cmd(
        lambda t: (beir(t), _mine(t, "--retriever", "dense", "--model", str(t / "nope")))[1],
        "--model",
        "nope",
        "no such folder",
    ),
    "mine_data_is_file": c_cmd(
        lambda t: ((t / "f").write_text("x"), ["mine", "--data", str(t / "f"), "--out", str(t / "out")])[1],
        "--data",
        "is a file",
    ),
    "mine_data_absent": c_cmd(
        lambda t: ["mine", "--data", str(t / "nothing"), "--out", str(t / "out")],
        "--data",
        "no such data folder",
    ),
    "mine_out_under_file": c_cmd(
        lambda t: (beir(t), (t / "f").write_text("x"), [*_mine(t)[:4], str(t / "f" / "out")])[2],
        "--out",
        "is a file",
    ),
    # ingest
    "ingest_missing": c_ingest(lambda t: t / "nope.jsonl", "nope.jsonl", "no such file"),
    "ingest_folder": c_ingest(
        lambda t: (t / "dir.jsonl").mkdir() or t / "dir.jsonl", "dir.jsonl", "is a folder"
    ),
    "ingest_zero_bytes": c_ingest(
        lambda t: (t / "e.jsonl").write_bytes(b"") or t / "e.jsonl", "e.jsonl", "empty file"
    ),
    "ingest_gz_truncated": c_ingest(
        lambda t: (p := gz(tevatron(t)), truncate(p))[0], "rows.jsonl.gz", "truncated gzip"
    ),
    "ingest_latin1": c_ingest(
        lambda t: (
            p := tevatron(t),
            p.write_bytes(p.read_text().replace("query 2", "requête 2").encode("latin-1")),
        )[0],
        "rows.jsonl:3:",
        "not valid utf-8",
    ),
    "ingest_parquet_text": c_ingest(
        lambda t: ((t / "x.parquet").write_text("hello\n"), t / "x.parquet")[1],
        "x.parquet",
        "unreadable Parquet",
    ),
    "ingest_parquet_truncated": c_ingest(
        lambda t: (p := parquet_rows(t, TEVATRON), truncate(p, 0.7))[0], "rows.parquet", "unreadable Parquet"
    ),
    "ingest_parquet_foreign": c_ingest(
        lambda t: parquet_rows(t, [{"a": 1}]), "rows.parquet", "missing column"
    ),
    "ingest_bad_row": c_ingest(
        lambda t: (p := tevatron(t), p.write_text(p.read_text() + '{"query_id": "9", "query": "x"}\n'))[0],
        "rows.jsonl:5:",
        "no positive_passages",
        extra=("--queries-per-shard", "1"),
    ),
    "ingest_negative_max": c_ingest(tevatron, "--max-negatives", extra=("--max-negatives", "-1")),
    # relabel (all refused before any server is contacted)
    "relabel_in_missing": c_cmd(
        lambda t: ["relabel", "--in", str(t / "nope"), "--out", str(t / "out"), "--model", "m"],
        "--in",
        "no such shard folder",
    ),
    "relabel_in_file": c_cmd(
        lambda t: (
            (t / "f").write_text("x"),
            ["relabel", "--in", str(t / "f"), "--out", str(t / "out"), "--model", "m"],
        )[1],
        "--in",
        "is a file",
    ),
    "relabel_in_empty": c_cmd(
        lambda t: (
            (t / "e").mkdir(),
            ["relabel", "--in", str(t / "e"), "--out", str(t / "out"), "--model", "m"],
        )[1],
        "--in",
        "no part-*.parquet",
    ),
    "relabel_part_corrupt": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(broken_part("corrupt")(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--dry-run",
        ],
        "part-00001.parquet",
        "unreadable Parquet",
    ),
    "relabel_part_truncated": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(broken_part("truncated")(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--dry-run",
        ],
        "part-00001.parquet",
        "truncated",
    ),
    "relabel_part_foreign": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(broken_part("foreign")(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--dry-run",
        ],
        "part-00001.parquet",
        "_manifest.json says",
    ),
    "relabel_part_text": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(broken_part("text")(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--dry-run",
        ],
        "part-00001.parquet",
        "_manifest.json says",
    ),
    "relabel_part_truncated_run": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(broken_part("truncated")(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--base-url",
            "http://127.0.0.1:9/v1",
        ],
        "part-00001.parquet",
    ),
    "train_part_truncated": c_cmd(
        lambda t: ["train", "--data", str(broken_part("truncated")(t)), "--out", str(t / "out")],
        "part-00001.parquet",
    ),
    "relabel_cache_is_folder": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(shards(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--llm-cache",
            str(shards(t)),
        ],
        "--llm-cache",
        "is a folder",
    ),
    "synth_cache_under_file": c_cmd(
        lambda t: (
            beir(t),
            [
                "synth",
                "--data",
                str(t / "data"),
                "--out",
                str(t / "out"),
                "--model",
                "m",
                "--llm-cache",
                str(t / "data" / "corpus.jsonl" / "c.sqlite"),
            ],
        )[1],
        "--llm-cache",
        "is a file",
    ),
    "relabel_out_is_in": c_cmd(
        lambda t: ["relabel", "--in", str(shards(t)), "--out", str(shards(t)), "--model", "m"],
        "--out",
        "input folder",
    ),
    "relabel_bad_shard": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(shards(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--shard",
            "5/2",
        ],
        "--shard",
    ),
    "relabel_bad_concurrency": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(shards(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--concurrency",
            "0",
        ],
        "--concurrency",
    ),
    "relabel_userinfo_url": c_cmd(
        lambda t: [
            "relabel",
            "--in",
            str(shards(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--base-url",
            f"https://user:{KEY}@example.invalid/v1",
        ],
        "--base-url",
        "OPENAI_API_KEY",
    ),
    # synth
    "synth_no_source": c_cmd(
        lambda t: ["synth", "--out", str(t / "out"), "--model", "m"], "--data", "--queries"
    ),
    "synth_queries_missing": c_cmd(
        lambda t: ["synth", "--queries", str(t / "q.tsv"), "--out", str(t / "out"), "--model", "m"],
        "--queries",
        "no such file",
    ),
    "synth_queries_zero": c_cmd(
        lambda t: (
            (t / "q.tsv").write_bytes(b""),
            ["synth", "--queries", str(t / "q.tsv"), "--out", str(t / "out"), "--model", "m"],
        )[1],
        "q.tsv",
        "empty file",
    ),
    "synth_queries_latin1": c_cmd(
        lambda t: (
            (t / "q.tsv").write_bytes("q1\tcafé\n".encode("latin-1")),
            ["synth", "--queries", str(t / "q.tsv"), "--out", str(t / "out"), "--model", "m", "--dry-run"],
        )[1],
        "q.tsv:1:",
        "not valid utf-8",
    ),
    "synth_from_corrupt": c_cmd(
        lambda t: [
            "synth",
            "--from-shards",
            str(broken_part("truncated")(t)),
            "--out",
            str(t / "out"),
            "--model",
            "m",
            "--dry-run",
        ],
        "part-00001.parquet",
    ),
    "synth_bad_levels": c_cmd(
        lambda t: (
            beir(t),
            ["synth", "--data", str(t / "data"), "--out", str(t / "out"), "--model", "m", "--levels", "9"],
        )[1],
        "--levels",
    ),
    "synth_userinfo_url": c_cmd(
        lambda t: (
            beir(t),
            [
                "synth",
                "--data",
                str(t / "data"),
                "--out",
                str(t / "out"),
                "--model",
                "m",
                "--base-url",
                f"http://u:{KEY}@h/v1",
            ],
        )[1],
        "--base-url",
    ),
    # train: refused before torch is imported
    "train_data_missing": c_cmd(
        lambda t: ["train", "--data", str(t / "nope"), "--out", str(t / "out")],
        "--data",
        "no such shard folder",
    ),
    "train_data_empty": c_cmd(
        lambda t: ((t / "e").mkdir(), ["train", "--data", str(t / "e"), "--out", str(t / "out")])[1],
        "--data",
        "no part-*.parquet",
    ),
    "train_model_missing": c_cmd(
        lambda t: ["train", "--data", str(shards(t)), "--out", str(t / "out"), "--model", str(t / "nope")],
        "--model",
        "no such folder",
    ),
    "train_model_half": c_cmd(
        lambda t: [
            "train",
            "--data",
            str(shards(t)),
            "--out",
            str(t / "out"),
            "--model",
            model_folder(t, {"config.json": "{}"}),
        ],
        "--model",
        "not a complete model",
    ),
    "train_eval_data_missing": c_cmd(
        lambda t: [
            "train",
            "--data",
            str(shards(t)),
            "--out",
            str(t / "out"),
            "--eval-data",
            str(t / "nope"),
        ],
        "--eval-data",
    ),
    # eval
    "eval_model_models_nope": c_cmd(
        lambda t: (
            beir(t),
            (t / "models").mkdir(),
            ["eval", "--data", str(t / "data"), "--model", "models/nope"],
        )[2],
        "--model models/nope",
        "no such folder",
    ),
    "eval_model_half": c_cmd(
        lambda t: (
            beir(t),
            [
                "eval",
                "--data",
                str(t / "data"),
                "--model",
                model_folder(t, {"config.json": "{}", "model.safetensors": ""}),
            ],
        )[1],
        "--model",
        "model.safetensors is empty",
    ),
    "eval_model_bad_config": c_cmd(
        lambda t: (
            beir(t),
            [
                "eval",
                "--data",
                str(t / "data"),
                "--model",
                model_folder(t, {"config.json": "{", "model.safetensors": "x"}),
            ],
        )[1],
        "--model",
        "config.json is not valid JSON",
    ),
    "eval_model_modules_missing": c_cmd(
        lambda t: (
            beir(t),
            [
                "eval",
                "--data",
                str(t / "data"),
                "--model",
                model_folder(t, {"modules.json": '[{"path": "1_Pooling"}]', "config.json": "{}"}),
            ],
        )[1],
        "--model",
        "1_Pooling",
    ),
    "eval_hub_id_offline": c_cmd(
        lambda t: (beir(t), ["eval", "--data", str(t / "data"), "--model", "nobody/no-such-model-xyz"])[1],
        "--model nobody/no-such-model-xyz",
        "Hugging Face cache",
    ),
    "eval_baseline_missing": c_cmd(
        lambda t: (beir(t), ["eval", "--data", str(t / "data"), "--baseline", str(t / "nope")])[1],
        "--baseline",
        "no such folder",
    ),
    "eval_split_missing": c_cmd(
        lambda t: (beir(t), ["eval", "--data", str(t / "data"), "--split", "dev"])[1], "split 'dev'"
    ),
    "eval_json_is_folder": c_cmd(
        lambda t: (beir(t), (t / "j").mkdir(), ["eval", "--data", str(t / "data"), "--json", str(t / "j")])[
            2
        ],
        "--json",
        "is a folder",
    ),
    "eval_corpus_latin1": c_cmd(
        lambda t: (
            latin1(beir(t) / "corpus.jsonl"),
            ["eval", "--data", str(t / "data"), "--split", "test", "--json", str(t / "r.json")],
        )[1],
        "corpus.jsonl:3:",
        "--encoding",
    ),
    "eval_qrels_bom_bad_row": c_cmd(
        lambda t: (
            beir(t),
            (t / "data" / "qrels" / "test.tsv").write_bytes(
                b"\xef\xbb\xbfquery-id\tcorpus-id\tscore\nq0\td0\n"
            ),
            ["eval", "--data", str(t / "data")],
        )[2],
        "test.tsv:2:",
        "3 tab-separated",
    ),
    # run
    "run_missing": c_cmd(lambda t: ["run", str(t / "nope.toml")], "nope.toml", "no such experiment file"),
    "run_toml_syntax": c_cmd(
        lambda t: ["run", run_file(t, 'out = "OUT"\ndata = "DATA"\n[mine\ndepth = 3\n')],
        "exp.toml:3:",
        "invalid TOML",
    ),
    "run_bad_value": c_cmd(
        lambda t: [
            "run",
            run_file(t, 'out = "OUT"\ndata = "DATA"\nstages = ["mine"]\n\n[mine]\ndepth = -1\n'),
        ],
        "exp.toml:6:",
        "mine.depth",
    ),
    "run_unknown_key": c_cmd(
        lambda t: ["run", run_file(t, 'out = "OUT"\ndata = "DATA"\n[mine]\nnope = 1\n')],
        "exp.toml:4:",
        "mine.nope",
    ),
    "run_unknown_top": c_cmd(
        lambda t: ["run", run_file(t, 'out = "OUT"\ndata = "DATA"\nbogus = 1\n')], "exp.toml:3:", "bogus"
    ),
    "run_userinfo_url": c_cmd(
        lambda t: [
            "run",
            run_file(t, f'out = "OUT"\ndata = "DATA"\n[llm]\nbase_url = ["https://me:{KEY}@h/v1"]\n'),
        ],
        "exp.toml:4:",
        "llm.base_url",
    ),
    "run_bad_only": c_cmd(
        lambda t: ["run", run_file(t, 'out = "OUT"\ndata = "DATA"\n'), "--only", "mine,nope"],
        "--only",
        "nope",
    ),
    "run_bad_set": c_cmd(
        lambda t: ["run", run_file(t, 'out = "OUT"\ndata = "DATA"\n'), "--set", "mine.depth"], "--set"
    ),
    # inspect / validate
    "inspect_corrupt": c_cmd(lambda t: ["inspect", str(broken_part("truncated")(t))], "part-00001.parquet"),
    "inspect_missing": c_cmd(lambda t: ["inspect", str(t / "nope")], "nope", "no such shard folder"),
    "validate_missing": c_cmd(lambda t: ["validate", str(t / "nope")], "nope"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPR_CACHE", str(tmp_path / "cache"))
    argv, named = CASES[name](tmp_path)
    before = set(tmp_path.rglob("*"))
    result = runner.invoke(app, argv)
    error_line(result, *named)
    assert KEY not in result.output
    assert not leftovers(before, tmp_path), leftovers(before, tmp_path)  # nothing half-written


@pytest.mark.parametrize("option", ["mine", "relabel", "synth", "train", "ingest"])
def test_out_is_a_file(tmp_path, option):
    """`--out` naming an existing file is refused, and the file is left as it was."""
    beir(tmp_path)
    target = tmp_path / "taken"
    target.write_text("mine, not yours\n")
    argv = {
        "mine": ["mine", "--data", str(tmp_path / "data"), "--out"],
        "relabel": ["relabel", "--in", str(shards(tmp_path)), "--model", "m", "--out"],
        "synth": ["synth", "--data", str(tmp_path / "data"), "--model", "m", "--out"],
        "train": ["train", "--data", str(shards(tmp_path)), "--out"],
        "ingest": ["ingest", str(tevatron(tmp_path)), "--out"],
    }[option]
    result = runner.invoke(app, [*argv, str(target)])
    error_line(result, "--out", "taken", "is a file")
    assert target.read_text() == "mine, not yours\n"


# -- what used to fail and now reads ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["bom_everywhere", "latin1_with_option", "gzip_with_bom", "crlf"])
def test_readable_variants(tmp_path, variant):
    data = beir(tmp_path)
    extra: list[str] = []
    if variant in ("bom_everywhere", "gzip_with_bom"):
        for path in (data / "corpus.jsonl", data / "queries.jsonl", data / "qrels" / "train.tsv"):
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
            if variant == "gzip_with_bom":
                gz(path)
    elif variant == "latin1_with_option":
        latin1(data / "corpus.jsonl")
        extra = ["--encoding", "latin-1"]
    elif variant == "crlf":
        for path in (data / "corpus.jsonl", data / "qrels" / "train.tsv"):
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    result = runner.invoke(app, [*_mine(tmp_path, "--depth", "3", "--num-negatives", "1"), *extra])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(part(tmp_path / "out")).to_pylist()
    assert {r["qid"] for r in rows} == {"q0", "q1", "q2"}  # the BOM did not eat the header or the first id
    if variant == "latin1_with_option":
        assert any("café 2" in (r["text"] or "") for r in rows) or "d2" not in {r["pid"] for r in rows}


def test_ingest_failure_leaves_nothing_and_the_rerun_works(tmp_path):
    """`mpr ingest` used to write its manifest and parts before meeting a bad row, blocking the rerun."""
    src = tevatron(tmp_path)
    good = src.read_text()
    src.write_text(good + '{"query_id": "9", "query": "x"}\n')
    out = tmp_path / "out"
    error_line(
        runner.invoke(app, ["ingest", str(src), "--out", str(out), "--queries-per-shard", "1"]),
        "rows.jsonl:5:",
    )
    assert not out.exists()
    src.write_text(good)
    result = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--queries-per-shard", "1"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("part-*.parquet"))) == 4


# -- fuzzed and truncated files: every reader answers with data or one InputError naming the file --------


def _reads_or_names(path: Path, read: Callable[[Path], object]) -> None:
    try:
        read(path)
    except MprError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message, message


FUZZ = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_valid_corpus = "".join(json.dumps(d) + "\n" for d in CORPUS).encode()
_valid_qrels = ("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS)).encode()


@FUZZ
@given(
    st.binary(max_size=400)
    | st.builds(
        lambda n, b: _valid_corpus[:n] + b, st.integers(0, len(_valid_corpus)), st.binary(max_size=20)
    )
)
def test_fuzz_jsonl(tmp_path, blob):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(blob)
    _reads_or_names(path, read_corpus)
    _reads_or_names(path, read_queries)
    _reads_or_names(path, lambda p: list(iter_tevatron(p)))


@FUZZ
@given(
    st.binary(max_size=300)
    | st.builds(lambda n, b: _valid_qrels[:n] + b, st.integers(0, len(_valid_qrels)), st.binary(max_size=20))
)
def test_fuzz_tsv(tmp_path, blob):
    path = tmp_path / "train.tsv"
    path.write_bytes(blob)
    _reads_or_names(path, read_qrels)


@FUZZ
@given(st.integers(0, 200), st.binary(max_size=8))
def test_fuzz_gzip(tmp_path, cut, tail):
    whole = gzip.compress(_valid_corpus)
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(whole[: cut % (len(whole) + 1)] + tail)
    _reads_or_names(path, read_corpus)


@FUZZ
@given(st.integers(0, 10_000), st.integers(0, 255), st.booleans())
def test_fuzz_parquet(tmp_path, position, byte, cut):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(TEVATRON), path)
    data = bytearray(path.read_bytes())
    position %= len(data)
    if cut:
        data = data[:position]
    else:
        data[position] = byte
    path.write_bytes(bytes(data))
    _reads_or_names(path, lambda p: read_part(p, columns=["query_id"]))
    _reads_or_names(path, lambda p: list(iter_tevatron(p)))


# -- secrets ------------------------------------------------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that echoes the bearer key in every body and header. The path's first
    part picks the status of chat completions: /200/v1 (an answer holding the key), /401/v1, /500/v1."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, payload: dict) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = json.dumps(payload).replace("KEY", key).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Echo-Key", key)
        self.send_header("Retry-After-Ms", "1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, {"data": [{"id": "m"}], "note": "KEY"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = int(self.path.split("/")[1])
        if status == 200:
            self._send(
                200,
                {
                    "choices": [
                        {"message": {"content": "your key is KEY, not JSON"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                },
            )
        else:
            self._send(status, {"error": {"message": f"HTTP {status} for key KEY"}})


class EchoServer(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 refuses connections on a busy machine

    def handle_error(self, request, client_address):  # a client that hung up after a 401: not mpr's output
        pass

    daemon_threads = True


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    server = EchoServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _files_text(root: Path) -> str:
    """Every file under `root` as text: Parquet parts decoded row by row, everything else as bytes."""
    out = []
    for path in root.rglob("*"):
        if path.is_file():
            out.append(
                str(pq.read_table(path).to_pylist())
                if path.suffix == ".parquet"
                else path.read_bytes().decode("utf-8", "replace")
            )
    return "\n".join(out)


@pytest.mark.parametrize("status", [200, 401, 500])
@pytest.mark.parametrize("stage", ["relabel", "synth"])
def test_key_echoed_by_the_server_is_never_stored_or_printed(
    tmp_path, monkeypatch, echo_server, status, stage
):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MPR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    common = [
        "--out",
        str(tmp_path / "out"),
        "--model",
        "m",
        "--backend",
        "openai",
        "--base-url",
        f"{echo_server}/{status}/v1",
        "--max-invalid-retries",
        "0",
        "--concurrency",
        "4",
        "--llm-cache",
        str(tmp_path / "cache" / "llm.sqlite"),
        "-q",
    ]
    if stage == "relabel":
        argv = ["relabel", "--in", str(shards(tmp_path)), *common]
    else:
        argv = ["synth", "--data", str(beir(tmp_path)), "--max-queries", "2", *common]
    result = runner.invoke(app, argv)
    if status == 401:  # after the line naming the backend, one error line
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert (
            result.stderr.strip().splitlines()[-1].startswith("error: ")
            and "401" in result.stderr
            and MARKER in result.stderr
        )
    else:  # every item failed: output complete, exit 3 (the failed-items code)
        assert result.exit_code == 3, result.output
        stored = _files_text(tmp_path / "out")
        assert MARKER in stored  # the error column / failures file kept the message, key replaced
    assert KEY not in result.output
    assert KEY not in _files_text(tmp_path)


def test_userinfo_in_openai_base_url_env_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"https://u:{KEY}@example.invalid/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = runner.invoke(
        app,
        [
            "relabel",
            "--in",
            str(shards(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--model",
            "m",
            "--backend",
            "openai",
        ],
    )
    error_line(result, "OPENAI_BASE_URL", "user:key@")
    assert KEY not in result.output and not (tmp_path / "out").exists()


def test_redact(tmp_path, caplog):
    register("s3cr3t-value")
    assert redact("x s3cr3t-value y") == f"x {MARKER} y"
    assert (
        redact("key sk-abcdefghijklmnopqrstuvwx") == f"key {MARKER}"
        and redact("sk-learn-style") == "sk-learn-style"
    )
    assert redact("https://user:pw@host/v1") == f"https://{MARKER}@host/v1"
    assert redact("nothing here") == "nothing here"
    register("EMPTY")  # the placeholder key of local servers is not a secret worth mangling answers for
    assert redact("EMPTY answer") == "EMPTY answer"
    write_json_atomic(tmp_path / "m.json", {"config": {"note": "s3cr3t-value"}})
    assert json.loads((tmp_path / "m.json").read_text()) == {"config": {"note": MARKER}}
    redact_logging()
    logging.getLogger("mpr.test").warning("server said %s", "s3cr3t-value")
    assert "s3cr3t-value" not in caplog.text and MARKER in caplog.text


# -- speed: help, dry runs and input errors answer within 2 seconds ----------------------------------------


def _timed(argv: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """The command's CPU seconds (user + system): what it costs, whatever else the machine is running."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "mpr", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["mine", "--help"],
        ["relabel", "--help"],
        ["synth", "--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["ingest", "--help"],
        ["run", "--help"],
        ["inspect", "--help"],
        ["validate", "--help"],
        ["mine", "--data", "data", "--out", "out", "--split", "nope"],
        ["train", "--data", "nope", "--out", "out"],
        ["eval", "--data", "data", "--model", "models/nope"],
        ["mine", "--data", "data", "--out", "out", "--retriever", "bm25", "--encoding", "ascii"],
        ["synth", "--data", "data", "--out", "out", "--model", "m", "--dry-run", "--max-queries", "1"],
        ["relabel", "--in", "shards", "--out", "out", "--model", "m", "--dry-run"],
        ["ingest", "rows.jsonl", "--out", "out", "--max-negatives", "-1"],
        ["run", "exp.toml"],
    ],
)
def test_answers_within_two_seconds(tmp_path, argv):
    data = beir(tmp_path)
    if argv[0] == "relabel":
        shards(tmp_path)
    tevatron(tmp_path)
    latin1(data / "corpus.jsonl")
    (tmp_path / "models").mkdir()
    (tmp_path / "exp.toml").write_text('out = "out"\ndata = "data"\n[train]\nloss = "nope"\n')
    seconds, proc = _timed(argv, tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert seconds < 2.0, (seconds, argv)
    if "--help" not in argv and "--dry-run" not in argv:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
