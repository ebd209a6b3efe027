"""What the LLM stages (`mpr relabel`, `mpr synth`) share: backend and run options, `--shard K/N`,
opening the backends, and counting the requests and tokens of each run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.data.identity import RUNTIME
from pipeline.llm.backends import AUTO, BACKENDS, BackendChoice
from pipeline.llm.base import ChatBackend
from pipeline.llm.client import ClientOptions
from pipeline.llm.models import resolve_backend, resolve_llm_alias
from pipeline.llm.ray_engine import RayOptions
from pipeline.llm.types import RunStats
from pipeline.redact import refuse_userinfo

LLM_KEYS = (
    "sent",
    "first_try_valid",
    "cache_hits",
    "retries",
    "invalid",
    "failures",
    "prompt_tokens",
    "completion_tokens",
)


class LLMStageConfig(RayOptions, ClientOptions):
    """Options every LLM stage takes (those marked RUNTIME do not change what the stage writes)."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendChoice = Field(
        AUTO,
        description="openai: any OpenAI-compatible server; vllm: in-process (pip install 'mpr[vllm]'); "
        "auto: vLLM with a GPU, else $OPENAI_BASE_URL or localhost:8000.",
        json_schema_extra=RUNTIME,
    )
    base_url: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URL; repeat to spread the load over several servers.",
        json_schema_extra=RUNTIME,
    )
    shard: str | None = Field(
        None,
        description="K/N: process one slice (whole queries) of N; N jobs together fill one folder.",
        json_schema_extra=RUNTIME,
    )
    queries_per_shard: int = Field(
        1000, ge=1, description="Queries per output part (the unit of resumption and of --shard)."
    )
    llm_cache: Path | None = Field(
        None, description="SQLite request cache (default: $MPR_CACHE/llm.sqlite).", json_schema_extra=RUNTIME
    )
    overwrite: bool = Field(
        False,
        description="Replace an existing output folder written with other options.",
        json_schema_extra=RUNTIME,
    )
    progress: bool = Field(True, json_schema_extra=RUNTIME)
    max_failure_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of items (rows, sets) left failed that still exits 0; above it the run exits 3.",
        json_schema_extra=RUNTIME,
    )
    verify_inputs: Literal["fast", "full"] | None = Field(
        None,
        description="Check input shard folders against their manifests: fast (parts, sizes, row counts; "
        "checksums up to 1 GiB) or full (every checksum). Default: $MPR_VERIFY, else fast.",
        json_schema_extra=RUNTIME,
    )

    _no_userinfo = field_validator("base_url")(refuse_userinfo)

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            k, n = (int(x) for x in value.split("/"))
        except ValueError:
            raise ValueError("expected K/N, e.g. 0/4") from None
        if not 0 <= k < n:
            raise ValueError(f"K must be in 0..N-1, got {value}")
        return value

    @property
    def job(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        k, n = (int(x) for x in self.shard.split("/"))
        return k, n


def open_backends(
    cfg: LLMStageConfig, model: str, others: list[str | None], *, stage: str, log: Callable[[str], None]
) -> tuple[ChatBackend, list[ChatBackend | None]]:
    """The backend for `model` and one for each of `others` (None stays None; the same model shares it)."""
    from pipeline.data.locations import default_cache_dir

    options: dict[str, Any] = dict(
        cache=cfg.llm_cache or default_cache_dir() / "llm.sqlite", max_invalid_retries=cfg.max_invalid_retries
    )
    if cfg.engine == "ray":
        return _open_ray(cfg, model, others, options, stage=stage, log=log)
    spec = resolve_backend(cfg.backend, cfg.base_url, model, api_key_env=cfg.api_key_env)
    backend = spec.create(cfg, **options)
    extra = [
        None
        if m is None
        else backend
        if m == spec.model
        else spec.model_copy(update={"model": m}).create(cfg, **options)
        for m in others
    ]
    log(
        f"{stage}: {spec.kind} backend, model {spec.model}"
        + (f" at {', '.join(spec.base_urls)}" if spec.base_urls else "")
    )
    if spec.backend.probes_endpoint:
        know_endpoint([backend, *extra], cfg, stage=stage, log=log)
    return backend, extra


def know_endpoint(
    backends: list[ChatBackend | None], cfg: LLMStageConfig, *, stage: str, log: Callable[[str], None]
) -> None:
    """Ask the (first) server what it supports before any work is sent, say in one line what will be used, and
    set the backends up for it: prompts fitted to its context window, no schema where it refuses one, and
    one request in flight per slot of a llama.cpp server (more would wait in its queue on the timeout's
    clock)."""
    from pipeline.llm.client import OpenAIBackend
    from pipeline.llm.endpoint import probe_endpoint
    from pipeline.redact import read_key

    clients = [
        b for b in {id(b): b for b in backends if b is not None}.values() if isinstance(b, OpenAIBackend)
    ]
    if not clients:
        return
    info, fit = probe_endpoint(
        clients[0].servers[0].url, clients[0].model, read_key(cfg.api_key_env), timeout_s=cfg.timeout
    )
    note = ""
    for client in clients:
        client.endpoint, client.fit = info, fit
        if info.json_schema is False:
            for server in client.servers:
                server.schema_level = 0
        if info.server == "llama.cpp" and info.slots:
            limit = info.slots * len(client.servers)
            if client.concurrency > limit:
                client.concurrency = limit
                note = (
                    f"; {limit} request(s) in flight "
                    "(one per slot: more would wait in its queue, on --timeout's clock)"
                )
    log(f"{stage}: endpoint: {info.line()}{note}")


def _open_ray(
    cfg: LLMStageConfig,
    model: str,
    others: list[str | None],
    options: dict[str, Any],
    *,
    stage: str,
    log: Callable[[str], None],
) -> tuple[ChatBackend, list[ChatBackend | None]]:
    """`--engine ray`: the same models, asked through Ray Data's LLM processors (pipeline.llm.ray_engine)."""
    chosen = BACKENDS.get(cfg.backend)
    if chosen is not None and chosen.in_process:  # runs on the cluster's GPU workers: need not import here
        name, urls = resolve_llm_alias(model), []
    else:
        spec = resolve_backend(cfg.backend, cfg.base_url, model, api_key_env=cfg.api_key_env)
        chosen, name, urls = spec.backend, spec.model, list(spec.base_urls)
    backend = chosen.ray(name, urls, cfg, options)
    extra = [
        None if m is None else backend if m == name else chosen.ray(m, urls, cfg, options) for m in others
    ]
    log(
        f"{stage}: ray engine, {chosen.name} backend, model {name}"
        + (f" at {', '.join(urls)}" if urls else "")
    )
    return backend, extra


def close_backends(*backends: ChatBackend | None) -> None:
    for backend in {id(b): b for b in backends if b is not None}.values():
        backend.close()


def add_llm_stats(stats: dict[str, int], prefix: str, run: RunStats) -> None:
    """Add one `run`'s request and token counts to a part's statistics, as `{prefix}_{key}`."""
    for key in LLM_KEYS:
        stats[f"{prefix}_{key}"] = stats.get(f"{prefix}_{key}", 0) + int(getattr(run, key))


def failure_line(stage: str, out: Path, summary: dict[str, Any], max_rate: float) -> str | None:
    """One line when the run ended with more items left failed (`retryable` of `attempted`) than
    `max_rate` allows; None when it succeeded. The output is complete and a rerun retries them."""
    failed, attempted = int(summary.get("retryable", 0)), int(summary.get("attempted", 0))
    if not failed or (attempted and failed / attempted <= max_rate):
        return None
    share = f" of {attempted:,} ({failed / attempted:.1%})" if attempted else ""
    return (
        f"{stage}: {failed:,}{share} item(s) failed (see {out}/_failures.jsonl); "
        f"rerun the same command to retry exactly those, or accept them with --max-failure-rate"
    )
