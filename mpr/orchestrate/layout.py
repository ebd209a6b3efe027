"""Where `mpr run` puts its models and evaluations under RUN, named once for the runner and the report."""

from __future__ import annotations

from pathlib import Path

SINGLE_POSITIVE = "infonce-single"  # the single-positive reference: InfoNCE on the mined data, not relabeled


def model_folder(out: Path, name: str) -> Path:
    """RUN/model-NAME: the model trained with loss NAME (or the single-positive reference)."""
    return out / f"model-{name}"


def eval_file(out: Path, name: str) -> Path:
    """RUN/eval-NAME.json: the evaluation of RUN/model-NAME."""
    return out / f"eval-{name}.json"


def model_folders(out: Path) -> list[Path]:
    """Every RUN/model-NAME, sorted."""
    return sorted(out.glob("model-*"))


def model_name(folder: Path) -> str:
    """NAME of RUN/model-NAME."""
    return folder.name.removeprefix("model-")
