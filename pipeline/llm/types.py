"""Pydantic models at the boundary of the LLM client layer: requests, results, run statistics."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

KEY_VERSION = "mpr-chat-v1"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """One chat completion. `model` may stay empty: the backend fills in its own model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: list[Message] = Field(min_length=1)
    model: str = ""
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    max_tokens: int | None = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)

    @property
    def key(self) -> str:
        """sha256 over the model, the messages, every sampling parameter and the schema (computed on each
        call)."""
        payload = json.dumps(
            [KEY_VERSION, self.model_dump(mode="json")],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def with_model(self, model: str) -> ChatRequest:
        return self if self.model else self.model_copy(update={"model": model})


class TokenLogprob(BaseModel):
    """One generated token, its log-probability and the top alternatives at that position."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)


class ChatResult(BaseModel):
    key: str
    content: str | None = None
    parsed: Any = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class RunStats(BaseModel):
    requests: int = 0
    unique: int = 0
    cache_hits: int = 0
    sent: int = 0
    answered: int = 0
    first_try_valid: int = 0  # answered validly by the first attempt (cache hits not counted)
    retries: int = 0
    invalid: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    per_server: dict[str, int] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def merge(self, other: RunStats) -> None:
        for name in RunStats.model_fields:
            if name == "per_server":
                for url, n in other.per_server.items():
                    self.per_server[url] = self.per_server.get(url, 0) + n
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        return (
            f"{self.requests} requests ({self.cache_hits} cached, {self.sent} sent, {self.retries} retries, "
            f"{self.failures} failed) in {self.wall_s:.1f}s = {self.requests_per_s:.0f}/s; "
            f"tokens in/out {self.prompt_tokens}/{self.completion_tokens}"
        )
