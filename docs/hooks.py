"""mkdocs hooks: pages generated at build time, so they cannot drift from their sources.

- `reference.md`: every command and option, read from the typer app (whose options are built from the stages'
  config models: `mpr/commands/options.py`);
- `data-format.md`, `architecture.md`, `benchmarks.md`: data/README.md, ARCHITECTURE.md and bench/README.md,
  which stay where contributors look for them; their links to files outside the site become plain paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
INCLUDED = {
    "data-format.md": "data/README.md",
    "architecture.md": "ARCHITECTURE.md",
    "benchmarks.md": "bench/README.md",
}
SITE_OF = {source: page for page, source in INCLUDED.items()}


def _links(text: str, source: str) -> str:
    """Links between included files point at their pages; other links outside the site become paths."""
    base = Path(source).parent

    def one(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            return match.group(0)
        path = (base / target.split("#")[0]).as_posix()
        if path in SITE_OF:
            return f"[{label}]({SITE_OF[path]})"
        return label if label.startswith("`") else f"`{path}`" if label == target else f"{label} (`{path}`)"

    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", one, text)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    import typer

    from mpr.cli import app

    group: Any = typer.main.get_command(app)
    ctx = typer.Context(group, info_name="mpr")
    lines = [
        "# Command reference",
        "",
        "Generated from the command line itself (its options are built from the stages' config models), "
        "so it is the same as `mpr COMMAND --help`.",
        "",
    ]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        lines += [f"## mpr {name}", "", (command.help or "").strip().split("\n\n")[0], ""]
        rows = []
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
            if param.param_type_name == "argument":
                names = f"`{param.name.upper()}`"
            default = param.default
            plain = default is None or callable(default) or param.param_type_name == "argument"
            shown = "" if plain else f"`{default}`"
            if isinstance(default, bool) and param.secondary_opts:
                shown = f"`{param.opts[0] if default else param.secondary_opts[0]}`"
            rows.append(f"| {names} | {_cell(getattr(param, 'help', None) or '')} | {shown} |")
        if rows:
            lines += ["| option | meaning | default |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "reference.md", content=reference()))
    for page, source in INCLUDED.items():
        files.append(File.generated(config, page, content=_links((ROOT / source).read_text(), source)))
    return files
