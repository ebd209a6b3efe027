"""Prompt templates (`prompts/*.toml`, shipped as package data) and safe rendering of data into them.

Query and passage texts are data: `<` and `>` inside them are escaped, so a passage can neither close
its own tag nor open a fake candidate or instruction block.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from pipeline.errors import MprError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    schema: str
    system: str
    user: str
    tables: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        """`name@version`: what every row judged with this prompt records in its `prompt` column."""
        return f"{self.name}@{self.version}"

    def render(self, **fields: str) -> list[dict[str, str]]:
        """System and user messages: the fixed instruction first and the data after it, so a server's
        prefix cache is shared by every request of a query."""
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": Template(self.user).substitute(fields)},
        ]


def available() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml") for p in resources.files("prompts").iterdir() if p.name.endswith(".toml")
    )


@cache
def load_prompt(name: str) -> Prompt:
    path = resources.files("prompts") / f"{name}.toml"
    if not path.is_file():
        raise MprError(f"unknown prompt '{name}' (available: {', '.join(available())})")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    keys = ("name", "version", "schema", "system", "user")
    try:
        fields = {k: str(data[k]) for k in keys}
    except KeyError as exc:
        raise MprError(f"prompt file {path}: missing key {exc}") from None
    return Prompt(**fields, tables={k: v for k, v in data.items() if k not in keys})


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def passage_text(title: str | None, text: str) -> str:
    return escape(f"{title}\n{text}" if title else text)


def known_relevant_block(passages: list[tuple[str | None, str]]) -> str:
    return "\n".join(f"<known_relevant>{passage_text(t, x)}</known_relevant>" for t, x in passages)


def numbered_block(passages: list[tuple[str | None, str]], tag: str = "candidate") -> str:
    return "\n".join(
        f'<{tag} number="{n}">{passage_text(t, x)}</{tag}>' for n, (t, x) in enumerate(passages, start=1)
    )
