"""A batch of query groups as the losses see it: the k passage columns merged into one, rows selected and
sliced, and a passage that occurs several times embedded once (`GroupBatch`, `prepare_batch`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.labels import PADDING


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
