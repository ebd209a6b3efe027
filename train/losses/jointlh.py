"""JointLH: every positive pulled equally (sum of per-positive log-likelihoods)."""

from __future__ import annotations

from torch import Tensor

from .core import MULTI_POSITIVE_CITATION, GroupLoss, masked_logsumexp


def jointlh_objective(scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    """mean_i −Σ_{p ∈ P_i} log softmax(s_i)_p, the softmax over all valid columns (positives included)."""
    log_partition, _ = masked_logsumexp(scores, valid)
    count = positives.sum(dim=1).to(scores.dtype)
    per_row = count * log_partition - scores.masked_fill(~positives, 0.0).sum(dim=1)
    return per_row.mean()


class JointLHLoss(GroupLoss):
    r"""JointLH: the joint likelihood of all positives, each pulled with the same weight.

    With :math:`s = \cos/\tau`, :math:`P_i` the query's positives and :math:`V_i = P_i \cup N_i` every
    valid (unmasked) column of row i:

    .. math::

        \mathcal{L} = \frac{1}{B}\sum_i -\sum_{p \in P_i} \log \frac{e^{s_{ip}}}{\sum_{c \in V_i} e^{s_{ic}}}

    The denominator is the full one: it includes all of i's positives (the multi-positive literature's
    JointLH), so the positives also compete with each other. It is a *sum* over positives, so queries with
    more positives weigh more; queries without positives contribute 0. Grades are not used.

    References:
        - Wang et al., Training Dense Retrievers with Multiple Positive Passages, 2026.
          https://arxiv.org/abs/2602.12727
    """

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        return jointlh_objective(scores, targets, positives, valid)

    @property
    def citation(self) -> str:
        return MULTI_POSITIVE_CITATION
