"""The study's report: study.md, study.json and study.png from the stored cells."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpr.orchestrate.report import ALPHA, MIN_QUERIES
from mpr.orchestrate.study.config import (
    ALL_LOSSES,
    BASELINE,
    LABELS,
    LISTWISE,
    METRICS,
    MULTI_POSITIVE,
    PLOT_NAMES,
    ROW_NAMES,
    ZERO_SHOT,
    Cell,
    Paths,
    StudyConfig,
    _title,
    write_json_atomic,
)
from pipeline.formatting import number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# -- report ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _secs(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return f"{statistics.fmean(got):.0f}" if got else "–"


def _judge_line(rows: list[dict[str, Any]], error_rates: Sequence[float]) -> str:
    parts = []
    for e in error_rates:
        by_fold: dict[tuple[str, int], dict[str, Any]] = {}
        for row in rows:
            if row["error_rate"] == e:
                for fold, stats in row["judge"].items():
                    by_fold[(stats["mode"], fold)] = stats
        listwise = [v for (mode, _), v in by_fold.items() if mode == LISTWISE] or list(by_fold.values())
        judged, flagged = sum(v["judged"] for v in listwise), sum(v["flagged"] for v in listwise)
        failed = sum(v["failed"] for v in by_fold.values())
        if judged:
            parts.append(
                f"e={_err(e)}: {flagged:,} of {judged:,} hard negatives flagged relevant "
                f"({flagged / judged:.1%})" + (f", {failed:,} judgments failed" if failed else "")
            )
    return "; ".join(parts)


def _err(error_rate: float | None) -> str:
    return (
        "–"
        if error_rate is None
        else f"{error_rate:.1f}"
        if round(error_rate, 1) == error_rate
        else f"{error_rate:.2f}"
    )


def collect(cfg: StudyConfig, paths: Paths, cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (dataset, loss, error rate) with per-fold values of each metric."""
    rows: dict[tuple[str, str, float | None], dict[str, Any]] = {}
    for cell in cells:
        path = paths.cell(cell)
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        key = (cell.dataset, cell.loss, cell.error_rate)
        row = rows.setdefault(
            key,
            {
                "dataset": cell.dataset,
                "loss": cell.loss,
                "error_rate": cell.error_rate,
                "folds": [],
                "metrics": {m: [] for m in METRICS},
                "hardware": [],
                "train_seconds": [],
                "eval_seconds": [],
                "cell_seconds": [],
                "judge": {},
                "per_query": {},
                "computed_by": [],
            },
        )
        row["folds"].append(cell.fold)
        row["per_query"][cell.fold] = record["eval"]["per_query_ndcg@10"]
        for m in METRICS:
            row["metrics"][m].append(record["eval"]["metrics"][m])
        if record["hardware"] not in row["hardware"]:
            row["hardware"].append(record["hardware"])
        if record.get("train"):
            row["train_seconds"].append(record["train"].get("seconds"))
        row["eval_seconds"].append(record["eval"]["seconds"])
        row["cell_seconds"].append(record["seconds"])
        row["computed_by"].append({"command": record.get("command"), "finished": record["finished"]})
        if record.get("judge"):
            row["judge"][cell.fold] = record["judge"]
    out = []
    for row in rows.values():
        row["summary"] = {m: dict(zip(("mean", "std"), _mean_std(v))) for m, v in row["metrics"].items()}
        out.append(row)
    return out


def _row(
    rows: list[dict[str, Any]], dataset: str, loss: str, error_rate: float | None
) -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["dataset"], r["loss"], r["error_rate"]) == (dataset, loss, error_rate)), None
    )


def _value(rows: list[dict[str, Any]], dataset: str, loss: str, error_rate: float | None) -> dict[int, float]:
    row = _row(rows, dataset, loss, error_rate)
    return dict(zip(row["folds"], row["metrics"]["ndcg@10"])) if row else {}


def _per_query(
    rows: list[dict[str, Any]], dataset: str, loss: str, error_rate: float | None
) -> dict[tuple[str, Any, str], float]:
    row = _row(rows, dataset, loss, error_rate)
    if row is None:
        return {}
    return {
        (dataset, fold, qid): v
        for fold, per_query in row["per_query"].items()
        for qid, v in per_query.items()
    }


REFERENCES = {"vs_baseline": BASELINE, "vs_zero_shot": ZERO_SHOT}


def findings(cfg: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers behind the paper's claims (nDCG@10): deltas paired by fold, and a paired test over the
    held-out queries pooled over folds and datasets (every query is held out in exactly one fold)."""
    from pipeline.retrieval.metrics import paired_tests

    errors = sorted(cfg.error_rates)
    losses = [loss for loss in ALL_LOSSES if loss in cfg.losses]
    out: dict[str, Any] = {**{name: {} for name in REFERENCES}, "drop": {}, "mean_rank": {}}
    for loss in losses:
        for e in errors:
            for name, reference in REFERENCES.items():
                deltas, a, b = [], [], []
                for dataset in cfg.datasets:
                    base, got = _value(rows, dataset, reference, None), _value(rows, dataset, loss, e)
                    deltas += [got[f] - base[f] for f in got if f in base]
                    qbase, qgot = (
                        _per_query(rows, dataset, reference, None),
                        _per_query(rows, dataset, loss, e),
                    )
                    common = sorted(set(qgot) & set(qbase), key=str)
                    a += [qgot[k] for k in common]
                    b += [qbase[k] for k in common]
                if deltas:
                    p_t, p_r = paired_tests(a, b)
                    out[name].setdefault(loss, {})[f"{e:.2f}"] = {
                        "mean_delta": statistics.fmean(deltas),
                        "wins": sum(d > 0 for d in deltas),
                        "n": len(deltas),
                        "queries": len(a),
                        "p_ttest": p_t,
                        "p_randomization": p_r,
                    }
        if len(errors) > 1:
            drops = []
            for dataset in cfg.datasets:
                lo, hi = _value(rows, dataset, loss, errors[0]), _value(rows, dataset, loss, errors[-1])
                drops += [hi[f] - lo[f] for f in hi if f in lo]
            if drops:
                out["drop"][loss] = {
                    "mean": statistics.fmean(drops),
                    "n": len(drops),
                    "from": errors[0],
                    "to": errors[-1],
                }
    ranks: dict[str, list[int]] = {loss: [] for loss in losses}
    for dataset in cfg.datasets:
        for e in errors:
            values = {loss: _value(rows, dataset, loss, e) for loss in losses}
            for f in sorted({f for v in values.values() for f in v}):
                ran = [loss for loss in losses if f in values[loss]]
                if len(ran) < 2:
                    continue
                for rank, loss in enumerate(sorted(ran, key=lambda loss: -values[loss][f]), start=1):
                    ranks[loss].append(rank)
    out["mean_rank"] = {loss: statistics.fmean(r) for loss, r in ranks.items() if r}
    return out


def _delta_cell(got: dict[str, Any] | None) -> str:
    if not got:
        return "–"
    p = got["p_randomization"]
    return f"{got['mean_delta']:+.4f} ({got['wins']}/{got['n']}" + (
        f", p {number(p, 'p')})" if p is not None else ")"
    )


def _findings_md(cfg: StudyConfig, found: dict[str, Any]) -> list[str]:
    errors = sorted(cfg.error_rates)
    losses = [loss for loss in ALL_LOSSES if loss in cfg.losses]
    lines = [
        "## The paper's claims, as this data answers them",
        "",
        "nDCG@10. Δ is the loss minus the reference, paired by fold and pooled over the datasets above "
        "(wins: folds where the loss is better, of n); p is a two-sided paired randomization test over the "
        "held-out queries of those folds (each query is held out once; the t-test's p is in study.json). "
        "The change is from the lowest to the highest error rate; the rank is among the losses run, per "
        "(dataset, fold, error rate). Read them with the number of folds and the spread in the tables.",
        "",
    ]
    for name, title in (
        ("vs_baseline", "the single-positive baseline"),
        ("vs_zero_shot", "the zero-shot model"),
    ):
        head = [f"e={_err(e)}" for e in errors]
        if name == "vs_baseline":
            head += ([f"change e={_err(errors[0])}→{_err(errors[-1])}"] if len(errors) > 1 else []) + [
                "mean rank"
            ]
        lines += [
            f"Against {title}:",
            "",
            "| loss | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(head),
        ]
        for loss in losses:
            cells = [_delta_cell(found[name].get(loss, {}).get(f"{e:.2f}")) for e in errors]
            if name == "vs_baseline":
                if len(errors) > 1:
                    drop = found["drop"].get(loss)
                    cells.append(f"{drop['mean']:+.4f}" if drop else "–")
                rank = found["mean_rank"].get(loss)
                cells.append(f"{rank:.2f}" if rank is not None else "–")
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
        lines.append("")
    multi = [loss for loss in MULTI_POSITIVE if loss in found["vs_baseline"]]
    for e in errors:
        ran = [loss for loss in multi if f"{e:.2f}" in found["vs_baseline"][loss]]
        got = [found["vs_baseline"][loss][f"{e:.2f}"] for loss in ran]
        if got:
            wins, n = sum(g["wins"] for g in got), sum(g["n"] for g in got)
            mean = statistics.fmean(g["mean_delta"] for g in got)
            lines.append(
                f"- Multi-positive objectives ({', '.join(ran)}) vs the single-positive baseline at error "
                f"{_err(e)}: better in {wins} of {n} cells, mean Δ nDCG@10 {mean:+.4f}."
            )
    for name, title in (
        ("vs_zero_shot", "the zero-shot model"),
        ("vs_baseline", "single-positive InfoNCE (the baseline)"),
    ):
        significant, not_significant, too_few = [], [], []
        for loss in losses:
            for e in errors:
                got = found[name].get(loss, {}).get(f"{e:.2f}")
                if not got:
                    continue
                what = (
                    f"{loss} at e={_err(e)} "
                    f"({got['mean_delta']:+.4f}, p {number(got['p_randomization'], 'p')})"
                    if got["p_randomization"] is not None
                    else loss
                )
                if got["queries"] < MIN_QUERIES:
                    too_few.append(what)
                elif got["p_randomization"] is not None and got["p_randomization"] < ALPHA:
                    significant.append(what)
                else:
                    not_significant.append(what)
        if significant or not_significant or too_few:
            lines.append(
                f"- Against {title}, over the pooled held-out queries: significant at p < {ALPHA} "
                "(two-sided paired randomization test, no correction for the "
                f"{len(significant) + len(not_significant)} tests): "
                f"{'; '.join(significant) or 'none'}. "
                f"Not significant: {'; '.join(not_significant) or 'none'}."
                + (f" Too few queries (< {MIN_QUERIES}) for a test: {'; '.join(too_few)}." if too_few else "")
            )
    if found["drop"]:
        order = sorted(found["drop"].items(), key=lambda kv: -kv[1]["mean"])
        lines.append(
            f"- Most robust to judge errors (smallest loss of nDCG@10): {order[0][0]}; "
            f"most sensitive: {order[-1][0]}."
        )
    return [*lines, ""]


def _provenance(rows: list[dict[str, Any]]) -> list[str]:
    """The commands that computed the cells of `rows`: cells, their wall time and when they finished, per
    command."""
    by: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        for who, seconds in zip(row["computed_by"], row["cell_seconds"]):
            got = by.setdefault(who["command"], {"cells": 0, "seconds": 0.0, "finished": []})
            got["cells"] += 1
            got["seconds"] += seconds
            got["finished"].append(who["finished"].replace("T", " "))
    lines = []
    for command, got in sorted(by.items(), key=lambda kv: min(kv[1]["finished"])):
        what = f"`{command}`" if command else "a run that did not record its command"
        lines.append(
            f"- {what}: {got['cells']} cell{'s' if got['cells'] != 1 else ''}, "
            f"{got['seconds']:.0f}s, finished "
            f"{min(got['finished'])} to {max(got['finished'])}"
        )
    return lines


def write_study_report(
    cfg: StudyConfig, paths: Paths, cells: list[Cell], meta: dict[str, Any]
) -> dict[str, Any]:
    """`meta` describes this invocation; each cell names the command that computed it."""
    rows = collect(cfg, paths, cells)
    found = findings(cfg, rows)
    hardware_ids: dict[str, str] = {}
    for row in rows:
        row["hardware_ids"] = [
            hardware_ids.setdefault(h, f"hw{len(hardware_ids) + 1}") for h in row["hardware"]
        ]
    computed = meta["computed"]
    this_run = (
        f"; it computed {computed} cell{'s' if computed != 1 else ''} in {meta['seconds']:.0f}s (stages: "
        f"{', '.join(f'{k} {v:.0f}s' for k, v in meta['stage_seconds'].items()) or 'none'})"
        if computed
        else ""
    )
    lines = [
        f"# mpr loss study ({_title(cfg)})",
        "",
        f"Report written {meta['finished']} by `{meta['command']}`{this_run}.",
        "",
        f"The {sum(len(r['folds']) for r in rows)} cells below took "
        f"{sum(sum(r['cell_seconds']) for r in rows):.0f}s "
        "to compute (each cell's wall time, including the mining and relabeling it triggered)"
        + (", by:" if rows else "."),
        "",
        *_provenance(rows),
        *([""] if rows else []),
        "Settings (the same for every trained row): "
        + ", ".join(f"{k} {v}" for k, v in cfg.identity().items() if k not in ("fold_seed", "oracle_seed")),
        "",
        "Hardware each figure was measured on:",
        "",
    ]
    lines += [f"- {hid}: {h}" for h, hid in hardware_ids.items()] + [""]
    for dataset in cfg.datasets:
        drows = [r for r in rows if r["dataset"] == dataset]
        if not drows:
            continue
        folds = cfg.folds_of(dataset)
        how = (
            f"{cfg.folds}-fold CV over the judged queries (folds run: {', '.join(map(str, folds))}); "
            "train qrels keep "
            "one positive per query"
            if cfg.folded(dataset)
            else "train on `train`, test on `test` (one split)"
        )
        counts = meta.get("collections", {}).get(dataset)
        if counts:
            how += f". {counts['documents']:,} documents, {counts['queries']:,} queries" + (
                f"; skipped {counts['empty_documents']:,} empty document(s) "
                f"and {counts['empty_queries']:,} empty "
                f"quer{'y' if counts['empty_queries'] == 1 else 'ies'}, "
                f"and the {counts['judgments_dropped']:,} "
                "judgment(s) pointing at them"
                if counts["empty_documents"] or counts["empty_queries"]
                else ""
            )
        lines += [
            f"## {dataset}",
            "",
            f"{how}. Mean ± sample std over folds.",
            "",
            "| model | error rate | folds | "
            + " | ".join(LABELS[m] for m in METRICS)
            + " | train s | eval s | hardware |",
            "|---|---|---|" + "---|" * len(METRICS) + "---|---|---|",
        ]
        order = [(ZERO_SHOT, None), (BASELINE, None)] + [
            (loss, e) for loss in cfg.losses for e in cfg.error_rates
        ]
        for loss, e in order:
            got = next((r for r in drows if (r["loss"], r["error_rate"]) == (loss, e)), None)
            if got is None:
                continue
            lines.append(
                f"| {ROW_NAMES.get(loss, loss)} | {_err(e)} | {len(got['folds'])} | "
                + " | ".join(_fmt(got["metrics"][m]) for m in METRICS)
                + f" | {_secs(got['train_seconds'])} | {_secs(got['eval_seconds'])} "
                f"| {', '.join(got['hardware_ids'])} |"
            )
        judged = _judge_line(drows, cfg.error_rates)
        if judged:
            lines += ["", f"Judge (oracle over the full qrels), pooled over folds: {judged}."]
        lines += ["", *_by_error_rate(cfg, rows, dataset), ""]
    lines += _findings_md(cfg, found)
    lines += [
        "Protocol: see `mpr study --help` and the docstring of `mpr/orchestrate/study.py`. "
        "Zero-shot and baseline do not depend on the error rate."
    ]
    markdown = "\n".join(lines) + "\n"
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "study.md").write_text(markdown, encoding="utf-8")
    payload = {
        "config": {**cfg.model_dump(mode="json"), "datasets": list(cfg.datasets)},
        "meta": meta,
        "hardware": {v: k for k, v in hardware_ids.items()},
        "rows": [{k: v for k, v in r.items() if k != "hardware"} for r in rows],
        "findings": found,
    }
    write_json_atomic(paths.out / "study.json", payload)
    plot(cfg, rows, paths.out / "study.png")
    return {"markdown": markdown, "rows": rows}


def _all_folds(rows: list[dict[str, Any]], dataset: str) -> int:
    """The folds a cell of `dataset` has once it is complete: the most any of its cells has."""
    return max((len(r["folds"]) for r in rows if r["dataset"] == dataset), default=0)


def _by_error_rate(cfg: StudyConfig, rows: list[dict[str, Any]], dataset: str) -> list[str]:
    """The table of mean nDCG@10 per loss and error rate; a cell still missing folds says how many it has."""
    full = _all_folds(rows, dataset)

    def mean(vals: dict[int, float]) -> str:
        if not vals:
            return "–"
        return f"{statistics.fmean(vals.values()):.4f}" + (
            "" if len(vals) == full else f" ({len(vals)} of {full} folds)"
        )

    lines = [
        f"nDCG@10 against the judge's error rate ({dataset}):",
        "",
        "| loss | " + " | ".join(f"e={_err(e)}" for e in cfg.error_rates) + " |",
        "|---|" + "---|" * len(cfg.error_rates),
    ]
    for loss in [ZERO_SHOT, BASELINE]:
        vals = _value(rows, dataset, loss, None)
        if vals:
            lines.append(f"| {loss} | " + " | ".join(mean(vals) for _ in cfg.error_rates) + " |")
    for loss in cfg.losses:
        lines.append(
            f"| {loss} | " + " | ".join(mean(_value(rows, dataset, loss, e)) for e in cfg.error_rates) + " |"
        )
    return lines


def figure(cfg: StudyConfig, rows: list[dict[str, Any]]) -> Figure:
    """nDCG@10 against the judge's error rate, one panel per collection; a loss has one colour in every
    panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {loss: f"C{i % 10}" for i, loss in enumerate(cfg.losses)}
    datasets = [d for d in cfg.datasets if any(r["dataset"] == d for r in rows)] or list(cfg.datasets)
    width = 4.6 * len(datasets) + 2.8
    fig, axes = plt.subplots(1, len(datasets), figsize=(width, 4.4), squeeze=False)
    errors = sorted(cfg.error_rates)
    for ax, dataset in zip(axes[0], datasets):
        folds = _all_folds(rows, dataset)
        partial = False  # a mean over fewer folds is not comparable with its neighbours: not drawn
        for loss in cfg.losses:
            xs, ys, es = [], [], []
            for e in errors:
                vals = list(_value(rows, dataset, loss, e).values())
                partial |= 0 < len(vals) < folds
                if len(vals) == folds:
                    mean, std = _mean_std(vals)
                    xs.append(e)
                    ys.append(mean)
                    es.append(std or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=loss, color=colours[loss])
        for reference, style in ((ZERO_SHOT, ":"), (BASELINE, "--")):
            vals = list(_value(rows, dataset, reference, None).values())
            if vals:
                ax.axhline(
                    statistics.fmean(vals),
                    color="grey" if reference == ZERO_SHOT else "black",
                    linestyle=style,
                    label=PLOT_NAMES[reference],
                )
        ax.set_title(
            f"{dataset} ({folds} fold{'s' if folds != 1 else ''}"
            + ("; cells missing folds not drawn)" if partial else ")"),
            fontsize=10 if partial else None,
        )
        ax.set_xlabel("judge error rate")
        ax.set_ylabel("nDCG@10 (mean ± std over folds)")
        ax.set_xticks(errors)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}  # every loss and reference of any panel, once
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [
        label for label in (PLOT_NAMES[ZERO_SHOT], PLOT_NAMES[BASELINE], *cfg.losses) if label in legend
    ]
    fig.legend([legend[label] for label in labels], labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(
        f"mpr loss study: {cfg.model.split('/')[-1]},\n{cfg.steps} steps x batch {cfg.batch_size}, "
        f"max_seq_length {cfg.max_seq_length}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / width, 1))
    return fig


def plot(cfg: StudyConfig, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(cfg, rows)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
