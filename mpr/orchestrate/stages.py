"""The stage registry: every stage `mpr run` and `mpr study` can drive, written once.

A stage is its module's `plan(cfg) -> StagePlan` and `run(cfg, *, log)`, its config model, the folder it
writes under a run's `out`, and how `mpr run` fills in the paths between stages (`inputs`). Adding a stage
to `mpr run` is one `StageSpec` here (and its module; its command is registered in `mpr/cli.py`). Nothing
else in `mpr/orchestrate/` spells a stage's name: it uses the constants below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from mpr.orchestrate.experiment import Experiment
    from pipeline.stages.plan import StagePlan


@dataclass(frozen=True)
class StageSpec:
    """One stage. `module` holds `plan` and `run`; `config` is the config model's name in it."""

    name: str
    module: str
    config: str
    folder: str | None = None  # what it writes under RUN (None: a model or a report, named by the stage)
    llm: bool = False  # it asks an LLM: `mpr run` gives it the [llm] table, and failed items stop the run
    default: bool = True  # `mpr run` runs it when the file names no `stages`
    run_keys: tuple[str, ...] = ()  # keys of its table that tell `mpr run` where to read, not the config
    shown: str | None = None  # a function of the module that formats `run`'s result for the log
    inputs: Callable[[Experiment], dict[str, Any]] = field(default=lambda _: {}, compare=False)

    def load(self) -> Any:
        return importlib.import_module(self.module)

    def config_model(self) -> type[BaseModel]:
        model: type[BaseModel] = getattr(self.load(), self.config)
        return model

    def plan(self, cfg: BaseModel) -> StagePlan:
        plan: StagePlan = self.load().plan(cfg)
        return plan

    def run(self, cfg: BaseModel, log: Callable[[str], None]) -> Any:
        return self.load().run(cfg, log=log)

    def out(self, run: Path) -> Path:
        assert self.folder is not None, f"{self.name} writes no shard folder"
        return run / self.folder


def _train_sources(e: Experiment) -> list[Path]:
    named = e.table(TRAIN).get("from")
    if named:
        unknown = [n for n in named if n not in REGISTRY or REGISTRY[n].folder is None]
        if unknown:
            raise ValueError(f"from: no stage writing shards named {', '.join(unknown)}")
        return [REGISTRY[n].out(e.out) for n in named]
    written = [s for s in (RELABEL, SYNTH) if s.name in e.stages]
    return [s.out(e.out) for s in written] or [e.shards_in()]


MINE = StageSpec(
    "mine", "pipeline.stages.mine", "MineConfig", folder="mined",
    inputs=lambda e: {"data": e.spec.data, "split": e.spec.split},
)  # fmt: skip
INGEST = StageSpec("ingest", "pipeline.stages.ingest", "IngestConfig", folder="ingested", default=False)
RELABEL = StageSpec(
    "relabel", "pipeline.stages.relabel", "RelabelConfig", folder="relabeled", llm=True,
    inputs=lambda e: {"input": e.shards_in()},
)  # fmt: skip
SYNTH = StageSpec(
    "synth", "pipeline.stages.synth", "SynthConfig", folder="synth", llm=True,
    inputs=lambda e: {"data": e.spec.data, "split": e.spec.split},
)  # fmt: skip
TRAIN = StageSpec(
    "train", "train.trainer", "TrainConfig",
    inputs=lambda e: {"data": _train_sources(e), "out": e.model_out(), "resume": True}, run_keys=("from",),
)  # fmt: skip
EVAL = StageSpec(
    "eval", "pipeline.stages.evaluate", "EvalConfig", inputs=lambda e: e.eval_inputs(), shown="format_table"
)  # fmt: skip

#: In the order `mpr run` runs them.
REGISTRY: dict[str, StageSpec] = {s.name: s for s in (INGEST, MINE, RELABEL, SYNTH, TRAIN, EVAL)}
#: Stages whose folder holds the rows relabel and train read, first found first.
SHARD_SOURCES = (INGEST, MINE)
