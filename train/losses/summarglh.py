"""SumMargLH: the marginal likelihood of the positive set (satisfied once some positive wins)."""

from __future__ import annotations

from torch import Tensor

from .core import MULTI_POSITIVE_CITATION, GroupLoss, masked_logsumexp


def summarglh_objective(scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    """mean_i −log Σ_{p ∈ P_i} softmax(s_i)_p, the softmax over all valid columns; 0 for rows without
    positives."""
    log_partition, _ = masked_logsumexp(scores, valid)
    log_positive, has_positive = masked_logsumexp(scores, positives)
    per_row = (log_partition - log_positive).masked_fill(~has_positive, 0.0)
    return per_row.mean()


class SumMargLHLoss(GroupLoss):
    r"""SumMargLH: maximise the total probability mass on the positives.

    With :math:`s = \cos/\tau`, :math:`P_i` the query's positives and :math:`V_i = P_i \cup N_i` every
    valid column of row i:

    .. math::

        \mathcal{L} = \frac{1}{B}\sum_i -\log \frac{\sum_{p \in P_i} e^{s_{ip}}}{\sum_{c \in V_i} e^{s_{ic}}}

    The gradient on each positive is proportional to its share of the positive mass, so the loss is
    satisfied as soon as one positive dominates the negatives. Queries without positives contribute 0.
    Grades are not used.

    References:
        - Wang et al., Training Dense Retrievers with Multiple Positive Passages, 2026.
          https://arxiv.org/abs/2602.12727
    """

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        return summarglh_objective(scores, targets, positives, valid)

    @property
    def citation(self) -> str:
        return MULTI_POSITIVE_CITATION
