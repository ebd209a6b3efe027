"""`mpr run`: the example experiment end to end, overrides, partial runs and config errors."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from mpr.cli import app
from mpr.orchestrate.experiment import Experiment, load_run_file, parse_value
from mpr.orchestrate.stages import REGISTRY
from pipeline.data.shards import read_manifest, read_shards

from ..conftest import REPO

runner = CliRunner()
EXAMPLE_TOML = REPO / "experiments" / "example.toml"


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("1e-4") == 1e-4
    assert parse_value("jointlh") == "jointlh" and parse_value('["mine", "train"]') == ["mine", "train"]


def test_overrides_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_run_file(EXAMPLE_TOML, ["train.loss=jointlh", "mine.depth=7", "out=elsewhere"])
    assert spec.train["loss"] == "jointlh" and spec.mine["depth"] == 7 and str(spec.out) == "elsewhere"
    from pipeline.errors import MprError

    with pytest.raises(MprError, match="expected KEY=VALUE"):
        load_run_file(EXAMPLE_TOML, ["train.loss"])
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\ndata = "y"\nstages = ["mine", "fly"]\n')
    with pytest.raises(MprError, match="stages"):
        load_run_file(bad)
    bad.write_text('out = "x"\ndata = "y"\n[mine]\ndepht = 3\n')
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "depht" in result.output  # a misspelt option is named, not ignored
    assert not (tmp_path / "x").exists()  # and nothing was written


def test_one_positive_threshold_in_every_stage_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = ("relabel", "synth", "train")
    spec = load_run_file(EXAMPLE_TOML, [f"{stage}.positive_threshold=0.5" for stage in stages])
    experiment = Experiment(spec, progress=False)
    assert [
        experiment.config(REGISTRY[stage], "http://127.0.0.1:9/v1").positive_threshold for stage in stages
    ] == [0.5] * 3
    result = runner.invoke(app, ["run", str(EXAMPLE_TOML), "--set", "synth.positive_level=2"])
    assert (
        result.exit_code == 2 and "synth.positive_level" in result.output and not (tmp_path / "runs").exists()
    )


def test_dry_run_plans_the_stages_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["run", str(EXAMPLE_TOML), "--dry-run", "--set", f"out={json.dumps(str(out))}"]
    )
    assert result.exit_code == 0, result.output
    assert "mine --dry-run" in result.output and re.search(r"^  queries\s+20$", result.output, re.M)
    assert (
        f"relabel: reads {out / 'mined'}, which mine writes first" in result.output
    )  # planned once mine has run
    assert "synth --dry-run" in result.output and re.search(r"^  requests\s+20$", result.output, re.M)
    assert "train --dry-run" in result.output and str(out / "model-lsepair") in result.output
    assert "eval --dry-run" in result.output
    assert not out.exists()


def test_example_experiment_end_to_end(tmp_path, cache_dir):
    out = tmp_path / "run"
    args = [
        "run",
        str(EXAMPLE_TOML),
        "-q",
        "--set",
        f"out={json.dumps(str(out))}",
        "--set",
        f"mine.cache_dir={json.dumps(str(cache_dir))}",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.group_size=4",
        "--set",
        "eval.depth=20",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "NOTE: no LLM endpoint is configured" in result.output
    for folder in ("mined", "relabeled", "synth"):
        assert read_manifest(out / folder).complete
    relabeled = read_shards(out / "relabeled").to_pandas()
    assert ((relabeled.prior_label == 0) & (relabeled.label == 1)).sum() > 0  # the hidden positives came back
    assert (out / "model-lsepair" / "model.safetensors").exists()
    report = (out / "report.md").read_text()
    for part in (
        "NOT a language model",
        "### mine",
        "### relabel",
        "0 -> 1",
        "### synth",
        "model-lsepair",
        "ndcg@10",
    ):
        assert part in report, part
    assert re.search(r"\| seconds \| ([\d.]+ s|\d+ min \d\d s) \|", report) and re.search(
        r"\| rows_out \| [\d,]+ \|", report
    )  # numbers by kind
    assert (out / "model-lsepair-training.png").exists() and (out / "eval-lsepair.json").exists()

    again = runner.invoke(app, [*args, "--only", "mine,relabel,train"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = runner.invoke(app, [*args, "--only", "train", "--set", "train.loss=jointlh"])
    assert other.exit_code == 0, other.output
    assert (out / "model-jointlh" / "model.safetensors").exists()
    changed = runner.invoke(app, [*args, "--only", "train", "--set", "train.learning_rate=0.1"])
    assert changed.exit_code == 2 and "trained with other options" in changed.output
    unknown = runner.invoke(app, [*args, "--only", "fly"])
    assert unknown.exit_code == 2 and "unknown stage" in unknown.output


def test_ingest_is_a_stage_of_mpr_run_and_relabel_reads_its_folder(tmp_path):
    """Tevatron rows -> RUN/ingested -> relabel (the simulated judge) -> RUN/relabeled, from one file."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "query_id": "1",
                    "query": "what do bees make",
                    "positive_passages": [{"docid": "p1", "title": "Bees", "text": "Bees make honey."}],
                    "negative_passages": [{"docid": "n1", "title": "", "text": "Wasps sting."}],
                }
            ]
        )
        + "\n"
    )
    out = tmp_path / "run"
    (tmp_path / "x.toml").write_text(
        f"out = {json.dumps(str(out))}\ndata = {json.dumps(str(REPO / 'data' / 'example'))}\n"
        'stages = ["ingest", "relabel"]\n'
        f"[ingest]\nfiles = [{json.dumps(str(rows))}]\n[llm]\ntest_server = true\n"
    )
    planned = runner.invoke(app, ["run", str(tmp_path / "x.toml"), "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert "ingest --dry-run" in planned.output and f"relabel: reads {out / 'ingested'}" in planned.output
    result = runner.invoke(app, ["run", str(tmp_path / "x.toml")])
    assert result.exit_code == 0, result.output
    relabeled = read_manifest(out / "relabeled")
    assert relabeled is not None and relabeled.complete
    assert {r["pid"] for r in read_shards(out / "relabeled").to_pylist()} == {"p1", "n1"}
    assert "### ingest:" in (out / "report.md").read_text()
