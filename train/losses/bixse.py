"""BiXSE: binary cross-entropy of every (query, passage) pair against its grade, SigLIP-style."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .core import GroupLoss, world
from .gradcache import ChunkPlan
from .registry import BiXSEOptions


def bixse_objective(
    scores: Tensor,
    targets: Tensor,
    positives: Tensor,
    valid: Tensor,
    *,
    scale: Tensor | float,
    bias: Tensor | float,
) -> Tensor:
    """(1/R) Σ_i Σ_{c valid} BCE(σ(scale·s_ic + bias), y_ic): summed over each row's valid columns, mean
    over rows."""
    logits = scores * scale + bias
    bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return bce.masked_fill(~valid, 0.0).sum(dim=1).mean()


class BiXSELoss(GroupLoss):
    r"""BiXSE: pointwise binary cross-entropy against graded relevance, with in-batch negatives.

    Every (query i, passage c) pair of the batch is a binary classification with logit
    :math:`z_{ic} = t\cdot\cos(q_i, d_c) + b` and soft target :math:`y_{ic}`: the grade of c for i's own
    slots (1 for a binary positive, 0 for a plain negative, in between for graded passages) and 0 for the
    passages of the other queries. Masked pairs (padding, duplicates of i's own passages, optionally the
    other queries' positives) are ignored.

    .. math::

        \mathcal{L} = -\frac{1}{B}\sum_i\sum_{c \in V_i}
            \big[y_{ic}\log\sigma(z_{ic}) + (1-y_{ic})\log(1-\sigma(z_{ic}))\big]

    Averaging follows SigLIP: summed over each query's valid pairs, averaged over the queries (so it
    decomposes over queries and DDP ranks exactly; its scale grows with the number of in-batch passages).
    The scale :math:`t` (stored as ``log_scale``) and bias :math:`b` are learnable. :math:`t` starts at
    SigLIP's 10. SigLIP starts :math:`b` at -10, the log-odds of one relevant pair among tens of thousands
    in a from-scratch model's batch; a fine-tuning batch holds a few percent relevant pairs and a pretrained
    encoder scores them all well above 0, so there -10 starts every pair at :math:`\sigma \approx 0`, the
    positives pull all similarities up while the negatives push back with almost no gradient, and at
    fine-tuning learning rates :math:`b` hardly moves from where it starts. By default (``bias=None``)
    :math:`b` therefore starts at the first batch's prior: with :math:`\bar y` the mean target and
    :math:`\bar s` the mean similarity over its valid pairs (all ranks' under DDP),
    :math:`b_0 = \log\frac{\bar y}{1-\bar y} - t\,\bar s`, so that :math:`\sigma(t\bar s + b_0) = \bar y`
    (the usual initialisation of a classifier's bias at the log prior). Because the scale plays the role
    of 1/τ, this loss has no separate temperature: the similarity fed to it is the raw cosine.

    Args:
        scale: initial t.
        bias: initial b; None: the first batch's log prior less t times its mean similarity (above).
        learn_scale: learn t (as a log-parameter).
        learn_bias: learn b.

    References:
        - Tsirigotis et al., BiXSE: Improving Dense Retrieval via Probabilistic Graded Relevance Distillation,
          2025. https://arxiv.org/abs/2508.06781
        - Zhai et al., Sigmoid Loss for Language Image Pre-Training (SigLIP), 2023. https://arxiv.org/abs/2303.15343
    """

    start_bias: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        scale: float = BiXSEOptions().scale,
        bias: float | None = BiXSEOptions().bias,
        learn_scale: bool = True,
        learn_bias: bool = True,
        mask_duplicates: bool = True,
        mask_other_positives: bool = False,
        mini_batch_size: int | None = None,
        chunk_plan: ChunkPlan | None = None,
        gather_across_devices: bool = True,
        similarity: Literal["cos", "dot"] = "cos",
    ) -> None:
        super().__init__(
            model,
            temperature=1.0,
            learn_temperature=False,
            mask_duplicates=mask_duplicates,
            mask_other_positives=mask_other_positives,
            mini_batch_size=mini_batch_size,
            chunk_plan=chunk_plan,
            gather_across_devices=gather_across_devices,
            similarity=similarity,
        )
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.learn_scale = learn_scale
        self.learn_bias = learn_bias
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.tensor(0.0 if bias is None else float(bias)), requires_grad=learn_bias)
        # b's starting value, NaN until the first batch sets it; saved with the loss's state, so a resumed
        # run keeps b
        self.register_buffer(
            "start_bias", torch.tensor(math.nan if bias is None else float(bias), dtype=torch.float64)
        )

    @property
    def scale(self) -> float:
        return float(self.log_scale.detach().exp())

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        if self.start_bias.isnan():
            self._start_at_prior(scores, targets, valid)
        return bixse_objective(
            scores,
            targets,
            positives,
            valid,
            scale=torch.exp(self._synced(self.log_scale)),
            bias=self._synced(self.bias),
        )

    @torch.no_grad()
    def _start_at_prior(self, scores: Tensor, targets: Tensor, valid: Tensor) -> None:
        mask = valid.to(torch.float64)
        sums = torch.stack(
            [mask.sum(), (targets.to(torch.float64) * mask).sum(), (scores.to(torch.float64) * mask).sum()]
        )
        if world()[0] > 1:
            dist.all_reduce(sums)  # every rank starts at the same b
        pairs, relevant, similarity = sums.tolist()
        if pairs == 0:
            return
        prior = min(max(relevant / pairs, 1e-4), 1 - 1e-4)
        start = math.log(prior / (1 - prior)) - self.scale * similarity / pairs
        self.bias.fill_(start)
        self.start_bias.fill_(start)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        if (
            prefix + "bias" in state_dict and prefix + "start_bias" not in state_dict
        ):  # saved before start_bias existed
            state_dict[prefix + "start_bias"] = state_dict[prefix + "bias"].detach().to(torch.float64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def run_summary(self) -> dict[str, float]:
        """Where t and b started and ended (b starts from the first batch by default)."""
        config = self.get_config_dict()
        return {f"bixse_{key}": round(config[key], 4) for key in ("start_bias", "bias", "scale")}

    def get_config_dict(self) -> dict[str, Any]:
        config = super().get_config_dict()
        del config["temperature"], config["learn_temperature"]
        return {
            **config,
            "scale": self.scale,
            "bias": float(self.bias.detach()),
            "start_bias": float(self.start_bias),
            "learn_scale": self.learn_scale,
            "learn_bias": self.learn_bias,
        }

    @property
    def citation(self) -> str:
        return """
@misc{tsirigotis2025bixse,
    title={BiXSE: Improving Dense Retrieval via Probabilistic Graded Relevance Distillation},
    author={Christos Tsirigotis and Vaibhav Adlakha and Joao Monteiro and Aaron Courville and \
Perouz Taslakian},
    year={2025},
    eprint={2508.06781},
    archivePrefix={arXiv},
    primaryClass={cs.IR}
}
"""
