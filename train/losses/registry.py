"""The loss registry: every objective `mpr train` knows, with the options it takes, written once.

A loss is a `LossSpec`: its name, its class (imported when a model is trained: this module imports no
torch), the options model its constructor takes, and what it wants from the data (graded labels, several
positives). `TrainConfig`, the command line (`--LOSS-OPTION`), `mpr run`'s `[train]` table and `mpr study`
read this table; adding a loss is its file and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from train.losses.core import GroupLoss

#: τ of every temperature-scaled loss, and the range a learned τ is kept in.
DEFAULT_TEMPERATURE = 0.05
DEFAULT_TEMPERATURE_RANGE = (0.01, 1.0)


class LossOptions(BaseModel):
    """A loss's own options, passed to its constructor. On the command line a field is `--LOSS-FIELD`
    (`--bixse-scale`), or `--FIELD` when the class is `shared` by several losses (`--temperature`)."""

    model_config = ConfigDict(extra="forbid")
    shared: ClassVar[bool] = False

    def loss_kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments."""
        return self.model_dump()

    def describe(self) -> str:
        """The options in words, for the model card."""
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.model_dump().items())


class TemperatureOptions(LossOptions):
    """Scores are similarities divided by τ."""

    shared: ClassVar[bool] = True
    temperature: float = Field(
        DEFAULT_TEMPERATURE, gt=0, description="τ: scores are similarities divided by τ (not used by bixse)."
    )
    learn_temperature: bool = Field(
        False, description="Learn τ, within --min-temperature and --max-temperature."
    )
    min_temperature: float = Field(
        DEFAULT_TEMPERATURE_RANGE[0], gt=0, description="Lower bound of a learned τ."
    )
    max_temperature: float = Field(
        DEFAULT_TEMPERATURE_RANGE[1], gt=0, description="Upper bound of a learned τ."
    )

    @model_validator(mode="after")
    def _range(self) -> TemperatureOptions:
        if self.min_temperature > self.max_temperature:
            raise ValueError("--min-temperature must not exceed --max-temperature")
        if self.learn_temperature and not self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError("--temperature must lie within --min-temperature and --max-temperature")
        return self

    def loss_kwargs(self) -> dict[str, Any]:
        own = self.model_dump(exclude={"min_temperature", "max_temperature"})
        return {**own, "temperature_range": (self.min_temperature, self.max_temperature)}

    def describe(self) -> str:
        return f"temperature {self.temperature}" + (" (learned)" if self.learn_temperature else "")


class WS2Options(TemperatureOptions):
    target_temperature: float = Field(
        1 / 3, gt=0, description="ws2: temperature of the target softmax over the grades."
    )

    def loss_kwargs(self) -> dict[str, Any]:
        return {**super().loss_kwargs(), "target_temperature": self.target_temperature}

    def describe(self) -> str:
        return f"{super().describe()}, target temperature {self.target_temperature:.4g}"


class BiXSEOptions(LossOptions):
    scale: float = Field(10.0, gt=0, description="bixse: initial logit scale t (SigLIP's 10).")
    bias: float | None = Field(
        None,
        description="bixse: initial logit bias b (default: the first batch's log prior of relevance less t "
        "times its mean similarity; SigLIP's -10 suits from-scratch training on huge batches).",
    )

    def describe(self) -> str:
        bias = "from the first batch" if self.bias is None else f"{self.bias}"
        return f"learned logit scale (from {self.scale}) and bias ({bias})"


@dataclass(frozen=True)
class LossSpec:
    name: str
    cls: str  # module:class under train.losses
    options: type[LossOptions] = TemperatureOptions
    multi_positive: bool = True  # learns from several positives per query
    graded: bool = False  # learns from grades (0-1), not only labels
    seeded: bool = False  # draws at random: takes the run's seed

    def load(self) -> type[GroupLoss]:
        module, name = self.cls.split(":")
        loaded: type[GroupLoss] = getattr(importlib.import_module(f"train.losses.{module}"), name)
        return loaded


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("infonce", "infonce:InfoNCELoss", multi_positive=False),
        LossSpec("rand1", "rand1:Rand1Loss", seeded=True),
        LossSpec("jointlh", "jointlh:JointLHLoss"),
        LossSpec("summarglh", "summarglh:SumMargLHLoss"),
        LossSpec("lsepair", "lsepair:LSEPairLoss"),
        LossSpec("ws2", "ws2:WS2Loss", options=WS2Options, graded=True),
        LossSpec("bixse", "bixse:BiXSELoss", options=BiXSEOptions, graded=True),
    )
}
DEFAULT_LOSS = "lsepair"
#: The single-positive reference the study and `mpr run`'s `single_positive` train.
SINGLE_POSITIVE_LOSS = "infonce"


def option_name(spec: LossSpec, field: str) -> str:
    """The TrainConfig key (and, with dashes, the option) of a loss option: `FIELD` when a class that is
    `shared` by several losses declares it, else `LOSS_FIELD`."""
    shared = any(
        vars(base).get("shared") is True and field in base.model_fields
        for base in spec.options.__mro__
        if isinstance(base, type) and issubclass(base, LossOptions)
    )
    return field if shared else f"{spec.name}_{field}"


def option_fields() -> dict[str, tuple[Any, Any]]:
    """Every loss option under its TrainConfig key: key -> (annotation, FieldInfo), the first loss's wins."""
    out: dict[str, tuple[Any, Any]] = {}
    for spec in LOSSES.values():
        for field, info in spec.options.model_fields.items():
            out.setdefault(option_name(spec, field), (info.annotation, info))
    return out


def owners(key: str) -> list[str]:
    """The losses that take the option `key`."""
    return [s.name for s in LOSSES.values() if any(option_name(s, f) == key for f in s.options.model_fields)]
