"""Rand1LH: InfoNCE on one positive drawn at random per query and step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core import MULTI_POSITIVE_CITATION, GroupLoss
from .infonce import single_positive_nll


def rand1_objective(
    scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor, draws: Tensor
) -> Tensor:
    """InfoNCE on the ⌊u_i·|P_i|⌋-th positive of row i (column order), u_i = ``draws[i]`` ∈ [0, 1).

    The row's other positives are left out of the denominator (as in :func:`infonce_objective`).
    """
    count = positives.sum(dim=1)
    index = torch.minimum((draws.to(torch.float64) * count).floor().long(), (count - 1).clamp_min(0))
    chosen = positives & (positives.cumsum(dim=1) - 1 == index.unsqueeze(1))
    return single_positive_nll(scores, positives, valid, chosen)


class Rand1Loss(GroupLoss):
    r"""Rand1LH: InfoNCE on one positive drawn uniformly at random per query and step.

    For query i, draw :math:`p_i` uniformly from its positives :math:`P_i`; with :math:`N_i` its own
    negatives plus every unmasked passage of the other queries and :math:`s = \cos/\tau`:

    .. math::

        \mathcal{L} = \frac{1}{B}\sum_i \Big[\log\big(e^{s_{i p_i}} + \sum_{n \in N_i} e^{s_{i n}}\big)
            - s_{i p_i}\Big]

    The other positives of i are left out of the denominator (same convention as :class:`InfoNCELoss`,
    which always takes the first positive). A query without positives contributes 0.

    The draws come from the loss's own ``torch.Generator``: one uniform number per query of the (global)
    batch and step, so ``seed`` makes runs reproducible and, under DDP, every rank draws the numbers of the
    whole global batch and uses its own slice (2 ranks give the same draws as 1 process on the concatenated
    batch). Without a seed the generator is seeded once from the global torch RNG.

    Args:
        seed: seed of the draws.

    References:
        - Wang et al., Training Dense Retrievers with Multiple Positive Passages, 2026.
          https://arxiv.org/abs/2602.12727
    """

    def __init__(self, model: nn.Module, *, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def draw(self, num_groups: int) -> Tensor:
        """One uniform number in [0, 1) per query of the global batch (float64, CPU)."""
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._generator = torch.Generator().manual_seed(seed)
        return torch.rand(num_groups, generator=self._generator, dtype=torch.float64)

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's state, so that a resumed run draws what an uninterrupted one would."""
        return {
            "seed": self.seed,
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generator = None
        if state["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"])

    def row_objective(
        self,
        scores: Tensor,
        targets: Tensor,
        positives: Tensor,
        valid: Tensor,
        row_groups: Tensor,
        num_groups: int,
    ) -> Tensor:
        draws = self.draw(num_groups).to(scores.device)[row_groups]
        return rand1_objective(scores, targets, positives, valid, draws)

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        return rand1_objective(
            scores, targets, positives, valid, self.draw(scores.shape[0]).to(scores.device)
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "seed": self.seed}

    @property
    def citation(self) -> str:
        return MULTI_POSITIVE_CITATION
