"""`mpr train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mpr.commands._common import Overwrite, Quiet, log, one_line_errors, print_summary


@one_line_errors(cleanup=False)  # keep checkpoints for --resume
def train(
    data: Annotated[list[Path], typer.Option(help="Shard folder(s) from mine/relabel/synth/ingest; repeat to mix (rows of one query are merged).")],
    out: Annotated[Path, typer.Option(help="Output model folder (loads with SentenceTransformer(out)).")],
    loss: Annotated[Literal["infonce", "rand1", "jointlh", "summarglh", "lsepair", "ws2", "bixse"], typer.Option(help="Objective (see the README's table).")] = "lsepair",
    model: Annotated[str, typer.Option(help="Starting sentence-transformers model id or path.")] = "sentence-transformers/all-MiniLM-L6-v2",
    group_size: Annotated[int, typer.Option(help="Passages per query: positives first, then hard, then random negatives.")] = 8,
    max_positives: Annotated[int, typer.Option(help="Positives per group at most.")] = 4,
    positive_threshold: Annotated[float | None, typer.Option(help="Also count rows with grade >= this as positives.")] = None,
    random_negatives: Annotated[bool, typer.Option(help="Fill groups with random negatives from other queries.")] = True,
    batch_size: Annotated[int, typer.Option(help="Queries per batch (per device).")] = 32,
    mini_batch_size: Annotated[int | None, typer.Option(help="GradCache: embed in chunks of this size, same gradients at constant memory.")] = None,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    epochs: Annotated[float, typer.Option(help="Epochs over the groups.")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after N steps (overrides --epochs).")] = -1,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps with linear warm-up.")] = 0.1,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the scores.")] = 0.05,
    learn_temperature: Annotated[bool, typer.Option(help="Learn the temperature.")] = False,
    mask_duplicates: Annotated[bool, typer.Option(help="Mask in-batch copies of a query's own passages (a duplicate of a positive is not a negative).")] = True,
    mask_other_positives: Annotated[bool, typer.Option(help="Mask other queries' positives as likely false negatives.")] = False,
    max_seq_length: Annotated[int | None, typer.Option(help="Truncate inputs to this many tokens.")] = None,
    query_prompt: Annotated[str | None, typer.Option(help="Text prepended to queries.")] = None,
    passage_prompt: Annotated[str | None, typer.Option(help="Text prepended to passages.")] = None,
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"], typer.Option(help="auto: bf16 on a GPU that has it, else fp32.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for groups, sampling and initialisation.")] = 42,
    logging_steps: Annotated[int, typer.Option(help="Log the loss every N steps.")] = 10,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    eval_data: Annotated[Path | None, typer.Option(help="BEIR folder evaluated during training (nDCG@10, MRR@10, recall).")] = None,
    eval_split: Annotated[str, typer.Option(help="qrels split of --eval-data.")] = "test",
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate every N steps (default: --save-steps).")] = None,
    eval_max_queries: Annotated[int | None, typer.Option(help="Evaluate on the first N judged queries only.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: best available).")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a bi-encoder on judgment shards with a multi-positive or graded loss.

    Example: mpr train --data runs/x/relabeled --loss lsepair --out models/x-lsepair
    """
    options = {k: v for k, v in locals().items() if k != "quiet"}
    from pipeline.checks import train_inputs

    train_inputs(data, out, model, eval_data, eval_split)
    from train.trainer import TrainConfig
    from train.trainer import train as run_train

    cfg = TrainConfig(**options, progress=not quiet)
    summary = run_train(cfg, log=log)
    print_summary("train", cfg.out, summary)
