"""`mpr run`: one TOML file names the data, the stages and their options, from data to evaluated model.

Each stage table takes the options of the stage's own command (the same pydantic models, so the file
and the flags never disagree); paths between stages are filled in: `mine` writes RUN/mined, `relabel`
reads it and writes RUN/relabeled, `synth` writes RUN/synth, `train` reads what the earlier stages
wrote and writes RUN/model-LOSS, `eval` evaluates that model against the starting model. With
`single_positive = true` the train stage also trains RUN/model-infonce-single (single-positive InfoNCE on the
mined data, not relabeled, with the same settings) and eval evaluates it too, so the report can test
relabeled against single-positive training and both against the starting model. Stages skip
what is complete and resume what is not. Relative paths are relative to the working directory, as on
the command line. See experiments/example.toml.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from mpr.orchestrate.layout import SINGLE_POSITIVE, eval_file, model_folder
from mpr.orchestrate.stages import EVAL, MINE, REGISTRY, SHARD_SOURCES, TRAIN, StageSpec
from pipeline.errors import FailedItems, MprError
from pipeline.llm.backends import AUTO, BACKENDS, SERVER, BackendChoice
from pipeline.redact import redact, refuse_userinfo
from pipeline.stages.audit import AuditFailed
from train.losses.registry import SINGLE_POSITIVE_LOSS

if TYPE_CHECKING:
    from pipeline.stages.plan import StagePlan
    from pipeline.stages.relabel import RelabelConfig
    from pipeline.stages.synth import SynthConfig
    from train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEST_SERVER_MODEL = "simulated-judge-from-qrels"
TEST_SERVER_NOTICE = (
    "NOTE: no LLM endpoint is configured, so this run starts mpr's SIMULATED judge "
    "(a local OpenAI-compatible server): an oracle that answers from the data's own qrels. "
    "Its labels and passages are NOT a language model's judgments."
)


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    backend: BackendChoice = AUTO
    base_url: list[str] = Field(default_factory=list)
    test_server: bool = Field(
        False, description="use mpr's local qrels oracle server when no endpoint is configured"
    )
    test_server_error_rate: float = Field(0.0, ge=0, le=1)

    _no_userinfo = field_validator("base_url")(refuse_userinfo)

    @property
    def simulated(self) -> bool:
        """The simulated judge answers: `test_server` is on and no endpoint (nor in-process vLLM) is set."""
        in_process = self.backend in BACKENDS and BACKENDS[self.backend].in_process
        return self.test_server and not self.base_url and not in_process


class RunFileBase(BaseModel):
    """The experiment file, less its stage tables (one per registered stage, added below)."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    data: Path
    split: str = "train"
    stages: list[str] = Field(default_factory=lambda: [n for n, s in REGISTRY.items() if s.default])
    llm: LLMSettings = Field(default_factory=LLMSettings)
    single_positive: bool = Field(
        False,
        description="also train single-positive InfoNCE on the mined data (not relabeled) and evaluate it",
    )

    @field_validator("stages")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(REGISTRY)})")
        return value

    def table(self, stage: StageSpec) -> dict[str, Any]:
        """A copy of the stage's table."""
        return dict(getattr(self, stage.name))


RunFile = create_model(
    "RunFile",
    __base__=RunFileBase,
    __doc__="The experiment file.",
    **{name: (dict[str, Any], Field(default_factory=dict)) for name in REGISTRY},  # type: ignore[call-overload]
)


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, quoted strings), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_run_file(path: Path, overrides: Sequence[str] = ()) -> RunFileBase:
    if not path.is_file():
        raise MprError(
            f"{path}: {'is a folder, not an experiment file' if path.is_dir() else 'no such experiment file'}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MprError(
            f"{path}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if at:
            message = f"{path}:{at.group(1)}: invalid TOML: {message[: at.start()]} at column {at.group(2)}"
        else:
            message = f"{path}: invalid TOML: {message}"
        raise MprError(message) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MprError(f"--set {item}: expected KEY=VALUE, e.g. train.loss=jointlh")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MprError(f"--set {item}: '{part}' is not a table")
        node[leaf] = parse_value(value.strip())
    try:
        return RunFile.model_validate(raw)
    except ValueError as exc:
        first: Mapping[str, Any] = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        raise key_error(path, [str(p) for p in first["loc"]], first["msg"]) from None


def key_error(path: Path, keys: list[str], message: str) -> MprError:
    """`FILE:LINE: table.key: message`, the line found by looking for the key inside its table."""
    line = _key_line(path, keys)
    where = f"{path}:{line}" if line else str(path)
    name = ".".join(keys) or "(top level)"
    return MprError(f"{where}: {name}: {message.removeprefix('Value error, ')}")


def _key_line(path: Path, keys: list[str]) -> int | None:
    if not keys:
        return None
    table, key = ".".join(keys[:-1]), keys[-1]
    current = ""
    found_table = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1)
            if current == ".".join(keys):
                found_table = lineno
            continue
        if current == table and re.match(rf"^[\"']?{re.escape(key)}[\"']?\s*=", stripped):
            return lineno
        if not current and table and re.match(rf"^{re.escape(table)}\.{re.escape(key)}\s*=", stripped):
            return lineno
    return found_table


class Experiment:
    """The stage configs of one run file, with the paths between stages filled in."""

    def __init__(self, spec: RunFileBase, *, progress: bool = True):
        self.spec: RunFileBase = spec
        self.progress = progress
        self.out = spec.out

    @property
    def stages(self) -> list[str]:
        return self.spec.stages

    def table(self, stage: StageSpec) -> dict[str, Any]:
        return self.spec.table(stage)

    def shards_in(self) -> Path:
        """The folder relabel (and train, when nothing is relabeled or synthesized) reads."""
        source = next((s for s in SHARD_SOURCES if s.name in self.stages), MINE)
        return source.out(self.out)

    def model_out(self) -> Path:
        from train.config import TrainConfig

        return model_folder(self.out, self.table(TRAIN).get("loss", TrainConfig.model_fields["loss"].default))

    def eval_inputs(self) -> dict[str, Any]:
        trained = cast("TrainConfig", self.config(TRAIN))
        return {
            "data": self.spec.data,
            "split": "test",
            "model": str(trained.out),
            "baseline": trained.model,
            "json_out": eval_file(self.out, trained.loss),
            "max_seq_length": trained.max_seq_length,
        }

    def _llm(self, table: dict[str, Any], test_server: str | None) -> dict[str, Any]:
        llm = self.spec.llm
        merged = {
            "backend": llm.backend,
            "base_url": list(llm.base_url),
            "llm_cache": self.out / "llm.sqlite",
            **table,
        }
        merged.setdefault("model", llm.model)
        if test_server:
            merged.update(base_url=[test_server], model=TEST_SERVER_MODEL, backend=SERVER.name)
        if not merged.get("model"):
            raise MprError(
                "the run file names no LLM: set llm.model (or the stage's model), or llm.test_server = true"
            )
        return merged

    def config(self, stage: StageSpec, base_url: str | None = None) -> BaseModel:
        """The stage's config: the paths between stages, then the stage's table over them."""
        table = {k: v for k, v in self.table(stage).items() if k not in stage.run_keys}
        if stage.llm:
            table = self._llm(table, base_url)
        model = stage.config_model()
        values = {**stage.inputs(self), **table}
        if "progress" in model.model_fields:
            values.setdefault("progress", self.progress)
        if stage.folder is not None:
            values.setdefault("out", stage.out(self.out))
        return model(**values)

    def single_positive_configs(self) -> tuple[BaseModel, BaseModel]:
        """(train, eval) configs of the single-positive reference: InfoNCE on the mined data, not relabeled,
        with the train table's other settings, evaluated on the same split as the main model."""
        trained = cast("TrainConfig", self.config(TRAIN))
        evaluated = self.config(EVAL)
        train_cfg = trained.model_copy(
            update={
                "data": [self.shards_in()],
                "loss": SINGLE_POSITIVE_LOSS,
                "out": model_folder(self.out, SINGLE_POSITIVE),
            }
        )
        eval_cfg = evaluated.model_copy(
            update={
                "model": str(train_cfg.out),
                "baseline": None,
                "json_out": eval_file(self.out, SINGLE_POSITIVE),
            }
        )
        return train_cfg, eval_cfg


def _checked(
    path: Path, only: list[str] | None, overrides: Sequence[str], progress: bool
) -> tuple[Experiment, list[StageSpec]]:
    """The experiment and the stages to run, every stage's options checked (nothing is written)."""
    spec = load_run_file(path, list(overrides))
    unknown = [s for s in (only or []) if s not in REGISTRY]
    if unknown:
        raise MprError(f"--only: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(REGISTRY)})")
    stages = [s for s in REGISTRY.values() if s.name in spec.stages and (not only or s.name in only)]
    experiment = Experiment(spec, progress=progress)
    for stage in stages:
        try:
            experiment.config(stage, _placeholder(spec))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise key_error(path, [stage.name, *(str(p) for p in first["loc"])], first["msg"]) from None
        except ValueError as exc:  # a path between stages the table names wrongly (train.from)
            raise key_error(path, [stage.name], str(exc)) from None
    if spec.single_positive and (TRAIN in stages or EVAL in stages):
        experiment.single_positive_configs()
    return experiment, stages


def _placeholder(spec: RunFileBase) -> str | None:
    """The base URL the configs are checked with before the test server runs (nothing is sent to it)."""
    return "http://127.0.0.1:9/v1" if spec.llm.simulated else None


def plan_experiment(
    path: Path, *, only: list[str] | None = None, overrides: Sequence[str] = ()
) -> list[StagePlan | str]:
    """What `run_experiment` would do, stage by stage: the stage's plan, or a line where the stage reads a
    folder an earlier stage has yet to write."""
    experiment, stages = _checked(path, only, overrides, progress=False)
    writers = {s.out(experiment.out): s for s in REGISTRY.values() if s.folder is not None}
    plans: list[StagePlan | str] = []
    for stage in stages:
        cfg = experiment.config(stage, _placeholder(experiment.spec))
        source = getattr(cfg, "input", None)
        if isinstance(source, Path) and not source.exists() and source in writers:
            plans.append(
                f"{stage.name}: reads {source}, which {writers[source].name} writes first; "
                "planned once it exists"
            )
        else:
            plans.append(stage.plan(cfg))
        if experiment.spec.single_positive and stage in (TRAIN, EVAL):
            plans.append(
                f"{stage.name}: also the single-positive reference, "
                f"{model_folder(experiment.out, SINGLE_POSITIVE)}"
            )
    return plans


def run_experiment(
    path: Path,
    *,
    only: list[str] | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the file's stages (or `only` those), then write RUN/report.md; returns the report's path."""
    experiment, stages = _checked(path, only, overrides, progress)
    spec = experiment.spec
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "experiment.toml").write_text(
        redact(path.read_text(encoding="utf-8-sig") + "".join(f"\n# --set {o}" for o in overrides)) + "\n"
    )
    with ExitStack() as stack:
        base_url = None
        needs_llm = any(s.llm for s in stages)
        if needs_llm and spec.llm.simulated:
            from mpr.simulated_judge import Oracle, start_server

            log(TEST_SERVER_NOTICE)
            server = stack.enter_context(
                start_server(
                    responder=Oracle(spec.data, error_rate=spec.llm.test_server_error_rate),
                    models=(TEST_SERVER_MODEL,),
                )
            )
            base_url = server.url
            (spec.out / "TEST_SERVER_LABELS").write_text(TEST_SERVER_NOTICE + "\n")
        for stage in stages:
            log(f"== {stage.name}")
            cfg = experiment.config(stage, base_url)
            try:
                run_stage(stage, cfg, log)
            except AuditFailed:  # the report says why the run stopped
                from mpr.orchestrate.report import write_report

                write_report(experiment, log=log)
                raise
            if spec.single_positive and stage in (TRAIN, EVAL):
                log(
                    f"== {stage.name}: the single-positive reference "
                    "(InfoNCE on the mined data, not relabeled)"
                )
                run_stage(stage, experiment.single_positive_configs()[stage is EVAL], log)
    from mpr.orchestrate.report import write_report

    return write_report(experiment, log=log)


def run_stage(
    stage: StageSpec, cfg: BaseModel, log: Callable[[str], None], *, show_table: bool = True
) -> Any:
    """Run one stage from its config: the runner `mpr run` and `mpr study` share. Returns what the stage's
    `run` returns (a manifest, the training summary, the evaluation report, whose table is logged unless
    `show_table` is off). An LLM stage with more failed items than its `max_failure_rate` raises
    `FailedItems`: the later stages would train on what is missing, and a rerun retries exactly those."""
    result = stage.run(cfg, log)
    if stage.llm:
        from pipeline.llm.stage import failure_line

        llm_cfg = cast("RelabelConfig | SynthConfig", cfg)
        line = failure_line(stage.name, llm_cfg.out, result.summary, llm_cfg.max_failure_rate)
        if line:
            raise FailedItems(line)
    if show_table and stage.shown:
        log(getattr(stage.load(), stage.shown)(result))
    return result
