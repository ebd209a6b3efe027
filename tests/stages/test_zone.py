"""`mpr relabel --zone`: only the ambiguity zone is judged; the rest keeps its mined label and says why."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mpr.cli import app
from mpr.simulated_judge import Oracle, start_server
from pipeline.data.shards import read_shards
from pipeline.stages import relabel
from pipeline.stages.relabel import RelabelConfig

from ..handmade import handmade_mined, vaswani_slice

MODEL, CHEAP = "judge-model", "cheap-model"
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return vaswani_slice(tmp_path_factory.mktemp("zone") / "vaswani")


@pytest.fixture(scope="module")
def mined(data, tmp_path_factory):
    return handmade_mined(data, tmp_path_factory.mktemp("zone-mined") / "mined")


@pytest.fixture(scope="module")
def server(data):
    # the cheap judge is wrong on 30% of pairs and, where wrong, puts only 0.4 on its grade
    oracle = Oracle(data, model_error_rates={CHEAP: 0.3}, error_confidence=0.4)
    with start_server(responder=oracle, models=(MODEL, CHEAP)) as handle:
        yield handle


def run(mined, out, server, tmp_path, **kw):
    cfg = RelabelConfig(
        input=mined,
        out=out,
        model=MODEL,
        base_url=[server.url],
        candidates="all",
        llm_cache=tmp_path / "llm.sqlite",
        progress=False,
        **kw,
    )
    manifest = relabel.run(cfg, log=lambda _: None)
    return manifest, read_shards(out).to_pandas()


def hidden_found(df):
    flagged = df[(df.source == "mined") & (df.label == 1)]
    return set(zip(flagged.qid, flagged.pid))


def test_margin_judges_only_candidates_near_the_lowest_positive(mined, server, tmp_path):
    _, everything = run(mined, tmp_path / "all", server, tmp_path)
    manifest, df = run(mined, tmp_path / "margin", server, tmp_path, zone="margin", zone_margin=0.1)
    cand = df[df.source == "mined"]
    floor = df[df.source == "qrels"].groupby("qid").score.min() - 0.1
    inside = cand.score >= cand.qid.map(floor)
    assert inside.any() and (~inside).any()
    assert cand[inside].llm_label.notna().all() and cand[inside].unjudged.isna().all()
    outside = cand[~inside]
    assert outside.llm_label.isna().all() and (outside.label == outside.prior_label).all()
    assert outside.unjudged.str.startswith("zone margin: score").all()
    assert manifest.summary["zone_skipped"] == len(outside) and manifest.summary["judged"] == inside.sum()
    assert df[df.source == "qrels"].unjudged.isna().all()
    # the handmade hidden positives score within ~0.1 of the positive: nearly all are still found
    assert len(hidden_found(df)) >= 0.9 * len(hidden_found(everything)) > 0


def test_top_judges_the_r_best_ranked(mined, server, tmp_path):
    _, df = run(mined, tmp_path / "top", server, tmp_path, zone="top", zone_top=3)
    cand = df[df.source == "mined"]
    judged = cand[cand.llm_label.notna()]
    assert judged.groupby("qid").size().max() == 3 and len(judged) == 3 * df.qid.nunique()
    best = cand.sort_values("rank").groupby("qid").head(3)
    assert set(zip(judged.qid, judged.pid)) == set(zip(best.qid, best.pid))
    assert cand[cand.llm_label.isna()].unjudged.str.startswith("zone top").all()


def test_unsure_skips_what_the_cheap_judge_is_sure_is_negative(mined, server, tmp_path):
    _, everything = run(mined, tmp_path / "all", server, tmp_path)
    truth = hidden_found(everything)
    manifest, df = run(
        mined, tmp_path / "unsure", server, tmp_path, zone="unsure", zone_model=CHEAP, zone_unsure=0.2
    )
    cand = df[df.source == "mined"]
    assert hidden_found(df) == truth  # a calibrated cheap judge is unsure exactly where it is wrong
    skipped = cand[cand.unjudged.notna()]
    assert 0.3 * len(cand) < len(skipped) < len(cand) and skipped.unjudged.str.startswith("zone unsure").all()
    assert manifest.summary["zone_sent"] == len(cand) and manifest.models["zone"] == CHEAP


def test_cli_and_dry_run_count_the_zone(mined, tmp_path):
    args = [
        "relabel",
        "--in",
        str(mined),
        "--out",
        str(tmp_path / "x"),
        "--model",
        MODEL,
        "--candidates",
        "all",
        "--dry-run",
    ]
    every = runner.invoke(app, args)
    zone = runner.invoke(app, [*args, "--zone", "top", "--zone-top", "2"])
    assert every.exit_code == 0 and zone.exit_code == 0, zone.output

    def candidates(out):
        return int(
            next(line for line in out.splitlines() if line.strip().startswith("candidates "))
            .split()[-1]
            .replace(",", "")
        )

    assert candidates(zone.output) == 2 * 12 < candidates(every.output)
