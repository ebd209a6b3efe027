"""Paired comparison of one loss between two `mpr study` outputs that differ in one training setting (e.g.
`--attention-dropout 0` against the model's own): nDCG@10 per fold and a paired randomization test over
the pooled held-out queries.

    python bench/compare_studies.py bench/results/dropout/model-dropout bench/results/dropout/dropout-0 \\
        --loss lsepair --error-rate 0 --out bench/results/dropout/compare.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pipeline.retrieval.metrics import paired_tests


def _cells(out: Path, loss: str, error_rate: float) -> dict[tuple[str, int], dict[str, float]]:
    name = f"{loss}@e{error_rate:.2f}"
    found = {}
    for path in sorted(out.glob(f"cells/*/fold*/{name}.json")):
        record = json.loads(path.read_text())
        found[(record["dataset"], record["fold"])] = record["eval"]["per_query_ndcg@10"]
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--loss", default="lsepair")
    ap.add_argument("--error-rate", type=float, default=0.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    a, b = _cells(args.a, args.loss, args.error_rate), _cells(args.b, args.loss, args.error_rate)
    common = sorted(set(a) & set(b))
    xs, ys, folds = [], [], []
    for key in common:
        queries = sorted(set(a[key]) & set(b[key]))
        xs += [a[key][q] for q in queries]
        ys += [b[key][q] for q in queries]
        folds.append(
            {
                "dataset": key[0],
                "fold": key[1],
                "a": statistics.fmean(a[key][q] for q in queries),
                "b": statistics.fmean(b[key][q] for q in queries),
                "queries": len(queries),
            }
        )
    p_t, p_r = paired_tests(ys, xs)
    result = {
        "a": str(args.a),
        "b": str(args.b),
        "loss": args.loss,
        "error_rate": args.error_rate,
        "folds": folds,
        "queries": len(xs),
        "ndcg@10_a": statistics.fmean(xs),
        "ndcg@10_b": statistics.fmean(ys),
        "delta_b_minus_a": statistics.fmean(ys) - statistics.fmean(xs),
        "p_ttest": p_t,
        "p_randomization": p_r,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
