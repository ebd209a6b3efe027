"""Shard folders: atomic Parquet parts plus a manifest that makes every stage resumable.

A folder holds `part-00000.parquet`, `part-00001.parquet`, ... and `manifest.json`. Each part holds
whole queries with their rows contiguous. Parts are written to a temporary name and renamed once
complete; the manifest is rewritten (also atomically) after every part, so a killed run restarts
from the first part the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from mpr import __version__
from pipeline.errors import MprError
from pipeline.redact import redact

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ShardInfo(BaseModel):
    name: str
    rows: int
    queries: int
    sha256: str
    stats: dict[str, int] = Field(default_factory=dict)


class InputInfo(BaseModel):
    path: str
    kind: str
    fingerprint: str


class Manifest(BaseModel):
    mpr_version: str = __version__
    stage: str
    config: dict[str, Any]
    config_hash: str
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


def read_manifest(folder: str | Path) -> Manifest | None:
    path = Path(folder) / MANIFEST
    return _load_manifest(path) if path.exists() else None


def _load_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise MprError(f"{path}: not a valid mpr manifest ({str(exc).splitlines()[0]})") from exc


class ShardRun:
    """The output folder of one stage run: skips parts already complete, writes the rest atomically.

    `identity` is the part of the configuration that determines the output; a folder written with
    another identity is refused unless `overwrite` is set, so two different runs never mix.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        stage: str,
        config: dict[str, Any],
        identity: dict[str, Any],
        inputs: list[InputInfo] = (),
        models: dict[str, str] | None = None,
        prompts: dict[str, str] | None = None,
        planned_shards: int | None = None,
        overwrite: bool = False,
        job: tuple[int, int] | None = None,
    ):
        self.out = Path(out)
        self.job = job if job and job[1] > 1 else None
        self.manifest_name = f"manifest.{job[0]}-of-{job[1]}.json" if self.job else MANIFEST
        digest = config_hash(identity)
        own = self.out / self.manifest_name
        old = _load_manifest(own) if own.exists() else None
        siblings = sorted(self.out.glob("manifest*.json")) if self.out.is_dir() else []
        if self.out.exists() and any(self.out.iterdir()):
            if overwrite and self.job is None:
                shutil.rmtree(self.out)
                old = None
            elif not siblings:
                raise MprError(f"{self.out}: folder exists and is not an mpr shard folder; choose another --out")
            else:
                other = old or _load_manifest(siblings[0])
                if other.stage != stage or other.config_hash != digest:
                    raise MprError(
                        f"{self.out}: holds a '{other.stage}' run with other options; "
                        "use --overwrite to replace it or choose another --out"
                    )
        self.out.mkdir(parents=True, exist_ok=True)
        if self.job is None:  # parallel jobs may be writing their own temporary files
            for stale in self.out.glob(f"*{TMP_SUFFIX}"):
                stale.unlink()
        kept = [s for s in (old.shards if old else []) if self._intact(s)]
        self.manifest = Manifest(
            stage=stage,
            config=config,
            config_hash=digest,
            inputs=list(inputs),
            models=models or {},
            prompts=prompts or {},
            planned_shards=planned_shards,
            shards=kept,
            complete=bool(old and old.complete and len(kept) == len(old.shards)),
            summary=old.summary if old else {},
            created=old.created if old else _now(),
        )
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
        name = shard_name(index)
        return any(s.name == name for s in self.manifest.shards)

    def write(self, index: int, table: pa.Table, stats: dict[str, int] | None = None) -> ShardInfo:
        name = shard_name(index)
        final = self.out / name
        tmp = self.out / (name + TMP_SUFFIX)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        info = ShardInfo(
            name=name,
            rows=table.num_rows,
            queries=len(set(table.column("qid").to_pylist())) if table.num_rows else 0,
            sha256=sha256_file(final),
            stats=stats or {},
        )
        self.manifest.shards = sorted([s for s in self.manifest.shards if s.name != name] + [info], key=lambda s: s.name)
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
        manifest.json, listing every job's parts, so the folder is one valid shard folder."""
        self.manifest.summary = summary
        self.manifest.complete = True
        self._save()
        if self.job is None:
            return self.manifest
        jobs = [self.out / f"manifest.{k}-of-{self.job[1]}.json" for k in range(self.job[1])]
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
            raise MprError(f"{path}: no column {', '.join(repr(c) for c in missing)} (not an mpr shard part?)")
        table = pq.read_table(path, columns=columns)
        table.validate(full=True)  # corrupt pages decode to invalid UTF-8 or offsets, caught here and not in a reader
        return table
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: undecodable metadata
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MprError(f"{path}: unreadable Parquet part ({detail})") from None


def read_part_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise MprError(f"{path}: unreadable Parquet part ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


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
