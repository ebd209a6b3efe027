"""Trainer callbacks of `mpr train`: the loss's state in every checkpoint, a progress bar with memory, and
without a bar the logged values as lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from train.memory import format_size, peak_rss_bytes

#: The loss's own state saved with every checkpoint: its learned parameters and rand1's generator.
LOSS_STATE = "mpr_loss_state.pt"


def loss_state(loss: nn.Module) -> dict[str, Any]:
    """The loss's state without the model's weights (which the checkpoint holds already)."""
    return {k: v for k, v in loss.state_dict().items() if not k.startswith("model.")}


class LossStateCallback(TrainerCallback):
    """Saves the loss's own state (a learned temperature, BiXSE's scale and bias, Rand1LH's random
    generator) into every checkpoint, so that `--resume` continues with the same values and draws."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(loss_state(self.loss), folder / LOSS_STATE)


def restore_loss_state(loss: nn.Module, checkpoint: Path) -> bool:
    path = checkpoint / LOSS_STATE
    if not path.is_file():
        return False
    loss.load_state_dict(torch.load(path, weights_only=False), strict=False)
    return True


class MemoryProgressCallback(ProgressCallback):
    """The library's progress bar (steps, steps/s, ETA) with the peak memory beside it."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_step_end(args, state, control, **kwargs)
        bar = getattr(self, "training_bar", None)
        if bar is not None and state.is_world_process_zero:
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()
            bar.set_postfix_str(f"peak {format_size(peak)}", refresh=False)


class LogLinesCallback(TrainerCallback):
    """Without a progress bar: each logging step as one line through `log` (in place of the library's
    PrinterCallback, which prints the raw dict)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in logs.items()
            if k not in ("epoch", "total_flos")
        )
        self.log(f"train: step {state.global_step}/{state.max_steps}: {shown}")


class MemoryGuardCallback(TrainerCallback):
    """Keeps the run within its memory budget when the planner's estimate was short: each time the
    peak memory rises past the budget, the GradCache chunks shrink by the excess (never below one text),
    once per rise, with one line saying so."""

    def __init__(self, loss: nn.Module, budget: int, log: Callable[[str], None]) -> None:
        self.loss, self.budget, self.log = loss, budget, log
        self.seen = budget

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()
        plan = getattr(self.loss, "chunk_plan", None)
        if peak <= self.seen or plan is None or plan.max_bytes is None:
            return
        excess, self.seen = peak - self.seen, peak
        smaller = max(plan.max_bytes - excess * 1.2, plan.cost(1))
        self.loss.chunk_plan = dataclasses.replace(plan, max_bytes=smaller)
        self.log(
            f"train: peak memory {format_size(peak)} passed the budget {format_size(self.budget)} at step "
            f"{state.global_step}; GradCache chunks shrink to {format_size(smaller)} of activations"
        )
