"""The study's options (`StudyConfig`), its cells and where their files go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.data.identity import RUNTIME, identity
from pipeline.data.locations import DEFAULT_ENCODER
from pipeline.data.shards import write_json_atomic as _write_json_atomic
from pipeline.stages.relabel import RelabelConfig
from pipeline.stages.synth import split_list
from train.config import TrainConfig, check_size
from train.losses.registry import LOSSES

if TYPE_CHECKING:
    pass


ALL_LOSSES = tuple(LOSSES)
LISTWISE = RelabelConfig.model_fields["mode"].default  # the relabel mode that flags candidates
GRADED_LOSSES = frozenset(n for n, s in LOSSES.items() if s.graded)
MULTI_POSITIVE = tuple(n for n, s in LOSSES.items() if s.multi_positive)
OWN_SPLITS = ("train", "test")
METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000")
LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@100": "R@100", "recall@1000": "R@1000"}
ZERO_SHOT, BASELINE = "zero-shot", "baseline"
ROW_NAMES = {ZERO_SHOT: "zero-shot (no training)", BASELINE: "baseline: InfoNCE, 1 positive, not relabeled"}
PLOT_NAMES = {ZERO_SHOT: "zero-shot", BASELINE: "baseline: InfoNCE,\n1 positive, not relabeled"}
_TRAINED = TrainConfig.model_fields


class StudyConfig(BaseModel):
    """Every option of `mpr study`. Training options the study shares with `mpr train` take their defaults
    from `TrainConfig`, except the batch (16: a study trains hundreds of models)."""

    model_config = ConfigDict(extra="forbid")

    data: list[Path] = Field(
        min_length=1,
        description="A BEIR folder to study (repeat for several); the report names it by its folder.",
        json_schema_extra=RUNTIME,
    )
    out: Path = Field(
        Path("runs/study"),
        description="Report (study.md, study.json, study.png) and one result file per cell.",
        json_schema_extra=RUNTIME,
    )
    work: Path | None = Field(
        None, description="Shards, models and caches (default: OUT/work).", json_schema_extra=RUNTIME
    )
    folds: int = Field(
        5, ge=2, description="k of the k-fold split over the judged queries (each is evaluated exactly once)."
    )
    fold_ids: list[int] | None = Field(
        None, description="Run only these folds (0-based, comma-separated).", json_schema_extra=RUNTIME
    )
    losses: list[str] = Field(
        list(ALL_LOSSES),
        min_length=1,
        description="Losses to train on relabeled data, comma-separated.",
        json_schema_extra=RUNTIME,
    )
    error_rates: list[float] = Field(
        [0.0, 0.2, 0.4],
        min_length=1,
        description="Simulated judge error rates, comma-separated (each in 0-1).",
        json_schema_extra=RUNTIME,
    )
    baseline: bool = Field(
        True,
        description="Train single-positive InfoNCE on the mined data (not relabeled) as the baseline.",
        json_schema_extra=RUNTIME,
    )
    graded: bool = Field(
        True, description="Train ws2 and bixse on graded relabel data (else on the binary labels)."
    )
    own_splits: list[str] = Field(
        [],
        description="Collections (by folder name) trained on their own train split and tested on test, "
        "not folded.",
    )
    steps: int = Field(100, ge=1, description="Training steps of every model.")
    batch_size: int = Field(16, ge=1, description="Queries per training batch.")
    group_size: int = Field(
        _TRAINED["group_size"].default, ge=2, description=_TRAINED["group_size"].description
    )
    max_positives: int = Field(
        _TRAINED["max_positives"].default, ge=1, description=_TRAINED["max_positives"].description
    )
    learning_rate: float = Field(
        _TRAINED["learning_rate"].default, gt=0, description=_TRAINED["learning_rate"].description
    )
    attention_dropout: float | None = Field(
        None, ge=0, le=1, description=_TRAINED["attention_dropout"].description
    )
    seed: int = Field(_TRAINED["seed"].default, description="Seed of training.")
    fold_seed: int = Field(0, description="Seed of the folds and of the kept positive per training query.")
    oracle_seed: int = Field(0, description="Seed of the simulated judge's errors.")
    max_seq_length: int = Field(
        256, ge=8, description="Truncate texts to this many tokens (mining, training, evaluation)."
    )
    depth: int = Field(100, ge=1, description="Candidates mined per training query.")
    candidates: int = Field(20, ge=1, description="Hard negatives kept per query, all of them judged.")
    judge_chars: int = Field(20_000, ge=1, description="Characters of a passage the judge sees at most.")
    max_queries: int | None = Field(
        None, ge=1, description="Mine (train on) only the first N training queries per fold."
    )
    model: str = Field(
        DEFAULT_ENCODER,
        description="Base sentence-transformers model (zero-shot, and the start of every model).",
    )
    memory_budget: str | None = Field(
        None, description=_TRAINED["memory_budget"].description, json_schema_extra=RUNTIME
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads (default: torch's choice; 1 can be faster on a busy machine).",
        json_schema_extra=RUNTIME,
    )
    keep_models: bool = Field(
        False, description="Keep every trained model under WORK.", json_schema_extra=RUNTIME
    )
    report_only: bool = Field(
        False, description="Only rebuild the report from the stored cells.", json_schema_extra=RUNTIME
    )

    _lists = field_validator("fold_ids", "losses", "error_rates", "own_splits", mode="before")(split_list)
    _size = field_validator("memory_budget")(check_size)

    @field_validator("data")
    @classmethod
    def _folders(cls, value: list[Path]) -> list[Path]:
        for folder in value:
            if not folder.is_dir():
                raise ValueError(f"{folder}: no such folder")
        return value

    @field_validator("losses")
    @classmethod
    def _losses(cls, value: list[str]) -> list[str]:
        unknown = [loss for loss in value if loss not in LOSSES]
        if unknown:
            raise ValueError(f"unknown loss(es) {', '.join(unknown)} (losses: {', '.join(LOSSES)})")
        return value

    @field_validator("error_rates")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        if any(not 0 <= e <= 1 for e in value):
            raise ValueError("every rate must be in [0, 1]")
        return value

    @model_validator(mode="after")
    def _fold_ids(self) -> StudyConfig:
        if self.fold_ids is not None and any(not 0 <= f < self.folds for f in self.fold_ids):
            raise ValueError(f"--fold-ids: folds are 0..{self.folds - 1}")
        unknown = set(self.own_splits) - set(self.sources)
        if unknown:
            raise ValueError(f"--own-splits: no --data folder named {', '.join(sorted(unknown))}")
        return self

    @property
    def sources(self) -> dict[str, Path]:
        """Dataset name (the folder's name, made unique) -> BEIR folder."""
        out: dict[str, Path] = {}
        for folder in self.data:
            base = folder.resolve().name
            name, n = base, 2
            while name in out:
                name, n = f"{base}-{n}", n + 1
            out[name] = folder.resolve()
        return out

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(self.sources)

    @property
    def work_dir(self) -> Path:
        return self.work if self.work is not None else self.out / "work"

    def identity(self) -> dict[str, Any]:
        """The settings that determine a cell's result (not which cells are run, nor where)."""
        out = identity(self)
        for name in ("own_splits", "attention_dropout"):
            if not out[name] and out[name] != 0:
                del out[name]  # unset: as results written before the field existed
        return out

    def folded(self, dataset: str) -> bool:
        return dataset not in self.own_splits

    def folds_of(self, dataset: str) -> list[int]:
        if not self.folded(dataset):
            return [0]
        return sorted(self.fold_ids) if self.fold_ids is not None else list(range(self.folds))


@dataclass
class Cell:
    dataset: str
    fold: int
    loss: str
    error_rate: float | None = None

    @property
    def file_name(self) -> str:
        return self.loss if self.error_rate is None else f"{self.loss}@e{self.error_rate:.2f}"

    @property
    def label(self) -> str:
        err = "" if self.error_rate is None else f" e={self.error_rate:.2f}"
        return f"[{self.dataset} fold {self.fold}{err} {self.loss}]"


@dataclass
class Paths:
    out: Path
    work: Path

    def cell(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.dataset / f"fold{cell.fold}" / f"{cell.file_name}.json"

    def fold(self, dataset: str, fold: int) -> Path:
        return self.work / dataset / f"fold{fold}"

    @property
    def embeddings(self) -> Path:
        return self.work / "cache" / "embeddings"

    @property
    def llm_cache(self) -> Path:
        return self.work / "llm.sqlite"


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, payload)


def _title(cfg: StudyConfig) -> str:
    return ", ".join(cfg.datasets)
