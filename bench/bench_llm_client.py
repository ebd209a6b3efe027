"""The LLM client's own ceiling: requests/s and client CPU per request against a test server answering at \
once.

    python bench/bench_llm_client.py [--n 2000] [--concurrency 1,8,32,128]
        [--transports aiohttp,openai]

The server runs in a subprocess (its own core), so the client process's CPU time is the client's cost. Both
HTTP paths of the client run in the same invocation: `aiohttp` (the default) and `openai` (the official SDK's
raw request call), and the ratio of their requests/s is printed.
Modes: `no cache`; `cold cache` (every answer committed to SQLite as it arrives); `warm cache` (the same
requests again: all hits, nothing sent); `batch 8` (8 candidates judged per request: schema with an array of
8 labels, cold cache) to show candidates/s when a stage batches. Reference rows show the cost of the SDK's
typed `chat.completions.create()` path and of a bare SQLite commit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mpr.simulated_judge import start_server
from pipeline.llm.cache import ResultCache
from pipeline.llm.client import OpenAIBackend, Transport
from pipeline.llm.types import ChatRequest, ChatResult

PASSAGE = "Dense retrievers learn from graded relevance labels produced by a judge model. " * 4
ONE = {
    "type": "object",
    "properties": {"label": {"type": "integer", "minimum": 0, "maximum": 3}},
    "required": ["label"],
}
BATCH = {
    "type": "object",
    "properties": {
        "labels": {"type": "array", "items": ONE["properties"]["label"], "minItems": 8, "maxItems": 8}
    },
    "required": ["labels"],
}


def make_requests(n: int, tag: str, batch: int) -> list[ChatRequest]:
    system = {"role": "system", "content": "Grade how well each passage answers the query, 0-3. Answer JSON."}
    out = []
    for i in range(n):
        passages = "\n".join(f"[{j}] {PASSAGE}" for j in range(batch))
        user = {"role": "user", "content": f"query: {tag} {i}\n{passages}"}
        out.append(
            ChatRequest(messages=[system, user], json_schema=BATCH if batch > 1 else ONE, max_tokens=64)
        )
    return out


def measure(backend: OpenAIBackend, reqs: list[ChatRequest]) -> tuple[float, float, int]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = backend.run_sync(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(r.ok for r in results), next(r.error for r in results if not r.ok)
    return len(reqs) / wall, cpu / len(reqs) * 1e6, backend.last_stats.sent


def make_backend(url: str, cache: Path | None, concurrency: int, transport: Transport) -> OpenAIBackend:
    return OpenAIBackend("test-model", url, cache=cache, concurrency=concurrency, transport=transport)


def run_modes(
    url: str, folder: Path, c: int, n: int, tag: str, transport: Transport
) -> Iterator[tuple[str, tuple[float, float, int]]]:
    """(mode, (requests/s, CPU µs/request, sent)) for each mode, with fresh requests per call."""
    yield "no cache", measure(make_backend(url, None, c, transport), make_requests(n, f"nc{tag}", 1))
    db = folder / f"c{tag}.sqlite"
    reqs = make_requests(n, f"cc{tag}", 1)
    yield "cold cache", measure(make_backend(url, db, c, transport), reqs)
    yield "warm cache", measure(make_backend(url, db, c, transport), reqs)
    batch = make_requests(n, f"b{tag}", 8)
    yield "batch 8, cold cache", measure(make_backend(url, folder / f"b{tag}.sqlite", c, transport), batch)


def sdk_create(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """The SDK's typed path, for reference: chat.completions.create() returning a ChatCompletion model."""
    import openai

    reqs = make_requests(n, "sdk", 1)

    async def go() -> tuple[float, float]:
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
            pending = iter(reqs)

            async def worker() -> None:
                for r in pending:
                    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": r.json_schema}}
                    msgs = [m.model_dump() for m in r.messages]
                    await client.chat.completions.create(
                        model="test-model", messages=msgs, response_format=rf, max_tokens=64, temperature=0
                    )

            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1e6

    return asyncio.run(go())


def commit_cost(folder: Path, n: int = 5000) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    with ResultCache(folder / "commit.sqlite") as cache:
        t0 = time.perf_counter()
        for i in range(n):
            cache.put(
                ChatResult(key=f"{i:064x}", content='{"label": 2}', prompt_tokens=90, completion_tokens=7)
            )
        return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per row (a third of it at concurrency 1)")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per row; the best is kept (shared machines are noisy)"
    )
    ap.add_argument("--transports", default="aiohttp,openai", help="the client's HTTP paths to measure")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    transports: list[Transport] = [t for t in ("aiohttp", "openai") if t in args.transports.split(",")]
    if len(transports) != len(set(args.transports.split(","))):
        ap.error(f"--transports: choose from aiohttp, openai (got {args.transports})")

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, transports {'+'.join(transports)}, "
        "server in a subprocess, "
        f"best of {args.repeat}; load average at start {os.getloadavg()[0]:.1f}"
    )
    rows = []
    with start_server(mode="subprocess") as srv, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for transport in transports:
            for c in levels:
                n = args.n if c > 1 else max(args.n // 3, 100)
                measure(
                    make_backend(srv.url, None, c, transport),
                    make_requests(min(n, 200), f"warmup{c}{transport}", 1),
                )
                best: dict[str, tuple[float, float, int]] = {}
                for rep in range(args.repeat):
                    for mode, got in run_modes(srv.url, folder, c, n, f"{c}-{rep}-{transport}", transport):
                        if mode not in best or got[1] < best[mode][1]:
                            best[mode] = got
                for mode, (rps, cpu, sent) in best.items():
                    rows.append((transport, c, mode, 8 if mode.startswith("batch") else 1, rps, cpu, sent))
        ref_c = 32 if 32 in levels else levels[-1]
        sdk_rps, sdk_cpu = max(sdk_create(srv.url, max(args.n // 3, 100), ref_c) for _ in range(args.repeat))
        commit_us = min(commit_cost(folder / str(i)) for i in range(args.repeat))

    print()
    print("| path | concurrency | mode | requests/s | candidates/s | client CPU µs/request | sent |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for transport, c, mode, k, rps, cpu, sent in rows:
        print(f"| {transport} | {c} | {mode} | {rps:,.0f} | {rps * k:,.0f} | {cpu:,.0f} | {sent} |")
    rps_of = {(t, c, mode): rps for t, c, mode, _, rps, _, _ in rows}
    ratios = [
        (c, mode, rps / rps_of[("openai", c, mode)])
        for t, c, mode, _, rps, _, _ in rows
        if t == "aiohttp" and ("openai", c, mode) in rps_of
    ]
    if ratios:
        print()
        print(
            "requests/s, aiohttp path / openai SDK path: "
            + ", ".join(f"c={c} {mode} {ratio:.2f}x" for c, mode, ratio in ratios)
        )
    print()
    print(
        f"reference, SDK typed chat.completions.create() at concurrency {ref_c} (ChatCompletion models): "
        f"{sdk_rps:,.0f} requests/s, {sdk_cpu:,.0f} µs CPU/request"
    )
    print(f"reference, one SQLite commit (WAL, synchronous=NORMAL) per answer: {commit_us:,.0f} µs")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
