"""Which options of a stage make its output what it is (its identity) and which only say where or how fast
it is computed. A config field says it itself: `Field(..., json_schema_extra=RUNTIME)` marks a runtime
option. Resume checks, manifests' fingerprints and `mpr run`'s "trained with other options" compare the
identity only."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

RUNTIME: dict[str, Any] = {"identity": False}


def runtime_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` marked RUNTIME."""
    return frozenset(
        name
        for name, field in model.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("identity") is False
    )


def identity(cfg: BaseModel) -> dict[str, Any]:
    """`cfg` as JSON, less its runtime fields."""
    return cfg.model_dump(mode="json", exclude=set(runtime_fields(type(cfg))))
