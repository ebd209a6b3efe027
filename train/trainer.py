"""`mpr train`: a sentence-transformers bi-encoder trained on judgment shards with a group loss.

Training runs on `SentenceTransformerTrainer`, so DDP (torchrun / accelerate), checkpoints, resuming,
logging and the model card come from the library. Before the first step, `train.memory` plans how each
batch is embedded within the memory budget, and says what it chose in one line.

Outputs: the model folder OUT is an ordinary sentence-transformers model (`SentenceTransformer("models/x")`)
plus `mpr/` (the run config, the memory plan, the group statistics, the training log, the manifests of the
data). It is written under a temporary name and renamed into place when complete, so a killed run never
leaves a half model where `mpr eval` would read it. Checkpoints go to the sibling folder OUT.checkpoints/,
which `--resume` continues from and a successful run removes (unless `--keep-checkpoints`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.checks import train_inputs, weights_problem
from pipeline.data.identity import identity, runtime_fields
from pipeline.data.shards import fingerprint_shards, read_manifest, write_json_atomic
from pipeline.errors import MprError
from pipeline.stages.plan import StagePlan
from train.config import TrainConfig

__all__ = ["TrainConfig", "check_inputs", "train"]


def _precision(choice: str) -> dict[str, bool]:
    import torch

    if choice == "auto":
        cuda = torch.cuda.is_available()
        return {"bf16": cuda and torch.cuda.is_bf16_supported(), "fp16": False}
    if choice != "fp32" and not torch.cuda.is_available():
        raise MprError(f"--precision {choice} needs a CUDA GPU; use fp32 (or auto) on this machine")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def check_inputs(cfg: TrainConfig) -> None:
    """What can be checked before torch is imported: the inputs, the model path, the output's state."""
    train_inputs(cfg.data, cfg.out, cfg.model, cfg.eval_data, cfg.eval_split)
    finished = cfg.out.is_dir() and any(cfg.out.iterdir())
    if finished and not (cfg.overwrite or cfg.resume):
        raise MprError(
            f"--out {cfg.out}: exists; --overwrite replaces it, --resume continues or keeps it, "
            "or choose another --out"
        )
    if _checkpoints(cfg) and not (cfg.resume or cfg.overwrite):
        raise MprError(
            f"{cfg.checkpoints}: a stopped run left checkpoints; "
            "--resume continues it, --overwrite starts over"
        )


def _checkpoints(cfg: TrainConfig) -> list[Path]:
    found = [p for p in cfg.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a run killed while saving it), or None."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return f"{state.name} is missing or cut short"
    for path in sorted(folder.iterdir()):
        problem = weights_problem(path) if path.suffix in (".safetensors", ".bin", ".pt", ".pth") else None
        if problem:
            return f"{path.name} {problem}"
    return None


def resume_point(cfg: TrainConfig, log: Callable[[str], None]) -> Path | None:
    """The last checkpoint that can be resumed from; a damaged later one is said and passed over."""
    found = _checkpoints(cfg)
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"train: {folder} cannot be resumed from ({problem}); trying the checkpoint before it")
    if found:
        raise MprError(f"{cfg.checkpoints}: no checkpoint can be resumed from; --overwrite starts over")
    return None


def _staging(cfg: TrainConfig) -> Path:
    return cfg.out.with_name(f".{cfg.out.name}.partial")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished model folder into place; an old one is replaced only now."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _model_card_note(cfg: TrainConfig, memory: str, data: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    lines = [
        "",
        "## Trained with mpr",
        "",
        f"- loss: `{cfg.loss}` (train.losses), {cfg.similarity} similarity, {cfg.loss_config().describe()}",
        f"- {memory}",
        f"- groups: {stats['groups']:,} queries x {cfg.group_size} passages, "
        f"{stats['positives_per_group']} positives per group",
        f"- batch size {cfg.batch_size}, learning rate {cfg.learning_rate}, seed {cfg.seed}",
        "- data (judgment shards; manifests copied to `mpr/manifests/`):",
    ]
    lines += [f"  - `{d['path']}` (stage `{d['stage']}`, {d['fingerprint']})" for d in data]
    return "\n".join(lines) + "\n"


def _finished_summary(cfg: TrainConfig) -> dict[str, Any] | None:
    record = cfg.out / "mpr" / "train.json"
    if cfg.resume and not cfg.overwrite and record.is_file():  # the folder appears only when complete
        return dict(json.loads(record.read_text())["summary"], already_trained=True)
    return None


def plan(cfg: TrainConfig) -> StagePlan:
    """What `run` would read and write, from the input folders' manifests (nothing is loaded)."""
    queries, notes = 0, []
    for folder in cfg.data:
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None:
            notes.append(f"{folder}: not written yet")
        else:
            queries += int(manifest.summary.get("queries", 0))
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.epochs:g} epoch(s)"
    notes.append(
        f"loss {cfg.loss}, {steps} of {cfg.batch_size} queries x {cfg.group_size} passages, "
        f"learning rate {cfg.learning_rate:g}"
    )
    return StagePlan(
        stage="train",
        out=cfg.out,
        inputs=[str(p) for p in cfg.data],
        queries=queries,
        models=[cfg.model],
        notes=notes,
    )


def run(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`train`, except that a model already trained in `cfg.out` with other options is refused (one line)
    instead of kept: what `mpr run` and `mpr study` need, as their stage tables can change between runs."""
    record = cfg.out / "mpr" / "train.json"
    if record.is_file() and not cfg.overwrite:
        done = json.loads(record.read_text())
        runtime = runtime_fields(TrainConfig)
        if {k: v for k, v in done["config"].items() if k not in runtime} != identity(cfg):
            raise MprError(
                f"{cfg.out}: trained with other options; overwrite (--overwrite) to train it again"
            )
        log(f"{cfg.out}: already trained with these options; nothing to do")
        return dict(done["summary"])
    return train(cfg, log=log)


def train(
    cfg: TrainConfig, *, log: Callable[[str], None] = print, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """Build groups, plan memory, train, then publish the model and its run record; the run summary.

    ``callbacks`` are extra `transformers.TrainerCallback`s.
    """
    check_inputs(cfg)
    finished = _finished_summary(cfg)
    if finished is not None:
        log(f"train: {cfg.out} is already trained (--overwrite retrains it)")
        return finished
    from train.groups import build_groups

    started = time.perf_counter()
    dataset, stats = build_groups(cfg.data, cfg)  # reads and verifies the data before torch is loaded
    log(
        f"train: {stats.groups:,} groups of {cfg.group_size} from {stats.queries:,} queries "
        f"({stats.skipped_no_positive:,} without a positive skipped), "
        f"{stats.as_dict()['positives_per_group']} positives per group"
    )
    if cfg.positive_threshold is not None:
        log(
            f"train: --positive-threshold {cfg.positive_threshold:g} made "
            f"{stats.threshold_positives:,} negative(s) positive and "
            f"{stats.threshold_negatives:,} positive(s) negative"
        )
    if len(dataset) < cfg.batch_size:
        raise MprError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training groups")
    import torch
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from pipeline.retrieval.encode import load_encoder
    from train.callbacks import (
        LogLinesCallback,
        LossStateCallback,
        MemoryGuardCallback,
        MemoryProgressCallback,
        restore_loss_state,
    )
    from train.losses import LOSSES
    from train.memory import limit_heap_fragmentation, peak_rss_bytes, plan_embedding, set_attention_dropout

    if cfg.overwrite and cfg.checkpoints.exists():
        shutil.rmtree(cfg.checkpoints)
    model = load_encoder(cfg.model, device=cfg.device, max_seq_length=cfg.max_seq_length)
    if cfg.attention_dropout is not None:
        set_attention_dropout(model, cfg.attention_dropout)
    precision = _precision(cfg.precision)
    plan = plan_embedding(
        model,
        texts_per_batch=cfg.batch_size * (1 + cfg.group_size),
        budget=cfg.memory_budget_bytes,
        mini_batch_size=cfg.mini_batch_size,
        autocast=torch.bfloat16 if precision["bf16"] else None,
    )
    log(f"train: {plan.describe()}")
    if plan.device == "cpu":
        limit_heap_fragmentation(plan.chunk_plan is not None)
    spec = LOSSES[cfg.loss]
    for key in cfg.foreign_options():
        log(f"train: --{key.replace('_', '-')} is not an option of {cfg.loss}; not used")
    options: dict[str, Any] = {
        "similarity": cfg.similarity,
        "chunk_plan": plan.chunk_plan,
        "mask_duplicates": cfg.mask_duplicates,
        "mask_other_positives": cfg.mask_other_positives,
        **({"seed": cfg.seed} if spec.seeded else {}),
        **cfg.loss_config().loss_kwargs(),
    }
    loss = spec.load()(model, **options)
    own = loss.named_loss_parameters()
    rates: dict[str, float] = {}
    if cfg.loss_learning_rate is not None and own:
        rates = {"^(" + "|".join(map(re.escape, own)) + ")$": cfg.loss_learning_rate}
    elif cfg.loss_learning_rate is not None:
        log(
            f"train: {cfg.loss} has no parameters of its own "
            "(bixse has, and any loss with --learn-temperature); "
            "--loss-learning-rate is not used"
        )
    evaluator = None
    if cfg.eval_data is not None:
        from pipeline.retrieval.ir_evaluator import IREvaluator

        evaluator = IREvaluator(
            cfg.eval_data,
            cfg.eval_split,
            name=cfg.eval_split,
            max_queries=cfg.eval_max_queries,
            query_prompt=cfg.query_prompt,
            passage_prompt=cfg.passage_prompt,
        )
    prompts = {}
    if cfg.query_prompt:
        prompts["query"] = cfg.query_prompt
    if cfg.passage_prompt:
        prompts.update({f"passage_{j}": cfg.passage_prompt for j in range(cfg.group_size)})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(cfg.checkpoints),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        learning_rate_mapping=rates,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a float below 1 as a ratio
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluator else "no",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        report_to="none",
        dataloader_drop_last=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        prompts=prompts or None,
        disable_tqdm=not cfg.progress,
        ddp_backend="gloo"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        else None,
        use_cpu=cfg.device == "cpu",
        bf16=precision["bf16"],
        fp16=precision["fp16"],
    )
    # The model card's example is the first group; sentence-transformers would otherwise draw one from the
    # global RNG behind a progress bar of its own.
    first = dataset[0]
    texts = [first["query"], *(first[f"passage_{j}"] for j in range(cfg.group_size))]
    model.model_card_data.widget = [{"source_sentence": texts[0], "sentences": texts[1:]}]
    model.model_card_data.usage_examples = texts[:4]
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=[LossStateCallback(loss), MemoryGuardCallback(loss, plan.budget, log), *callbacks],
    )
    if cfg.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(MemoryProgressCallback())
    else:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(LogLinesCallback(log))
    resume = resume_point(cfg, log) if cfg.resume else None
    if resume is not None:
        restore_loss_state(loss, resume)
        log(f"train: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()
    summary = {
        **stats.as_dict(),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": round(float(result.training_loss), 5),
        "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 2),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "peak_memory_mb": round(peak / 2**20),
        "seconds": round(seconds, 1),
    }
    summary.update(loss.run_summary())
    if trainer.is_world_process_zero():
        staging = _staging(cfg)
        shutil.rmtree(staging, ignore_errors=True)
        model.save(str(staging))
        data = []
        (staging / "mpr" / "manifests").mkdir(parents=True, exist_ok=True)
        for n, folder in enumerate(cfg.data):
            manifest = read_manifest(folder)
            if manifest is not None:
                (staging / "mpr" / "manifests" / f"{n}-{folder.name}.json").write_text(
                    manifest.model_dump_json(indent=2)
                )
            data.append(
                {
                    "path": str(folder),
                    "stage": manifest.stage if manifest else "unknown",
                    "fingerprint": fingerprint_shards(folder),
                }
            )
        write_json_atomic(
            staging / "mpr" / "train.json",
            {
                "config": cfg.model_dump(mode="json"),
                "memory_plan": plan.as_dict(),
                "data": data,
                "summary": summary,
                "log_history": trainer.state.log_history,
            },
        )
        readme = staging / "README.md"
        if readme.exists():
            readme.write_text(
                readme.read_text() + _model_card_note(cfg, plan.describe(), data, stats.as_dict())
            )
        _publish(staging, cfg.out)
        if not cfg.keep_checkpoints:
            shutil.rmtree(cfg.checkpoints, ignore_errors=True)
    return summary
