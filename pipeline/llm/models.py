"""Model aliases, choosing a backend (in-process vLLM or an OpenAI-compatible server), rough token counts."""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pipeline.errors import MprError
from pipeline.llm.backends import AUTO, BACKENDS, IN_PROCESS, SERVER, Backend, BackendChoice
from pipeline.llm.base import ChatBackend
from pipeline.llm.types import Message
from pipeline.redact import USERINFO_HINT, has_userinfo, read_key

if TYPE_CHECKING:
    from pipeline.llm.stage import LLMStageConfig

log = logging.getLogger("mpr.llm")

DEFAULT_LLM = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_BASE_URL = "http://localhost:8000/v1"  # `vllm serve` listens here by default
ALIASES_ENV = "MPR_MODEL_ALIASES"

MODEL_ALIASES: dict[str, str] = {
    "Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-3B": "Qwen/Qwen2.5-3B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen2.5-14B": "Qwen/Qwen2.5-14B-Instruct",
    "Qwen2.5-32B": "Qwen/Qwen2.5-32B-Instruct",
    "Qwen2.5-72B": "Qwen/Qwen2.5-72B-Instruct",
    "Qwen3-0.6B": "Qwen/Qwen3-0.6B",
    "Qwen3-1.7B": "Qwen/Qwen3-1.7B",
    "Qwen3-4B": "Qwen/Qwen3-4B",
    "Qwen3-8B": "Qwen/Qwen3-8B",
    "Qwen3-14B": "Qwen/Qwen3-14B",
    "Qwen3-32B": "Qwen/Qwen3-32B",
    "Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B-Instruct",
    "Llama-3.1-70B": "meta-llama/Llama-3.1-70B-Instruct",
    "Llama-3.2-1B": "meta-llama/Llama-3.2-1B-Instruct",
    "Llama-3.2-3B": "meta-llama/Llama-3.2-3B-Instruct",
    "Llama-3.3-70B": "meta-llama/Llama-3.3-70B-Instruct",
    "Mistral-7B": "mistralai/Mistral-7B-Instruct-v0.3",
    "Mistral-Nemo-12B": "mistralai/Mistral-Nemo-Instruct-2407",
    "Mistral-Small-24B": "mistralai/Mistral-Small-24B-Instruct-2501",
}


def load_aliases(path: str | Path | None = None) -> dict[str, str]:
    """Built-in aliases, overridden by `path` or, without it, by $MPR_MODEL_ALIASES (a JSON/TOML file or a
    JSON object). A file holds `{"alias": "org/model", ...}`, optionally under an `aliases` table."""
    aliases = dict(MODEL_ALIASES)
    source = str(path) if path is not None else os.environ.get(ALIASES_ENV, "")
    if not source:
        return aliases
    if source.lstrip().startswith("{"):
        data, where = _parse_aliases_json(source, f"${ALIASES_ENV}"), f"${ALIASES_ENV}"
    else:
        file = Path(source).expanduser()
        where = str(file)
        try:
            text = file.read_text()
        except OSError as e:
            raise MprError(f"{file}: cannot read model aliases ({e.strerror})") from e
        if file.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError as e:  # Python 3.10
                raise MprError(f"{file}: TOML aliases need Python 3.11+; use a .json file") from e
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise MprError(f"{file}: invalid TOML ({e})") from e
        else:
            data = _parse_aliases_json(text, where)
    if isinstance(data.get("aliases"), dict):
        data = data["aliases"]
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise MprError(f"{where}: model aliases must map names to strings (bad: {', '.join(bad)})")
    aliases.update(data)
    return aliases


def _parse_aliases_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise MprError(f"{where}: invalid JSON for model aliases ({e})") from e
    if not isinstance(data, dict):
        raise MprError(f"{where}: model aliases must be a JSON object")
    return data


def resolve_llm_alias(name: str, aliases: Mapping[str, str] | None = None) -> str:
    """The full model id for an alias (case-insensitive); other names come back unchanged."""
    table = load_aliases() if aliases is None else aliases
    if name in table:
        return table[name]
    lowered = {k.lower(): v for k, v in table.items()}
    return lowered.get(name.lower(), name)


class BackendSpec(BaseModel):
    """The outcome of `resolve_backend`: what to run and where. `create()` builds the backend."""

    kind: str  # a key of pipeline.llm.backends.BACKENDS
    model: str
    base_urls: list[str] = []
    served_models: list[str] = []

    @property
    def backend(self) -> Backend:
        return BACKENDS[self.kind]

    def create(self, cfg: LLMStageConfig | None = None, **kwargs: Any) -> ChatBackend:
        """The backend, with the stage's options (`cfg`) where it takes them and the cache options."""
        return self.backend.local(self.model, list(self.base_urls), cfg, kwargs)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_backend(
    backend: BackendChoice = AUTO,
    base_urls: Sequence[str] = (),
    model: str | None = None,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    probe_timeout_s: float = 3.0,
) -> BackendSpec:
    """Pick the backend. `auto` without base URLs: in-process vLLM when importable and a CUDA GPU is present,
    else the server in $OPENAI_BASE_URL, else vLLM's default local address. Servers are probed with
    `GET /models`; when none answers, one MprError line says what was tried and how to start a server."""
    from pipeline.llm.vllm_backend import vllm_importable

    resolved = resolve_llm_alias(model) if model else None
    urls = [u.rstrip("/") for u in base_urls]
    chosen = BACKENDS.get(backend)
    if chosen is not None and chosen.in_process:
        if urls:
            raise MprError(
                f"--backend {backend} runs the model in-process; "
                f"drop --base-url or use --backend {SERVER.name}"
            )
        problem = chosen.missing()
        if problem:
            raise MprError(problem)
        return BackendSpec(kind=chosen.name, model=resolved or DEFAULT_LLM)

    tried: list[str] = []
    env_url = os.environ.get("OPENAI_BASE_URL", "").strip()
    if has_userinfo(env_url) and not urls:
        raise MprError(f"$OPENAI_BASE_URL {USERINFO_HINT}")
    if not urls:
        if backend == AUTO:
            if vllm_importable():
                if _cuda_available():
                    return BackendSpec(kind=IN_PROCESS.name, model=resolved or DEFAULT_LLM)
                tried.append("in-process vLLM (no CUDA GPU)")
            else:
                tried.append("in-process vLLM (not installed)")
        urls = [env_url.rstrip("/")] if env_url else [DEFAULT_BASE_URL]

    key = read_key(api_key_env)
    with ThreadPoolExecutor(min(len(urls), 16)) as pool:
        probes = list(pool.map(lambda u: _probe(u, key, probe_timeout_s), urls))
    alive = [(u, served) for u, (served, problem) in zip(urls, probes, strict=True) if problem is None]
    for u, (_, problem) in zip(urls, probes, strict=True):
        if problem is not None:
            tried.append(f"{u} ({problem})")
            if problem.startswith("HTTP 401") or problem.startswith("HTTP 403"):
                raise MprError(f"{u} refused the API key from ${api_key_env} ({problem}); set {api_key_env}")
    if not alive:
        raise MprError(
            f"no LLM endpoint answered: tried {'; '.join(tried)}. Start a server, e.g. "
            f"`vllm serve {resolved or DEFAULT_LLM}`, then pass --base-url http://HOST:8000/v1 "
            f"or set OPENAI_BASE_URL"
        )
    if len(alive) < len(urls):
        log.warning("LLM servers not answering, left out: %s", "; ".join(t for t in tried if "://" in t))
    served = sorted({m for _, ms in alive for m in ms})
    name = _choose_model(model, resolved, served)
    return BackendSpec(kind=SERVER.name, model=name, base_urls=[u for u, _ in alive], served_models=served)


def _choose_model(raw: str | None, resolved: str | None, served: list[str]) -> str:
    if raw is None or resolved is None:
        if not served:
            raise MprError("no model given and the server lists none; pass --model")
        if len(served) > 1:
            log.warning("no model given; the server serves %s; using %s", ", ".join(served), served[0])
        return served[0]
    if not served or resolved in served:
        return resolved
    if raw in served:  # e.g. `vllm serve ... --served-model-name Qwen2.5-7B`
        return raw
    log.warning("model %s is not among the served models (%s)", resolved, ", ".join(served[:10]))
    return resolved


def _probe(url: str, key: str, timeout_s: float) -> tuple[list[str], str | None]:
    """(served model ids, None) when `GET {url}/models` answers, else ([], what went wrong)."""
    req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return [], f"HTTP {e.code}"
    except urllib.error.URLError as e:
        reason = e.reason
        return [], (getattr(reason, "strerror", None) or str(reason)).lower()
    except TimeoutError:
        return [], f"no answer within {timeout_s:g}s"
    except (OSError, ValueError) as e:
        return [], f"{type(e).__name__}"
    models = data.get("data") if isinstance(data, dict) else None
    return [m["id"] for m in models or () if isinstance(m, dict) and isinstance(m.get("id"), str)], None


# -- token counts for dry runs -------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _local_tokenizer(model: str) -> Any:
    """A `tokenizers.Tokenizer` for `model` if its tokenizer.json is on disk (a folder or the HF cache)."""
    try:
        from tokenizers import Tokenizer

        folder = Path(model).expanduser()
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, "tokenizer.json")
        return Tokenizer.from_file(path) if isinstance(path, str) else None
    except Exception:
        return None


class TokenCounter:
    """Token counts for dry runs: the model's own tokenizer when it is on disk, else ~4 characters/token."""

    def __init__(self, model: str | None = None):
        self.tokenizer = _local_tokenizer(resolve_llm_alias(model)) if model else None

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) / 4)

    def count_messages(self, messages: Iterable[Message | Mapping[str, str]]) -> int:
        """Prompt tokens of a chat, with ~4 tokens per message for the chat template's markers."""
        total = 0
        for m in messages:
            content = m.content if isinstance(m, Message) else m["content"]
            total += self.count(content) + 4
        return total + 2
