"""The `mpr` command line: thin drivers (mpr/commands/) over importable stage functions."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from mpr import __version__
from mpr.commands import eval, ingest, mine, relabel, run, shards, study, synth, train

app = typer.Typer(
    name="mpr",
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
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


STAGES = "Stages"
SHARDS = "Shards"
app.command(rich_help_panel=STAGES)(mine.mine)
app.command(rich_help_panel=STAGES)(ingest.ingest)
app.command(rich_help_panel=STAGES)(relabel.relabel)
app.command(rich_help_panel=STAGES)(synth.synth)
app.command(rich_help_panel=STAGES)(train.train)
app.command(name="eval", rich_help_panel=STAGES)(eval.eval)
app.command(rich_help_panel="Experiments")(run.run)
app.command(rich_help_panel="Experiments")(study.study)
app.command(rich_help_panel=SHARDS)(shards.inspect)
app.command(rich_help_panel=SHARDS)(shards.validate)
