r"""Training at the settings users run: peak memory and seconds per step of every loss, against
sentence-transformers' MultipleNegativesRankingLoss (MNRL) and CachedMultipleNegativesRankingLoss.

    python bench/bench_train.py --data runs/scifact/mined [--steps 3] [--max-seq-length 256 128] \
        [--out bench/results/train.json]

Real batches: mpr's training groups from a mined shard folder (SciFact train in bench/README.md), batch 32,
group 8 (1 positive + 7 negatives for MNRL: the same texts), all-MiniLM-L6-v2 on CPU. Each configuration runs
in its own process: load, tokenise ``--steps`` batches, then time each step (forward + backward + AdamW step);
s/step is the median of the steps after the first, peak is the process's maximum resident memory. A
configuration whose estimated peak exceeds ``--max-memory`` is not run (MNRL at seq 256 needs ~27 GB).

Configurations, per sequence length:
- ``mpr-<loss>``: `mpr train`'s path, the memory planner at its default budget (2 GB);
- ``mpr-infonce@chunk8`` vs ``st-cached@chunk8``: GradCache at the same chunk size and dropout;
- ``mpr-<loss>@full`` vs ``st-mnrl``: no chunking, where it fits.
Each with the model's attention dropout (0.1) and with ``--attention-dropout 0`` (suffix ``/ad0``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOSSES = ["infonce", "rand1", "jointlh", "summarglh", "lsepair", "ws2", "bixse"]


def worker(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from pipeline.retrieval.encode import load_encoder
    from train.config import GroupOptions
    from train.groups import build_groups
    from train.losses import build_loss
    from train.memory import limit_heap_fragmentation, peak_rss_bytes, plan_embedding, set_attention_dropout

    torch.manual_seed(0)
    model = load_encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu", max_seq_length=config["seq"])
    if config["attention_dropout"] is not None:
        set_attention_dropout(model, config["attention_dropout"])
    model.train()
    groups, _ = build_groups([Path(config["data"])], GroupOptions(group_size=config["group_size"], seed=0))
    batch_size = config["batch_size"]
    collate = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    passage_columns = [f"passage_{j}" for j in range(config["group_size"])]
    batches = []
    for step in range(config["steps"]):
        rows = [groups[i] for i in range(step * batch_size, (step + 1) * batch_size)]
        if config["kind"] == "st":
            rows = [
                {
                    "anchor": r["query"],
                    "positive": r["passage_0"],
                    **{f"negative_{j}": r[c] for j, c in enumerate(passage_columns[1:])},
                }
                for r in rows
            ]
            columns = ["anchor", "positive"] + [f"negative_{j}" for j in range(len(passage_columns) - 1)]
        else:
            columns = ["query", *passage_columns]
        batch = collate(rows)
        features = [{k[len(c) + 1 :]: v for k, v in batch.items() if k.startswith(c + "_")} for c in columns]
        batches.append((features, batch.get("label")))
    plan_line = ""
    if config["kind"] == "st":
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )

        if config["chunk"]:
            loss = CachedMultipleNegativesRankingLoss(
                model, mini_batch_size=config["chunk"], show_progress_bar=False
            )
        else:
            loss = MultipleNegativesRankingLoss(model)
    else:
        plan = plan_embedding(
            model,
            texts_per_batch=batch_size * (1 + config["group_size"]),
            budget=config["budget"],
            mini_batch_size=config["chunk"],
        )
        limit_heap_fragmentation(plan.chunk_plan is not None)  # as `mpr train` does
        plan_line = plan.describe()
        loss = build_loss(
            config["loss"],
            model,
            chunk_plan=plan.chunk_plan,
            **({"seed": 0} if config["loss"] == "rand1" else {}),
        )
    optimizer = torch.optim.AdamW([p for p in loss.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for features, labels in batches:
        started = time.perf_counter()
        value = loss(features, labels)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"times": times, "peak_mb": peak_rss_bytes() / 2**20, "plan": plan_line}


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1], "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def configurations(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    base = {
        "data": str(args.data),
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "steps": args.steps,
    }
    out = []
    for seq in args.max_seq_length:
        for dropout in args.attention_dropout:
            tag = f"seq{seq}" + ("/ad0" if dropout == 0 else "")
            common = {**base, "seq": seq, "attention_dropout": dropout}
            for loss in args.losses:
                out.append(
                    (
                        f"{tag} mpr-{loss}",
                        {**common, "kind": "mpr", "loss": loss, "chunk": None, "budget": None},
                    )
                )
            out.append(
                (
                    f"{tag} mpr-infonce@chunk{args.chunk}",
                    {**common, "kind": "mpr", "loss": "infonce", "chunk": args.chunk, "budget": None},
                )
            )
            out.append((f"{tag} st-cached@chunk{args.chunk}", {**common, "kind": "st", "chunk": args.chunk}))
            texts = args.batch_size * (1 + args.group_size)
            per_text_mb = (100 if dropout else 40) * seq / 256
            if texts * per_text_mb < args.max_memory * 1024:
                out.append((f"{tag} st-mnrl", {**common, "kind": "st", "chunk": None}))
                for loss in args.full_losses:
                    out.append(
                        (
                            f"{tag} mpr-{loss}@full",
                            {**common, "kind": "mpr", "loss": loss, "chunk": None, "budget": 10**12},
                        )
                    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="mined shard folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, nargs="*", default=[256, 128])
    parser.add_argument("--attention-dropout", type=float, nargs="*", default=[0.1, 0.0])
    parser.add_argument("--losses", nargs="*", default=LOSSES)
    parser.add_argument("--full-losses", nargs="*", default=LOSSES)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--max-memory", type=float, default=16, help="GB: skip configurations estimated above this"
    )
    parser.add_argument(
        "--only", nargs="*", help="run only the configurations whose name contains one of these"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name, config in configurations(args):
        if args.only and not any(o in name for o in args.only):
            continue
        load = os.getloadavg()[0]
        result = run_one(config)
        result.update(config=config, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2))
        if "times" in result:
            timed = result["times"][1:] or result["times"]
            result["s_per_step"] = round(statistics.median(timed), 2)
            result["samples_per_s"] = round(config["batch_size"] / result["s_per_step"], 3)
            print(
                f"{name:<34} {result['s_per_step']:>7.2f} s/step  peak {result['peak_mb']:>7,.0f} MB  "
                f"load {load:.1f}  {result['plan']}",
                flush=True,
            )
        else:
            print(f"{name:<34} failed: {result['error']}", flush=True)
        results[name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
