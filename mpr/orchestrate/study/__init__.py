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

from mpr.orchestrate.study.config import (
    ALL_LOSSES,
    BASELINE,
    GRADED_LOSSES,
    LABELS,
    LISTWISE,
    METRICS,
    MULTI_POSITIVE,
    OWN_SPLITS,
    PLOT_NAMES,
    ROW_NAMES,
    ZERO_SHOT,
    Cell,
    Paths,
    StudyConfig,
    write_json_atomic,
)
from mpr.orchestrate.study.folds import (
    fold_assignment,
    kept_positive,
    pooled_qrels,
    prepare_source,
    write_fold,
)
from mpr.orchestrate.study.report import REFERENCES, collect, figure, findings, plot, write_study_report
from mpr.orchestrate.study.runner import (
    ENCODE_S_PER_DOC,
    LOAD_S,
    TRAIN_S_PER_TEXT,
    Oracles,
    Study,
    Timer,
    check_identity,
    judge_stats,
    log_with_time,
    run_study,
)

__all__ = [
    "ALL_LOSSES",
    "BASELINE",
    "ENCODE_S_PER_DOC",
    "GRADED_LOSSES",
    "LABELS",
    "LISTWISE",
    "LOAD_S",
    "METRICS",
    "MULTI_POSITIVE",
    "OWN_SPLITS",
    "PLOT_NAMES",
    "REFERENCES",
    "ROW_NAMES",
    "TRAIN_S_PER_TEXT",
    "ZERO_SHOT",
    "Cell",
    "Oracles",
    "Paths",
    "Study",
    "StudyConfig",
    "Timer",
    "check_identity",
    "collect",
    "figure",
    "findings",
    "fold_assignment",
    "judge_stats",
    "kept_positive",
    "log_with_time",
    "plot",
    "pooled_qrels",
    "prepare_source",
    "run_study",
    "write_fold",
    "write_json_atomic",
    "write_study_report",
]
