r"""The SciFact learning curve: nDCG@10 and R@100 of every checkpoint of a `mpr train` run on SciFact test,
each against the zero-shot model with paired tests over the test queries.

    mpr mine --data data/beir/scifact --split train --out runs/scifact/mined
    mpr train --data runs/scifact/mined --out runs/models/scifact-lsepair \
        --save-steps 5 --save-total-limit 10 --keep-checkpoints
    python bench/scifact_curve.py --run runs/models/scifact-lsepair --data data/beir/scifact \
        --out bench/results/scifact

Every evaluation is saved as OUT/NAME/step-N.json when it finishes (a rerun skips it); OUT/curve.md is the
table of all runs in OUT.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pipeline.data.locations import DEFAULT_ENCODER
from pipeline.stages import evaluate
from pipeline.stages.evaluate import EvalConfig


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [
        (int(m.group(1)), p)
        for p in (run.parent / f"{run.name}.checkpoints").glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    return sorted(found)


def _row(path: Path) -> dict:
    report = json.loads(path.read_text())
    by = {c["metric"]: c for c in report["comparison"]}
    return {
        "step": int(path.stem.split("-")[1]),
        "ndcg@10": report["result"]["metrics"]["ndcg@10"],
        "recall@100": report["result"]["metrics"]["recall@100"],
        "zero_shot_ndcg@10": report["baseline"]["metrics"]["ndcg@10"],
        "p_randomization": by["ndcg@10"]["p_randomization"],
        "queries": report["queries"],
    }


def write_table(out: Path) -> str:
    lines = [
        "# SciFact test: nDCG@10 against training steps",
        "",
        "Each row: a checkpoint of `mpr train` on mined SciFact train, evaluated with `mpr eval` "
        "against the zero-shot "
        f"model ({DEFAULT_ENCODER}); p is the paired randomization test over the test queries.",
        "",
    ]
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        rows = sorted((_row(p) for p in run.glob("step-*.json")), key=lambda r: r["step"])
        if not rows:
            continue
        meta = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        lines += [
            f"## {run.name}",
            "",
            f"Training: {meta.get('command', '?')}; {meta.get('note', '')}",
            "",
            "| step | nDCG@10 | R@100 | zero-shot nDCG@10 | Δ | p | queries |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['step']} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['zero_shot_ndcg@10']:.4f} | "
            f"{r['ndcg@10'] - r['zero_shot_ndcg@10']:+.4f} | {r['p_randomization']:.4f} | {r['queries']} |"
            for r in rows
        ]
        lines.append("")
    text = "\n".join(lines)
    (out / "curve.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run",
        type=Path,
        required=True,
        help="the model folder of mpr train (its checkpoints are RUN.checkpoints/)",
    )
    ap.add_argument("--data", type=Path, default=Path("data/beir/scifact"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/scifact"))
    ap.add_argument(
        "--steps",
        type=lambda v: {int(x) for x in v.split(",")},
        help="evaluate only these checkpoints, e.g. 5,15,25",
    )
    args = ap.parse_args(argv)
    dest = args.out / args.run.name
    dest.mkdir(parents=True, exist_ok=True)
    for step, folder in _checkpoints(args.run):
        target = dest / f"step-{step}.json"
        if target.exists() or (args.steps and step not in args.steps):
            continue
        evaluate.run(
            EvalConfig(
                model=str(folder),
                baseline=DEFAULT_ENCODER,
                data=args.data,
                split="test",
                json_out=target,
                progress=False,
            )
        )
        print(f"step {step}: {json.dumps(_row(target))}", flush=True)
    print(write_table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
