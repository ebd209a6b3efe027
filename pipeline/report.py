"""The run report of `mpr run`: RUN/report.md with what each stage produced, how the LLM changed the
labels, the training curve and the evaluation against the starting model."""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from mpr import __version__
from pipeline.audit import report_lines as audit_report_lines
from pipeline.redact import redact
from pipeline.shards import read_manifest, shard_files

if TYPE_CHECKING:
    from pipeline.experiment import Experiment


def _hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def summary_value(key: str, value: float) -> str:
    """A stage summary's number by its kind: time in seconds, a rate per second, a count with thousands
    separators, anything else (a share, a mean) with 4 decimals."""
    if key == "seconds" or key.endswith("_seconds") or (key.endswith("_s") and not key.endswith("per_s")):
        return f"{value:,.1f} s"
    if key.endswith("per_s"):
        return f"{value:,.1f}/s"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4f}"


def _table(rows: list[list[Any]], header: list[str]) -> list[str]:
    """A Markdown table; ints get thousands separators, floats (metrics) 4 decimals."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(f"{c:,}" if isinstance(c, int) else f"{c:.4f}" if isinstance(c, float) else str(c) for c in r) + " |" for r in rows]
    return out


def _stage_section(name: str, folder: Path) -> list[str]:
    manifest = read_manifest(folder) if folder.exists() else None
    if manifest is None:
        return []
    summary = {k: v for k, v in manifest.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v}
    lines = [f"### {name}: `{folder}`", "", f"{len(manifest.shards)} part(s), complete: {manifest.complete}.", ""]
    lines += _table([[k, summary_value(k, v)] for k, v in summary.items()], ["count", "value"])
    return [*lines, ""]


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _label_changes(folder: Path) -> list[str]:
    changes: Counter[tuple[str, str]] = Counter()
    for path in shard_files(folder):
        table = pq.read_table(path, columns=["prior_label", "label", "error"])
        for prior, label, error in zip(*(table.column(c).to_pylist() for c in ("prior_label", "label", "error"))):
            after = "failed" if error else "null" if label is None else str(label)
            changes[("null" if prior is None else str(prior), after)] += 1
    rows = [[f"{a} -> {b}", n] for (a, b), n in sorted(changes.items())]
    return ["How the LLM changed the labels (label before -> after; rows the mode dropped are not listed):", "", *_table(rows, ["change", "rows"]), ""]


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


def write_report(experiment: Experiment, *, log: Callable[[str], None] = print) -> Path:
    out = experiment.out
    spec = experiment.spec
    lines = [
        f"# mpr run report: `{out}`",
        "",
        f"- written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by mpr {__version__} on {_hardware()}",
        f"- data `{spec.data}` (split `{spec.split}`), stages: {', '.join(spec.stages)}; the experiment file is `experiment.toml`",
        "",
    ]
    if (out / "TEST_SERVER_LABELS").exists():
        lines += [f"> {(out / 'TEST_SERVER_LABELS').read_text().strip()}", ""]
    lines += ["## What each stage produced", ""]
    for name, folder in (("mine", "mined"), ("relabel", "relabeled"), ("synth", "synth")):
        lines += _stage_section(name, out / folder)
        if name == "relabel":
            lines += audit_report_lines(out / folder)
        if name == "relabel" and (out / folder).exists() and (m := read_manifest(out / folder)) and m.shards:
            lines += _label_changes(out / folder)
    for model_dir in sorted(out.glob("model-*")):
        record_path = model_dir / "mpr" / "train.json"
        if not record_path.exists():
            continue
        record = json.loads(record_path.read_text())
        s = record["summary"]
        lines += [f"## Training: `{model_dir.name}`", "",
                  f"Loss `{record['config']['loss']}`, {s['groups']:,} groups, {s['steps']:,} steps, "
                  f"loss {_loss(s['first_loss'])} -> {_loss(s['final_loss'])}, {summary_value('seconds', s['seconds'])}.", ""]
        png = out / f"{model_dir.name}-training.png"
        if _training_curve(record, png):
            lines += [f"![training loss]({png.name})", ""]
        report = out / f"eval-{record['config']['loss']}.json"
        if report.exists():
            ev = json.loads(report.read_text())
            lines += [f"### Evaluation on `{ev['data']}` ({ev['split']}, {ev['queries']:,} queries)", ""]
            if ev.get("comparison"):
                rows = [[c["metric"], c["model"], c["baseline"], f"{c['delta']:+.4f}", c["p_ttest"] if c["p_ttest"] is not None else "-"]
                        for c in ev["comparison"]]
                lines += _table(rows, ["metric", model_dir.name, f"start ({ev['baseline']['model']})", "delta", "p (paired t)"])
            else:
                lines += _table([[m, v] for m, v in ev["result"]["metrics"].items()], ["metric", model_dir.name])
            lines.append("")
    path = out / "report.md"
    path.write_text(redact("\n".join(lines)) + "\n")
    log(f"report: {path}")
    return path
