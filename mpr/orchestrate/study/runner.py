"""Running the cells: mine, relabel (the simulated judge), train and evaluate each, saved as it finishes."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpr.orchestrate.experiment import run_stage
from mpr.orchestrate.machine import hardware
from mpr.orchestrate.stages import EVAL, MINE, RELABEL, TRAIN
from mpr.orchestrate.study.config import (
    BASELINE,
    GRADED_LOSSES,
    OWN_SPLITS,
    ZERO_SHOT,
    Cell,
    Paths,
    StudyConfig,
    _title,
    write_json_atomic,
)
from mpr.orchestrate.study.folds import (
    prepare_source,
    write_fold,
)
from mpr.orchestrate.study.report import (
    write_study_report,
)
from pipeline.errors import MprError
from pipeline.formatting import number
from pipeline.stages.relabel import RelabelConfig
from train.config import TrainConfig
from train.losses.registry import SINGLE_POSITIVE_LOSS

if TYPE_CHECKING:
    pass


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


# The time estimate before any cell of a study has finished: seconds measured on the project's 2-core CPU box
# (bench/results/cpu), scaled linearly by max_seq_length. Rough: the load of the machine moves them by 2x.
TRAIN_S_PER_TEXT = 0.07
ENCODE_S_PER_DOC = 0.014
LOAD_S = 5.0


def log_with_time(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# -- stages ------------------------------------------------------------------------------------------------


class Oracles:
    """One test server per dataset, started on first use, answering as `oracle-DATASET-eRATE` models."""

    def __init__(self, sources: dict[str, Path], cfg: StudyConfig, stack: ExitStack):
        self.sources, self.cfg, self.stack = sources, cfg, stack
        self.urls: dict[str, str] = {}

    @staticmethod
    def model(dataset: str, error_rate: float) -> str:
        return f"oracle-{dataset}-e{error_rate:.2f}"

    def url(self, dataset: str) -> str:
        if dataset not in self.urls:
            from mpr.simulated_judge import Oracle, start_server

            rates = {self.model(dataset, e): e for e in self.cfg.error_rates}
            oracle = Oracle(self.sources[dataset], None, 0.0, self.cfg.oracle_seed, model_error_rates=rates)
            server = self.stack.enter_context(start_server(responder=oracle, models=tuple(rates)))
            self.urls[dataset] = server.url
        return self.urls[dataset]


class Study:
    def __init__(
        self,
        cfg: StudyConfig,
        sources: dict[str, Path],
        paths: Paths,
        keep_models: bool,
        stack: ExitStack,
        command: str,
        log: Callable[[str], None] = log_with_time,
    ):
        self.cfg, self.paths, self.keep_models, self.command, self.log = cfg, paths, keep_models, command, log
        self.sources: dict[str, Path] = {}
        self.skipped: dict[str, dict[str, int]] = {}
        for dataset, src in sources.items():
            self.sources[dataset], self.skipped[dataset] = prepare_source(
                src, paths.work / dataset / "source"
            )
            counts = self.skipped[dataset]
            if counts["empty_documents"] or counts["empty_queries"]:
                self.log(
                    f"[{dataset}] skipped {counts['empty_documents']} empty document(s) "
                    f"and {counts['empty_queries']} empty "
                    f"quer{'y' if counts['empty_queries'] == 1 else 'ies'} "
                    f"({counts['judgments_dropped']} judgment(s) pointing at them); "
                    f"reading the copy without them in {self.sources[dataset]}"
                )
        self.oracles = Oracles(self.sources, cfg, stack)
        self.hw = hardware()
        self.timer = Timer()
        self.computed = 0
        self.done: dict[tuple[Any, ...], Path] = {}

    def cells(self) -> Iterator[Cell]:
        for dataset in self.cfg.datasets:
            for fold in self.cfg.folds_of(dataset):
                yield Cell(dataset, fold, ZERO_SHOT)
                if self.cfg.baseline:
                    yield Cell(dataset, fold, BASELINE)
                for error_rate in self.cfg.error_rates:
                    for loss in self.cfg.losses:
                        yield Cell(dataset, fold, loss, error_rate)

    def fold_data(self, dataset: str, fold: int) -> tuple[Path, str, str]:
        """(BEIR folder, train split, test split) of a fold."""
        src = self.sources[dataset]
        if not self.cfg.folded(dataset):
            train, test = OWN_SPLITS
            return src, train, test
        started = time.perf_counter()
        dst = self.paths.fold(dataset, fold) / "data"
        write_fold(src, dst, self.cfg, fold)
        self.timer.add("folds", started)
        return dst, "train", "test"

    def mined(self, dataset: str, fold: int) -> Path:
        from pipeline.stages.mine import MineConfig

        out = self.paths.fold(dataset, fold) / "mined"
        if self.done.get((MINE.name, dataset, fold)) == out:
            return out
        data, train_split, _ = self.fold_data(dataset, fold)
        started = time.perf_counter()
        run_stage(
            MINE,
            MineConfig(
                data=data,
                split=train_split,
                out=out,
                model=self.cfg.model,
                depth=self.cfg.depth,
                num_negatives=self.cfg.candidates,
                max_seq_length=self.cfg.max_seq_length,
                max_queries=self.cfg.max_queries,
                cache_dir=self.paths.embeddings,
                retriever="dense",
                progress=False,
            ),
            log=lambda m: self.log(f"[{dataset} fold {fold}] {m}"),
        )
        self.timer.add(MINE.name, started)
        self.done[(MINE.name, dataset, fold)] = out
        return out

    def relabeled(self, dataset: str, fold: int, error_rate: float, graded: bool) -> Path:

        mode = "graded" if graded else "relabel"
        out = self.paths.fold(dataset, fold) / f"{mode}-e{error_rate:.2f}"
        key = (RELABEL.name, dataset, fold, error_rate, mode)
        if self.done.get(key) == out:
            return out
        mined = self.mined(dataset, fold)
        started = time.perf_counter()
        run_stage(
            RELABEL,
            self.relabel_config(
                mined, out, Oracles.model(dataset, error_rate), self.oracles.url(dataset), mode
            ),
            log=lambda m: self.log(f"[{dataset} fold {fold} e={error_rate:.2f}] {m}"),
        )
        self.timer.add(RELABEL.name, started)
        self.done[key] = out
        return out

    def relabel_config(self, mined: Path, out: Path, model: str, base_url: str, mode: str) -> RelabelConfig:
        """The study's relabel options for any judge: the simulated one, or a real server's model."""
        return RelabelConfig(
            input=mined,
            out=out,
            model=model,
            mode=mode,
            base_url=[base_url],
            candidates="negatives",
            max_candidates=self.cfg.candidates,
            max_passage_chars=self.cfg.judge_chars,
            llm_cache=self.paths.llm_cache,
            progress=False,
        )

    def training_data(self, cell: Cell) -> Path | None:
        if cell.loss == ZERO_SHOT:
            return None
        if cell.loss == BASELINE or cell.error_rate is None:
            return self.mined(cell.dataset, cell.fold)
        graded = self.cfg.graded and cell.loss in GRADED_LOSSES
        return self.relabeled(cell.dataset, cell.fold, cell.error_rate, graded)

    def train(self, cell: Cell, data: Path) -> tuple[Path, dict[str, Any]]:
        out = self.paths.fold(cell.dataset, cell.fold) / "models" / cell.file_name
        record = out / "mpr" / "train.json"
        if record.exists():
            return out, json.loads(record.read_text())["summary"]
        started = time.perf_counter()
        summary = run_stage(
            TRAIN,
            TrainConfig(
                data=[data],
                out=out,
                model=self.cfg.model,
                loss=SINGLE_POSITIVE_LOSS if cell.loss == BASELINE else cell.loss,
                group_size=self.cfg.group_size,
                max_positives=self.cfg.max_positives,
                batch_size=self.cfg.batch_size,
                max_steps=self.cfg.steps,
                learning_rate=self.cfg.learning_rate,
                attention_dropout=self.cfg.attention_dropout,
                max_seq_length=self.cfg.max_seq_length,
                memory_budget=self.cfg.memory_budget,
                seed=self.cfg.seed,
                logging_steps=max(1, self.cfg.steps // 10),
                save_steps=max(500, self.cfg.steps + 1),
                overwrite=True,
                progress=False,
            ),
            log=lambda m: self.log(f"{cell.label} {m}"),
        )
        self.timer.add(TRAIN.name, started)
        return out, summary

    def evaluate(self, cell: Cell, model: str, cached: bool) -> dict[str, Any]:
        from pipeline.stages.evaluate import EvalConfig, EvalReport

        data, _, test_split = self.fold_data(cell.dataset, cell.fold)
        started = time.perf_counter()
        report: EvalReport = run_stage(
            EVAL,
            EvalConfig(
                model=model,
                data=data,
                split=test_split,
                max_seq_length=self.cfg.max_seq_length,
                cache_dir=self.paths.embeddings,
                no_cache=not cached,
                progress=False,
            ),
            log=lambda m: self.log(f"{cell.label} {m}"),
            show_table=False,
        )
        self.timer.add(EVAL.name, started)
        return {
            "metrics": report.result.metrics,
            "queries": report.queries,
            "corpus_size": report.corpus_size,
            "per_query_ndcg@10": {q: round(m["ndcg@10"], 6) for q, m in report.result.per_query.items()},
            "seconds": report.seconds,
        }

    def estimate(self, cells: list[Cell]) -> tuple[float, str]:
        """Seconds the missing cells should take: per-cell times measured in this OUT when there are any (per
        dataset), else the constants measured on the project's 2-core CPU box, scaled by the settings."""
        measured: dict[tuple[str, bool], list[float]] = {}
        for cell in cells:
            path = self.paths.cell(cell)
            if path.exists():
                record = json.loads(path.read_text())
                measured.setdefault((cell.dataset, record.get("train") is not None), []).append(
                    record["seconds"]
                )
        scale = self.cfg.max_seq_length / 96
        total, sources = 0.0, set()
        for cell in cells:
            if self.paths.cell(cell).exists():
                continue
            trained = cell.loss != ZERO_SHOT
            got = measured.get((cell.dataset, trained))
            if got:
                total += statistics.fmean(got)
                sources.add("measured")
                continue
            docs = self.skipped[cell.dataset]["documents"]
            encode = docs * ENCODE_S_PER_DOC * scale
            if trained:
                total += (
                    LOAD_S
                    + self.cfg.steps * self.cfg.batch_size * self.cfg.group_size * TRAIN_S_PER_TEXT * scale
                    + encode
                )
            else:
                total += encode * 2  # the base model's corpus, for mining and evaluation of the fold
            sources.add("constants")
        how = (
            "from the cells already done here"
            if sources == {"measured"}
            else "rough, from per-text constants measured on a 2-core CPU (bench/results/cpu); "
            "a GPU is far faster"
            + ("; partly from the cells already done here" if "measured" in sources else "")
        )
        return total, how

    def run_cell(self, cell: Cell) -> float | None:
        """Compute a missing cell and save it at once; returns its seconds (None when it was already done)."""
        path = self.paths.cell(cell)
        if path.exists():
            return None
        started = time.perf_counter()
        data = self.training_data(cell)
        record: dict[str, Any] = {
            **asdict(cell),
            "identity": self.cfg.identity(),
            "train_data": None,
            "train": None,
        }
        if data is None:
            record["eval"] = self.evaluate(cell, self.cfg.model, cached=True)
        else:
            model, summary = self.train(cell, data)
            record["train_data"], record["train"] = str(data), summary
            record["judge"] = judge_stats(data)
            record["eval"] = self.evaluate(cell, str(model), cached=False)
            if not self.keep_models:
                shutil.rmtree(model)
        record["hardware"] = self.hw["summary"]
        record["load_average"] = [round(x, 2) for x in os.getloadavg()]
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        record["command"] = self.command
        write_json_atomic(path, record)
        self.computed += 1
        self.log(
            f"{cell.label} nDCG@10 {record['eval']['metrics']['ndcg@10']:.4f} ({record['seconds']:.0f}s)"
        )
        return record["seconds"]


def judge_stats(folder: Path) -> dict[str, Any] | None:
    """What the judge said about the mined candidates of a relabel run (None for unrelabeled data)."""
    from pipeline.data.shards import read_manifest

    manifest = read_manifest(folder)
    if manifest is None or manifest.stage != RELABEL.name:
        return None
    summary = manifest.summary
    return {k: summary.get(k, 0) for k in ("queries", "judged", "flagged", "failed")} | {
        "mode": manifest.config.get("mode")
    }


# -- the study ----------------------------------------------------------------------------------------------


def check_identity(folder: Path, cfg: StudyConfig) -> None:
    """Refuse a folder that holds results of other result-determining settings."""
    path = folder / "study-identity.json"
    identity = cfg.identity()
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if changed:
            raise MprError(
                f"{folder}: holds a study with other settings "
                f"({', '.join(f'{k}: {old.get(k)} -> {identity.get(k)}' for k in changed)}); "
                "choose another --out/--work"
            )
    else:
        write_json_atomic(path, identity)


def run_study(
    cfg: StudyConfig, *, command: str, log: Callable[[str], None] = log_with_time
) -> dict[str, Any]:
    """Compute the missing cells (each saved when it finishes) and write the report; returns
    {"markdown": ..., "rows": ...}."""
    started = time.perf_counter()
    paths = Paths(cfg.out.resolve(), cfg.work_dir.resolve())
    check_identity(paths.out, cfg)
    check_identity(paths.work, cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    with ExitStack() as stack:
        study = Study(cfg, cfg.sources, paths, cfg.keep_models, stack, command, log=log)
        cells = list(study.cells())
        todo = [c for c in cells if not paths.cell(c).exists()]
        log(
            f"study {_title(cfg)}: {len(cells)} cells "
            f"({', '.join(f'{d}: {len(cfg.folds_of(d))} fold(s)' for d in cfg.datasets)}), "
            f"{len(cells) - len(todo)} already done; out {paths.out}, work {paths.work}; "
            f"{study.hw['summary']}"
        )
        if not cfg.report_only and todo:
            estimate, how = study.estimate(cells)
            log(f"estimate: {len(todo)} cells to compute, about {number(estimate, 'seconds')} ({how})")
            spent: list[float] = []
            for n, cell in enumerate(todo, start=1):
                seconds = study.run_cell(cell)
                if seconds is not None:
                    spent.append(seconds)
                left = (
                    study.estimate(cells)[0] if len(spent) < 3 else statistics.fmean(spent) * (len(todo) - n)
                )
                log(
                    f"progress: cell {n}/{len(todo)} done {cell.label}; "
                    f"{number(time.perf_counter() - started, 'seconds')} "
                    f"elapsed, about {number(left, 'seconds')} left"
                )
    meta = {
        "command": command,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "computed": study.computed,
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {k: round(v, 1) for k, v in study.timer.seconds.items()},
        "hardware": study.hw["summary"],
        "collections": {d: {"path": str(cfg.sources[d]), **study.skipped[d]} for d in cfg.datasets},
    }
    report = write_study_report(cfg, paths, cells, meta)
    log(f"wrote {paths.out / 'study.md'}, study.json, study.png in {time.perf_counter() - started:.0f}s")
    return report
