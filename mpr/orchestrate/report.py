"""The run report of `mpr run`: RUN/report.md with what each stage produced, how the LLM changed the
labels, the training curve and the evaluation against the starting model."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow.parquet as pq

from mpr import __version__
from mpr.orchestrate.layout import SINGLE_POSITIVE, eval_file, model_folders, model_name
from mpr.orchestrate.machine import hardware
from mpr.orchestrate.stages import REGISTRY, RELABEL, TRAIN
from pipeline.data.shards import read_manifest, shard_files
from pipeline.formatting import number, p_clause, summary_value
from pipeline.redact import redact
from pipeline.stages.audit import report_lines as audit_report_lines

if TYPE_CHECKING:
    from mpr.orchestrate.experiment import Experiment
    from train.config import TrainConfig


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    """A Markdown table of cells already formatted (`pipeline.formatting.number`)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _stage_section(name: str, folder: Path) -> list[str]:
    manifest = read_manifest(folder) if folder.exists() else None
    if manifest is None:
        return []
    summary = {
        k: v
        for k, v in manifest.summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v
    }
    lines = [
        f"### {name}: `{folder}`",
        "",
        f"{len(manifest.shards)} part(s), complete: {manifest.complete}.",
        "",
    ]
    lines += _table([[k, summary_value(k, v)] for k, v in summary.items()], ["summary", "value"])
    return [*lines, ""]


def _label_changes(folder: Path, simulated: bool = False) -> list[str]:
    changes: Counter[tuple[str, str]] = Counter()
    for path in shard_files(folder):
        table = pq.read_table(path, columns=["prior_label", "label", "error"])
        for prior, label, error in zip(
            *(table.column(c).to_pylist() for c in ("prior_label", "label", "error"))
        ):
            after = "failed" if error else "null" if label is None else str(label)
            changes[("null" if prior is None else str(prior), after)] += 1
    rows = [[f"{a} -> {b}", number(n, "count")] for (a, b), n in sorted(changes.items())]
    judge = "the SIMULATED judge (an oracle over the qrels, not an LLM)" if simulated else "the LLM"
    return [
        f"How {judge} changed the labels (label before -> after; rows the mode dropped are not listed):",
        "",
        *_table(rows, ["change", "rows"]),
        "",
    ]


def _training_curve(record: dict[str, Any], png: Path) -> bool:
    steps = [(e["step"], e["loss"]) for e in record["log_history"] if "loss" in e and "step" in e]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in steps], [float(v) for _, v in steps], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{record['config']['loss']} loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


SATURATED = 0.99  # both scores at or above: the collection is too easy to tell the models apart
MIN_QUERIES = (
    10  # fewer paired queries: too few for a test (a randomization test needs 6 to reach p < 0.05 at all)
)
ALPHA = 0.05


def _ndcg(result: dict[str, Any]) -> dict[str, float]:
    """nDCG@10 per query of one model's result in an `mpr eval` JSON report."""
    return {q: m["ndcg@10"] for q, m in result["per_query"].items()}


def _pair_sentence(
    name_a: str, a: dict[str, float], name_b: str, b: dict[str, float], tests: int
) -> tuple[list[str], str]:
    """One row of the comparison table and the sentence that says what it means, for nDCG@10 per query."""
    from pipeline.retrieval.metrics import paired_tests

    qids = [
        q for q in a if q in b
    ]  # the order of the evaluation, so that its randomization samples are the same
    xs, ys = [a[q] for q in qids], [b[q] for q in qids]
    mean_a = sum(xs) / len(xs) if xs else float("nan")
    mean_b = sum(ys) / len(ys) if ys else float("nan")
    delta = mean_a - mean_b
    p_t, p_r = paired_tests(xs, ys)
    wins, losses = sum(x > y for x, y in zip(xs, ys)), sum(x < y for x, y in zip(xs, ys))
    row = [
        f"{name_a} vs {name_b}",
        number(mean_a, "metric"),
        number(mean_b, "metric"),
        number(delta, "delta"),
        f"{wins}/{losses}/{len(qids) - wins - losses}",
        number(p_r, "p"),
        number(p_t, "p"),
    ]
    words = (
        f"{name_a} vs {name_b}: nDCG@10 {number(mean_a, 'metric')} vs {number(mean_b, 'metric')} "
        f"({number(delta, 'delta')}) "
        f"over {number(len(qids), 'count')} held-out queries; "
    )
    if len(qids) < MIN_QUERIES:
        words += (
            f"WARNING: {len(qids)} queries are too few for a paired test "
            f"(at least {MIN_QUERIES} needed); no conclusion."
        )
    elif p_r is not None and p_r < ALPHA:
        better = name_a if delta > 0 else name_b
        words += (
            f"the difference is significant (paired randomization test {p_clause(p_r)}): {better} is better"
            + (
                (
                    f", and it stays significant after a Bonferroni correction for {tests} tests "
                    f"(p < {ALPHA / tests:.4f})."
                )
                if tests > 1 and p_r < ALPHA / tests
                else (
                    f", though not after a Bonferroni correction for {tests} tests (p < {ALPHA / tests:.4f})."
                )
                if tests > 1
                else "."
            )
        )
    else:
        words += (
            (
                f"the difference is NOT significant ({p_clause(p_r)} >= {ALPHA}): "
                "this data cannot tell them apart."
            )
            if p_r is not None
            else "no test possible."
        )
    if xs and mean_a >= SATURATED and mean_b >= SATURATED:
        words += (
            f" WARNING: both scores are >= {SATURATED}: saturated, "
            "the collection is too easy to separate them."
        )
    return row, words


def _comparison_section(out: Path, loss: str) -> list[str]:
    """Zero-shot, single-positive and relabeled models on the held-out queries, every pair tested
    (nDCG@10)."""
    main_eval, single = eval_file(out, loss), eval_file(out, SINGLE_POSITIVE)
    if not (single.exists() and main_eval.exists()):
        return []
    ev, sp = json.loads(main_eval.read_text()), json.loads(single.read_text())
    if not ev.get("baseline"):
        return []
    models = {
        "zero-shot": _ndcg(ev["baseline"]),
        "single-positive InfoNCE": _ndcg(sp["result"]),
        f"relabeled ({loss})": _ndcg(ev["result"]),
    }
    names = list(models)
    pairs = [(names[2], names[1]), (names[2], names[0]), (names[1], names[0])]
    rows, words = [], []
    for a, b in pairs:
        row, sentence = _pair_sentence(a, models[a], b, models[b], len(pairs))
        rows.append(row)
        words.append(f"- {sentence}")
    lines = [
        "## Does relabeling help? Zero-shot, single-positive and relabeled models",
        "",
        f"nDCG@10 on the {number(ev['queries'], 'count')} held-out queries of `{ev['data']}` "
        f"({ev['split']}); wins/losses/ties count "
        "queries; p: two-sided paired randomization test over queries (t-test beside it).",
        "",
    ]
    lines += _table(
        rows,
        ["comparison", "first", "second", "delta", "wins/losses/ties", "p (randomization)", "p (paired t)"],
    )
    return [*lines, "", *words, ""]


def _seed_line(out: Path) -> list[str]:
    seeds = {}
    for model_dir in model_folders(out):
        record = model_dir / "mpr" / "train.json"
        if record.exists():
            seeds[model_dir.name] = json.loads(record.read_text())["config"].get("seed")
    if not seeds:
        return []
    values = sorted({str(v) for v in seeds.values()})
    return [
        f"- training seed: {', '.join(values)} (`train.seed`, the same for every model; one run per model, "
        "no seed was chosen after seeing a result)"
    ]


def write_report(experiment: Experiment, *, log: Callable[[str], None] = print) -> Path:
    out = experiment.out
    spec = experiment.spec
    lines = [
        f"# mpr run report: `{out}`",
        "",
        (
            f"- written {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
            f"by mpr {__version__} on {hardware()['summary']}"
        ),
        (
            f"- data `{spec.data}` (split `{spec.split}`), stages: {', '.join(spec.stages)}; "
            "the experiment file is `experiment.toml`"
        ),
        *_seed_line(out),
        "",
    ]
    if (out / "TEST_SERVER_LABELS").exists():
        lines += [f"> {(out / 'TEST_SERVER_LABELS').read_text().strip()}", ""]
    lines += ["## What each stage produced", ""]
    for stage in (s for s in REGISTRY.values() if s.folder is not None):
        folder = stage.out(out)
        lines += _stage_section(stage.name, folder)
        if stage is RELABEL:
            lines += audit_report_lines(folder)
            if folder.exists() and (m := read_manifest(folder)) and m.shards:
                lines += _label_changes(folder, simulated=(out / "TEST_SERVER_LABELS").exists())
    for model_dir in model_folders(out):
        record_path = model_dir / "mpr" / "train.json"
        if not record_path.exists():
            continue
        record = json.loads(record_path.read_text())
        s = record["summary"]
        lines += [
            f"## Training: `{model_dir.name}`",
            "",
            f"Loss `{record['config']['loss']}`, {number(s['groups'], 'count')} groups, "
            f"{number(s['steps'], 'count')} steps, "
            f"loss {number(s['first_loss'], 'metric')} -> {number(s['final_loss'], 'metric')}, "
            f"{number(s['seconds'], 'seconds')}.",
            "",
        ]
        png = out / f"{model_dir.name}-training.png"
        if _training_curve(record, png):
            lines += [f"![training loss]({png.name})", ""]
        report = eval_file(out, model_name(model_dir))
        if report.exists():
            ev = json.loads(report.read_text())
            lines += [
                f"### Evaluation on `{ev['data']}` ({ev['split']}, {number(ev['queries'], 'count')} queries)",
                "",
            ]
            if ev.get("comparison"):
                rows = [
                    [
                        c["metric"],
                        number(c["model"], "metric"),
                        number(c["baseline"], "metric"),
                        number(c["delta"], "delta"),
                        number(c["p_ttest"], "p"),
                    ]
                    for c in ev["comparison"]
                ]
                lines += _table(
                    rows,
                    ["metric", model_dir.name, f"start ({ev['baseline']['model']})", "delta", "p (paired t)"],
                )
                _, sentence = _pair_sentence(
                    model_dir.name, _ndcg(ev["result"]), "the starting model", _ndcg(ev["baseline"]), 1
                )
                lines += ["", sentence]
            else:
                lines += _table(
                    [[m, number(v, "metric")] for m, v in ev["result"]["metrics"].items()],
                    ["metric", model_dir.name],
                )
            lines.append("")
    if spec.single_positive:
        loss = cast("TrainConfig", experiment.config(TRAIN)).loss
        lines += _comparison_section(out, loss)
    path = out / "report.md"
    path.write_text(redact("\n".join(lines)) + "\n")
    log(f"report: {path}")
    return path
