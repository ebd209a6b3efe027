"""GradCache (Gao et al., 2021): a batch's loss and gradients with activation memory bounded by a chunk of
texts. The columns are embedded in chunks without gradient, the loss is computed on the embeddings, and its
gradient w.r.t. them is pushed through a second, gradient-enabled embedding of each chunk in backward; the
RNG is replayed so both passes draw the same dropout. Same loss and gradients as the plain computation."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import get_device_states, set_device_states

from train.losses.batch import GroupBatch, _num_rows, _select_rows

if TYPE_CHECKING:
    from train.losses.core import GroupLoss


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


def forward_cached(loss_fn: GroupLoss, batch: GroupBatch) -> Tensor:
    """The loss of `batch` with GradCache: every column embedded in chunks without gradient, the loss's
    gradient w.r.t. the embeddings kept, and pushed through a second, gradient-enabled embedding of each chunk
    in backward (same dropout: `RandContext`)."""
    assert loss_fn.chunk_plan is not None
    grad_enabled = torch.is_grad_enabled()
    columns = [batch.queries, batch.passages] if len(batch.real) else [batch.queries]
    chunks: list[list[Tensor]] = []
    states: list[list[RandContext]] = []
    reps: list[list[Tensor]] = []
    embedded: list[Tensor] = []
    for features in columns:
        column_chunks = loss_fn.chunk_plan.split(_lengths(features))
        column_states, column_reps = [], []
        for rows in column_chunks:
            minibatch = _select_rows(features, rows)
            if grad_enabled:
                column_states.append(RandContext(*(v for v in minibatch.values() if isinstance(v, Tensor))))
            with torch.no_grad():
                embedding = loss_fn._embed(minibatch)
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
    loss = loss_fn.loss_from_embeddings(queries, passages, batch)
    if not grad_enabled:
        return loss

    leaves = [rep for column in reps for rep in column]
    parameters = loss_fn.loss_parameters()
    grads = torch.autograd.grad(loss, [*leaves, *parameters], allow_unused=True)
    rep_grads = [torch.zeros_like(r) if g is None else g for r, g in zip(leaves, grads[: len(leaves)])]
    cache_grads, position = [], 0
    for column in reps:
        cache_grads.append(rep_grads[position : position + len(column)])
        position += len(column)
    cache = _Cache(columns, chunks, states, cache_grads, parameters, list(grads[len(leaves) :]))
    result = loss.detach().requires_grad_()
    result.register_hook(partial(_replay, loss_fn, cache=cache))
    return result


def _replay(loss_fn: GroupLoss, grad_output: Tensor, *, cache: _Cache) -> None:
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
                with _replay_context(loss_fn.model, synchronize=remaining == 0):
                    with state:
                        embedding = loss_fn._embed(_select_rows(features, rows))
                    if not embedding.requires_grad:  # a frozen model
                        continue
                    dtype = torch.promote_types(
                        torch.promote_types(embedding.dtype, grad.dtype), torch.float32
                    )
                    surrogate = torch.dot(embedding.reshape(-1).to(dtype), grad.reshape(-1).to(dtype))
                    (surrogate * grad_output).backward()
