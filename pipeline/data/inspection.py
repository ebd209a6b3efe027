"""`mpr inspect` (what is in a shard folder) and `mpr validate` (is it a valid one)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.schema import SCHEMA, SOURCES
from pipeline.data.shards import (
    MANIFEST,
    iter_groups,
    read_manifest,
    read_shards,
    sha256_file,
    shard_files,
    verify_shards,
)
from pipeline.errors import MprError


def _distribution(values: list[int] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {}
    return {
        "min": float(arr.min()),
        "p50": float(np.percentile(arr, 50)),
        "mean": round(float(arr.mean()), 3),
        "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()),
    }


def inspect_shards(folder: str | Path, *, samples: int = 3) -> dict[str, Any]:
    table = read_shards(folder)
    manifest = read_manifest(folder)
    by = table.group_by(["source", "label"]).aggregate([("qid", "count")])
    counts = sorted(
        (
            {"source": s, "label": label, "rows": n}
            for s, label, n in zip(*(by.column(c).to_pylist() for c in ("source", "label", "qid_count")))
        ),
        key=lambda r: (str(r["source"]), -1 if r["label"] is None else r["label"]),
    )
    qids = table.column("qid")
    positive = pc.fill_null(pc.equal(table.column("label"), 1), False)
    per_query = Counter(qids.to_pylist())
    pos_per_query = Counter(pc.filter(qids, positive).to_pylist())
    report: dict[str, Any] = {
        "folder": str(folder),
        "stage": manifest.stage if manifest else None,
        "complete": manifest.complete if manifest else None,
        "shards": len(shard_files(folder)),
        "rows": table.num_rows,
        "queries": len(per_query),
        "counts": counts,
        "positives_per_query": _distribution([pos_per_query.get(q, 0) for q in per_query]),
        "rows_per_query": _distribution(list(per_query.values())),
    }
    if "source" in table.column_names:
        candidates = Counter(pc.filter(qids, pc.equal(table.column("source"), "mined")).to_pylist())
        report["candidates_per_query"] = _distribution([candidates.get(q, 0) for q in per_query])
    grades = table.column("grade").drop_null().to_numpy(zero_copy_only=False)
    if grades.size:
        hist, edges = np.histogram(grades, bins=4, range=(0, 1))
        report["grades"] = {
            **_distribution(grades),
            "histogram": {
                f"[{a:.2f},{b:.2f}{']' if b == 1 else ')'}": int(n)
                for a, b, n in zip(edges[:-1], edges[1:], hist)
            },
        }
    levels = table.column("level").drop_null().to_pylist()
    if levels:
        report["levels"] = {str(k): v for k, v in sorted(Counter(levels).items())}
    if "filter" in table.column_names:
        report["filters"] = dict(sorted(Counter(table.column("filter").drop_null().to_pylist()).items()))
    if "prior_label" in table.column_names:
        pairs = Counter(zip(table.column("prior_label").to_pylist(), table.column("label").to_pylist()))
        report["label_changes"] = {
            f"{'null' if a is None else a} -> {'null' if b is None else b}": n
            for (a, b), n in sorted(pairs.items(), key=str)
        }
        report["failed"] = table.column("error").drop_null().length() if "error" in table.column_names else 0
    try:
        verify_shards(folder)
        report["integrity"] = "ok"
    except MprError as exc:  # inspect still shows what is there; training would refuse it
        report["integrity"] = str(exc)
    if manifest and manifest.summary:
        report["summary"] = manifest.summary
    step = max(1, table.num_rows // max(samples, 1))
    cols = [
        c
        for c in (
            "qid",
            "pid",
            "source",
            "rank",
            "score",
            "label",
            "grade",
            "level",
            "judge",
            "query",
            "text",
        )
        if c in table.column_names
    ]
    report["samples"] = [
        {
            c: (
                v[:80] + "…"
                if isinstance(v, str) and len(v) > 80
                else round(v, 4)
                if isinstance(v, float)
                else v
            )
            for c, v in table.slice(i, 1).select(cols).to_pylist()[0].items()
        }
        for i in range(0, table.num_rows, step)
    ][:samples]
    return report


def validate_shards(folder: str | Path) -> list[str]:
    """Every violation of the shard contract, as one line each (empty when the folder is valid)."""
    folder = Path(folder)
    errors: list[str] = []
    files = shard_files(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        errors.append(f"{folder}/{MANIFEST}: missing")
    elif not manifest.complete:
        errors.append(f"{folder}/{MANIFEST}: run is not complete (resume it by rerunning the stage)")
    listed = {s.name: s for s in manifest.shards} if manifest else {}
    seen_in: dict[str, str] = {}
    for path in files:
        name = path.name
        try:
            table = pq.read_table(path)
        except Exception as exc:
            errors.append(f"{path}: unreadable Parquet ({exc})")
            continue
        for field in SCHEMA:
            if field.name not in table.column_names:
                errors.append(f"{path}: missing column '{field.name}'")
            elif not table.schema.field(field.name).type.equals(field.type):
                errors.append(
                    f"{path}: column '{field.name}' is {table.schema.field(field.name).type}, "
                    f"expected {field.type}"
                )
            elif not field.nullable and table.column(field.name).null_count:
                errors.append(
                    f"{path}: column '{field.name}' has {table.column(field.name).null_count} nulls"
                )
        if any(e.startswith(str(path)) for e in errors):
            continue
        bad_sources = set(table.column("source").to_pylist()) - set(SOURCES)
        if bad_sources:
            errors.append(f"{path}: unknown source value(s) {sorted(bad_sources)}")
        labels = set(table.column("label").drop_null().to_pylist()) - {0, 1}
        if labels:
            errors.append(f"{path}: label values {sorted(labels)} (allowed: 0, 1, null)")
        grades = table.column("grade").drop_null()
        if len(grades) and (pc.min(grades).as_py() < 0 or pc.max(grades).as_py() > 1):
            errors.append(f"{path}: grade outside [0, 1]")
        for qid, rows in iter_groups(table):
            if qid in seen_in:
                where = (
                    "in another place of the same shard"
                    if seen_in[qid] == name
                    else f"also in {seen_in[qid]}"
                )
                errors.append(f"{path}: query '{qid}' rows are not contiguous ({where})")
                continue
            seen_in[qid] = name
            labelled: dict[str, set[int]] = {}
            for pid, label in zip(rows.column("pid").to_pylist(), rows.column("label").to_pylist()):
                if label is not None:
                    labelled.setdefault(pid, set()).add(label)
            both = sorted(p for p, ls in labelled.items() if ls == {0, 1})
            if both:
                errors.append(f"{path}: query '{qid}' has passage(s) {both[:3]} both positive and negative")
        if manifest:
            info = listed.pop(name, None)
            if info is None:
                errors.append(f"{path}: not listed in {MANIFEST}")
            else:
                if info.rows != table.num_rows:
                    errors.append(f"{path}: {table.num_rows} rows, manifest says {info.rows}")
                if info.bytes is not None and info.bytes != path.stat().st_size:
                    errors.append(f"{path}: {path.stat().st_size} bytes, manifest says {info.bytes}")
                if info.sha256 != sha256_file(path):
                    errors.append(f"{path}: checksum does not match {MANIFEST}")
    for name in listed:
        errors.append(f"{folder}/{name}: listed in {MANIFEST} but missing")
    return errors


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['folder']}: stage={report['stage']} complete={report['complete']} "
        f"shards={report['shards']} "
        f"rows={report['rows']:,} queries={report['queries']:,}",
        *([f"integrity: {report['integrity']}"] if report.get("integrity", "ok") != "ok" else []),
        "",
        "rows by source and label",
    ]
    for row in report["counts"]:
        label = "null" if row["label"] is None else row["label"]
        lines.append(f"  {row['source']:<10} label={label!s:<5} {row['rows']:>10,}")
    for key in ("positives_per_query", "candidates_per_query", "rows_per_query"):
        if report.get(key):
            dist = "  ".join(f"{k}={v:g}" for k, v in report[key].items())
            lines.append(f"{key.replace('_', ' '):<22} {dist}")
    if "grades" in report:
        g = report["grades"]
        lines.append(
            "grades                 " + "  ".join(f"{k}={v:g}" for k, v in g.items() if k != "histogram")
        )
        lines.append("  histogram            " + "  ".join(f"{k}: {v:,}" for k, v in g["histogram"].items()))
    if "levels" in report:
        lines.append(
            "levels                 " + "  ".join(f"{k}: {v:,}" for k, v in report["levels"].items())
        )
    if report.get("filters"):
        lines.append(
            "filtered candidates    " + "  ".join(f"{k}: {v:,}" for k, v in report["filters"].items())
        )
    if "label_changes" in report:
        lines.append(
            "label before -> after  " + "  ".join(f"{k}: {v:,}" for k, v in report["label_changes"].items())
        )
        lines.append(f"failed judgments       {report['failed']:,}")
    lines += ["", "sample rows"]
    for row in report["samples"]:
        lines.append("  " + " | ".join(f"{k}={v}" for k, v in row.items()))
    return "\n".join(lines)
