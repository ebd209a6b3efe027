"""`StagePlan`: what a stage would read, do and write, computed without running it.

Every stage module has `plan(cfg) -> StagePlan` (what `--dry-run` prints) and `run(cfg, *, log) ->
Manifest` (what it writes; `mpr eval`'s `run` returns its report, as that stage writes no shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StagePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    out: Path | None = Field(description="the shard folder it writes (None: the stage writes no shards)")
    inputs: list[str] = Field(description="the files and folders it reads")
    queries: int = Field(description="queries it processes")
    parts: int | None = Field(None, description="Parquet parts it writes")
    corpus: int | None = Field(None, description="passages it encodes and searches (mine, eval)")
    models: list[str] = Field(default_factory=list, description="models it loads or asks")
    candidates: int | None = Field(None, description="(query, passage) pairs it judges (relabel)")
    sets: int | None = Field(None, description="passage sets it asks for (synth)")
    passages: int | None = Field(None, description="passages it asks for (synth)")
    requests: int | None = Field(None, description="LLM requests, without retries")
    verify_requests_max: int | None = Field(None, description="synth --verify: judge requests at most")
    prompt_tokens: int | None = None
    max_completion_tokens: int | None = Field(
        None, description="the requests' completion token limits, summed"
    )
    prompt_tokens_per_candidate: float | None = None
    token_counts: str | None = Field(None, description="how the tokens were counted: exact, or estimated")
    notes: list[str] = Field(default_factory=list)

    def rows(self) -> list[tuple[str, Any]]:
        """(name, value) of what is known, in field order (`stage` and `notes` apart)."""
        return [
            (name, value)
            for name, value in self
            if name not in ("stage", "notes") and value not in (None, [])
        ]
