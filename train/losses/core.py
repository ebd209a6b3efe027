"""Shared machinery of the group losses: embedding, DDP gathering, the score/target/mask matrices, GradCache.

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
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.util import all_gather, all_gather_with_grad
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import get_device_states, set_device_states

from pipeline.data.labels import PADDING, POSITIVE
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
# Features: merging the k passage columns, selecting and slicing rows
# ------------------------------------------------------------------------------------------------------------


def _num_rows(features: dict[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor):
            return value.shape[0]
    return next(v.shape[0] for v in features.values() if isinstance(v, Tensor) and v.ndim > 0)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


def _concat_rows(features_list: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the rows of same-kind feature dicts (column-major), right-padding token axes with 0."""
    first = features_list[0]
    if any(set(features) != set(first) for features in features_list[1:]):
        raise ValueError("The passage columns were tokenized into different sets of features.")
    rows = _num_rows(first)
    merged: dict[str, Any] = {}
    for key, value in first.items():
        values = [features[key] for features in features_list]
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == rows:
            if value.ndim >= 2:
                width = max(v.shape[1] for v in values)
                values = [F.pad(v, [0, 0] * (v.ndim - 2) + [0, width - v.shape[1]]) for v in values]
            merged[key] = torch.cat(values)
        elif all(_same(v, value) for v in values[1:]):
            merged[key] = value
        else:
            raise ValueError(f"The passage columns disagree on the feature {key!r}.")
    return merged


def _select_rows(features: dict[str, Any], index: Tensor | slice) -> dict[str, Any]:
    """The given rows of ``features``, with the token columns that are padding in all of them dropped."""
    rows = _num_rows(features)
    out = {
        key: value[index]
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == rows
        else value
        for key, value in features.items()
    }
    mask = out.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] > 0:
        active = mask.bool().any(dim=0).nonzero()
        width = int(active.max()) + 1 if len(active) else 1
        if width < mask.shape[1]:
            seq = mask.shape[1]
            out = {
                key: value[:, :width]
                if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[1] == seq
                else value
                for key, value in out.items()
            }
    return out


@dataclass
class GroupBatch:
    """One batch in the loss's terms (local to this process)."""

    queries: dict[str, Any]
    passages: dict[str, Any]
    """Features of the distinct non-padding passages, in query-major order of first occurrence."""
    real: Tensor
    """[n] the flat query-major position (i*k + j) of each non-padding slot."""
    passage_index: Tensor | None
    """[n] the row of ``passages`` each non-padding slot holds (None: one row per slot)."""
    grades: Tensor
    """[B, k] float grades (0 on padding slots)."""
    kinds: Tensor
    """[B, k] long slot kinds."""
    token_ids: Tensor | None
    """[B*k, L] query-major token ids, -1 beyond each sequence; None when the features carry no input_ids."""


def prepare_batch(sentence_features: Iterable[dict[str, Any]], labels: Tensor | None) -> GroupBatch:
    """Split the collator's output into queries, the non-padding passages and the group labels."""
    features = list(sentence_features)
    if len(features) < 2:
        raise ValueError(
            f"Expected a query column and at least one passage column, got {len(features)} column(s)."
        )
    k = len(features) - 1
    if labels is None or labels.ndim != 3 or labels.shape[1] != 2 or labels.shape[2] != k:
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(
            f"Expected labels of shape [batch, 2, {k}] (grades, then kinds 1/0/-1 of the {k} passage slots), "
            f"got {shape}."
        )
    batch_size = labels.shape[0]
    kinds = labels[:, 1, :].round().long()
    grades = labels[:, 0, :].float().masked_fill(kinds == PADDING, 0.0)
    merged = _concat_rows(features[1:])
    device = merged["input_ids"].device if isinstance(merged.get("input_ids"), Tensor) else labels.device
    # merged is column-major (slot j of query i at row j*B + i); ``order`` maps query-major positions to it.
    slots = torch.arange(k, device=device) * batch_size
    order = (torch.arange(batch_size, device=device).unsqueeze(1) + slots.unsqueeze(0)).reshape(-1)
    real = (kinds.reshape(-1) != PADDING).nonzero().squeeze(1).to(device)
    token_ids = None
    input_ids, attention_mask = merged.get("input_ids"), merged.get("attention_mask")
    if isinstance(input_ids, Tensor) and input_ids.ndim == 2:
        token_ids = input_ids[order].long()
        if isinstance(attention_mask, Tensor) and attention_mask.shape == input_ids.shape:
            token_ids = token_ids.masked_fill(attention_mask[order] == 0, -1)
    rows, passage_index = order[real], None
    if token_ids is not None and len(real):
        first, passage_index = _first_occurrences(token_ids[real])
        if len(first) < len(real):
            rows = rows[first]
        else:
            passage_index = None
    return GroupBatch(
        queries=features[0],
        passages=_select_rows(merged, rows),
        real=real,
        passage_index=passage_index,
        grades=grades.to(device),
        kinds=kinds.to(device),
        token_ids=token_ids,
    )


def _first_occurrences(token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For rows of token ids: the index of the first row of each distinct sequence (ascending), and for
    every row the position of its sequence in that list. A passage that occurs several times in a batch is
    embedded once; autograd sums the gradients of its copies."""
    _, inverse = torch.unique(token_ids, dim=0, return_inverse=True)
    positions = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((int(inverse.max()) + 1,), len(inverse), device=inverse.device, dtype=positions.dtype)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    first, ranked = first.sort()
    rank = torch.empty_like(ranked)
    rank[ranked] = torch.arange(len(ranked), device=ranked.device)
    return first, rank[inverse]


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
# GradCache
# ------------------------------------------------------------------------------------------------------------


class RandContext:
    """Snapshot the CPU/CUDA RNG at creation and restore it on enter, so that re-embedding a mini-batch
    draws the same dropout masks as the first (gradient-free) pass. After GradCache (Gao et al., 2021)."""

    def __init__(self, *tensors: Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork: AbstractContextManager[Any] | None = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc: Any) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


def _replay_context(model: nn.Module, synchronize: bool) -> AbstractContextManager[Any]:
    """DDP all-reduces once, after the last re-embedded mini-batch."""
    if isinstance(model, DistributedDataParallel) and not synchronize:
        return model.no_sync()
    return nullcontext()


@dataclass(frozen=True)
class ChunkPlan:
    """How GradCache splits the texts of one column (queries, or passages) into chunks.

    Texts are sorted by length, longest first, and a chunk takes texts while it has at most ``max_texts``
    of them and ``n * cost(L)`` stays within ``max_bytes``, where L is the chunk's longest text (every text
    of a chunk is padded to it) and ``cost(L) = bytes_per_token * L + bytes_per_token_squared * L**2`` is
    the activation memory one text of L tokens keeps for the backward pass. A column that fits in one
    chunk is embedded as it comes, unsorted.
    """

    max_texts: int | None = None
    max_bytes: float | None = None
    bytes_per_token: float = 0.0
    bytes_per_token_squared: float = 0.0

    def cost(self, length: int) -> float:
        return self.bytes_per_token * length + self.bytes_per_token_squared * length * length

    def texts_at(self, length: int) -> int:
        """How many texts of ``length`` tokens one chunk holds."""
        fit = (
            int(self.max_bytes // self.cost(length)) if self.max_bytes and self.cost(length) > 0 else 1 << 30
        )
        return max(1, min(fit, self.max_texts or fit))

    def split(self, lengths: Tensor) -> list[Tensor]:
        """Chunks of row indices for texts of the given token ``lengths``."""
        rows = len(lengths)
        if rows == 0:
            return []
        if rows <= self.texts_at(int(lengths.max())):
            return [torch.arange(rows, device=lengths.device)]
        order = torch.sort(lengths, descending=True, stable=True).indices
        chunks, begin = [], 0
        while begin < rows:
            size = self.texts_at(int(lengths[order[begin]]))
            chunks.append(order[begin : begin + size])
            begin += size
        return chunks


def _lengths(features: dict[str, Any]) -> Tensor:
    mask = features.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2:
        return mask.sum(dim=1)
    rows = _num_rows(features)
    width = next((v.shape[1] for v in features.values() if isinstance(v, Tensor) and v.ndim >= 2), 1)
    return torch.full((rows,), width)


@dataclass
class _Cache:
    columns: list[dict[str, Any]]
    chunks: list[list[Tensor]]
    states: list[list[RandContext]]
    grads: list[list[Tensor]]
    parameters: list[nn.Parameter]
    parameter_grads: list[Tensor | None]


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
            return self._forward_cached(batch)
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

    # -- GradCache -------------------------------------------------------------------------------------------

    def _forward_cached(self, batch: GroupBatch) -> Tensor:
        assert self.chunk_plan is not None
        grad_enabled = torch.is_grad_enabled()
        columns = [batch.queries, batch.passages] if len(batch.real) else [batch.queries]
        chunks: list[list[Tensor]] = []
        states: list[list[RandContext]] = []
        reps: list[list[Tensor]] = []
        embedded: list[Tensor] = []
        for features in columns:
            column_chunks = self.chunk_plan.split(_lengths(features))
            column_states, column_reps = [], []
            for rows in column_chunks:
                minibatch = _select_rows(features, rows)
                if grad_enabled:
                    column_states.append(
                        RandContext(*(v for v in minibatch.values() if isinstance(v, Tensor)))
                    )
                with torch.no_grad():
                    embedding = self._embed(minibatch)
                column_reps.append(embedding.detach().requires_grad_(grad_enabled))
            chunks.append(column_chunks)
            states.append(column_states)
            reps.append(column_reps)
            stacked = torch.cat(column_reps)
            if len(column_chunks) > 1:  # back from length order to the column's own order
                stacked = stacked[torch.argsort(torch.cat(column_chunks))]
            embedded.append(stacked)
        queries = embedded[0]
        passages = embedded[1] if len(embedded) > 1 else queries.new_zeros(0, queries.shape[-1])
        loss = self.loss_from_embeddings(queries, passages, batch)
        if not grad_enabled:
            return loss

        leaves = [rep for column in reps for rep in column]
        parameters = self.loss_parameters()
        grads = torch.autograd.grad(loss, [*leaves, *parameters], allow_unused=True)
        rep_grads = [torch.zeros_like(r) if g is None else g for r, g in zip(leaves, grads[: len(leaves)])]
        cache_grads, position = [], 0
        for column in reps:
            cache_grads.append(rep_grads[position : position + len(column)])
            position += len(column)
        cache = _Cache(columns, chunks, states, cache_grads, parameters, list(grads[len(leaves) :]))
        result = loss.detach().requires_grad_()
        result.register_hook(partial(self._replay, cache=cache))
        return result

    def _replay(self, grad_output: Tensor, *, cache: _Cache) -> None:
        """Backward hook of the cached loss: push the cached gradients through a second, gradient-enabled
        embedding of every mini-batch, scaled by whatever the outer backward hands us (grad accumulation,
        fp16 loss scaling)."""
        with torch.enable_grad():
            for parameter, grad in zip(cache.parameters, cache.parameter_grads):
                if grad is not None:
                    (parameter * (grad * grad_output)).sum().backward()
            remaining = sum(len(c) for c in cache.chunks)
            for features, column_chunks, column_states, column_grads in zip(
                cache.columns, cache.chunks, cache.states, cache.grads
            ):
                for rows, state, grad in zip(column_chunks, column_states, column_grads):
                    remaining -= 1
                    with _replay_context(self.model, synchronize=remaining == 0):
                        with state:
                            embedding = self._embed(_select_rows(features, rows))
                        if not embedding.requires_grad:  # a frozen model
                            continue
                        dtype = torch.promote_types(
                            torch.promote_types(embedding.dtype, grad.dtype), torch.float32
                        )
                        surrogate = torch.dot(embedding.reshape(-1).to(dtype), grad.reshape(-1).to(dtype))
                        (surrogate * grad_output).backward()
