"""`mpr train`: its options are the fields of `train.config.TrainConfig`."""

from __future__ import annotations

from typing import Any

from mpr.commands._common import DryRun, Quiet, log, one_line_errors, print_plan, print_summary
from mpr.commands.options import config_options
from train.config import TrainConfig


@one_line_errors(cleanup=False)  # the model folder appears only when complete; checkpoints stay for --resume
@config_options(TrainConfig, exclude={"progress"})
def train(dry_run: DryRun = False, quiet: Quiet = False, **options: Any) -> None:
    """Train a bi-encoder on judgment shards with a multi-positive or graded loss.

    Example: mpr train --data runs/x/relabeled --loss lsepair --out models/x-lsepair
    """
    cfg = TrainConfig(**options, progress=not quiet)
    from train.trainer import check_inputs, plan

    check_inputs(cfg)
    if dry_run:
        print_plan(plan(cfg))
        return
    from train.trainer import train as run_train

    summary = run_train(cfg, log=log)
    print_summary("train", cfg.out, summary)
