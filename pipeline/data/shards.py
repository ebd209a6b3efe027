"""Shard folders: atomic Parquet parts plus a manifest that makes every stage resumable.

A folder holds `part-00000.parquet`, `part-00001.parquet`, ... and `_manifest.json` (and
`_failures.jsonl` where rows failed). The leading `_` is the Hadoop/Spark convention for metadata, so
pandas, pyarrow.dataset, duckdb and `datasets.load_dataset` read the folder by its path; folders
written before that (`manifest.json`, `failures.jsonl`) are still read. Each part holds whole queries
with their rows contiguous. Parts are written to a temporary name (`_part-*.tmp`) and renamed once
complete; the manifest is rewritten (also atomically) after every part, so a killed run restarts
from the first part the manifest does not list, and a part with rows that failed is redone.

A stage that reads a shard folder first calls `verify_shards`: the parts on disk must be exactly the
ones the manifest lists, with its sizes, row counts and (see `VerifyMode`) checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline import __version__
from pipeline.errors import MprError
from pipeline.redact import redact

MANIFEST = "_manifest.json"
FAILURES = "_failures.jsonl"
LEGACY_MANIFEST = "manifest.json"  # folders written before the `_` names
LEGACY_FAILURES = "failures.jsonl"
TMP_SUFFIX = ".tmp"
# Per-part statistic that counts rows an LLM could not answer: a part with any is redone by a rerun.
RETRYABLE = "retryable"
# `fast`: part list, sizes and row counts always; checksums too while the folder is at most
# HASH_LIMIT bytes. `full`: checksums of every part, whatever the size.
VerifyMode = Literal["fast", "full"]
HASH_LIMIT = 1 << 30
VERIFY_ENV = "MPR_VERIFY"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ShardInfo(BaseModel):
    name: str
    rows: int
    queries: int
    sha256: str
    bytes: int | None = None  # None in manifests written before sizes were recorded
    stats: dict[str, int] = Field(default_factory=dict)

    @property
    def retryable(self) -> int:
        return self.stats.get(RETRYABLE, 0)


class InputInfo(BaseModel):
    path: str
    kind: str
    fingerprint: str
    # For a shard input: whether this stage carries its rows forward (relabel does; synth --from-shards
    # reads only its queries). Only a carried input is in the lineage, whose rows this folder supersedes.
    carried: bool = True


class Manifest(BaseModel):
    mpr_version: str = __version__
    stage: str
    config: dict[str, Any]
    config_hash: str
    identity: dict[str, Any] = Field(default_factory=dict)
    # Where the rows come from: `dataset` names the query source (queries from different datasets never
    # merge by qid alone); `lineage` holds the fingerprints of every shard folder whose rows this one
    # carries forward, directly or through others (trained on together, the later stage wins).
    dataset: str | None = None
    lineage: list[str] = Field(default_factory=list)
    inputs: list[InputInfo] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict)
    prompts: dict[str, str] = Field(default_factory=dict)
    planned_shards: int | None = None
    shards: list[ShardInfo] = Field(default_factory=list)
    complete: bool = False
    summary: dict[str, Any] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: _now())
    updated: str = Field(default_factory=lambda: _now())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(redact(json.dumps(payload, indent=2, default=str)) + "\n")
    os.replace(tmp, path)


def _temporary(path: Path) -> bool:
    """A file mpr writes before renaming it into place (`_part-*.parquet.tmp`, `_manifest.json.tmp`, ...)."""
    return path.name.startswith("_") and path.name.endswith(TMP_SUFFIX)


def manifest_path(folder: str | Path) -> Path:
    """The folder's manifest file: `_manifest.json`, or `manifest.json` in a folder written before."""
    folder = Path(folder)
    new = folder / MANIFEST
    return new if new.exists() or not (folder / LEGACY_MANIFEST).exists() else folder / LEGACY_MANIFEST


def read_manifest(folder: str | Path) -> Manifest | None:
    path = manifest_path(folder)
    return _load_manifest(path) if path.exists() else None


def _load_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise MprError(f"{path}: not a valid mpr manifest ({str(exc).splitlines()[0]})") from exc


def job_manifest_name(job: tuple[int, int]) -> str:
    return f"_manifest.{job[0]}-of-{job[1]}.json"


def _manifests_in(folder: Path) -> list[Path]:
    """Every manifest of a folder (the folder's own and those of `--shard` jobs), new names and old."""
    if not folder.is_dir():
        return []
    return sorted({*folder.glob("_manifest*.json"), *folder.glob("manifest*.json")})


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        k
        for k in keys
        if json.dumps(old.get(k), sort_keys=True, default=str)
        != json.dumps(new.get(k), sort_keys=True, default=str)
    ]


def _origin(inputs: list[InputInfo]) -> tuple[str | None, list[str]]:
    """The dataset and the upstream shard folders of a run reading `inputs`. A shard input passes on its
    own dataset and lineage; otherwise the dataset is the fingerprint of the query source (the inputs
    whose kind names queries, else every input), so a mined and a synth folder of one BEIR dataset share
    it and two datasets never do."""
    datasets: list[str] = []
    lineage: list[str] = []
    plain: list[InputInfo] = []
    for item in inputs:
        if item.kind.startswith("shards:"):
            upstream = read_manifest(item.path) if Path(item.path).is_dir() else None
            if item.carried:
                lineage += [item.fingerprint, *(upstream.lineage if upstream else [])]
            if upstream is not None and upstream.dataset:
                datasets.append(upstream.dataset)
        else:
            plain.append(item)
    queries = [i for i in plain if "quer" in i.kind] or plain
    if queries:
        datasets.append(
            "sha256:"
            + hashlib.sha256("\n".join(sorted(i.fingerprint for i in queries)).encode()).hexdigest()[:16]
        )
    unique = sorted(set(datasets))
    return (unique[0] if len(unique) == 1 else None), list(dict.fromkeys(lineage))


class ShardRun:
    """The output folder of one stage run: skips parts already complete, writes the rest atomically.

    `identity` is the part of the configuration that determines the output. A folder holding finished
    parts written with another identity is refused (naming the options that differ) unless `overwrite`
    is set, so two different runs never mix; a folder with no finished part (say a run that could not
    reach its server) is simply started again with the new options.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        stage: str,
        config: dict[str, Any],
        identity: dict[str, Any],
        inputs: Sequence[InputInfo] = (),
        models: dict[str, str] | None = None,
        prompts: dict[str, str] | None = None,
        planned_shards: int | None = None,
        overwrite: bool = False,
        job: tuple[int, int] | None = None,
    ):
        self.out = Path(out)
        self.job = job if job and job[1] > 1 else None
        self.manifest_name = job_manifest_name(self.job) if self.job else MANIFEST
        digest = config_hash(identity)
        own = self.out / self.manifest_name
        if self.job is None:
            own = manifest_path(self.out)
        else:
            legacy = self.out / f"manifest.{self.job[0]}-of-{self.job[1]}.json"
            own = own if own.exists() or not legacy.exists() else legacy
        old = _load_manifest(own) if own.exists() else None
        siblings = _manifests_in(self.out)
        # temporary files are a killed run's (removed below) or a parallel job's: they make no folder foreign
        if self.out.exists() and any(not _temporary(p) for p in self.out.iterdir()):
            if overwrite and self.job is None:
                shutil.rmtree(self.out)
                old = None
            elif not siblings:
                raise MprError(
                    f"{self.out}: folder exists and is not an mpr shard folder; choose another --out"
                )
            else:
                every = [_load_manifest(p) for p in siblings]
                finished = any(m.shards for m in every) or any(self.out.glob("part-*.parquet"))
                other = old or every[0]
                if (other.stage != stage or other.config_hash != digest) and finished:
                    if other.stage != stage:
                        what = f"stage '{other.stage}', not '{stage}'"
                    else:
                        diff = (
                            _config_diff(other.identity, identity)
                            if other.identity
                            else _config_diff(other.config, config)
                        )
                        what = "options that differ: " + (", ".join(diff) if diff else "the inputs")
                    raise MprError(
                        f"{self.out}: holds finished parts of a '{other.stage}' run with other options "
                        f"({what}); "
                        "use --overwrite to replace it or choose another --out"
                    )
                if other.stage != stage or other.config_hash != digest:  # nothing finished: start afresh
                    for path in siblings:
                        path.unlink()
                    for path in (self.out / FAILURES, self.out / LEGACY_FAILURES):
                        path.unlink(missing_ok=True)
                    old = None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.job is None:  # parallel jobs may be writing their own temporary files
            for stale in self.out.glob(f"*{TMP_SUFFIX}"):
                stale.unlink()
        if self.job is None and own.name == LEGACY_MANIFEST and own.exists():
            own.unlink()  # rewritten under the new name below
        kept = [s for s in (old.shards if old else []) if self._intact(s)]
        dataset, lineage = _origin(list(inputs))
        self.manifest = Manifest(
            stage=stage,
            config=config,
            config_hash=digest,
            identity=identity,
            dataset=dataset,
            lineage=lineage,
            inputs=list(inputs),
            models=models or {},
            prompts=prompts or {},
            planned_shards=planned_shards,
            shards=kept,
            complete=bool(
                old and old.complete and len(kept) == len(old.shards) and not any(s.retryable for s in kept)
            ),
            summary=old.summary if old else {},
            created=old.created if old else _now(),
        )
        self._previous = {s.name: s for s in kept}
        self._save()

    def owns(self, index: int) -> bool:
        """Whether part `index` belongs to this job (`--shard K/N`: every part whose index is K mod N)."""
        return self.job is None or index % self.job[1] == self.job[0]

    def _intact(self, info: ShardInfo) -> bool:
        path = self.out / info.name
        return path.exists() and sha256_file(path) == info.sha256

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def done(self, index: int) -> bool:
        """Whether part `index` is written and has no row left to retry."""
        name = shard_name(index)
        return any(s.name == name and not s.retryable for s in self.manifest.shards)

    def write(self, index: int, table: pa.Table, stats: dict[str, int] | None = None) -> ShardInfo:
        """Write part `index`. Counters of requests sent (`*_sent`) add up over every run that wrote the
        part, so a part redone to retry its failed rows still counts the requests of its first run."""
        name = shard_name(index)
        final = self.out / name
        tmp = self.out / ("_" + name + TMP_SUFFIX)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        stats = dict(stats or {})
        previous = self._previous.pop(name, None)
        if previous is not None:
            for key, value in previous.stats.items():
                if key.endswith("_sent"):
                    stats[key] = stats.get(key, 0) + value
        info = ShardInfo(
            name=name,
            rows=table.num_rows,
            queries=len(set(table.column("qid").to_pylist())) if table.num_rows else 0,
            sha256=sha256_file(final),
            bytes=final.stat().st_size,
            stats=stats,
        )
        self.manifest.shards = sorted(
            [s for s in self.manifest.shards if s.name != name] + [info], key=lambda s: s.name
        )
        self._save()
        return info

    def totals(self) -> dict[str, int]:
        """Per-part statistics summed over all parts, including parts written by an earlier run."""
        out: dict[str, int] = {}
        for shard in self.manifest.shards:
            for key, value in shard.stats.items():
                out[key] = out.get(key, 0) + value
        return out

    def finish(self, summary: dict[str, Any]) -> Manifest:
        """Mark this run complete. The last of N parallel jobs to finish also writes the folder's
        _manifest.json, listing every job's parts, so the folder is one valid shard folder."""
        self.manifest.summary = summary
        self.manifest.complete = True
        self._save()
        if self.job is None:
            return self.manifest
        jobs = [self.out / job_manifest_name((k, self.job[1])) for k in range(self.job[1])]
        loaded = [_load_manifest(p) for p in jobs if p.exists()]
        if len(loaded) < len(jobs) or not all(m.complete for m in loaded):
            return self.manifest
        merged = self.manifest.model_copy(deep=True)
        merged.shards = sorted((s for m in loaded for s in m.shards), key=lambda s: s.name)
        merged.summary = _sum_summaries([m.summary for m in loaded])
        merged.created = min(m.created for m in loaded)
        merged.updated = _now()
        write_json_atomic(self.out / MANIFEST, merged.model_dump(mode="json"))
        return merged

    def _save(self) -> None:
        self.manifest.updated = _now()
        write_json_atomic(self.out / self.manifest_name, self.manifest.model_dump(mode="json"))


class FailureLog:
    """`_failures.jsonl`: one line per item (row, set) an LLM stage could not write, tagged with its
    part. A part's lines are written just before the part; on start, the lines of every part that will be
    written again (not listed, or listed with rows to retry) are removed, so the file always describes
    the folder as it is. `--shard K/N` jobs write `_failures.K-of-N.jsonl`, merged by the last job."""

    def __init__(self, run: ShardRun):
        self.out = run.out
        self.job = run.job
        self.path = run.out / (
            FAILURES if self.job is None else f"_failures.{self.job[0]}-of-{self.job[1]}.jsonl"
        )
        legacy = run.out / (
            LEGACY_FAILURES if self.job is None else f"failures.{self.job[0]}-of-{self.job[1]}.jsonl"
        )
        if legacy.exists() and not self.path.exists():
            os.replace(legacy, self.path)
        if self.path.exists():
            done = {s.name for s in run.manifest.shards if not s.retryable}
            lines = self.path.read_text(encoding="utf-8").splitlines()
            keep = [line for line in lines if line.strip() and json.loads(line).get("part") in done]
            if len(keep) != len(lines):
                self._write(self.path, keep)

    @staticmethod
    def _write(path: Path, lines: list[str]) -> None:
        tmp = path.with_name(path.name + TMP_SUFFIX)
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        tmp.replace(path)

    def add(self, part: str, records: list[dict[str, Any]]) -> None:
        lines = [
            line
            for line in (self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else [])
            if line.strip() and json.loads(line).get("part") != part
        ]
        lines += [redact(json.dumps({**r, "part": part}, ensure_ascii=False, default=str)) for r in records]
        if lines or self.path.exists():
            self._write(self.path, lines)

    def merge_jobs(self) -> None:
        """The last of N parallel jobs writes the folder's `_failures.jsonl` from every job's file."""
        if self.job is None:
            return
        files = [self.out / f"_failures.{k}-of-{self.job[1]}.jsonl" for k in range(self.job[1])]
        lines = [
            line
            for f in files
            if f.exists()
            for line in f.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        lines.sort(key=lambda line: json.loads(line)["part"])
        self._write(self.out / FAILURES, lines)


def _sum_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for summary in summaries:
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, dict):
                out[key] = _sum_summaries([out.get(key, {}), value])
            else:
                out.setdefault(key, value)
    return out


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MprError(f"{folder}: no such shard folder")
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        raise MprError(f"{folder}: no part-*.parquet files (is this an mpr shard folder?)")
    return files


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet part; a truncated, corrupt or foreign file is an MprError naming the part."""
    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns or () if c not in schema.names]
        if missing:
            raise MprError(
                f"{path}: no column {', '.join(repr(c) for c in missing)} (not an mpr shard part?)"
            )
        table = pq.read_table(path, columns=columns)
        table.validate(
            full=True
        )  # corrupt pages decode to invalid UTF-8 or offsets, caught here and not in a reader
        return table
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: undecodable metadata
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MprError(f"{path}: unreadable Parquet part ({detail})") from None


def read_part_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise MprError(
            f"{path}: unreadable Parquet part "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def verify_shards(folder: str | Path, mode: VerifyMode | None = None) -> Manifest:
    """Check a shard folder against its manifest before a stage reads it; return the manifest.

    Refused, with one line naming the folder, the part and what differs: no manifest; a run not complete;
    a listed part missing; a part on disk the manifest does not list (an extra or duplicated part); a
    part whose size or row count (read from its Parquet footer) differs from the manifest; a checksum
    that differs (`fast`: while the folder is at most HASH_LIMIT bytes; `full`: always). `mode` defaults
    to $MPR_VERIFY, else `fast`."""
    folder = Path(folder)
    mode = mode or os.environ.get(VERIFY_ENV, "fast")  # type: ignore[assignment]
    if mode not in ("fast", "full"):
        raise MprError(f"verify mode '{mode}': expected fast or full")
    files = shard_files(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if _manifests_in(folder):
            raise MprError(
                f"{folder}: the --shard jobs that write it have not all finished; rerun the missing ones"
            )
        raise MprError(
            f"{folder}: no {MANIFEST}, so its parts cannot be checked (write foreign data with `mpr ingest`)"
        )
    if not manifest.complete:
        raise MprError(f"{folder}: the run that writes it is not complete; rerun that stage to finish it")
    listed = {s.name: s for s in manifest.shards}
    names = [s.name for s in manifest.shards]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MprError(f"{folder}/{MANIFEST}: lists {repeated[0]} more than once")
    on_disk = {p.name: p for p in files}
    for name in listed:
        if name not in on_disk:
            raise MprError(f"{folder}/{name}: listed in {MANIFEST} but missing")
    for name, path in on_disk.items():
        if name not in listed:
            size = path.stat().st_size
            twin = next(
                (
                    s.name
                    for s in manifest.shards
                    if s.bytes in (None, size) and sha256_file(path) == s.sha256
                ),
                None,
            )
            why = f"a copy of {twin}" if twin else "extra"
            raise MprError(f"{path}: not listed in {MANIFEST} ({why}); remove it or rerun the stage")
    total = sum(p.stat().st_size for p in files)
    hash_all = mode == "full" or total <= HASH_LIMIT
    for info in manifest.shards:
        path = on_disk[info.name]
        size = path.stat().st_size
        if info.bytes is not None and size != info.bytes:
            raise MprError(
                f"{path}: {size:,} bytes, {MANIFEST} says {info.bytes:,} (truncated or rewritten?)"
            )
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as exc:
            raise MprError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0]})") from None
        if rows != info.rows:
            raise MprError(f"{path}: {rows:,} rows, {MANIFEST} says {info.rows:,}")
        if (hash_all or info.bytes is None) and sha256_file(path) != info.sha256:
            raise MprError(f"{path}: checksum differs from {MANIFEST} (edited part or edited manifest)")
    return manifest


def read_shards(*folders: str | Path, columns: list[str] | None = None) -> pa.Table:
    tables = [read_part(f, columns=columns) for folder in folders for f in shard_files(folder)]
    return pa.concat_tables(tables, promote_options="default")


def iter_groups(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """Yield (qid, rows) for each run of equal qids; shards keep a query's rows contiguous."""
    qids = table.column("qid").to_pylist()
    start = 0
    for i in range(1, len(qids) + 1):
        if i == len(qids) or qids[i] != qids[start]:
            yield qids[start], table.slice(start, i - start)
            start = i


def fingerprint_shards(folder: str | Path) -> str:
    """A stable fingerprint of a shard folder: the checksums its manifest lists (or of its files)."""
    manifest = read_manifest(folder)
    if manifest and manifest.shards:
        parts = [f"{s.name}:{s.sha256}" for s in manifest.shards]
    else:
        parts = [f"{p.name}:{sha256_file(p)}" for p in shard_files(folder)]
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
