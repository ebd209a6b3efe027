"""`mpr mine` against sentence-transformers' `mine_hard_negatives` on SciFact train, in one run.

Variants, each in its own process (wall time and peak RSS of that process):
  encode-only   encode corpus and queries with SentenceTransformer.encode: the floor
  mpr-cold      `mpr mine` with an empty embedding cache
  mpr-warm      `mpr mine` again with other filter options and a warm cache (no re-encoding)
  st-mine       sentence_transformers.util.mine_hard_negatives, same model, depth and negatives

    python bench/bench_mine.py [--data data/beir/scifact] [--max-seq-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(variant: str, args: argparse.Namespace, work: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    from pipeline.data.locations import DEFAULT_ENCODER, encoder_path
    from pipeline.data.readers import load_beir

    ds = load_beir(args.data, "train")
    passages = [ds.corpus.full_text(i) for i in range(len(ds.corpus))]
    start = time.perf_counter()
    extra: dict = {}
    if variant == "encode-only":
        model = SentenceTransformer(encoder_path(DEFAULT_ENCODER), device="cpu")
        model.max_seq_length = args.max_seq_length
        model.encode(passages, batch_size=args.batch_size, normalize_embeddings=True)
        model.encode([ds.queries[q] for q in ds.qrels], batch_size=args.batch_size, normalize_embeddings=True)
    elif variant in ("mpr-cold", "mpr-warm"):
        from pipeline.stages import mine
        from pipeline.stages.mine import MineConfig

        manifest = mine.run(
            MineConfig(
                data=args.data,
                out=work / variant,
                cache_dir=work / "cache",
                max_seq_length=args.max_seq_length,
                depth=args.depth,
                num_negatives=args.negatives if variant == "mpr-cold" else args.negatives // 2,
                batch_size=args.batch_size,
                progress=False,
            ),
            log=lambda _: None,
        )
        extra = {
            "negatives": manifest.summary["negatives"],
            "encoded": manifest.summary.get("corpus_encoded", 0),
        }
    elif variant == "st-mine":
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        model = SentenceTransformer(encoder_path(DEFAULT_ENCODER), device="cpu")
        model.max_seq_length = args.max_seq_length
        pairs = [
            (ds.queries[q], ds.corpus.full_text(ds.corpus.index[p]))
            for q, judged in ds.qrels.items()
            for p, s in judged.items()
            if s > 0
        ]
        dataset = Dataset.from_dict({"query": [a for a, _ in pairs], "positive": [b for _, b in pairs]})
        out = mine_hard_negatives(
            dataset,
            model,
            corpus=passages,
            range_max=args.depth,
            num_negatives=args.negatives,
            sampling_strategy="top",
            batch_size=args.batch_size,
            output_format="n-tuple",
            verbose=False,
        )
        extra = {"rows": len(out)}
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds": round(wall, 1), "peak_rss_mb": round(peak_mb), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO / "data" / "beir" / "scifact")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--negatives", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args, args.work)))
        return
    if not args.data.is_dir():
        sys.exit(f"{args.data}: not found (the SciFact BEIR folder)")
    work = Path(tempfile.mkdtemp(prefix="mpr-bench-"))
    results = []
    try:
        for variant in ("encode-only", "mpr-cold", "mpr-warm", "st-mine"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                variant,
                "--work",
                str(work),
                "--data",
                str(args.data),
                "--max-seq-length",
                str(args.max_seq_length),
                "--depth",
                str(args.depth),
                "--negatives",
                str(args.negatives),
                "--batch-size",
                str(args.batch_size),
            ]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["variant"]: r for r in results}
    floor = by["encode-only"]["seconds"]
    print(
        f"\nSciFact train, {os.cpu_count()} CPU cores, max_seq_length {args.max_seq_length}, "
        f"depth {args.depth}, {args.negatives} negatives"
    )
    print(f"{'variant':<12} {'seconds':>8} {'peak MB':>8} {'x encode-only':>14}")
    for r in results:
        print(f"{r['variant']:<12} {r['seconds']:>8.1f} {r['peak_rss_mb']:>8} {r['seconds'] / floor:>14.2f}")
    cold = by["mpr-cold"]["seconds"]
    print(f"\nmpr-cold / encode-only = {cold / floor:.3f} (target <= 1.15)")
    print(f"mpr-cold / st-mine     = {cold / by['st-mine']['seconds']:.3f} (target <= 1.00)")
    print(f"mpr-warm / mpr-cold    = {by['mpr-warm']['seconds'] / cold:.3f} (target < 0.10)")


if __name__ == "__main__":
    main()
