"""`--engine ray` request throughput in Ray local mode: the same requests through mpr's client in Ray Data
actors (`--ray-processor mpr`), through ray.data.llm's HttpRequestProcessorConfig (`ray-llm`), and through
the local engine, against the test server answering each request after `--delay` seconds.

    PYTHONPATH=. python bench/bench_ray.py --requests 160 --delay 0.2 --workers 2 --cpus 2
"""

from __future__ import annotations

import argparse
import time

from mpr.simulated_judge import start_server
from pipeline.llm.client import OpenAIBackend
from pipeline.llm.ray_engine import RayHttpBackend
from pipeline.llm.types import ChatRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    requests = [
        ChatRequest(messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4)
        for i in range(args.requests)
    ]
    with start_server(models=("m",), faults={"delay_s": args.delay}) as server:
        for processor in ("mpr", "ray-llm"):
            backend = RayHttpBackend(
                "m",
                [server.url],
                api_key_env="NO_KEY",
                timeout_s=60,
                address=None,
                workers=args.workers,
                batch_size=256,
                max_attempts=3,
                processor=processor,
                concurrency=args.concurrency,
                transport="aiohttp",
            )
            t0 = time.perf_counter()
            results = backend.run_sync(requests)
            seconds = time.perf_counter() - t0
            stats = server.stats()
            print(
                f"ray {processor:8s} {seconds:6.1f} s  {sum(r.ok for r in results)}/{len(results)} answered  "
                f"max in flight at the server {stats['max_in_flight']}"
            )
            server.control(reset_stats=True)
        local = OpenAIBackend("m", [server.url], concurrency=args.concurrency)
        t0 = time.perf_counter()
        results = local.run_sync(requests)
        print(
            f"local        {time.perf_counter() - t0:6.1f} s  "
            f"{sum(r.ok for r in results)}/{len(results)} answered"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
