"""`TrainConfig`: every option of `mpr train`, its default and its help, written once.

The command line (mpr/commands/train.py) and `mpr run`'s `[train]` table are both built from this model.
It imports nothing heavy, so a command can validate its options before torch is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.data.identity import RUNTIME
from pipeline.data.locations import DEFAULT_ENCODER
from train.losses.registry import DEFAULT_LOSS, LOSSES, LossOptions, option_fields, option_name

#: Every registered loss's options under their TrainConfig keys (`temperature`, `bixse_scale`, ...).
LOSS_OPTIONS = option_fields()

#: The memory budget on CPU when none is given: the process's peak resident memory.
CPU_MEMORY_BUDGET = "2GB"
#: Share of the free device memory a GPU run plans with when no budget is given.
GPU_MEMORY_SHARE = 0.9

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 2**40,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'2GB', '1.5G', '800MB', '512MiB' -> bytes (binary units)."""
    value = text.strip().upper().replace(" ", "")
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size such as 2GB or 800MB") from None
    if unit not in _UNITS or not amount > 0:
        raise ValueError(f"{text!r} is not a size such as 2GB or 800MB")
    return int(amount * _UNITS[unit])


def check_size(value: str | None) -> str | None:
    """A validator: an optional size that `parse_size` reads."""
    if value is not None:
        parse_size(value)
    return value


class GroupOptions(BaseModel):
    """How the training groups are built from the --data folders (train.groups.build_groups): part of
    `TrainConfig`, so each option is written once."""

    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(
        8, ge=2, description="Passages per query: positives first, then hard, then random negatives."
    )
    max_positives: int = Field(4, ge=1, description="Positives per group at most.")
    positive_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="On the 0-1 grade scale (relabel: 0-3 grade / 3; synth: level / (L-1)): rows with a "
        "grade >= this are positives and labelled positives with a lower grade are negatives; "
        "rows without a grade "
        "keep their label. Default: the labels as written.",
    )
    random_negatives: bool = Field(True, description="Fill groups with random negatives from other queries.")
    verify_inputs: Literal["fast", "full"] | None = Field(
        None,
        description="Check the --data folders against their manifests: "
        "fast (parts, sizes, row counts; checksums up to "
        "1 GiB) or full (every checksum). Default: $MPR_VERIFY, else fast.",
    )
    seed: int = Field(
        42, description="Seed of the groups, the data order, the draws of rand1 and the initialisation."
    )


class TrainConfig(GroupOptions):
    data: list[Path] = Field(
        min_length=1,
        description="Shard folder(s) from mine/relabel/synth/ingest; repeat to mix. Of a folder and one "
        "derived from it (mined, relabeled) the later stage wins; queries of different datasets never merge.",
    )
    out: Path = Field(description="Output model folder (loads with SentenceTransformer(out)).")
    model: str = Field(
        DEFAULT_ENCODER, description="Starting sentence-transformers model id or local folder."
    )
    loss: str = Field(
        DEFAULT_LOSS, description=f"Objective: {', '.join(LOSSES)} (see the docs' losses page)."
    )
    batch_size: int = Field(32, ge=1, description="Queries per batch (per device).")
    memory_budget: str | None = Field(
        None,
        description="Memory the run may use, e.g. 2GB: "
        f"peak resident memory on CPU (default {CPU_MEMORY_BUDGET}), "
        f"device memory on a GPU (default {GPU_MEMORY_SHARE:.0%} of the free memory). "
        "The batch is embedded in "
        "GradCache chunks that fit it.",
    )
    mini_batch_size: int | None = Field(
        None, ge=1, description="GradCache chunks of exactly this many texts (overrides --memory-budget)."
    )
    attention_dropout: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Dropout on attention probabilities (default: the model's own). 0 lets PyTorch's "
        "fused attention kernel run in training: about half the time and memory per text on CPU.",
    )
    learning_rate: float = Field(
        5e-5, gt=0, description="Peak learning rate (with linear warm-up and decay)."
    )
    loss_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of the loss's own parameters: "
        "bixse's scale t and bias b, a learned τ "
        "(default: --learning-rate, at which these few scalars hardly move in a fine-tuning run).",
    )
    epochs: float = Field(1.0, gt=0, description="Epochs over the groups.")
    max_steps: int = Field(-1, description="Stop after N steps (overrides --epochs).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps with linear warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    similarity: Literal["cos", "dot"] = Field(
        "cos", description="Score by cosine, or by raw dot product (as the multi-positive paper and SyCL)."
    )
    mask_duplicates: bool = Field(
        True,
        description="Mask in-batch copies of a query's own passages (a copy of a positive is no negative).",
    )
    mask_other_positives: bool = Field(
        False, description="Mask other queries' positives as likely false negatives."
    )
    max_seq_length: int | None = Field(
        None, ge=8, description="Truncate inputs to this many tokens (default: the model's limit)."
    )
    query_prompt: str | None = Field(None, description="Text prepended to queries.")
    passage_prompt: str | None = Field(None, description="Text prepended to passages.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp32."
    )
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N steps (into OUT.checkpoints/).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept at most.")
    keep_checkpoints: bool = Field(
        False, description="Keep OUT.checkpoints/ after a successful run (removed by default)."
    )
    eval_data: Path | None = Field(
        None, description="BEIR folder evaluated during training (nDCG@10, MRR@10, recall)."
    )
    eval_split: str = Field("test", description="qrels split of --eval-data.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: --save-steps).")
    eval_max_queries: int | None = Field(
        None, ge=1, description="Evaluate on the first N judged queries only."
    )
    resume: bool = Field(
        False,
        description="Continue from the last checkpoint in OUT.checkpoints/: same data order, same draws.",
        json_schema_extra=RUNTIME,
    )
    device: str | None = Field(None, description="cpu, cuda, ... (default: the best available).")
    overwrite: bool = Field(
        False,
        description="Replace an existing model folder (the old one stays until the new one is complete).",
        json_schema_extra=RUNTIME,
    )
    progress: bool = Field(True, json_schema_extra=RUNTIME)

    # Every registered loss's options (train/losses/registry.py), under their keys: `temperature`,
    # `bixse_scale`, ... The chosen loss reads its own through `loss_config()`.
    __annotations__.update({key: annotation for key, (annotation, _) in LOSS_OPTIONS.items()})
    vars().update({key: info for key, (_, info) in LOSS_OPTIONS.items()})

    _size = field_validator("memory_budget")(check_size)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSSES:
            raise ValueError(f"unknown loss {value!r} (losses: {', '.join(LOSSES)})")
        return value

    @model_validator(mode="after")
    def _loss_options(self) -> TrainConfig:
        self.loss_config()
        return self

    def loss_config(self) -> LossOptions:
        """The chosen loss's options, read from this config's keys for them."""
        spec = LOSSES[self.loss]
        return spec.options(**{f: getattr(self, option_name(spec, f)) for f in spec.options.model_fields})

    def foreign_options(self) -> list[str]:
        """Options of other losses than the chosen one that were set to other than their defaults."""
        spec = LOSSES[self.loss]
        own = {option_name(spec, f) for f in spec.options.model_fields}
        return [
            key
            for key, (_, info) in LOSS_OPTIONS.items()
            if key not in own and key in self.model_fields_set and getattr(self, key) != info.default
        ]

    @property
    def checkpoints(self) -> Path:
        """Checkpoints live beside the model folder, never in it."""
        return self.out.with_name(self.out.name + ".checkpoints")

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_size(self.memory_budget)
