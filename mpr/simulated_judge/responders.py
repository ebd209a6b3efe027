"""What the simulated judge's server answers: the responder interface, a default responder, loading by
dotted path.

A responder is a callable `(request_json: dict) -> str | ResponderAnswer` (it may also be `async`). It gets
the chat-completions request body exactly as the client sent it (model, messages, response_format, ...).
`--responder module:factory` names a *factory*: it is called with the responder arguments as keywords and
returns the responder, so a stage can plug in e.g. an oracle built from a qrels file.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from pipeline.errors import MprError

# (token, logprob) or (token, logprob, [(alternative, logprob), ...])
TokenLogprobs: TypeAlias = Sequence[tuple[str, float] | tuple[str, float, Sequence[tuple[str, float]]]]


@dataclass(slots=True)
class ResponderAnswer:
    content: str
    token_logprobs: TokenLogprobs | None = None
    finish_reason: Literal["stop", "length"] = "stop"


ResponderOutput: TypeAlias = "str | ResponderAnswer"
Responder: TypeAlias = Callable[[dict[str, Any]], "ResponderOutput | Awaitable[ResponderOutput]"]


def response_schema(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema the request asks the answer to follow, if any (OpenAI or vLLM-extension field)."""
    rf = request.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else {}
    so = request.get("structured_outputs")
    if isinstance(so, dict) and isinstance(so.get("json"), dict):
        return so["json"]
    guided = request.get("guided_json")
    return guided if isinstance(guided, dict) else None


def minimal_instance(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """The smallest value valid for the common subset of JSON Schema that pydantic emits."""
    root = root or schema
    if "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part] if part else node
        return minimal_instance(node, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for combo in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combo)
        if options:
            non_null = [o for o in options if o.get("type") != "null"]
            return minimal_instance((non_null or options)[0], root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "null"
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal_instance(props.get(name, {}), root) for name in schema.get("required", [])}
    if kind == "array":
        item = schema.get("items") or {}
        return [minimal_instance(item, root) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "string":
        return "a" * int(schema.get("minLength", 0))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        if low is None:
            high = schema.get("maximum")
            value = min(0, high) if high is not None else 0
        else:
            value = low + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    return None


def default_responder(text: str = "OK") -> Responder:
    """Answers `text`, or the minimal valid JSON instance when the request carries a JSON schema."""
    memo: dict[str, str] = {}

    def respond(request: dict[str, Any]) -> str:
        schema = response_schema(request)
        if schema is None:
            if request.get("response_format", {}).get("type") == "json_object":
                return "{}"
            return text
        k = json.dumps(schema, sort_keys=True)
        if k not in memo:
            memo[k] = json.dumps(minimal_instance(schema))
        return memo[k]

    return respond


def load_responder(spec: str, kwargs: dict[str, Any] | None = None) -> Responder:
    """`module.path:factory` -> factory(**kwargs), which must return the responder callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MprError(f"responder {spec!r}: expected 'module.path:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise MprError(f"responder {spec!r}: {e}") from e
    responder = factory(**(kwargs or {}))
    if not callable(responder):
        raise MprError(f"responder {spec!r}: the factory returned {type(responder).__name__}, not a callable")
    return responder
