"""The backend registry: every way mpr can reach a model, written once.

A backend is a `ChatBackend` subclass (the base class gives caching, retries, validation and stats) and a
`Backend` entry here saying how `--engine local` and `--engine ray` build it. `resolve_backend`
(`models.py`) picks one for `--backend auto`; `open_backends` (`stage.py`) builds it. Adding a backend is its
module and one entry here (and its name in `BackendChoice`, which the config models and the command line
read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from pipeline.llm.base import ChatBackend
    from pipeline.llm.stage import LLMStageConfig

#: `--backend`: a registered backend, or `auto` (in-process vLLM with a GPU, else a server).
BackendChoice = Literal["auto", "openai", "vllm"]
AUTO: Final = "auto"

#: (model, base URLs, the stage's config or None, cache options) -> the backend.
Factory = Callable[[str, list[str], "LLMStageConfig | None", dict[str, Any]], "ChatBackend"]


@dataclass(frozen=True)
class Backend:
    name: str
    local: Factory  # `--engine local`
    ray: Factory  # `--engine ray`: the same requests through Ray Data
    in_process: bool = False  # the model runs in the process (on Ray: on the GPU workers), not behind a URL
    probes_endpoint: bool = False  # ask the server what it supports before the work (pipeline.llm.endpoint)
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here (one line), or None


def _openai(model: str, urls: list[str], cfg: LLMStageConfig | None, options: dict[str, Any]) -> ChatBackend:
    from pipeline.llm.client import OpenAIBackend

    if cfg is not None:
        options = {
            **options,
            "api_key_env": cfg.api_key_env,
            "concurrency": cfg.concurrency,
            "timeout_s": cfg.timeout,
            "max_attempts": cfg.max_attempts,
            "transport": cfg.http_client,
        }
    return OpenAIBackend(model, urls, **options)


def _vllm(model: str, urls: list[str], cfg: LLMStageConfig | None, options: dict[str, Any]) -> ChatBackend:
    from pipeline.llm.vllm_backend import VLLMBackend

    return VLLMBackend(model, **options)


def _vllm_missing() -> str | None:
    from pipeline.llm.vllm_backend import INSTALL_HINT, vllm_importable

    return None if vllm_importable() else INSTALL_HINT


def _ray_common(cfg: LLMStageConfig | None, options: dict[str, Any]) -> dict[str, Any]:
    assert cfg is not None, "--engine ray needs the stage's config"
    return {
        "address": cfg.ray_address,
        "workers": cfg.ray_workers,
        "batch_size": cfg.ray_batch_size,
        "max_attempts": cfg.max_attempts,
        "cache": options["cache"],
        "max_invalid_retries": cfg.max_invalid_retries,
    }


def _ray_openai(
    model: str, urls: list[str], cfg: LLMStageConfig | None, options: dict[str, Any]
) -> ChatBackend:
    from pipeline.llm.ray_engine import RayHttpBackend

    common = _ray_common(cfg, options)
    assert cfg is not None
    return RayHttpBackend(
        model,
        urls,
        api_key_env=cfg.api_key_env,
        timeout_s=cfg.timeout,
        processor=cfg.ray_processor,
        concurrency=cfg.concurrency,
        transport=cfg.http_client,
        **common,
    )


def _ray_vllm(
    model: str, urls: list[str], cfg: LLMStageConfig | None, options: dict[str, Any]
) -> ChatBackend:
    from pipeline.llm.ray_engine import RayVLLMBackend

    return RayVLLMBackend(model, **_ray_common(cfg, options))


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("openai", local=_openai, ray=_ray_openai, probes_endpoint=True),
        Backend("vllm", local=_vllm, ray=_ray_vllm, in_process=True, missing=_vllm_missing),
    )
}
#: The backend for a server found at a URL, and the one `auto` runs in-process when it can.
SERVER, IN_PROCESS = BACKENDS["openai"], BACKENDS["vllm"]
