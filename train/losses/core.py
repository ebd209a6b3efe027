"""Shared machinery of the group losses: DDP gathering, the score/target/mask matrices, the base class.

A batch holds B queries, each with a group of k passage slots (``labels`` of shape [B, 2, k]: the grade of
each slot, then its kind: 1 positive, 0 negative, -1 padding). The passages are flattened query-major, so
column ``c = i * k + j`` is slot j of query i. Every objective is a pure function of four [R, C] matrices:

- ``scores``: cosine(query, passage) / temperature,
- ``targets``: the grade of the passage for the row's own slots, 0 elsewhere,
- ``positives``: the row's own positive slots,
- ``valid``: the columns that take part for that row (padding, duplicates of the row's own passages and,
  optionally, other queries' positives are masked out).

:class:`GroupLoss` builds those matrices from ``sentence_features`` and ``labels`` and hands them to the
subclass's :meth:`GroupLoss.objective`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.util import all_gather, all_gather_with_grad
from torch import Tensor, nn

from pipeline.data.labels import PADDING, POSITIVE
from train.losses.batch import GroupBatch, prepare_batch
from train.losses.gradcache import ChunkPlan, forward_cached
from train.losses.registry import DEFAULT_TEMPERATURE, DEFAULT_TEMPERATURE_RANGE

MULTI_POSITIVE_CITATION = """
@misc{wang2026multipositive,
    title={Training Dense Retrievers with Multiple Positive Passages},
    author={Benben Wang and Minghao Tang and Hengran Zhang and Jiafeng Guo and Keping Bi},
    year={2026},
    eprint={2602.12727},
    archivePrefix={arXiv},
    primaryClass={cs.IR}
}
"""


def world() -> tuple[int, int]:
    """(world size, rank), or (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# ------------------------------------------------------------------------------------------------------------
# Masked reductions shared by the objectives. Empty rows are handled without producing NaN gradients.
# ------------------------------------------------------------------------------------------------------------


def masked_logsumexp(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise log Σ_{c: mask} exp(x_c), and whether the row had any entry.

    Rows without any entry get 0 (not -inf) so that callers can discard them with ``torch.where`` without
    NaN gradients leaking through.
    """
    nonempty = mask.any(dim=-1)
    safe = torch.where(nonempty.unsqueeze(-1), x.masked_fill(~mask, float("-inf")), torch.zeros_like(x))
    return torch.logsumexp(safe, dim=-1), nonempty


def masked_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """Row-wise softmax over the masked entries; masked entries (and empty rows) get probability 0."""
    lse, nonempty = masked_logsumexp(x, mask)
    probs = torch.exp(x.masked_fill(~mask, float("-inf")) - lse.unsqueeze(-1))
    return torch.where(mask & nonempty.unsqueeze(-1), probs, torch.zeros_like(probs))


# ------------------------------------------------------------------------------------------------------------
# Targets and masks
# ------------------------------------------------------------------------------------------------------------


def passage_identity(token_ids: Tensor) -> Tensor:
    """One integer per row of ``token_ids`` ([N, L], -1 beyond each sequence): equal ids ⇔ equal passages."""
    return torch.unique(token_ids, dim=0, return_inverse=True)[1]


def build_targets(
    row_groups: Tensor,
    grades: Tensor,
    kinds: Tensor,
    identity: Tensor | None = None,
    *,
    mask_duplicates: bool = True,
    mask_other_positives: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``targets``, ``positives`` and ``valid`` matrices ([R, G·k]) of the rows ``row_groups``.

    Args:
        row_groups: [R] the group (query index in the flattened batch) each row scores.
        grades: [G, k] the grade of every slot of every group.
        kinds: [G, k] the kind of every slot (1 positive, 0 negative, -1 padding).
        identity: [G·k] passage identities (query-major); required for ``mask_duplicates``.
        mask_duplicates: mask, for row i, every column outside i's group holding a passage that is also in
            i's group (its non-padding slots).
        mask_other_positives: mask, for row i, every positive of another group.
    """
    num_groups, k = kinds.shape
    columns = num_groups * k
    device = kinds.device
    column_group = torch.arange(columns, device=device) // k
    kind = kinds.reshape(-1)
    real = kind != PADDING
    own = row_groups.unsqueeze(1) == column_group.unsqueeze(0)
    valid = real.unsqueeze(0).expand(len(row_groups), columns)
    if mask_duplicates and identity is not None:
        group_has = torch.zeros(num_groups, int(identity.max()) + 1, dtype=torch.bool, device=device)
        group_has[column_group[real], identity[real]] = True
        valid = valid & ~(group_has[row_groups][:, identity] & ~own)
    if mask_other_positives:
        valid = valid & ~((kind == POSITIVE).unsqueeze(0) & ~own)
    positives = own & (kind == POSITIVE).unsqueeze(0)
    grade = grades.reshape(-1).masked_fill(~real, 0.0)
    targets = torch.where(own, grade.unsqueeze(0), torch.zeros((), dtype=grade.dtype, device=device))
    return targets, positives, valid


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------------------------


class _AverageGradAcrossRanks(torch.autograd.Function):
    """Identity forward; averages the gradient over the ranks in backward.

    The loss's own parameters (temperature, BiXSE scale/bias) are not inside the DDP-wrapped model, so DDP
    does not average their gradients: without this every rank would step them with its local gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def _gather_token_ids(token_ids: Tensor) -> Tensor:
    width = torch.tensor([token_ids.shape[1]], device=token_ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    token_ids = F.pad(token_ids, [0, int(width.item()) - token_ids.shape[1]], value=-1)
    return all_gather(token_ids)


def _check_same_shape(batch_size: int, k: int, device: torch.device) -> None:
    shape = torch.tensor([batch_size, k, -batch_size, -k], device=device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    if int(shape[0]) != -int(shape[2]) or int(shape[1]) != -int(shape[3]):
        raise ValueError(
            "Gathering across processes needs the same per-device batch size and group size on every rank "
            f"(this rank: {batch_size} queries x {k} slots). Use drop_last or an even split."
        )


# ------------------------------------------------------------------------------------------------------------
# The base loss
# ------------------------------------------------------------------------------------------------------------


_SHARED_DOC = """
    Every loss also takes the arguments of :class:`GroupLoss` (model, temperature, learn_temperature,
    mask_duplicates, mask_other_positives, mini_batch_size, chunk_plan, similarity, temperature_range,
    gather_across_devices; BiXSE has no temperature).

    Inputs:
        +---------------------------------------------------+--------------------------------------------+
        | Texts                                             | Labels                                     |
        +===================================================+============================================+
        | (query, passage_0, ..., passage_{k-1})            | [2, k] per row: grades, kinds (1/0/-1)     |
        +---------------------------------------------------+--------------------------------------------+

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from train.losses import LOSS

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "query": ["capital of France?", "who wrote Hamlet?"],
                "passage_0": ["Paris is the capital of France.", "Shakespeare wrote Hamlet."],
                "passage_1": ["Paris, France's capital city.", "Macbeth is a tragedy."],
                "label": [[[1.0, 1.0], [1, 1]], [[1.0, 0.0], [1, 0]]],
            })
            trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=LOSS(model))
            trainer.train()
"""


class GroupLoss(nn.Module):
    """Base class of the group losses. Subclasses implement :meth:`objective`.

    Args:
        model: the SentenceTransformer to train.
        temperature: τ; the scores are cosine similarities divided by τ.
        learn_temperature: learn τ (stored as ``log_temperature``, initialised at log τ).
        mask_duplicates: for query i, mask every column outside i's group whose passage is token-identical
            to one of i's own (non-padding) passages.
        mask_other_positives: for query i, mask every other query's positives.
        mini_batch_size: if set, use GradCache: embed in mini-batches of this many texts without gradient,
            compute the loss and its gradient w.r.t. the embeddings, then re-embed each mini-batch with
            gradient (same RNG state, so the same dropout) and backpropagate. Same loss and gradients as
            the uncached loss, with activation memory bounded by the mini-batch. Texts are sorted by length
            so that a mini-batch is padded to its own longest text.
        chunk_plan: GradCache with chunks planned from a memory budget (:class:`ChunkPlan`, as made by
            ``train.memory.plan_embedding``) instead of a fixed ``mini_batch_size``.
        similarity: ``"cos"`` scores with the cosine of the embeddings, ``"dot"`` with their raw dot product
            (as the multi-positive paper and SyCL do); either is divided by τ.
        temperature_range: (min, max) bounds of a learned τ.
        gather_across_devices: under DDP (torch.distributed initialised, world size > 1), gather the
            passages (and for batch-level objectives the queries) of all ranks, with gradient, so every
            query is scored against the global batch. False: each rank scores its own batch only.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every loss's docstring ends with the contract all of them share (written once, below)."""
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "Inputs:" not in cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + "\n" + _SHARED_DOC.replace("LOSS", cls.__name__)

    #: The objective couples the rows (e.g. batch statistics): every rank then scores all gathered queries
    #: and returns the global loss, instead of the mean over its own queries.
    batch_level: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        learn_temperature: bool = False,
        mask_duplicates: bool = True,
        mask_other_positives: bool = False,
        mini_batch_size: int | None = None,
        chunk_plan: ChunkPlan | None = None,
        gather_across_devices: bool = True,
        similarity: Literal["cos", "dot"] = "cos",
        temperature_range: tuple[float, float] = DEFAULT_TEMPERATURE_RANGE,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer or None, got {mini_batch_size}")
        if similarity not in ("cos", "dot"):
            raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
        low, high = temperature_range
        if not 0 < low <= high:
            raise ValueError(f"temperature_range must be 0 < min <= max, got {temperature_range}")
        if learn_temperature and not low <= temperature <= high:
            raise ValueError(f"temperature {temperature} lies outside temperature_range {temperature_range}")
        self.model = model
        self.learn_temperature = learn_temperature
        self.mask_duplicates = mask_duplicates
        self.mask_other_positives = mask_other_positives
        self.mini_batch_size = mini_batch_size
        if chunk_plan is None and mini_batch_size is not None:
            chunk_plan = ChunkPlan(max_texts=mini_batch_size)
        self.chunk_plan = chunk_plan
        self.gather_across_devices = gather_across_devices
        self.similarity = similarity
        self.temperature_range = (float(low), float(high))
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self._temperature = float(temperature)

    # -- what subclasses provide -----------------------------------------------------------------------------

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        """The loss from the [R, C] score, target, positive-mask and valid-mask matrices."""
        raise NotImplementedError

    # -- configuration ---------------------------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        if self.learn_temperature:
            return float(self._log_temperature().detach().exp())
        return self._temperature

    def _log_temperature(self) -> Tensor:
        low, high = self.temperature_range
        return self.log_temperature.clamp(math.log(low), math.log(high))

    @property
    def distributed(self) -> bool:
        return self.gather_across_devices and world()[0] > 1

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "learn_temperature": self.learn_temperature,
            "mask_duplicates": self.mask_duplicates,
            "mask_other_positives": self.mask_other_positives,
            "mini_batch_size": self.mini_batch_size,
            "chunk_plan": None if self.chunk_plan is None else self.chunk_plan.__dict__,
            "gather_across_devices": self.gather_across_devices,
            "similarity": self.similarity,
            **({"temperature_range": list(self.temperature_range)} if self.learn_temperature else {}),
        }

    @property
    def citation(self) -> str:
        return ""

    def run_summary(self) -> dict[str, float]:
        """Values of the loss worth keeping in the training summary (where learned parameters ended)."""
        return {}

    def named_loss_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters owned by the loss itself (not the model's), by name."""
        return {
            name: p
            for name, p in self.named_parameters()
            if not name.startswith("model.") and p.requires_grad
        }

    def loss_parameters(self) -> list[nn.Parameter]:
        return list(self.named_loss_parameters().values())

    def _synced(self, parameter: Tensor) -> Tensor:
        """``parameter`` as used in the forward pass: its gradient is averaged across DDP ranks."""
        return _AverageGradAcrossRanks.apply(parameter) if self.distributed else parameter

    def _inverse_temperature(self) -> Tensor | float:
        if self.learn_temperature:
            low, high = self.temperature_range
            return torch.exp(-self._synced(self.log_temperature).clamp(math.log(low), math.log(high)))
        return 1.0 / self._temperature

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, sentence_features: Iterable[dict[str, Any]], labels: Tensor) -> Tensor:
        batch = prepare_batch(sentence_features, labels)
        if self.chunk_plan is not None:
            return forward_cached(self, batch)
        queries = self._embed(batch.queries)
        passages = self._embed(batch.passages) if len(batch.real) else queries.new_zeros(0, queries.shape[-1])
        return self.loss_from_embeddings(queries, passages, batch)

    def _embed(self, features: dict[str, Any]) -> Tensor:
        return self.model(features)["sentence_embedding"]

    def loss_from_embeddings(self, queries: Tensor, passages: Tensor, batch: GroupBatch) -> Tensor:
        """The loss from this rank's query embeddings [B, d] and the embeddings of ``batch.passages``."""
        if batch.passage_index is not None:
            passages = passages[batch.passage_index]
        batch_size, k = batch.kinds.shape
        queries = queries.to(torch.promote_types(queries.dtype, torch.float32))
        columns = queries.new_zeros(batch_size * k, queries.shape[-1]).index_copy(
            0, batch.real, passages.to(queries.dtype)
        )
        grades, kinds, token_ids = batch.grades, batch.kinds, batch.token_ids
        offset = 0
        if self.distributed:
            _check_same_shape(batch_size, k, queries.device)
            columns = all_gather_with_grad(columns)
            grades, kinds = all_gather(grades), all_gather(kinds)
            if self.mask_duplicates and token_ids is not None:
                token_ids = _gather_token_ids(token_ids)
            offset = world()[1] * batch_size
            if self.batch_level:
                queries = all_gather_with_grad(queries)
        num_groups = kinds.shape[0]
        if self.batch_level:
            row_groups = torch.arange(num_groups, device=queries.device)
        else:
            row_groups = torch.arange(offset, offset + batch_size, device=queries.device)
        identity = passage_identity(token_ids) if self.mask_duplicates and token_ids is not None else None
        targets, positives, valid = build_targets(
            row_groups,
            grades,
            kinds,
            identity,
            mask_duplicates=self.mask_duplicates,
            mask_other_positives=self.mask_other_positives,
        )
        if self.similarity == "cos":
            queries, columns = F.normalize(queries, dim=-1), F.normalize(columns, dim=-1)
        scores = queries @ columns.T * self._inverse_temperature()
        return self.row_objective(scores, targets, positives, valid, row_groups, num_groups)

    def row_objective(
        self,
        scores: Tensor,
        targets: Tensor,
        positives: Tensor,
        valid: Tensor,
        row_groups: Tensor,
        num_groups: int,
    ) -> Tensor:
        """Hook for objectives that need to know which global rows they score (e.g. per-row random draws)."""
        return self.objective(scores, targets, positives, valid)
