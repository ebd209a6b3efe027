"""`mpr train`: a sentence-transformers bi-encoder trained on judgment shards with a group loss.

Training runs on `SentenceTransformerTrainer`, so DDP (torchrun / accelerate), checkpoints, resuming,
logging and the model card come from the library. The output folder is an ordinary
sentence-transformers model (`SentenceTransformer("models/x")`) plus `mpr/`: the run config, the group
statistics, the training log and the manifests of the data it was trained on.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.encode import DEFAULT_MODEL, load_encoder
from pipeline.errors import MprError
from pipeline.shards import fingerprint_shards, read_manifest, write_json_atomic
from train.groups import GroupConfig, build_groups

LossName = Literal["infonce", "rand1", "jointlh", "summarglh", "lsepair", "ws2", "bixse"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[Path] = Field(min_length=1)
    out: Path
    model: str = DEFAULT_MODEL
    loss: LossName = "lsepair"
    group_size: int = Field(8, ge=2)
    max_positives: int = Field(4, ge=1)
    positive_threshold: float | None = Field(None, ge=0, le=1)
    random_negatives: bool = True
    batch_size: int = Field(32, ge=1)
    mini_batch_size: int | None = Field(None, ge=1, description="GradCache: embed in chunks of this size (constant memory)")
    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(0.05, gt=0)
    learn_temperature: bool = False
    mask_duplicates: bool = True
    mask_other_positives: bool = False
    max_seq_length: int | None = Field(None, ge=8)
    query_prompt: str | None = None
    passage_prompt: str | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int = Field(2, ge=1)
    eval_data: Path | None = None
    eval_split: str = "test"
    eval_steps: int | None = Field(None, ge=1)
    eval_max_queries: int | None = Field(None, ge=1)
    resume: bool = False
    device: str | None = None
    overwrite: bool = False
    progress: bool = True


def _precision(choice: str) -> dict[str, bool]:
    import torch

    if choice == "auto":
        cuda = torch.cuda.is_available()
        return {"bf16": cuda and torch.cuda.is_bf16_supported(), "fp16": False}
    if choice != "fp32" and not torch.cuda.is_available():
        raise MprError(f"--precision {choice} needs a CUDA GPU; use fp32 (or auto) on this machine")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def _check_out(cfg: TrainConfig) -> None:
    if not cfg.out.exists() or not any(cfg.out.iterdir()):
        return
    if cfg.overwrite:
        shutil.rmtree(cfg.out)
    elif not cfg.resume:
        raise MprError(f"{cfg.out}: exists; use --resume to continue its training, --overwrite to replace it, or another --out")


def _model_card_note(cfg: TrainConfig, data: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    lines = [
        "",
        "## Trained with mpr",
        "",
        f"- loss: `{cfg.loss}` (train.losses), temperature {cfg.temperature}"
        + (" (learned)" if cfg.learn_temperature else "")
        + (f", GradCache mini-batches of {cfg.mini_batch_size}" if cfg.mini_batch_size else ""),
        f"- groups: {stats['groups']:,} queries x {cfg.group_size} passages, {stats['positives_per_group']} positives per group",
        f"- batch size {cfg.batch_size}, learning rate {cfg.learning_rate}, seed {cfg.seed}",
        "- data (judgment shards; manifests copied to `mpr/manifests/`):",
    ]
    lines += [f"  - `{d['path']}` (stage `{d['stage']}`, {d['fingerprint']})" for d in data]
    return "\n".join(lines) + "\n"


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build groups, train, save the model and the run record; returns the run summary."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from train.losses import build_loss

    started = time.perf_counter()
    _check_out(cfg)
    dataset, stats = build_groups(
        GroupConfig(data=cfg.data, group_size=cfg.group_size, max_positives=cfg.max_positives,
                    positive_threshold=cfg.positive_threshold, random_negatives=cfg.random_negatives, seed=cfg.seed)
    )
    log(f"train: {stats.groups:,} groups of {cfg.group_size} from {stats.queries:,} queries "
        f"({stats.skipped_no_positive:,} without a positive skipped), {stats.as_dict()['positives_per_group']} positives per group")
    model = load_encoder(cfg.model, device=cfg.device, max_seq_length=cfg.max_seq_length)
    loss = build_loss(cfg.loss, model, temperature=cfg.temperature, learn_temperature=cfg.learn_temperature,
                      mask_duplicates=cfg.mask_duplicates, mask_other_positives=cfg.mask_other_positives,
                      mini_batch_size=cfg.mini_batch_size)
    evaluator = None
    if cfg.eval_data is not None:
        from train.evaluate import IREvaluator

        evaluator = IREvaluator(cfg.eval_data, cfg.eval_split, name=cfg.eval_split, max_queries=cfg.eval_max_queries,
                                query_prompt=cfg.query_prompt, passage_prompt=cfg.passage_prompt)
    prompts = {}
    if cfg.query_prompt:
        prompts["query"] = cfg.query_prompt
    if cfg.passage_prompt:
        prompts.update({f"passage_{j}": cfg.passage_prompt for j in range(cfg.group_size)})
    import torch

    args = SentenceTransformerTrainingArguments(
        output_dir=str(cfg.out / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
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
        prompts=prompts or None,
        disable_tqdm=not cfg.progress,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        use_cpu=cfg.device == "cpu",
        **_precision(cfg.precision),
    )
    if len(dataset) < cfg.batch_size:
        raise MprError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training groups")
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss, evaluator=evaluator)
    checkpoints = sorted((cfg.out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if cfg.resume and checkpoints else None)
    seconds = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        **stats.as_dict(),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": round(result.training_loss, 5),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "seconds": round(seconds, 1),
    }
    if trainer.is_world_process_zero():
        model.save(str(cfg.out))
        data = []
        (cfg.out / "mpr" / "manifests").mkdir(parents=True, exist_ok=True)
        for n, folder in enumerate(cfg.data):
            manifest = read_manifest(folder)
            if manifest is not None:
                (cfg.out / "mpr" / "manifests" / f"{n}-{folder.name}.json").write_text(manifest.model_dump_json(indent=2))
            data.append({"path": str(folder), "stage": manifest.stage if manifest else "unknown", "fingerprint": fingerprint_shards(folder)})
        write_json_atomic(cfg.out / "mpr" / "train.json", {
            "config": cfg.model_dump(mode="json"), "data": data, "summary": summary, "log_history": trainer.state.log_history,
        })
        readme = cfg.out / "README.md"
        if readme.exists():
            readme.write_text(readme.read_text() + _model_card_note(cfg, data, stats.as_dict()))
    return summary
