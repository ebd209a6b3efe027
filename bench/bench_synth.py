"""`mpr synth` throughput against the local test server answering at once (the oracle writes the passages).

    python bench/bench_synth.py [--queries 2000] [--concurrency 1,8,32,64] [--levels 4] [--repeat 3]

The server runs in a subprocess (its own core), so the figures are the client side of SyCL-style synthesis:
building the prompts, the HTTP round trips, validating every answer (levels, lengths, near-duplicates,
verbatim queries), the SQLite cache and the Parquet shards. Each run starts from an empty cache and output
folder; the fastest of `--repeat` runs per concurrency level is shown. Tokens are the test server's counts
(~4 characters per prompt token; one word or punctuation mark per completion token), so tokens per passage
shows the size of the answers, not a real tokenizer's count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from mpr.simulated_judge import start_server
from pipeline.stages import synth
from pipeline.stages.synth import SynthConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "data" / "example"
MODEL = "bench-model"


def write_queries(path: Path, n: int) -> None:
    """`n` queries: the example's 30, numbered over and over (each one a distinct request)."""
    base = [
        json.loads(line)["text"]
        for line in (EXAMPLE / "queries.jsonl").read_text().splitlines()
        if line.strip()
    ]
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"_id": f"b{i}", "text": f"{base[i % len(base)]} (case {i})"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--lengths", default="40,80,120")
    ap.add_argument("--repeat", type=int, default=3, help="runs per concurrency level; the fastest is shown")
    args = ap.parse_args()
    print(
        f"hardware: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); "
        f"Python {sys.version.split()[0]}; server in a subprocess; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"{args.queries} queries x 1 set, {args.levels} levels, target lengths {args.lengths} words; "
        f"fastest of {args.repeat} runs\n"
    )
    header = (
        f"{'concurrency':>11} {'requests':>9} {'seconds':>8} {'req/s':>8} {'passages/s':>11} "
        f"{'tok in/req':>11} {'tok out/passage':>16} {'retries':>8}"
    )
    print(header)
    print("-" * len(header))
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_server(
            responder="mpr.simulated_judge:oracle_responder",
            responder_args={"data": str(EXAMPLE)},
            models=(MODEL,),
            mode="subprocess",
        ) as server,
    ):
        queries = Path(tmp) / "queries.jsonl"
        write_queries(queries, args.queries)
        warm = Path(tmp) / "warm.jsonl"
        write_queries(warm, 50)
        synth.run(
            SynthConfig(
                queries=warm,
                out=Path(tmp) / "warm",
                model=MODEL,
                base_url=[server.url],
                llm_cache=Path(tmp) / "warm.sqlite",
                progress=False,
            ),
            log=lambda _: None,
        )  # imports and first connections out of the figures
        for c in (int(x) for x in args.concurrency.split(",")):
            best = None
            for r in range(args.repeat):
                cfg = SynthConfig(
                    queries=queries,
                    out=Path(tmp) / f"out-{c}-{r}",
                    model=MODEL,
                    base_url=[server.url],
                    levels=args.levels,
                    lengths=args.lengths,
                    concurrency=c,
                    llm_cache=Path(tmp) / f"llm-{c}-{r}.sqlite",
                    progress=False,
                )
                t0 = time.perf_counter()
                summary = synth.run(cfg, log=lambda _: None).summary
                wall = time.perf_counter() - t0
                if best is None or wall < best[0]:
                    best = (wall, summary)
            assert best is not None
            wall, summary = best
            sent = summary["llm_sent"]
            print(
                f"{c:>11} {sent:>9} {wall:>8.2f} {sent / wall:>8.1f} {summary['passages'] / wall:>11.1f} "
                f"{summary['llm_prompt_tokens'] / sent:>11.0f} {summary['tokens_out_per_passage']:>16.1f} "
                f"{summary['llm_retries']:>8}"
            )


if __name__ == "__main__":
    main()
