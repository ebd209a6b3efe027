"""`mpr study`: which objective of `mpr train` makes best use of LLM-densified labels, and how robust each is
to a judge that errs, cross-validated on any BEIR collections.

    mpr study --data path/to/beir/cisi --data path/to/beir/vaswani  # 5 folds, errors 0/0.2/0.4, every loss
    mpr study --data DIR --folds 5 --fold-ids 0 --losses lsepair,bixse --error-rates 0,0.4 --steps 30

Documents with an empty title and text and queries with an empty text are skipped and counted (the report
says how many), never a reason to refuse a collection. Before it starts, the study prints an estimate of its
time; while it runs, one line per cell with its result and the time left.

Protocol (one cell = dataset x fold x error rate x loss):

1. Folds. Every collection is folded except those named in `--own-splits` (trained on their own `train` split
   and tested on `test`, as a single "fold" 0). The judged queries of all its qrels files together (a query
   judged in several, with the highest score of each pair) that have a positive are sorted by id, shuffled
   with `fold_seed` and dealt round-robin into k folds, so every judged query is evaluated exactly once. Fold
   f is written as a BEIR folder (corpus and queries are symlinks, never copies) whose `qrels/test.tsv` holds
   fold f's full qrels and whose `qrels/train.tsv` keeps ONE positive per other query, drawn with
   `random.Random(f"{fold_seed}:{qid}")` from its sorted positive ids: the same annotator's pick in every
   fold, as single-positive human annotation would give.
2. `mpr mine` (dense, the base model, `depth` candidates, the top `candidates` non-positives kept as hard
   negatives) once per (dataset, fold). `mpr relabel` once per (dataset, fold, error rate): the judge is the
   SIMULATED judge (`mpr.simulated_judge`) answering from the dataset's ORIGINAL qrels (every split), which
   flips the verdict of a deterministic share `error` of the (query, passage) pairs (false positives and
   false negatives alike; the pairs flipped at 0.2 are a subset of those flipped at 0.4). It judges the
   `candidates` hard negatives of every query (`--candidates negatives`, mode `relabel`).
   Graded losses (ws2, bixse) are trained on a second relabel run in mode `graded` (pointwise 0-3 grades,
   expected grade from the logprobs) when `graded` is on (default): graded targets are what they are built
   for. The oracle grades from the same flipped verdict (3 or 0, answered with probability 0.85), so the
   graded data carry the same verdicts as the listwise data, only as soft grades (0.9 / 0.1; the kept
   annotated positive stays at 1.0). `--no-graded` trains them on the binary relabel data instead.
3. Every loss is trained from the base model with the same budget (steps, batch, group size, learning
   rate, seed, max_seq_length); the baseline is single-positive InfoNCE on the mined data WITHOUT
   relabeling (its hard negatives include the unannotated positives). The zero-shot model is evaluated too.
   Every model is evaluated (`mpr eval`) on the held-out fold's full qrels and then deleted
   (`--keep-models` keeps it). The stages run through the runner `mpr run` uses (`run_stage`).
4. The report (`OUT/study.md`, `OUT/study.json`, `OUT/study.png`): mean and sample std over folds per
   (dataset, loss, error rate), a pivot of nDCG@10 against the error rate, paired tests of every loss against
   zero-shot and against single-positive InfoNCE over the pooled held-out queries, and the hardware each cell
   ran on.

Resuming: a cell's result is `OUT/cells/DATASET/foldF/NAME.json`, written when the cell finishes; a rerun
computes only missing cells and reuses each stage's finished output folder under WORK (default `OUT/work`).
Relabel requests are cached in `WORK/llm.sqlite`; base-model embeddings in `WORK/cache`. An OUT or WORK
written with other result-determining settings is refused.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mpr.orchestrate.experiment import run_stage
from mpr.orchestrate.report import ALPHA, MIN_QUERIES
from mpr.orchestrate.stages import EVAL, MINE, RELABEL, TRAIN
from pipeline.data.identity import RUNTIME, identity
from pipeline.data.locations import DEFAULT_MODEL
from pipeline.data.readers import find_file, open_text, read_qrels, split_names
from pipeline.data.shards import write_json_atomic as _write_json_atomic
from pipeline.errors import MprError
from pipeline.formatting import number
from pipeline.stages.relabel import RelabelConfig
from pipeline.stages.synth import split_list
from train.config import TrainConfig, check_size
from train.losses.registry import LOSSES, SINGLE_POSITIVE_LOSS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
        DEFAULT_MODEL,
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


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


# The time estimate before any cell of a study has finished: seconds measured on the project's 2-core CPU box
# (bench/results/cpu: cisi, max_seq_length 96, batch 8 x group 6, 30 steps in ~90 s; 1,460 abstracts encoded
# in ~20 s), scaled linearly by max_seq_length. Rough: the load of the machine moves them by 2x.
TRAIN_S_PER_TEXT = 0.07
ENCODE_S_PER_DOC = 0.014
LOAD_S = 5.0


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, payload)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    text = f"{cpu}, {os.cpu_count()} CPUs, " + (f"GPU {gpu}" if gpu else "no GPU")
    return {
        "summary": f"{text} (torch {torch.__version__}, python {platform.python_version()})",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


# -- data --------------------------------------------------------------------------------------------------


def _qid_key(qid: str) -> tuple[int, int, str]:
    return (0, int(qid), qid) if qid.isdigit() else (1, 0, qid)


def fold_assignment(qids: list[str], k: int, seed: int) -> dict[str, int]:
    order = sorted(qids, key=_qid_key)
    random.Random(seed).shuffle(order)
    return {qid: i % k for i, qid in enumerate(order)}


def kept_positive(qid: str, judged: dict[str, int], seed: int) -> str:
    return random.Random(f"{seed}:{qid}").choice(sorted(p for p, s in judged.items() if s >= 1))


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target.resolve())


def _qrels_tsv(rows: list[tuple[str, str, int]]) -> str:
    return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t{s}\n" for q, p, s in rows)


def _blank(obj: Any, fields: tuple[str, ...]) -> bool:
    return isinstance(obj, dict) and not any(isinstance(obj.get(f), str) and obj[f].strip() for f in fields)


def _jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(line, parsed object or None when it does not parse) for every non-blank line; the readers judge the
    rest."""
    with open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    yield line, json.loads(line)
                except ValueError:
                    yield line, None


def prepare_source(src: Path, dst: Path) -> tuple[Path, dict[str, int]]:
    """The collection the study reads: `src` itself, or, when it has documents with an empty title and text or
    queries with an empty text, a copy under `dst` without them and without the judgments that point at them.
    Returns (folder, counts of what was skipped)."""
    corpus, queries = find_file(src, "corpus.jsonl"), find_file(src, "queries.jsonl")
    if corpus is None or queries is None:
        raise MprError(
            f"{src}: not a BEIR folder (needs corpus.jsonl and queries.jsonl, each optionally .gz)"
        )
    if not split_names(src):
        raise MprError(f"{src}: no qrels/*.tsv")
    docs = list(_jsonl_lines(corpus))
    blank_docs = {str(o.get("_id")) for _, o in docs if _blank(o, ("title", "text"))}
    qs = list(_jsonl_lines(queries))
    blank_queries = {str(o.get("_id")) for _, o in qs if _blank(o, ("text",))}
    counts = {
        "documents": len(docs) - len(blank_docs),
        "queries": len(qs) - len(blank_queries),
        "empty_documents": len(blank_docs),
        "empty_queries": len(blank_queries),
        "judgments_dropped": 0,
    }
    if not blank_docs and not blank_queries:
        return src, counts
    _write_if_changed(
        dst / "corpus.jsonl",
        "".join(
            line if line.endswith("\n") else line + "\n"
            for line, o in docs
            if not (o is not None and str(o.get("_id")) in blank_docs and _blank(o, ("title", "text")))
        ),
    )
    _write_if_changed(
        dst / "queries.jsonl",
        "".join(
            line if line.endswith("\n") else line + "\n"
            for line, o in qs
            if not (o is not None and str(o.get("_id")) in blank_queries and _blank(o, ("text",)))
        ),
    )
    for split in split_names(src):
        qrels, _ = read_qrels(_qrels_file(src, split))
        rows = [(q, p, sc) for q, judged in qrels.items() for p, sc in judged.items()]
        kept = [(q, p, sc) for q, p, sc in rows if q not in blank_queries and p not in blank_docs]
        counts["judgments_dropped"] += len(rows) - len(kept)
        _write_if_changed(dst / "qrels" / f"{split}.tsv", _qrels_tsv(kept))
    return dst, counts


def _qrels_file(src: Path, split: str) -> Path:
    found = find_file(src / "qrels", f"{split}.tsv")
    if found is None:
        raise MprError(f"{src}: no qrels/{split}.tsv")
    return found


def pooled_qrels(src: Path) -> dict[str, dict[str, int]]:
    """The judgments of every qrels file of a collection together (the highest score of a pair judged
    twice)."""
    pooled: dict[str, dict[str, int]] = {}
    for split in split_names(src):
        qrels, _ = read_qrels(_qrels_file(src, split))
        for q, judged in qrels.items():
            for p, score in judged.items():
                pooled.setdefault(q, {})[p] = max(score, pooled.get(q, {}).get(p, score))
    return pooled


def write_fold(src: Path, dst: Path, cfg: StudyConfig, fold: int) -> dict[str, int]:
    """The BEIR folder of one fold: train = one kept positive per training query, test = the fold's full
    qrels."""
    qrels = pooled_qrels(src)
    judged = {q: j for q, j in qrels.items() if any(s >= 1 for s in j.values())}
    if len(judged) < cfg.folds:
        raise MprError(
            f"{src}: {len(judged)} judged queries with a positive, fewer than the {cfg.folds} folds"
        )
    assign = fold_assignment(list(judged), cfg.folds, cfg.fold_seed)
    train: list[tuple[str, str, int]] = []
    test: list[tuple[str, str, int]] = []
    for qid in sorted(judged, key=_qid_key):
        if assign[qid] == fold:
            test += [(qid, p, s) for p, s in judged[qid].items()]
        else:
            keep = kept_positive(qid, judged[qid], cfg.fold_seed)
            train.append((qid, keep, judged[qid][keep]))
    for name in ("corpus.jsonl", "queries.jsonl"):
        found = find_file(src, name)
        if found is None:
            raise MprError(f"{src}: no {name}")
        dst.mkdir(parents=True, exist_ok=True)
        _link(found, dst / found.name)
    _write_if_changed(dst / "qrels" / "train.tsv", _qrels_tsv(train))
    _write_if_changed(dst / "qrels" / "test.tsv", _qrels_tsv(test))
    return {
        "train_queries": len(train),
        "test_queries": len({q for q, _, _ in test}),
        "dropped_positives": sum(sum(1 for s in judged[q].values() if s >= 1) - 1 for q, _, _ in train),
    }


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
        log: Callable[[str], None] = log,
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
        from pipeline.stages.relabel import RelabelConfig

        mode = "graded" if graded else "relabel"
        out = self.paths.fold(dataset, fold) / f"{mode}-e{error_rate:.2f}"
        key = (RELABEL.name, dataset, fold, error_rate, mode)
        if self.done.get(key) == out:
            return out
        mined = self.mined(dataset, fold)
        started = time.perf_counter()
        run_stage(
            RELABEL,
            RelabelConfig(
                input=mined,
                out=out,
                model=Oracles.model(dataset, error_rate),
                mode=mode,
                base_url=[self.oracles.url(dataset)],
                candidates="negatives",
                max_candidates=self.cfg.candidates,
                max_passage_chars=self.cfg.judge_chars,
                llm_cache=self.paths.llm_cache,
                progress=False,
            ),
            log=lambda m: self.log(f"[{dataset} fold {fold} e={error_rate:.2f}] {m}"),
        )
        self.timer.add(RELABEL.name, started)
        self.done[key] = out
        return out

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


# -- report ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _secs(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return f"{statistics.fmean(got):.0f}" if got else "–"


def _judge_line(rows: list[dict[str, Any]], error_rates: Sequence[float]) -> str:
    parts = []
    for e in error_rates:
        by_fold: dict[tuple[str, int], dict[str, Any]] = {}
        for row in rows:
            if row["error_rate"] == e:
                for fold, stats in row["judge"].items():
                    by_fold[(stats["mode"], fold)] = stats
        listwise = [v for (mode, _), v in by_fold.items() if mode == LISTWISE] or list(by_fold.values())
        judged, flagged = sum(v["judged"] for v in listwise), sum(v["flagged"] for v in listwise)
        failed = sum(v["failed"] for v in by_fold.values())
        if judged:
            parts.append(
                f"e={_err(e)}: {flagged:,} of {judged:,} hard negatives flagged relevant "
                f"({flagged / judged:.1%})" + (f", {failed:,} judgments failed" if failed else "")
            )
    return "; ".join(parts)


def _err(error_rate: float | None) -> str:
    return (
        "–"
        if error_rate is None
        else f"{error_rate:.1f}"
        if round(error_rate, 1) == error_rate
        else f"{error_rate:.2f}"
    )


def collect(cfg: StudyConfig, paths: Paths, cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (dataset, loss, error rate) with per-fold values of each metric."""
    rows: dict[tuple[str, str, float | None], dict[str, Any]] = {}
    for cell in cells:
        path = paths.cell(cell)
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        key = (cell.dataset, cell.loss, cell.error_rate)
        row = rows.setdefault(
            key,
            {
                "dataset": cell.dataset,
                "loss": cell.loss,
                "error_rate": cell.error_rate,
                "folds": [],
                "metrics": {m: [] for m in METRICS},
                "hardware": [],
                "train_seconds": [],
                "eval_seconds": [],
                "cell_seconds": [],
                "judge": {},
                "per_query": {},
                "computed_by": [],
            },
        )
        row["folds"].append(cell.fold)
        row["per_query"][cell.fold] = record["eval"]["per_query_ndcg@10"]
        for m in METRICS:
            row["metrics"][m].append(record["eval"]["metrics"][m])
        if record["hardware"] not in row["hardware"]:
            row["hardware"].append(record["hardware"])
        if record.get("train"):
            row["train_seconds"].append(record["train"].get("seconds"))
        row["eval_seconds"].append(record["eval"]["seconds"])
        row["cell_seconds"].append(record["seconds"])
        row["computed_by"].append({"command": record.get("command"), "finished": record["finished"]})
        if record.get("judge"):
            row["judge"][cell.fold] = record["judge"]
    out = []
    for row in rows.values():
        row["summary"] = {m: dict(zip(("mean", "std"), _mean_std(v))) for m, v in row["metrics"].items()}
        out.append(row)
    return out


def _row(
    rows: list[dict[str, Any]], dataset: str, loss: str, error_rate: float | None
) -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["dataset"], r["loss"], r["error_rate"]) == (dataset, loss, error_rate)), None
    )


def _value(rows: list[dict[str, Any]], dataset: str, loss: str, error_rate: float | None) -> dict[int, float]:
    row = _row(rows, dataset, loss, error_rate)
    return dict(zip(row["folds"], row["metrics"]["ndcg@10"])) if row else {}


def _per_query(
    rows: list[dict[str, Any]], dataset: str, loss: str, error_rate: float | None
) -> dict[tuple[str, Any, str], float]:
    row = _row(rows, dataset, loss, error_rate)
    if row is None:
        return {}
    return {
        (dataset, fold, qid): v
        for fold, per_query in row["per_query"].items()
        for qid, v in per_query.items()
    }


REFERENCES = {"vs_baseline": BASELINE, "vs_zero_shot": ZERO_SHOT}


def findings(cfg: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers behind the paper's claims (nDCG@10): deltas paired by fold, and a paired test over the
    held-out queries pooled over folds and datasets (every query is held out in exactly one fold)."""
    from pipeline.stages.evaluate import paired_tests

    errors = sorted(cfg.error_rates)
    losses = [loss for loss in ALL_LOSSES if loss in cfg.losses]
    out: dict[str, Any] = {**{name: {} for name in REFERENCES}, "drop": {}, "mean_rank": {}}
    for loss in losses:
        for e in errors:
            for name, reference in REFERENCES.items():
                deltas, a, b = [], [], []
                for dataset in cfg.datasets:
                    base, got = _value(rows, dataset, reference, None), _value(rows, dataset, loss, e)
                    deltas += [got[f] - base[f] for f in got if f in base]
                    qbase, qgot = (
                        _per_query(rows, dataset, reference, None),
                        _per_query(rows, dataset, loss, e),
                    )
                    common = sorted(set(qgot) & set(qbase), key=str)
                    a += [qgot[k] for k in common]
                    b += [qbase[k] for k in common]
                if deltas:
                    p_t, p_r = paired_tests(a, b)
                    out[name].setdefault(loss, {})[f"{e:.2f}"] = {
                        "mean_delta": statistics.fmean(deltas),
                        "wins": sum(d > 0 for d in deltas),
                        "n": len(deltas),
                        "queries": len(a),
                        "p_ttest": p_t,
                        "p_randomization": p_r,
                    }
        if len(errors) > 1:
            drops = []
            for dataset in cfg.datasets:
                lo, hi = _value(rows, dataset, loss, errors[0]), _value(rows, dataset, loss, errors[-1])
                drops += [hi[f] - lo[f] for f in hi if f in lo]
            if drops:
                out["drop"][loss] = {
                    "mean": statistics.fmean(drops),
                    "n": len(drops),
                    "from": errors[0],
                    "to": errors[-1],
                }
    ranks: dict[str, list[int]] = {loss: [] for loss in losses}
    for dataset in cfg.datasets:
        for e in errors:
            values = {loss: _value(rows, dataset, loss, e) for loss in losses}
            for f in sorted({f for v in values.values() for f in v}):
                ran = [loss for loss in losses if f in values[loss]]
                if len(ran) < 2:
                    continue
                for rank, loss in enumerate(sorted(ran, key=lambda loss: -values[loss][f]), start=1):
                    ranks[loss].append(rank)
    out["mean_rank"] = {loss: statistics.fmean(r) for loss, r in ranks.items() if r}
    return out


def _delta_cell(got: dict[str, Any] | None) -> str:
    if not got:
        return "–"
    p = got["p_randomization"]
    return f"{got['mean_delta']:+.4f} ({got['wins']}/{got['n']}" + (
        f", p {number(p, 'p')})" if p is not None else ")"
    )


def _findings_md(cfg: StudyConfig, found: dict[str, Any]) -> list[str]:
    errors = sorted(cfg.error_rates)
    losses = [loss for loss in ALL_LOSSES if loss in cfg.losses]
    lines = [
        "## The paper's claims, as this data answers them",
        "",
        "nDCG@10. Δ is the loss minus the reference, paired by fold and pooled over the datasets above "
        "(wins: folds where the loss is better, of n); p is a two-sided paired randomization test over the "
        "held-out queries of those folds (each query is held out once; the t-test's p is in study.json). "
        "The change is from the lowest to the highest error rate; the rank is among the losses run, per "
        "(dataset, fold, error rate). Read them with the number of folds and the spread in the tables.",
        "",
    ]
    for name, title in (
        ("vs_baseline", "the single-positive baseline"),
        ("vs_zero_shot", "the zero-shot model"),
    ):
        head = [f"e={_err(e)}" for e in errors]
        if name == "vs_baseline":
            head += ([f"change e={_err(errors[0])}→{_err(errors[-1])}"] if len(errors) > 1 else []) + [
                "mean rank"
            ]
        lines += [
            f"Against {title}:",
            "",
            "| loss | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(head),
        ]
        for loss in losses:
            cells = [_delta_cell(found[name].get(loss, {}).get(f"{e:.2f}")) for e in errors]
            if name == "vs_baseline":
                if len(errors) > 1:
                    drop = found["drop"].get(loss)
                    cells.append(f"{drop['mean']:+.4f}" if drop else "–")
                rank = found["mean_rank"].get(loss)
                cells.append(f"{rank:.2f}" if rank is not None else "–")
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
        lines.append("")
    multi = [loss for loss in MULTI_POSITIVE if loss in found["vs_baseline"]]
    for e in errors:
        ran = [loss for loss in multi if f"{e:.2f}" in found["vs_baseline"][loss]]
        got = [found["vs_baseline"][loss][f"{e:.2f}"] for loss in ran]
        if got:
            wins, n = sum(g["wins"] for g in got), sum(g["n"] for g in got)
            mean = statistics.fmean(g["mean_delta"] for g in got)
            lines.append(
                f"- Multi-positive objectives ({', '.join(ran)}) vs the single-positive baseline at error "
                f"{_err(e)}: better in {wins} of {n} cells, mean Δ nDCG@10 {mean:+.4f}."
            )
    for name, title in (
        ("vs_zero_shot", "the zero-shot model"),
        ("vs_baseline", "single-positive InfoNCE (the baseline)"),
    ):
        significant, not_significant, too_few = [], [], []
        for loss in losses:
            for e in errors:
                got = found[name].get(loss, {}).get(f"{e:.2f}")
                if not got:
                    continue
                what = (
                    f"{loss} at e={_err(e)} "
                    f"({got['mean_delta']:+.4f}, p {number(got['p_randomization'], 'p')})"
                    if got["p_randomization"] is not None
                    else loss
                )
                if got["queries"] < MIN_QUERIES:
                    too_few.append(what)
                elif got["p_randomization"] is not None and got["p_randomization"] < ALPHA:
                    significant.append(what)
                else:
                    not_significant.append(what)
        if significant or not_significant or too_few:
            lines.append(
                f"- Against {title}, over the pooled held-out queries: significant at p < {ALPHA} "
                "(two-sided paired randomization test, no correction for the "
                f"{len(significant) + len(not_significant)} tests): "
                f"{'; '.join(significant) or 'none'}. "
                f"Not significant: {'; '.join(not_significant) or 'none'}."
                + (f" Too few queries (< {MIN_QUERIES}) for a test: {'; '.join(too_few)}." if too_few else "")
            )
    if found["drop"]:
        order = sorted(found["drop"].items(), key=lambda kv: -kv[1]["mean"])
        lines.append(
            f"- Most robust to judge errors (smallest loss of nDCG@10): {order[0][0]}; "
            f"most sensitive: {order[-1][0]}."
        )
    return [*lines, ""]


def _provenance(rows: list[dict[str, Any]]) -> list[str]:
    """The commands that computed the cells of `rows`: cells, their wall time and when they finished, per
    command."""
    by: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        for who, seconds in zip(row["computed_by"], row["cell_seconds"]):
            got = by.setdefault(who["command"], {"cells": 0, "seconds": 0.0, "finished": []})
            got["cells"] += 1
            got["seconds"] += seconds
            got["finished"].append(who["finished"].replace("T", " "))
    lines = []
    for command, got in sorted(by.items(), key=lambda kv: min(kv[1]["finished"])):
        what = f"`{command}`" if command else "a run that did not record its command"
        lines.append(
            f"- {what}: {got['cells']} cell{'s' if got['cells'] != 1 else ''}, "
            f"{got['seconds']:.0f}s, finished "
            f"{min(got['finished'])} to {max(got['finished'])}"
        )
    return lines


def write_report(cfg: StudyConfig, paths: Paths, cells: list[Cell], meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` describes this invocation; each cell names the command that computed it."""
    rows = collect(cfg, paths, cells)
    found = findings(cfg, rows)
    hardware_ids: dict[str, str] = {}
    for row in rows:
        row["hardware_ids"] = [
            hardware_ids.setdefault(h, f"hw{len(hardware_ids) + 1}") for h in row["hardware"]
        ]
    computed = meta["computed"]
    this_run = (
        f"; it computed {computed} cell{'s' if computed != 1 else ''} in {meta['seconds']:.0f}s (stages: "
        f"{', '.join(f'{k} {v:.0f}s' for k, v in meta['stage_seconds'].items()) or 'none'})"
        if computed
        else ""
    )
    lines = [
        f"# mpr loss study ({_title(cfg)})",
        "",
        f"Report written {meta['finished']} by `{meta['command']}`{this_run}.",
        "",
        f"The {sum(len(r['folds']) for r in rows)} cells below took "
        f"{sum(sum(r['cell_seconds']) for r in rows):.0f}s "
        "to compute (each cell's wall time, including the mining and relabeling it triggered)"
        + (", by:" if rows else "."),
        "",
        *_provenance(rows),
        *([""] if rows else []),
        "Settings (the same for every trained row): "
        + ", ".join(f"{k} {v}" for k, v in cfg.identity().items() if k not in ("fold_seed", "oracle_seed")),
        "",
        "Hardware each figure was measured on:",
        "",
    ]
    lines += [f"- {hid}: {h}" for h, hid in hardware_ids.items()] + [""]
    for dataset in cfg.datasets:
        drows = [r for r in rows if r["dataset"] == dataset]
        if not drows:
            continue
        folds = cfg.folds_of(dataset)
        how = (
            f"{cfg.folds}-fold CV over the judged queries (folds run: {', '.join(map(str, folds))}); "
            "train qrels keep "
            "one positive per query"
            if cfg.folded(dataset)
            else "train on `train`, test on `test` (one split)"
        )
        counts = meta.get("collections", {}).get(dataset)
        if counts:
            how += f". {counts['documents']:,} documents, {counts['queries']:,} queries" + (
                f"; skipped {counts['empty_documents']:,} empty document(s) "
                f"and {counts['empty_queries']:,} empty "
                f"quer{'y' if counts['empty_queries'] == 1 else 'ies'}, "
                f"and the {counts['judgments_dropped']:,} "
                "judgment(s) pointing at them"
                if counts["empty_documents"] or counts["empty_queries"]
                else ""
            )
        lines += [
            f"## {dataset}",
            "",
            f"{how}. Mean ± sample std over folds.",
            "",
            "| model | error rate | folds | "
            + " | ".join(LABELS[m] for m in METRICS)
            + " | train s | eval s | hardware |",
            "|---|---|---|" + "---|" * len(METRICS) + "---|---|---|",
        ]
        order = [(ZERO_SHOT, None), (BASELINE, None)] + [
            (loss, e) for loss in cfg.losses for e in cfg.error_rates
        ]
        for loss, e in order:
            got = next((r for r in drows if (r["loss"], r["error_rate"]) == (loss, e)), None)
            if got is None:
                continue
            lines.append(
                f"| {ROW_NAMES.get(loss, loss)} | {_err(e)} | {len(got['folds'])} | "
                + " | ".join(_fmt(got["metrics"][m]) for m in METRICS)
                + f" | {_secs(got['train_seconds'])} | {_secs(got['eval_seconds'])} "
                f"| {', '.join(got['hardware_ids'])} |"
            )
        judged = _judge_line(drows, cfg.error_rates)
        if judged:
            lines += ["", f"Judge (oracle over the full qrels), pooled over folds: {judged}."]
        lines += ["", *_by_error_rate(cfg, rows, dataset), ""]
    lines += _findings_md(cfg, found)
    lines += [
        "Protocol: see `mpr study --help` and the docstring of `mpr/orchestrate/study.py`. "
        "Zero-shot and baseline do not depend on the error rate."
    ]
    markdown = "\n".join(lines) + "\n"
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "study.md").write_text(markdown, encoding="utf-8")
    payload = {
        "config": {**cfg.model_dump(mode="json"), "datasets": list(cfg.datasets)},
        "meta": meta,
        "hardware": {v: k for k, v in hardware_ids.items()},
        "rows": [{k: v for k, v in r.items() if k != "hardware"} for r in rows],
        "findings": found,
    }
    write_json_atomic(paths.out / "study.json", payload)
    plot(cfg, rows, paths.out / "study.png")
    return {"markdown": markdown, "rows": rows}


def _all_folds(rows: list[dict[str, Any]], dataset: str) -> int:
    """The folds a cell of `dataset` has once it is complete: the most any of its cells has."""
    return max((len(r["folds"]) for r in rows if r["dataset"] == dataset), default=0)


def _by_error_rate(cfg: StudyConfig, rows: list[dict[str, Any]], dataset: str) -> list[str]:
    """The table of mean nDCG@10 per loss and error rate; a cell still missing folds says how many it has."""
    full = _all_folds(rows, dataset)

    def mean(vals: dict[int, float]) -> str:
        if not vals:
            return "–"
        return f"{statistics.fmean(vals.values()):.4f}" + (
            "" if len(vals) == full else f" ({len(vals)} of {full} folds)"
        )

    lines = [
        f"nDCG@10 against the judge's error rate ({dataset}):",
        "",
        "| loss | " + " | ".join(f"e={_err(e)}" for e in cfg.error_rates) + " |",
        "|---|" + "---|" * len(cfg.error_rates),
    ]
    for loss in [ZERO_SHOT, BASELINE]:
        vals = _value(rows, dataset, loss, None)
        if vals:
            lines.append(f"| {loss} | " + " | ".join(mean(vals) for _ in cfg.error_rates) + " |")
    for loss in cfg.losses:
        lines.append(
            f"| {loss} | " + " | ".join(mean(_value(rows, dataset, loss, e)) for e in cfg.error_rates) + " |"
        )
    return lines


def figure(cfg: StudyConfig, rows: list[dict[str, Any]]) -> Figure:
    """nDCG@10 against the judge's error rate, one panel per collection; a loss has one colour in every
    panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {loss: f"C{i % 10}" for i, loss in enumerate(cfg.losses)}
    datasets = [d for d in cfg.datasets if any(r["dataset"] == d for r in rows)] or list(cfg.datasets)
    width = 4.6 * len(datasets) + 2.8
    fig, axes = plt.subplots(1, len(datasets), figsize=(width, 4.4), squeeze=False)
    errors = sorted(cfg.error_rates)
    for ax, dataset in zip(axes[0], datasets):
        folds = _all_folds(rows, dataset)
        partial = False  # a mean over fewer folds is not comparable with its neighbours: not drawn
        for loss in cfg.losses:
            xs, ys, es = [], [], []
            for e in errors:
                vals = list(_value(rows, dataset, loss, e).values())
                partial |= 0 < len(vals) < folds
                if len(vals) == folds:
                    mean, std = _mean_std(vals)
                    xs.append(e)
                    ys.append(mean)
                    es.append(std or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=loss, color=colours[loss])
        for reference, style in ((ZERO_SHOT, ":"), (BASELINE, "--")):
            vals = list(_value(rows, dataset, reference, None).values())
            if vals:
                ax.axhline(
                    statistics.fmean(vals),
                    color="grey" if reference == ZERO_SHOT else "black",
                    linestyle=style,
                    label=PLOT_NAMES[reference],
                )
        ax.set_title(
            f"{dataset} ({folds} fold{'s' if folds != 1 else ''}"
            + ("; cells missing folds not drawn)" if partial else ")"),
            fontsize=10 if partial else None,
        )
        ax.set_xlabel("judge error rate")
        ax.set_ylabel("nDCG@10 (mean ± std over folds)")
        ax.set_xticks(errors)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}  # every loss and reference of any panel, once
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [
        label for label in (PLOT_NAMES[ZERO_SHOT], PLOT_NAMES[BASELINE], *cfg.losses) if label in legend
    ]
    fig.legend([legend[label] for label in labels], labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(
        f"mpr loss study: {cfg.model.split('/')[-1]},\n{cfg.steps} steps x batch {cfg.batch_size}, "
        f"max_seq_length {cfg.max_seq_length}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / width, 1))
    return fig


def plot(cfg: StudyConfig, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(cfg, rows)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# -- the study ----------------------------------------------------------------------------------------------


def _title(cfg: StudyConfig) -> str:
    return ", ".join(cfg.datasets)


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


def run_study(cfg: StudyConfig, *, command: str, log: Callable[[str], None] = log) -> dict[str, Any]:
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
    report = write_report(cfg, paths, cells, meta)
    log(f"wrote {paths.out / 'study.md'}, study.json, study.png in {time.perf_counter() - started:.0f}s")
    return report
