"""Command-line options derived from a pydantic config model: name, type, default and help are the
field's, so no default is written twice (the config model is the one definition)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])


def option_name(field: str) -> str:
    """The option a field becomes by default: ``max_seq_length`` -> ``--max-seq-length``."""
    return "--" + field.replace("_", "-")


def _metavar(annotation: Any) -> str | None:
    """``<path>`` rather than ``<list[Path]>`` for a repeatable option."""
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return f"<{getattr(item, '__name__', str(item)).lower()}>"
    return None


def _parameter_info(name: str, field: FieldInfo, flag: str | None, argument: bool) -> Any:
    if argument:
        return typer.Argument(help=field.description, show_default=False, metavar=name.upper())
    if field.annotation is bool and field.default is False:
        return typer.Option(flag or option_name(name), help=field.description)  # a plain flag: --resume
    if field.annotation is bool and flag:
        return typer.Option(f"{flag}/--no-{flag.removeprefix('--')}", help=field.description)
    long_float = isinstance(field.default, float) and len(repr(field.default)) > 8
    shown: bool | str = f"{field.default:.4g}" if long_float else True  # 2/3 reads 0.6667
    return typer.Option(
        *([flag] if flag else []),
        help=field.description,
        metavar=_metavar(field.annotation),
        show_default=shown,
    )


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The model's fields, its own first and then each base class's (in method resolution order), so the
    options a command adds to a shared base config (the LLM stages') come before the shared ones."""
    order: list[str] = []
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            order += [n for n in inspect.get_annotations(cls) if n in model.model_fields and n not in order]
    order += [n for n in model.model_fields if n not in order]
    return [(n, model.model_fields[n]) for n in order]


def config_options(
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    flags: Mapping[str, str] | None = None,
    arguments: Iterable[str] = (),
    comma_lists: Iterable[str] = (),
) -> Callable[[F], F]:
    """Give the decorated command one option per field of ``model`` (except ``exclude``), before its own
    parameters. The command receives them as keyword arguments. A bool field that defaults to False is a
    plain flag (``--resume``); one that defaults to True also has its ``--no-`` form.

    ``flags`` renames an option (``{"json_out": "--json"}``: the field keeps its name, the command line
    says ``--json``); ``arguments`` makes fields positional arguments instead of options; ``comma_lists``
    are list fields given as one comma-separated value (``--lengths 40,80``) that the model's validator
    splits; left out, the field keeps the model's default. The command's own parameters (``--quiet``,
    options that are no config field) follow the config's."""
    skipped, positional, renamed, texts = set(exclude), set(arguments), dict(flags or {}), set(comma_lists)
    unknown = (skipped | positional | set(renamed) | texts) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {', '.join(sorted(unknown))}")

    def decorate(fn: F) -> F:
        parameters = []
        for name, field in _fields(model):
            if name in skipped:
                continue
            info = _parameter_info(name, field, renamed.get(name), name in positional)
            if name in texts:
                annotation: Any = Annotated[str | None, info]
                default = None
            else:
                annotation = Annotated[field.annotation, info]
                default = (
                    inspect.Parameter.empty
                    if field.is_required()
                    else field.get_default(call_default_factory=True)
                )
            parameters.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
                )
            )
        own = inspect.signature(fn, eval_str=True).parameters.values()
        parameters += [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.kind is not p.VAR_KEYWORD
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**{k: v for k, v in kwargs.items() if not (k in texts and v is None)})

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command  # type: ignore[return-value]

    return decorate
