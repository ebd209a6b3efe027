"""Damaged files and full disks. A weights file cut short (a copy interrupted, a disk that filled up, a run
killed while saving) gets one line naming it, before torch is imported: in eval, mine and train's --model,
and in train --resume, which passes over a damaged last checkpoint to the one before. A write that finds no
room (disk full, a file-size limit) gets one line naming the output folder, leaves no half part, and the
same command finishes later."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpr.cli import app
from pipeline.data.checks import weights_problem
from pipeline.errors import MprError
from train.config import TrainConfig
from train.trainer import resume_point

from ..conftest import EXAMPLE, REPO

runner = CliRunner()


def safetensors(path: Path, values: int = 4, cut: int = 0) -> Path:
    """A valid safetensors file of one float32 tensor of `values` values, less its last `cut` bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * (4 * values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - cut])
    return path


def model(folder: Path, cut: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    safetensors(folder / "model.safetensors", cut=cut)
    return folder


def test_weights_problem_reads_only_the_header(tmp_path: Path) -> None:
    assert weights_problem(safetensors(tmp_path / "ok.safetensors")) is None
    assert "truncated" in str(weights_problem(safetensors(tmp_path / "cut.safetensors", cut=3)))
    assert "truncated" in str(weights_problem(safetensors(tmp_path / "head.safetensors", cut=30)))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert "truncated" in str(weights_problem(tmp_path / "junk.safetensors"))
    with zipfile.ZipFile(tmp_path / "ok.pt", "w") as archive:
        archive.writestr("data.pkl", b"x" * 4096)
    assert weights_problem(tmp_path / "ok.pt") is None
    whole = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    assert weights_problem(tmp_path / "cut.pt") is not None


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--data", str(EXAMPLE), "--split", "test", "--model", "MODEL"],
        ["mine", "--data", str(EXAMPLE), "--out", "OUT", "--model", "MODEL"],
        ["eval", "--data", str(EXAMPLE), "--split", "test", "--baseline", "MODEL"],
    ],
    ids=["eval", "mine", "eval-baseline"],
)
def test_a_truncated_model_is_named_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    folder = model(tmp_path / "models" / "cut", cut=5)
    argv = [str(folder) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.safetensors is truncated" in lines[0] and str(folder) in lines[0]
    assert not (tmp_path / "out").exists()


def checkpoint(root: Path, step: int, cut: int = 0) -> Path:
    folder = root / f"checkpoint-{step}"
    safetensors(folder / "model.safetensors", cut=cut)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_resume_passes_over_a_checkpoint_cut_short(tmp_path: Path) -> None:
    cfg = TrainConfig(data=[tmp_path / "data"], out=tmp_path / "model", resume=True)
    good = checkpoint(cfg.checkpoints, 2)
    checkpoint(cfg.checkpoints, 4, cut=7)
    lines: list[str] = []
    assert resume_point(cfg, lines.append) == good
    assert len(lines) == 1 and "checkpoint-4" in lines[0] and "model.safetensors is truncated" in lines[0]
    (good / "trainer_state.json").write_text('{"global_')
    with pytest.raises(MprError, match="no checkpoint can be resumed from"):
        resume_point(cfg, lines.append)


def _limited(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def test_a_full_disk_gets_one_line_naming_the_folder_and_the_rerun_finishes(tmp_path: Path) -> None:
    out = tmp_path / "mined"
    argv = [
        sys.executable,
        "-m",
        "mpr",
        "mine",
        "--data",
        str(EXAMPLE),
        "--out",
        str(out),
        "--retriever",
        "bm25",
    ]
    argv += ["--queries-per-shard", "5", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    full = subprocess.run(
        argv, preexec_fn=_limited(8_000), capture_output=True, text=True, env=env, cwd=tmp_path
    )
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 2 and len(lines) == 1, full.stderr
    assert lines[0].startswith(f"error: {out}: no room to write") and "run the same command again" in lines[0]
    assert not out.exists() or not list(out.glob("part-*"))  # no half part left, none listed
    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert subprocess.run([sys.executable, "-m", "mpr", "validate", str(out)], env=env).returncode == 0
