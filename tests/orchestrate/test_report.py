"""The run report: numbers formatted by kind (the one helper `mpr eval` uses too), and the comparison
sentences: significance in words, saturation and too-few-queries warnings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mpr.orchestrate import report as report_module
from mpr.orchestrate.experiment import Experiment, RunFile
from mpr.orchestrate.report import _pair_sentence, write_report
from pipeline.data.shards import Manifest
from pipeline.formatting import number, summary_value
from pipeline.stages.evaluate import Comparison, EvalReport, ModelResult, format_table


def test_a_clear_gain_is_called_significant() -> None:
    a = {f"q{i}": 0.6 + 0.01 * (i % 3) for i in range(30)}
    b = {f"q{i}": 0.4 for i in range(30)}
    row, words = _pair_sentence("relabeled", a, "single", b, 3)
    assert row[4] == "30/0/0" and float(row[5].lstrip("<")) < 0.001
    assert "the difference is significant" in words and "relabeled is better" in words
    assert "stays significant after a Bonferroni correction for 3 tests" in words
    assert "WARNING" not in words


def test_noise_is_not_significant() -> None:
    a = {f"q{i}": 0.5 + (0.1 if i % 2 else -0.1) for i in range(20)}
    b = {f"q{i}": 0.5 for i in range(20)}
    _, words = _pair_sentence("x", a, "y", b, 1)
    assert "NOT significant" in words and "cannot tell them apart" in words


def test_saturated_and_too_few_are_warned() -> None:
    _, words = _pair_sentence(
        "x", {f"q{i}": 1.0 for i in range(12)}, "y", {f"q{i}": 0.995 for i in range(12)}, 1
    )
    assert "saturated" in words
    _, words = _pair_sentence("x", {"q1": 0.9, "q2": 0.8}, "y", {"q1": 0.1, "q2": 0.2}, 1)
    assert "too few for a paired test" in words and "significant" not in words


def test_numbers_by_kind() -> None:
    assert number(0.123456, "metric") == "0.1235" and number(None, "metric") == "-"
    assert number(0.0123, "delta") == "+0.0123" and number(-0.0123, "delta") == "-0.0123"
    assert number(1234567, "count") == "1,234,567" and number(105.0, "count") == "105"
    assert number(12.34, "seconds") == "12.3 s" and number(105.0, "seconds") == "1 min 45 s"
    assert number(59.97, "seconds") == "1 min 00 s" and number(3725, "seconds") == "1 h 02 min"
    assert number(12.34, "rate") == "12.3/s"
    assert number(5e-5, "p") == "<0.0001" and number(0.01234, "p") == "0.0123" and number(None, "p") == "-"
    assert summary_value("seconds", 105.0) == "1 min 45 s" and summary_value("train_seconds", 3.25) == "3.2 s"
    assert summary_value("requests_per_s", 12.34) == "12.3/s"
    assert summary_value("rows", 1234567) == "1,234,567" and summary_value("rows", 1234.0) == "1,234"
    assert summary_value("tokens_out_per_passage", 0.123456) == "0.1235"


def _comparison(metric: str, model: float, baseline: float, p: float) -> Comparison:
    return Comparison(
        metric=metric, model=model, baseline=baseline, delta=model - baseline, p_ttest=p, p_randomization=p
    )


def test_rendered_report_formats_by_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    (out / "mined").mkdir(parents=True)
    manifest = Manifest(
        stage="mine",
        config={},
        config_hash="0",
        complete=True,
        summary={
            "queries": 1234,
            "rows": 105.0,
            "seconds": 105.0,
            "requests_per_s": 12.34,
            "kept_share": 0.123456,
        },
    )
    (out / "mined" / "_manifest.json").write_text(manifest.model_dump_json())
    (out / "model-lsepair" / "mpr").mkdir(parents=True)
    (out / "model-lsepair" / "mpr" / "train.json").write_text(
        json.dumps(
            {
                "config": {"loss": "lsepair", "seed": 42},
                "log_history": [],
                "summary": {
                    "groups": 12345,
                    "steps": 100,
                    "first_loss": 2.5,
                    "final_loss": 1.25,
                    "seconds": 3725.0,
                },
            }
        )
    )
    per_query = {f"q{i}": {"ndcg@10": 0.5} for i in range(12)}
    report = EvalReport(
        data="data/x",
        split="test",
        queries=12,
        skipped_queries=0,
        dropped_qrels=0,
        corpus_size=1500,
        depth=100,
        max_seq_length=None,
        result=ModelResult(
            model="run/model-lsepair", metrics={"ndcg@10": 0.6, "mrr@10": 0.5}, per_query=per_query
        ),
        baseline=ModelResult(model="start", metrics={"ndcg@10": 0.5, "mrr@10": 0.5}, per_query=per_query),
        comparison=[_comparison("ndcg@10", 0.6, 0.5, 5e-5), _comparison("mrr@10", 0.5, 0.5, 1.0)],
    )
    (out / "eval-lsepair.json").write_text(report.model_dump_json())
    monkeypatch.setattr(report_module, "hardware", lambda: {"summary": "a test machine"})
    text = write_report(Experiment(RunFile(out=out, data=tmp_path / "data")), log=lambda _: None).read_text()
    assert "105.0000" not in text and "| rows | 105 |" in text and "| queries | 1,234 |" in text
    assert (
        "| seconds | 1 min 45 s |" in text
        and "| requests_per_s | 12.3/s |" in text
        and "| kept_share | 0.1235 |" in text
    )
    assert "12,345 groups, 100 steps, loss 2.5000 -> 1.2500, 1 h 02 min." in text
    assert (
        "| ndcg@10 | 0.6000 | 0.5000 | +0.1000 | <0.0001 |" in text
        and "| mrr@10 | 0.5000 | 0.5000 | +0.0000 | 1.0000 |" in text
    )
    table = format_table(report)  # `mpr eval` prints the same numbers the same way
    assert re.search(r"nDCG@10\s+0\.6000\s+0\.5000\s+\+0\.1000\s+<0\.0001\s+<0\.0001", table)
    assert "1,500 passages" in table


def _trained(out: Path, name: str, loss: str) -> None:
    (out / f"model-{name}" / "mpr").mkdir(parents=True)
    (out / f"model-{name}" / "mpr" / "train.json").write_text(
        json.dumps(
            {
                "config": {"loss": loss, "seed": 42},
                "log_history": [],
                "summary": {"groups": 10, "steps": 5, "first_loss": 2.0, "final_loss": 1.0, "seconds": 60.0},
            }
        )
    )


def _evaluated(out: Path, name: str, ndcg: float, baseline: float | None) -> None:
    per_query = {f"q{i}": {"ndcg@10": ndcg} for i in range(12)}
    start = (
        None
        if baseline is None
        else ModelResult(
            model="start",
            metrics={"ndcg@10": baseline},
            per_query={q: {"ndcg@10": baseline} for q in per_query},
        )
    )
    report = EvalReport(
        data="data/x",
        split="test",
        queries=12,
        skipped_queries=0,
        dropped_qrels=0,
        corpus_size=100,
        depth=100,
        max_seq_length=None,
        result=ModelResult(model=f"run/model-{name}", metrics={"ndcg@10": ndcg}, per_query=per_query),
        baseline=start,
        comparison=[] if baseline is None else [_comparison("ndcg@10", ndcg, baseline, 0.01)],
    )
    (out / f"eval-{name}.json").write_text(report.model_dump_json())


def test_single_positive_reference_shows_its_own_evaluation_when_the_main_loss_is_infonce(
    tmp_path: Path,
) -> None:
    """Both models train with loss infonce; each section must read its own eval file (the reference's
    section used to show the main model's, found by loss name)."""
    out = tmp_path / "run"
    _trained(out, "infonce", "infonce")
    _trained(out, "infonce-single", "infonce")
    _evaluated(out, "infonce", 0.6, baseline=0.5)
    _evaluated(out, "infonce-single", 0.3, baseline=None)
    spec = RunFile(
        out=out,
        data=tmp_path / "data",
        stages=["mine", "train", "eval"],
        train={"loss": "infonce"},
        single_positive=True,
    )
    text = write_report(Experiment(spec), log=lambda _: None).read_text()
    single = text.split("## Training: `model-infonce-single`")[1].split("\n## ")[0]
    assert "| ndcg@10 | 0.3000 |" in single and "0.6000" not in single
    comparison = text.split("## Does relabeling help?")[1]
    assert (
        "| relabeled (infonce) vs single-positive InfoNCE | 0.6000 | 0.3000 | +0.3000 | 12/0/0 |"
        in comparison
    )
