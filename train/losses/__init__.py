"""Training objectives over grouped passages: (query, passage_0, ..., passage_{k-1}) with [B, 2, k] labels.

Every loss is a ``torch.nn.Module`` taking the SentenceTransformer, to hand to
``SentenceTransformerTrainer(loss=...)``; :data:`LOSSES` (`registry.py`) lists them with their options, and
:func:`build_loss` builds one by name. The names below are imported on first use, so reading the registry
does not import torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .registry import LOSSES, TemperatureOptions

if TYPE_CHECKING:
    from torch import nn

    from .bixse import BiXSELoss, bixse_objective
    from .core import GroupLoss, build_targets
    from .gradcache import ChunkPlan
    from .infonce import InfoNCELoss, infonce_objective
    from .jointlh import JointLHLoss, jointlh_objective
    from .lsepair import LSEPairLoss, lsepair_objective
    from .rand1 import Rand1Loss, rand1_objective
    from .summarglh import SumMargLHLoss, summarglh_objective
    from .ws2 import WS2Loss, ws2_objective

logger = logging.getLogger(__name__)

_LAZY = {
    "ChunkPlan": "gradcache", "GroupLoss": "core", "build_targets": "core",
    **{name: spec.cls.split(":")[0] for spec in LOSSES.values() for name in (spec.cls.split(":")[1],)},
    **{f"{spec.name}_objective": spec.cls.split(":")[0] for spec in LOSSES.values()},
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_loss(
    name: str,
    model: nn.Module,
    *,
    temperature: float | None = None,
    learn_temperature: bool = False,
    mask_duplicates: bool = True,
    mask_other_positives: bool = False,
    mini_batch_size: int | None = None,
    **kwargs: Any,
) -> GroupLoss:
    """The loss ``name`` (a key of :data:`LOSSES`) for ``model``.

    ``mini_batch_size`` (or ``chunk_plan``) turns on GradCache; ``temperature`` None keeps the loss's own
    default. Extra keyword arguments go to the loss class (its options model's fields: ``target_temperature``
    for ws2, ``scale``/``bias`` for bixse; ``seed`` for rand1; ``chunk_plan``, ``similarity``,
    ``temperature_range``, ``gather_across_devices`` for all). A loss without a temperature (bixse: its
    learnable scale plays that role) ignores ``temperature``, ``learn_temperature`` and ``temperature_range``,
    with a warning if set.
    """
    try:
        spec = LOSSES[name]
    except KeyError:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.") from None
    options: dict[str, Any] = {
        "mask_duplicates": mask_duplicates,
        "mask_other_positives": mask_other_positives,
        "mini_batch_size": mini_batch_size,
        **kwargs,
    }
    if not issubclass(spec.options, TemperatureOptions):
        if temperature is not None or learn_temperature or options.pop("temperature_range", None):
            logger.warning(f"{name} has no temperature; temperature options are ignored.")
        return spec.load()(model, **options)
    if temperature is not None:
        options["temperature"] = temperature
    return spec.load()(model, learn_temperature=learn_temperature, **options)


__all__ = [
    "LOSSES",
    "BiXSELoss",
    "ChunkPlan",
    "GroupLoss",
    "InfoNCELoss",
    "JointLHLoss",
    "LSEPairLoss",
    "Rand1Loss",
    "SumMargLHLoss",
    "WS2Loss",
    "bixse_objective",
    "build_loss",
    "build_targets",
    "infonce_objective",
    "jointlh_objective",
    "lsepair_objective",
    "rand1_objective",
    "summarglh_objective",
    "ws2_objective",
]
