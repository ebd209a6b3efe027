"""The relabel client's own ceiling: judged candidates per second against the local test server
answering instantly (its own process), in `relabel` (listwise), RLHN-style chain-of-thought and `graded`
(pointwise) mode, at a few concurrency levels; CPU time per judgment; prompt and completion tokens per
judged candidate (the test server counts ~4 characters per prompt token and word pieces of its answer).

    python bench/bench_relabel.py [--data data/beir/scifact] [--concurrency 8 32 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from mpr.simulated_judge import start_server
from pipeline.stages import mine, relabel
from pipeline.stages.mine import MineConfig
from pipeline.stages.relabel import RelabelConfig

REPO = Path(__file__).resolve().parents[1]
MODES = [
    ("relabel", "relabel", None),
    ("relabel", "relabel_cot", None),
    ("graded", "graded", 1),
    ("graded", "graded_batch", 8),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO / "data" / "beir" / "scifact")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--candidates", type=int, default=20, help="hard negatives judged per query")
    parser.add_argument("--max-queries", type=int, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mpr-bench-relabel-"))
    try:
        mined = work / "mined"
        mine.run(
            MineConfig(
                data=args.data,
                out=mined,
                retriever="bm25",
                depth=args.candidates + 10,
                num_negatives=args.candidates,
                max_queries=args.max_queries,
                progress=False,
            ),
            log=lambda _: None,
        )
        rows = []
        with start_server(
            responder="mpr.simulated_judge:oracle_responder",
            responder_args={"data": str(args.data)},
            models=("bench-model",),
            mode="subprocess",
        ) as server:
            for mode, prompt, per_request in MODES:
                for concurrency in args.concurrency:
                    cache = work / f"cache-{mode}-{prompt}-{concurrency}.sqlite"
                    cfg = RelabelConfig(
                        input=mined,
                        out=work / f"out-{prompt}-{concurrency}",
                        model="bench-model",
                        mode=mode,
                        prompt=prompt,
                        batch_candidates=per_request,
                        base_url=[server.url],
                        concurrency=concurrency,
                        llm_cache=cache,
                        progress=False,
                    )
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    summary = relabel.run(cfg, log=lambda _: None).summary
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                    judged = summary["judged"]
                    rows.append(
                        (
                            mode,
                            prompt,
                            concurrency,
                            judged,
                            summary["llm_sent"],
                            wall,
                            judged / wall,
                            1000 * cpu / judged,
                            summary["llm_prompt_tokens"] / judged,
                            summary["llm_completion_tokens"] / judged,
                        )
                    )
                    print(f"{prompt:<12} c={concurrency:<4} {judged / wall:8.0f} judged/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nSciFact train, {args.candidates} candidates per query, {os.cpu_count()} CPU cores; "
        "the server runs in its own process"
    )
    print(
        f"{'mode':<8} {'prompt':<12} {'conc.':>5} {'judged':>7} {'requests':>8} {'seconds':>8} "
        f"{'judged/s':>9} {'CPU ms/judg.':>12} {'prompt tok/judg.':>16} {'compl. tok/judg.':>16}"
    )
    for r in rows:
        print(
            f"{r[0]:<8} {r[1]:<12} {r[2]:>5} {r[3]:>7} {r[4]:>8} {r[5]:>8.1f} "
            f"{r[6]:>9.0f} {r[7]:>12.3f} {r[8]:>16.1f} {r[9]:>16.1f}"
        )


if __name__ == "__main__":
    main()
