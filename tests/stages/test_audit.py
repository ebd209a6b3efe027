"""`mpr relabel --audit N`: the judge is checked against known labels before the full run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mpr.cli import app
from mpr.simulated_judge import Oracle, start_server
from pipeline.data.shards import read_manifest, read_shards
from pipeline.stages import relabel
from pipeline.stages.audit import AUDIT_FILE, AuditFailed, agreement, cohen_kappa
from pipeline.stages.relabel import RelabelConfig

from ..handmade import handmade_mined, vaswani_slice

MODEL = "judge-model"
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return vaswani_slice(tmp_path_factory.mktemp("audit") / "vaswani")


@pytest.fixture(scope="module")
def mined(data, tmp_path_factory):
    return handmade_mined(data, tmp_path_factory.mktemp("audit-mined") / "mined")


def cfg(mined, out, server, tmp_path, **kw):
    return RelabelConfig(
        input=mined,
        out=out,
        model=MODEL,
        base_url=[server.url],
        llm_cache=tmp_path / "llm.sqlite",
        progress=False,
        batch_candidates=10,
        **kw,
    )


def test_kappa_and_intervals_by_hand():
    assert cohen_kappa([(1, 1), (0, 0)] * 5) == 1.0
    assert cohen_kappa([(1, 0), (0, 1)] * 5) == -1.0
    # 20 pairs: tp 8, fn 2, fp 3, tn 7 -> po 0.75, pe 0.5*0.55+0.5*0.45 = 0.5, kappa 0.5
    pairs = [(1, 1)] * 8 + [(1, 0)] * 2 + [(0, 1)] * 3 + [(0, 0)] * 7
    got = agreement(pairs)
    assert (got["tp"], got["fn"], got["fp"], got["tn"]) == (8, 2, 3, 7)
    assert got["kappa"] == 0.5 and got["precision"] == round(8 / 11, 4) and got["recall"] == 0.8
    lo, hi = got["kappa_ci"]
    assert lo < 0.5 < hi
    lo, hi = got["recall_ci"]
    assert lo < 0.8 < hi <= 1


def test_audit_that_agrees_runs_and_is_recorded(mined, data, tmp_path):
    with start_server(responder=Oracle(data), models=(MODEL,)) as server:
        manifest = relabel.run(cfg(mined, tmp_path / "out", server, tmp_path, audit=10), log=lambda _: None)
    audit = manifest.summary["audit"]
    assert audit["positives"] == 10 and audit["negatives"] == 10 and audit["failed"] == 0
    assert audit["recall"] == 1.0 and audit["passed"] and audit["kappa"] >= 0.4
    assert (
        audit["projected"]["requests"] == manifest.summary["llm_sent"]
    )  # the projection is the real full run
    assert json.loads((tmp_path / "out" / AUDIT_FILE).read_text())["kappa"] == audit["kappa"]
    assert read_manifest(tmp_path / "out").complete


def test_audit_that_disagrees_stops_before_any_full_run_request(mined, data, tmp_path):
    wrong = Oracle(data, error_rate=1.0)  # every verdict the opposite of the qrels
    with start_server(responder=wrong, models=(MODEL,)) as server:
        with pytest.raises(AuditFailed, match="below --min-agreement"):
            relabel.run(cfg(mined, tmp_path / "out", server, tmp_path, audit=10), log=lambda _: None)
        received = server.stats()["received"]
        audit = json.loads((tmp_path / "out" / AUDIT_FILE).read_text())
        assert audit["kappa"] < 0 and not audit["passed"]
        assert received == audit["sent"] > 0  # the server saw the audit's requests and nothing else
        assert not list((tmp_path / "out").glob("part-*"))
        # the CLI: one line, exit code 2, still nothing of the full run sent
        args = [
            "relabel",
            "--in",
            str(mined),
            "--out",
            str(tmp_path / "cli"),
            "--model",
            MODEL,
            "--base-url",
            server.url,
            "--audit",
            "10",
            "--llm-cache",
            str(tmp_path / "llm2.sqlite"),
            "-q",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "error: audit:" in result.output and "--force" in result.output
        assert server.stats()["received"] == received + audit["sent"]
        assert not list((tmp_path / "cli").glob("part-*"))
        # --force runs anyway, and says so in the manifest
        result = runner.invoke(app, [*args, "--force"])
        assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "cli")
    assert manifest.complete and manifest.summary["audit"]["forced"]
    assert len(read_shards(tmp_path / "cli")) == len(read_shards(mined))


@pytest.mark.parametrize("error_rate", [0.0, 1.0])
def test_mpr_run_audits_and_reports(mined, data, tmp_path, error_rate):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(mined, run_dir / "mined")
    spec = tmp_path / "x.toml"
    spec.write_text(
        f'out = "{run_dir}"\ndata = "{data}"\nstages = ["relabel"]\n[llm]\ntest_server = true\n'
        f"test_server_error_rate = {error_rate}\n[relabel]\naudit = 10\nbatch_candidates = 10\n"
    )
    result = runner.invoke(app, ["run", str(spec)])
    assert (run_dir / "report.md").exists(), result.output
    report = (run_dir / "report.md").read_text()
    assert "Judge audit against the known labels" in report and "Cohen's kappa" in report
    if error_rate:
        assert result.exit_code == 2 and "error: audit:" in result.output
        assert "failed: the run stopped before the full run" in report
        assert not list((run_dir / "relabeled").glob("part-*"))
    else:
        assert result.exit_code == 0, result.output
        assert read_manifest(run_dir / "relabeled").summary["audit"]["passed"]


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """40 Vaswani queries, one qrels positive kept each: the other relevant passages sit among the mined
    negatives."""
    data = vaswani_slice(tmp_path_factory.mktemp("sparse") / "vaswani", n_queries=40)
    return data, handmade_mined(data, tmp_path_factory.mktemp("sparse-mined") / "mined")


def test_audit_measures_the_judge_not_the_labels(sparse, tmp_path):
    data, mined = sparse
    with start_server(
        responder=Oracle(data), models=(MODEL,)
    ) as server:  # knows every qrels positive: no errors
        manifest = relabel.run(
            cfg(mined, tmp_path / "ok", server, tmp_path, audit=40, min_agreement=0.8), log=lambda _: None
        )
    audit = manifest.summary["audit"]
    assert (audit["positives"], audit["negatives"], audit["likely_negatives"]) == (40, 40, 40)
    assert (
        audit["recall"] == 1.0
        and audit["false_positive_rate"] == 0.0
        and audit["kappa"] == 1.0
        and audit["passed"]
    )
    # what the judge flags among the likely negatives are the unlabelled positives hidden there, counted
    # exactly
    hidden = audit["likely_flag_rate"]
    assert hidden is not None and audit["unlabelled_positive_estimate"] == hidden
    with (
        start_server(responder=Oracle(data, error_rate=0.4), models=(MODEL,)) as server,
        pytest.raises(AuditFailed, match=r"below --min-agreement 0\.4"),
    ):
        relabel.run(cfg(mined, tmp_path / "wrong", server, tmp_path, audit=40), log=lambda _: None)
    wrong = json.loads((tmp_path / "wrong" / AUDIT_FILE).read_text())
    assert (
        0.45 <= wrong["recall"] <= 0.75
        and 0.25 <= wrong["false_positive_rate"] <= 0.55
        and wrong["kappa"] < 0.4
    )
