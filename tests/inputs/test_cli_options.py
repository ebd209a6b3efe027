"""Every option of a stage command is a field of its pydantic config: same name, default and help, so an
option is defined once. And the help reads literally (no markup eats `[vllm]`), whole, at 80 columns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel, Field, field_validator
from typer.main import get_command
from typer.testing import CliRunner

from mpr.cli import app
from mpr.commands.options import config_options, option_name
from pipeline.stages.evaluate import EvalConfig
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.mine import MineConfig
from pipeline.stages.relabel import RelabelConfig
from pipeline.stages.synth import SynthConfig
from train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
# Parameters that are no config field: what the command does around the stage, not what the stage does.
OWN = {"quiet", "encoding", "dry_run", "help"}
COMMANDS: dict[str, type[BaseModel]] = {
    "mine": MineConfig,
    "ingest": IngestConfig,
    "relabel": RelabelConfig,
    "synth": SynthConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
RENAMED = {("eval", "json_out"): "--json", ("eval", "run_out"): "--run", ("relabel", "input"): "--in"}


def _params(name: str) -> list[Any]:
    group: Any = get_command(app)  # a TyperGroup (typer's own click)
    return list(group.commands[name].params)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_a_config_field(name: str) -> None:
    fields = COMMANDS[name].model_fields
    for param in _params(name):
        if param.name in OWN:
            continue
        assert param.name in fields, f"mpr {name}: {param.name} is no field of {COMMANDS[name].__name__}"
        field = fields[param.name]
        assert field.description, f"{COMMANDS[name].__name__}.{param.name} has no description (its --help)"
        if param.param_type_name == "option":
            assert param.help == field.description
            assert RENAMED.get((name, param.name), option_name(param.name)) in param.opts
        if name == "synth" and param.name in {"styles", "lengths"}:
            assert param.default is None  # one comma-separated value; left out, the config's default
        elif not field.is_required():
            default = field.get_default(call_default_factory=True)
            assert param.default == default or (list(param.default or []) == default == []), (
                name,
                param.name,
            )


def test_no_default_is_written_in_a_command() -> None:
    """The stage commands' own signatures hold no option default (they come from the config models)."""
    modules = {"eval": "evaluate"}  # `eval` is a builtin: its module is mpr/commands/evaluate.py
    for name in COMMANDS:
        module = modules.get(name, name)
        source = (ROOT / "mpr" / "commands" / f"{module}.py").read_text()
        assert "typer.Option(" not in source, f"mpr/commands/{module}.py declares its own option"


def _help(*argv: str) -> str:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mpr", *argv, "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout


def test_help_is_literal_and_whole_at_80_columns() -> None:
    assert "'mpr[vllm]'" in _help("relabel")
    assert "'mpr[faiss]'" in _help("mine")
    for argv in [(), *((name,) for name in [*COMMANDS, "run", "inspect", "validate"])]:
        out = _help(*argv)
        assert max(len(line) for line in out.splitlines()) <= 80, argv
        assert not [line for line in out.splitlines()[1:] if line.endswith("...")], argv  # nothing cut short
        split = [line for line in out.splitlines() if re.search(r"\w-$", line)]
        assert not split, (argv, split)  # an option or a hyphenated word is never broken at its hyphen
    words = " ".join(_help().split())
    group: Any = get_command(app)
    for name, command in group.commands.items():
        first = " ".join((command.help or "").split("\n\n")[0].split())
        assert f"{name} {first}" in words, name  # the command list holds each command's whole first paragraph


class Toy(BaseModel):
    items: list[Path] = Field(min_length=1, description="Input files.")
    json_out: Path | None = Field(None, description="Report file.")
    sizes: list[int] = Field(default_factory=lambda: [1, 2], description="Comma-separated sizes.")
    keep: bool = Field(True, description="Keep them.")
    dry: bool = Field(False, description="Do nothing.")

    @field_validator("sizes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [int(x) for x in value.split(",")] if isinstance(value, str) else value


def _toy_app(seen: list[Toy]) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @config_options(Toy, flags={"json_out": "--json"}, arguments={"items"}, comma_lists={"sizes"})
    def run(**options: Any) -> None:
        seen.append(Toy(**options))

    return toy


def test_config_options_renames_positionals_and_comma_lists(tmp_path: Path) -> None:
    seen: list[Toy] = []
    runner = CliRunner()
    result = runner.invoke(
        _toy_app(seen), ["a", "b", "--json", "r.json", "--sizes", "3,4", "--no-keep", "--dry"]
    )
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(
        items=[Path("a"), Path("b")], json_out=Path("r.json"), sizes=[3, 4], keep=False, dry=True
    )
    result = runner.invoke(_toy_app(seen), ["a"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(items=[Path("a")])  # the defaults are the model's
    assert runner.invoke(_toy_app(seen), ["a", "--json-out", "x"]).exit_code != 0  # only the renamed flag


def test_config_options_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no field"):
        config_options(Toy, exclude={"nope"})


def test_the_configs_load_without_torch() -> None:
    """The commands import their config models up front: none of them may pull in torch or
    sentence-transformers, so the input checks still run (and fail) before the heavy imports."""
    code = (
        "import sys, mpr.cli; "
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.strip() == "[]"
