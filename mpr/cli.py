"""The `mpr` command line: thin drivers (mpr/commands/) over importable stage functions."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from typing import Annotated

import typer
from typer._click.formatting import HelpFormatter
from typer.core import TyperCommand, TyperGroup

from mpr import __version__
from mpr.commands import evaluate, ingest, mine, relabel, run, serve, shards, study, synth
from mpr.commands import train as train_command  # not to shadow the `train` package

NO_BREAK_HYPHEN = "\u2011"


class Formatter(HelpFormatter):
    """click's help layout, with lines broken at spaces only: an option (--max-temperature), a model id or
    multi-positive is never split at its hyphen."""

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", NO_BREAK_HYPHEN))

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl(
            [(term, text.replace("-", NO_BREAK_HYPHEN)) for term, text in rows], col_max, col_spacing
        )

    def getvalue(self) -> str:
        return super().getvalue().replace(NO_BREAK_HYPHEN, "-")


class Context(typer.Context):
    formatter_class = Formatter


class Command(TyperCommand):
    context_class = Context

    def get_short_help_str(self, limit: int = 45) -> str:
        """The command list shows the help's whole first paragraph, wrapped, not cut at `limit` with '...'."""
        return " ".join(inspect.cleandoc(self.short_help or self.help or "").split("\n\n")[0].split())


class Group(TyperGroup):
    context_class = Context


app = typer.Typer(
    name="mpr",
    cls=Group,
    help="Dense supervision for retrieval training: mine hard negatives, relabel them with an LLM, "
    "synthesise graded passages, and train bi-encoders with multi-positive and graded losses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is literal: "pip install 'mpr[vllm]'" keeps its [vllm]
)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mpr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


STAGES = "Stages"
SHARDS = "Shards"
app.command(cls=Command, rich_help_panel=STAGES)(mine.mine)
app.command(cls=Command, rich_help_panel=STAGES)(ingest.ingest)
app.command(cls=Command, rich_help_panel=STAGES)(relabel.relabel)
app.command(cls=Command, rich_help_panel=STAGES)(synth.synth)
app.command(cls=Command, rich_help_panel=STAGES)(train_command.train)
app.command(name="eval", cls=Command, rich_help_panel=STAGES)(evaluate.evaluate)
app.command(cls=Command, rich_help_panel="Experiments")(run.run)
app.command(cls=Command, rich_help_panel="Experiments")(study.study)
app.command(cls=Command, rich_help_panel=SHARDS)(shards.inspect)
app.command(cls=Command, rich_help_panel=SHARDS)(shards.validate)
app.command(cls=Command, rich_help_panel="Tools")(serve.serve)
