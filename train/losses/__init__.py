"""Training objectives over grouped passages: (query, passage_0, ..., passage_{k-1}) with [B, 2, k] labels.

Every loss is a ``torch.nn.Module`` taking the SentenceTransformer, to hand to
``SentenceTransformerTrainer(loss=...)``. :func:`build_loss` builds one by name.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .bixse import BiXSELoss, bixse_objective
from .core import ChunkPlan, GroupLoss, build_targets
from .infonce import InfoNCELoss, infonce_objective
from .jointlh import JointLHLoss, jointlh_objective
from .lsepair import LSEPairLoss, lsepair_objective
from .rand1 import Rand1Loss, rand1_objective
from .summarglh import SumMargLHLoss, summarglh_objective
from .ws2 import WS2Loss, ws2_objective

logger = logging.getLogger(__name__)

LOSSES: dict[str, type[GroupLoss]] = {
    "infonce": InfoNCELoss,
    "rand1": Rand1Loss,
    "jointlh": JointLHLoss,
    "summarglh": SumMargLHLoss,
    "lsepair": LSEPairLoss,
    "ws2": WS2Loss,
    "bixse": BiXSELoss,
}


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
    default. Extra keyword arguments go to the loss class (``seed`` for rand1, ``target_temperature``/``eps``
    for ws2, ``scale``/``bias``/``learn_scale``/``learn_bias`` for bixse, ``chunk_plan``, ``similarity``,
    ``temperature_range``, ``gather_across_devices`` for all). BiXSE has no temperature (its learnable
    scale plays that role): ``temperature``, ``learn_temperature`` and ``temperature_range`` are ignored
    for it, with a warning if set.
    """
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.") from None
    options: dict[str, Any] = {
        "mask_duplicates": mask_duplicates,
        "mask_other_positives": mask_other_positives,
        "mini_batch_size": mini_batch_size,
        **kwargs,
    }
    if cls is BiXSELoss:
        if temperature is not None or learn_temperature or options.pop("temperature_range", None):
            logger.warning(
                "bixse scores with its own learnable scale and bias; temperature options are ignored."
            )
        return cls(model, **options)
    if temperature is not None:
        options["temperature"] = temperature
    return cls(model, learn_temperature=learn_temperature, **options)


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
