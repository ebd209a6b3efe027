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

    Args:
        model: the SentenceTransformer to train.
        temperature: τ.
        learn_temperature: learn τ (as a log-parameter).
        mask_duplicates: mask token-identical copies of the query's own passages outside its group.
        mask_other_positives: mask every other query's positives.
        mini_batch_size: use GradCache with mini-batches of this size.
        gather_across_devices: under DDP, score against the passages of every rank.

    Inputs:
        +---------------------------------------------------+--------------------------------------------+
        | Texts                                             | Labels                                     |
        +===================================================+============================================+
        | (query, passage_0, ..., passage_{k-1})             | [2, k] per row: grades, kinds (1/0/-1)     |
        +---------------------------------------------------+--------------------------------------------+

    References:
        - Wang et al., Training Dense Retrievers with Multiple Positive Passages, 2026.
          https://arxiv.org/abs/2602.12727

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from train.losses import SumMargLHLoss

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "query": ["capital of France?", "who wrote Hamlet?"],
                "passage_0": ["Paris is the capital of France.", "Shakespeare wrote Hamlet."],
                "passage_1": ["Paris, France's capital city.", "Macbeth is a tragedy."],
                "label": [[[1.0, 1.0], [1, 1]], [[1.0, 0.0], [1, 0]]],
            })
            trainer = SentenceTransformerTrainer(
                model=model, train_dataset=train_dataset, loss=SumMargLHLoss(model)
            )
            trainer.train()
    """

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        return summarglh_objective(scores, targets, positives, valid)

    @property
    def citation(self) -> str:
        return MULTI_POSITIVE_CITATION
