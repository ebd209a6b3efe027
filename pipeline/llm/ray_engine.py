"""`--engine ray`: the LLM requests of `mpr relabel` and `mpr synth` go out through Ray Data.

The stage is the same code as with the local engine: the same parts, prompts, requests, validation,
verdicts, shard rows, manifest and resume per part. Only the backend differs: a `RayBackend` answers the
requests of a part as one Ray Data job, `ray.data.from_items(requests)` and then one of

- `ray_processor="mpr"` (default): `map_batches` over `ray_workers` actors, each running mpr's own async
  client (`OpenAIBackend`: `--concurrency` requests in flight, least-in-flight balancing over every
  `--base-url`, retries with backoff and Retry-After, the response_format fallback);
- `ray_processor="ray-llm"`: `ray.data.llm.build_processor(HttpRequestProcessorConfig, preprocess,
  postprocess)`, one processor per `--base-url`, with `preprocess` writing mpr's own request body
  (`OpenAIBackend._body`) and `postprocess` reading the answer with mpr's parser (`client._parse`).
  Ray's HTTP stage (Ray 2.60) awaits its requests one after another: one request in flight per actor
  (measured in bench/bench_ray.py), so it is there for parity with Ray's API, not for throughput;
- with `--backend vllm`: `vLLMEngineProcessorConfig` (vLLM engines on the cluster's GPU workers;
  `pip install "ray[llm]"` there), `preprocess` giving messages and sampling parameters (the JSON
  schema as structured output), `postprocess` the generated text. Not exercised here: no vLLM or GPU.

On the driver every answer is checked with the stage's validator (`ChatBackend.run` / `RunContext`),
stored in the SQLite request cache, and what failed or did not validate goes through another round, up
to `max_attempts` / `max_invalid_retries` as with the local engine: one bad answer never stops the run
(a Ray block that fails is skipped, `max_errored_blocks = -1`, and its rows are asked again).

Why the driver builds the requests and keeps the cache: a request's answer is cached under the hash of
(model, messages, sampling parameters), and a part is written only when all of its answers are in. With
the requests and the cache on the driver, a resumed run on a cluster sends nothing that was answered
and writes byte-identical parts, and the output folder and cache need to be visible to the driver only.
The API key goes to the workers as an environment variable of the job (`runtime_env`) or, with
`ray-llm`, in the processor's headers; it is never written to the shards, manifest or cache.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from pipeline.data.identity import RUNTIME
from pipeline.errors import MprError
from pipeline.llm.base import ChatBackend, RunContext, WorkItem
from pipeline.llm.types import ChatRequest, ChatResult

if TYPE_CHECKING:
    pass


class RayOptions(BaseModel):
    """Where the LLM requests run (part of every LLM stage's config; none changes what is written)."""

    engine: Literal["local", "ray"] = Field(
        "local",
        description="local: mpr's async client in this process; "
        "ray: a Ray Data pipeline through ray.data.llm "
        "(pip install 'mpr[ray]'; README: running on a cluster).",
        json_schema_extra=RUNTIME,
    )
    ray_address: str | None = Field(
        None,
        description="--engine ray: the Ray cluster (default: $RAY_ADDRESS, else a local Ray).",
        json_schema_extra=RUNTIME,
    )
    ray_processor: Literal["mpr", "ray-llm"] = Field(
        "mpr",
        description="--engine ray, HTTP: mpr's async client in Ray actors, or ray.data.llm's "
        "HttpRequestProcessorConfig (one request in flight per actor).",
        json_schema_extra=RUNTIME,
    )
    ray_workers: int = Field(
        2,
        ge=1,
        description="--engine ray: HTTP actors per server, or vLLM engine replicas with --backend vllm.",
        json_schema_extra=RUNTIME,
    )
    ray_batch_size: int = Field(
        256, ge=1, description="--engine ray: rows per Ray Data batch.", json_schema_extra=RUNTIME
    )


def ensure_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise MprError('--engine ray needs Ray: pip install "mpr[ray]"') from None
    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = -1  # a failed block's rows come back as missing and are asked again
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # mpr's own progress and summary say what happens


def _plain(value: Any) -> Any:
    """JSON default for what Ray Data hands back from Arrow blocks (numpy arrays and scalars)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _http_preprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {"i": row["i"], "key": row["key"], "payload": json.loads(row["body"])}


def _http_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    from pipeline.llm.client import _parse

    response = row["http_response"]
    raw = json.dumps(response, default=_plain)
    try:
        result = _parse(row["key"], raw.encode())
    except (ValueError, KeyError, IndexError, TypeError) as e:
        error = response.get("error") if isinstance(response, dict) else None
        message = (
            error.get("message") if isinstance(error, dict) else None
        ) or f"malformed response: {type(e).__name__}: {e}"
        return {"i": int(row["i"]), "ok": False, "answer": str(message)[:300]}
    return {"i": int(row["i"]), "ok": True, "answer": result.model_dump_json()}


def _vllm_preprocess(row: dict[str, Any]) -> dict[str, Any]:
    request = ChatRequest.model_validate_json(row["request"])
    sampling: dict[str, Any] = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
    }
    if request.seed is not None:
        sampling["seed"] = request.seed
    if request.stop:
        sampling["stop"] = request.stop
    if request.logprobs:
        sampling["logprobs"] = max(1, request.top_logprobs)
    if request.json_schema is not None:
        sampling["structured_outputs"] = {"json": request.json_schema}
    return {
        "i": row["i"],
        "key": row["key"],
        "messages": [m.model_dump() for m in request.messages],
        "sampling_params": sampling,
    }


def _vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    result = ChatResult(
        key=row["key"],
        content=row.get("generated_text"),
        prompt_tokens=int(row.get("num_input_tokens") or 0),
        completion_tokens=int(row.get("num_generated_tokens") or 0),
    )
    return {"i": int(row["i"]), "ok": True, "answer": result.model_dump_json()}


class _MprHttpUDF:
    """A Ray Data actor that answers a batch of requests with mpr's own async client (`--concurrency` in
    flight, retries with backoff, Retry-After, the schema fallback); validation stays on the driver."""

    def __init__(self, model: str, urls: list[str], options: dict[str, Any]):
        from pipeline.llm.client import OpenAIBackend

        self.backend = OpenAIBackend(model, urls, cache=None, max_invalid_retries=0, **options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        requests = [ChatRequest.model_validate_json(r) for r in batch["request"]]
        results = self.backend.run_sync(
            requests, validate=lambda content: None
        )  # any content; the driver validates
        return {
            "i": [int(i) for i in batch["i"]],
            "ok": [r.ok for r in results],
            "answer": [r.model_dump_json() if r.ok else (r.error or "failed") for r in results],
        }


class RayBackend(ChatBackend):
    """What the Ray backends share: rounds of Ray Data pipelines, validation and retries on the driver."""

    def __init__(
        self, model: str, *, address: str | None, workers: int, batch_size: int, max_attempts: int, **kw: Any
    ):
        super().__init__(model, **kw)
        self.address, self.workers, self.batch_size, self.max_attempts = (
            address,
            workers,
            batch_size,
            max_attempts,
        )
        # here, in the caller's thread: a local Ray started from the short-lived thread a round runs in would
        # be stopped with that thread (its processes get the parent-death signal)
        ensure_ray(address)

    async def _generate(self, todo: list[WorkItem], ctx: RunContext) -> None:
        stats = ctx.stats
        attempts: dict[str, int] = {}
        invalid: dict[str, int] = {}
        failures: dict[str, int] = {}
        pending = todo
        while pending:
            answers = await asyncio.to_thread(self._round, pending)
            again: list[WorkItem] = []
            for n, item in enumerate(pending):
                tries = attempts[item.key] = attempts.get(item.key, 0) + 1
                stats.sent += 1
                stats.retries += tries > 1
                ok, answer = answers.get(n, (False, "no answer from the Ray pipeline (its block failed)"))
                if ok:
                    result = ChatResult.model_validate_json(answer)
                    result.attempts = tries
                    problem = ctx.check(item, result)
                    if problem is None:
                        await ctx.finish(item, result)
                        continue
                    stats.invalid += 1
                    invalid[item.key] = invalid.get(item.key, 0) + 1
                    if invalid[item.key] > self.max_invalid_retries:
                        result.error = f"invalid answer after {tries} attempts: {problem}"
                        result.parsed = None
                        await ctx.finish(item, result)
                        continue
                else:
                    failures[item.key] = failures.get(item.key, 0) + 1
                    if failures[item.key] >= self.max_attempts:
                        await ctx.finish(
                            item,
                            ChatResult(
                                key=item.key,
                                error=f"gave up after {tries} attempts: {answer}",
                                attempts=tries,
                            ),
                        )
                        continue
                again.append(item)
            pending = again

    def _round(self, items: list[WorkItem]) -> dict[int, tuple[bool, str]]:
        """One Ray Data job over `items`: position -> (answered, ChatResult JSON or the error)."""
        out: dict[int, tuple[bool, str]] = {}
        for row in self._dataset(items).take_all():
            out[int(row["i"])] = (bool(row["ok"]), str(row["answer"]))
        return out

    def _dataset(self, items: list[WorkItem]) -> Any:
        raise NotImplementedError

    def _blocks(self, rows: int) -> int:
        """Enough blocks for every actor to get work, and no block larger than a batch."""
        return max(1, min(rows, max(self.workers, math.ceil(rows / self.batch_size))))


class RayHttpBackend(RayBackend):
    """OpenAI-compatible servers, through Ray Data actors running mpr's client (`processor="mpr"`) or
    through `ray.data.llm.HttpRequestProcessorConfig` (`processor="ray-llm"`)."""

    kind = "ray-openai"

    def __init__(
        self,
        model: str,
        base_urls: list[str],
        *,
        api_key_env: str,
        timeout_s: float,
        processor: str,
        concurrency: int,
        transport: str,
        **kw: Any,
    ):
        super().__init__(model, **kw)
        if not base_urls:
            raise MprError("--engine ray: no base URL given for the OpenAI-compatible servers")
        from pipeline.llm.client import OpenAIBackend

        self.urls = [u.rstrip("/") for u in base_urls]
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.processor = processor
        self.concurrency, self.transport = concurrency, transport
        self._bodies = OpenAIBackend(model, self.urls)  # mpr's own request body, nothing else

    def _dataset(self, items: list[WorkItem]) -> Any:
        return self._ray_llm(items) if self.processor == "ray-llm" else self._mpr(items)

    def _mpr(self, items: list[WorkItem]) -> Any:
        import ray

        secret = os.environ.get(self.api_key_env)
        options = {
            "api_key_env": self.api_key_env,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts,
            "transport": self.transport,
        }
        rows = [{"i": n, "request": item.request.model_dump_json()} for n, item in enumerate(items)]
        return ray.data.from_items(rows, override_num_blocks=self._blocks(len(rows))).map_batches(
            _MprHttpUDF,
            fn_constructor_kwargs={"model": self.model, "urls": self.urls, "options": options},
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            batch_size=self.batch_size,
            batch_format="default",
            # the workers read the key from their environment, as the local client does
            runtime_env={"env_vars": {self.api_key_env: secret}} if secret else None,
        )

    def __repr__(self) -> str:
        return f"RayHttpBackend(model={self.model!r}, base_urls={self.urls!r})"

    def _ray_llm(self, items: list[WorkItem]) -> Any:
        import aiohttp
        import ray
        from ray.data.llm import HttpRequestProcessorConfig, build_processor

        secret = os.environ.get(self.api_key_env) or ""
        rows = []
        for n, item in enumerate(items):
            messages = [{"role": m.role, "content": m.content} for m in item.request.messages]
            body = self._bodies._body(item.request, messages, item.request.json_schema is not None)
            rows.append({"i": n, "key": item.key, "body": json.dumps(body, ensure_ascii=False)})
        datasets = []
        for u, url in enumerate(self.urls):
            share = rows[u :: len(self.urls)]
            if not share:
                continue
            config = HttpRequestProcessorConfig(
                url=url + "/chat/completions",
                headers={"Authorization": f"Bearer {secret}"} if secret else None,
                concurrency=self.workers,
                batch_size=self.batch_size,
                max_retries=max(0, self.max_attempts - 1),
                base_retry_wait_time_in_s=0.5,
                session_factory=functools.partial(
                    aiohttp.ClientSession, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
                ),
            )
            processor = build_processor(config, preprocess=_http_preprocess, postprocess=_http_postprocess)
            datasets.append(
                processor(ray.data.from_items(share, override_num_blocks=self._blocks(len(share))))
            )
        return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


class RayVLLMBackend(RayBackend):
    """vLLM engines on the cluster's GPU workers through `ray.data.llm.vLLMEngineProcessorConfig`."""

    kind = "ray-vllm"

    def __init__(self, model: str, *, engine_kwargs: dict[str, Any] | None = None, **kw: Any):
        super().__init__(model, **kw)
        self.engine_kwargs = engine_kwargs or {"enable_prefix_caching": True}

    def _dataset(self, items: list[WorkItem]) -> Any:
        import ray
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        config = vLLMEngineProcessorConfig(
            model_source=self.model,
            engine_kwargs=self.engine_kwargs,
            concurrency=self.workers,
            batch_size=self.batch_size,
        )
        processor = build_processor(config, preprocess=_vllm_preprocess, postprocess=_vllm_postprocess)
        rows = [
            {"i": n, "key": item.key, "request": item.request.model_dump_json()}
            for n, item in enumerate(items)
        ]
        return processor(ray.data.from_items(rows, override_num_blocks=self._blocks(len(rows))))
