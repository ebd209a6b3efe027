"""LSEPair: a smooth maximum over all positive/negative score differences."""

from __future__ import annotations

import torch
from torch import Tensor

from .core import MULTI_POSITIVE_CITATION, GroupLoss, masked_logsumexp


def lsepair_objective(scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    """mean_i log(1 + Σ_{p ∈ P_i} Σ_{n ∈ N_i} exp(s_n − s_p)); 0 for rows without positives or negatives."""
    log_negative, has_negative = masked_logsumexp(scores, valid & ~positives)
    log_inverse_positive, has_positive = masked_logsumexp(-scores, positives)
    pairs = log_negative + log_inverse_positive
    per_row = torch.logaddexp(torch.zeros_like(pairs), pairs).masked_fill(~(has_negative & has_positive), 0.0)
    return per_row.mean()


class LSEPairLoss(GroupLoss):
    r"""LSEPair: log-sum-exp over every (positive, negative) pair of the query.

    With :math:`s = \cos/\tau`, :math:`P_i` the query's positives and :math:`N_i` every valid column of
    row i that is not one of its positives (its own negatives and the other queries' passages):

    .. math::

        \mathcal{L} = \frac{1}{B}\sum_i \log\Big(1 + \sum_{p \in P_i}\sum_{n \in N_i} e^{s_{in} - s_{ip}}\Big)

    A smooth maximum of the pairwise violations: the worst pairs (the weakest positive against the
    hardest negatives) dominate the gradient, and every positive is pushed above every negative.
    Computed as ``softplus(LSE_n s_n + LSE_p(−s_p))``. Queries without positives contribute 0. Grades are
    not used.

    References:
        - Wang et al., Training Dense Retrievers with Multiple Positive Passages, 2026.
          https://arxiv.org/abs/2602.12727
    """

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        return lsepair_objective(scores, targets, positives, valid)

    @property
    def citation(self) -> str:
        return MULTI_POSITIVE_CITATION
