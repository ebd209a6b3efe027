"""InfoNCE over the group: the first positive against the query's negatives and the in-batch passages."""

from __future__ import annotations

from torch import Tensor

from .core import GroupLoss, masked_logsumexp


def single_positive_nll(scores: Tensor, positives: Tensor, valid: Tensor, chosen: Tensor) -> Tensor:
    """mean_i [log Σ_{c ∈ {p_i} ∪ N_i} exp(s_ic) − s_{i,p_i}], p_i the ``chosen`` column of row i.

    N_i = valid columns that are not positives of row i: the row's other positives are left out of the
    denominator. Rows without a chosen positive contribute 0 (and still count in the mean).
    """
    has_positive = chosen.any(dim=1)
    log_partition, _ = masked_logsumexp(scores, chosen | (valid & ~positives))
    positive_score = scores.masked_fill(~chosen, 0.0).sum(dim=1)
    per_row = (log_partition - positive_score).masked_fill(~has_positive, 0.0)
    return per_row.mean()


def infonce_objective(scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    """InfoNCE on each row's first positive (lowest column index), other positives out of the denominator."""
    first = positives & (positives.cumsum(dim=1) == 1)
    return single_positive_nll(scores, positives, valid, first)


class InfoNCELoss(GroupLoss):
    r"""InfoNCE (MultipleNegativesRankingLoss with hard negatives) on grouped, labelled passages.

    For query i with score row :math:`s_i = \cos(q_i, \cdot)/\tau` over every passage of the batch, its
    first positive :math:`p_i` (slot 0) and :math:`N_i` (its own negatives plus every unmasked passage of
    the other queries):

    .. math::

        \mathcal{L} = \frac{1}{B}\sum_i \Big[\log\big(e^{s_{i p_i}}
        + \sum_{n \in N_i} e^{s_{i n}}\big) - s_{i p_i}\Big]

    The query's *other* positives are removed from the denominator, so they are neither pulled nor
    pushed; they are simply not used. Grades are ignored (only the slot kinds matter). A query without
    any positive contributes 0 (and still counts in the mean).

    Masking (see :class:`~train.losses.core.GroupLoss`): padding slots are ignored; with
    ``mask_duplicates`` a copy of one of i's passages elsewhere in the batch is not a negative of i; with
    ``mask_other_positives`` the other queries' positives are not negatives of i.

    References:
        - van den Oord et al., Representation Learning with Contrastive Predictive Coding, 2018.
          https://arxiv.org/abs/1807.03748
        - Henderson et al., Efficient Natural Language Response Suggestion for Smart Reply, 2017.
    """

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        return infonce_objective(scores, targets, positives, valid)

    @property
    def citation(self) -> str:
        return """
@misc{oord2018representation,
    title={Representation Learning with Contrastive Predictive Coding},
    author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
    year={2018},
    eprint={1807.03748},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
