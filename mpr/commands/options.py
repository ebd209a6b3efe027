"""Command-line options derived from a pydantic config model: name, type, default and help are the
field's, so no default is written twice (the config model is the one definition)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])


def config_options(model: type[BaseModel], *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Give the decorated command one option per field of ``model`` (except ``exclude``), before its own
    parameters. The command receives them as keyword arguments. A bool field that defaults to False is a
    plain flag (``--resume``); one that defaults to True also has its ``--no-`` form."""
    skipped = set(exclude)

    def decorate(fn: F) -> F:
        parameters = []
        for name, field in model.model_fields.items():
            if name in skipped:
                continue
            flag = "--" + name.replace("_", "-")
            declarations = [flag] if field.annotation is bool and field.default is False else []
            option = typer.Option(*declarations, help=field.description)
            default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
            parameters.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                  annotation=Annotated[field.annotation, option])
            )
        own = inspect.signature(fn, eval_str=True).parameters.values()
        parameters += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.kind is not p.VAR_KEYWORD]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command  # type: ignore[return-value]

    return decorate
