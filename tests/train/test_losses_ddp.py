"""Two gloo processes on CPU give the same losses and gradients as one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as worker

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable"),
    pytest.mark.slow,
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float64 summation-order noise (the model runs in float64)."""
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[list[dict]]]:
    tmp = tmp_path_factory.mktemp("ddp")
    model_dir = worker.build_tiny_model_dir(tmp / "model")
    out = tmp / "result"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        worker.__file__, model_dir, str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    module = worker.load_tiny_model(model_dir)
    single = worker.run_all(module, module, rank=0, world_size=1)
    return single, ranks


@pytest.mark.parametrize("index", range(len(worker.CONFIGS)), ids=[f"{n}-{o}" for n, o in worker.CONFIGS])
def test_two_processes_match_one(ddp_results: tuple[list[dict], list[list[dict]]], index: int) -> None:
    single, ranks = ddp_results
    expected = single[index]
    per_rank = [rank[index] for rank in ranks]
    # The per-query losses return each rank's mean over its own queries and the batch-level ws2 the global
    # loss on every rank: either way what the trainer logs, the mean over ranks, is the global loss.
    mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
    assert_close(mean_loss, expected["loss"], "loss")
    assert set(per_rank[0]["grads"]) == set(expected["grads"])
    for name, grad in expected["grads"].items():
        for result in per_rank:
            assert_close(result["grads"][name], grad, name)
    assert set(per_rank[0]["loss_grads"]) == set(expected["loss_grads"])
    for name, grad in expected["loss_grads"].items():
        for result in per_rank:
            assert_close(result["loss_grads"][name], grad, name)


def test_the_batch_exercises_masking_and_draws(ddp_results: tuple[list[dict], list[list[dict]]]) -> None:
    """Rank 1 holds a copy of rank 0's positive as a negative, so duplicate masking across ranks changes the
    loss; and rand1's draws pick other positives than infonce's first one."""
    single, _ = ddp_results
    names = [(n, o) for n, o in worker.CONFIGS]
    masked = single[names.index(("infonce", {"learn_temperature": True}))]["loss"]
    unmasked = single[names.index(("infonce", {"mask_duplicates": False}))]["loss"]
    rand1 = single[names.index(("rand1", {"seed": 0, "learn_temperature": True}))]["loss"]
    assert not torch.allclose(masked, unmasked)
    assert not torch.allclose(masked, rand1)
