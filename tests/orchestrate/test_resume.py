"""A run killed with SIGKILL and started again gives the same shards as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.data.shards import read_manifest, read_shards
from pipeline.stages import mine
from pipeline.stages.mine import MineConfig

from ..conftest import SEQ

pytestmark = pytest.mark.slow  # trains or encodes: left out of `make test-fast`


def mine_args(data, out, cache):
    return [
        "-m",
        "mpr",
        "mine",
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--max-seq-length",
        str(SEQ),
        "--queries-per-shard",
        "1",
        "--depth",
        "30",
        "--num-negatives",
        "4",
        "--sampling",
        "random",
        "-q",
    ]


def kill_when(out, ready, timeout=240.0, *, args):
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            manifest = read_manifest(out) if (out / "_manifest.json").exists() else None
            if ready(manifest):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return manifest
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
    raise AssertionError("the run ended before it could be killed")


def test_sigkill_mid_run_then_resume_gives_identical_shards(scifact_small, cache_dir, tmp_path):
    reference = tmp_path / "reference"
    mine.run(
        MineConfig(
            data=scifact_small,
            out=reference,
            cache_dir=cache_dir,
            max_seq_length=SEQ,
            queries_per_shard=1,
            depth=30,
            num_negatives=4,
            sampling="random",
            progress=False,
        ),
        log=lambda _: None,
    )
    out = tmp_path / "killed"
    seen = kill_when(
        out,
        lambda m: m is not None and len(m.shards) >= 2 and not m.complete,
        args=mine_args(scifact_small, out, cache_dir),
    )
    assert not seen.complete
    after_kill = read_manifest(out)
    assert 2 <= len(after_kill.shards) < after_kill.planned_shards
    done = subprocess.run(
        [sys.executable, *mine_args(scifact_small, out, cache_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert read_shards(out).equals(read_shards(reference))
    manifest = read_manifest(out)
    assert manifest.complete and len(manifest.shards) == manifest.planned_shards == 30
    assert manifest.summary["queries"] == 30 and not list(out.glob("*.tmp"))
    again = subprocess.run(
        [sys.executable, *mine_args(scifact_small, out, cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_sigkill_during_encoding_resumes_from_the_embedding_cache(scifact_small, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    kill_when(
        out, lambda m: m is not None, args=mine_args(scifact_small, out, cache)
    )  # killed while encoding
    assert not list(out.glob("*.parquet"))
    done = subprocess.run(
        [sys.executable, *mine_args(scifact_small, out, cache)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert read_manifest(out).complete
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
