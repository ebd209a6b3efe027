"""A run killed at the moment a part or the manifest is being put in place (its temporary file written, the
rename not done) leaves nothing the same command trips over: the rerun finishes with the rows of an
uninterrupted run, no temporary file stays, and the folder validates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data import shards
from pipeline.data.inspection import validate_shards
from pipeline.data.shards import read_manifest, read_shards
from pipeline.stages import mine
from pipeline.stages.mine import MineConfig

from ..conftest import EXAMPLE


class Killed(BaseException):
    """What SIGKILL would do to the process at that moment (BaseException: no handler catches it)."""


def config(out: Path) -> MineConfig:
    return MineConfig(data=EXAMPLE, out=out, retriever="bm25", queries_per_shard=5, progress=False)


@pytest.mark.parametrize(
    ("target", "nth"),
    [("part-00002.parquet", 1), ("_manifest.json", 1), ("_manifest.json", 3)],
    ids=["a part", "the first manifest", "a later manifest"],
)
def test_a_kill_while_a_file_is_put_in_place_leaves_nothing_to_trip_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, nth: int
) -> None:
    mine.run(config(tmp_path / "reference"), log=lambda _: None)
    out = tmp_path / "killed"
    replace = os.replace
    seen = []

    def dies_at_target(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(dst).name == target:
            seen.append(dst)
            if len(seen) == nth:
                raise Killed
        replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", dies_at_target)
    with pytest.raises(Killed):
        mine.run(config(out), log=lambda _: None)
    assert list(out.glob("*.tmp")), "the kill left its temporary file"
    monkeypatch.setattr(shards.os, "replace", replace)
    mine.run(config(out), log=lambda _: None)
    assert not list(out.glob("*.tmp"))
    assert validate_shards(out) == []
    manifest = read_manifest(out)
    assert manifest is not None and manifest.complete
    assert read_shards(out).equals(read_shards(tmp_path / "reference"))
