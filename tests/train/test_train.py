"""Group building and `mpr train` on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.data.schema import SCHEMA, to_table
from pipeline.data.shards import ShardRun
from pipeline.errors import MprError
from train.config import GroupOptions
from train.groups import build_groups

from ..conftest import SEQ, scifact_slice

pytestmark = pytest.mark.slow  # trains or encodes: left out of `make test-fast`


def shard_folder(path, rows):
    cols = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    run = ShardRun(path, stage="test", config={}, identity={"p": str(path)})
    run.write(0, to_table(cols, SCHEMA))
    run.finish({})
    return path


def row(qid, pid, source="mined", label=None, rank=None, grade=None, level=None, text=None):
    return {
        "qid": qid,
        "query": f"query {qid}",
        "pid": pid,
        "title": None,
        "text": text or f"text of {pid}",
        "source": source,
        "rank": rank,
        "label": label,
        "grade": grade,
        "level": level,
    }


@pytest.fixture
def folders(tmp_path):
    relabeled = shard_folder(
        tmp_path / "relabeled",
        [
            row("a", "p1", "qrels", 1),
            row("a", "n2", label=0, rank=2),
            row("a", "n1", label=0, rank=1),
            row("a", "u1", rank=3),
            row("a", "r1", label=1, rank=4),  # an LLM-relabeled false negative
            row("b", "p2", "qrels", 1),
            row("b", "n3", label=0, rank=1),
            row("c", "n4", label=0, rank=1),  # no positive
        ],
    )
    synth = shard_folder(
        tmp_path / "synth",
        [
            row("a", "s3", "synthetic", 1, grade=1.0, level=3),
            row("a", "s2", "synthetic", 1, grade=2 / 3, level=2),
            row("a", "s1", "synthetic", 0, grade=1 / 3, level=1),
            row("a", "s0", "synthetic", 0, grade=0.0, level=0),
            row("a", "p1", "synthetic", 1, grade=1.0, level=3),  # same pid as a qrels row: counted once
        ],
    )
    return relabeled, synth


def test_groups_positives_first_then_hard_then_random(folders):
    relabeled, _ = folders
    ds, stats = build_groups([relabeled], GroupOptions(group_size=5, max_positives=4, seed=1))
    assert stats.groups == 2 and stats.skipped_no_positive == 1
    a = ds[0]
    assert [a[f"passage_{j}"] for j in range(5)][:4] == [
        "text of p1",
        "text of r1",
        "text of n1",
        "text of n2",
    ]
    assert a["label"][1] == [1, 1, 0, 0, 0] and a["label"][0][:2] == [1.0, 1.0]
    assert a["passage_4"] not in {
        "text of u1",
        "text of p1",
        "text of r1",
    }  # random fill: never unjudged or own
    b = ds[1]
    assert b["label"][1] == [1, 0, 0, 0, 0] and stats.random_negatives == 1 + 3
    ds, stats = build_groups([relabeled], GroupOptions(group_size=5, random_negatives=False))
    assert ds[1]["label"][1] == [1, 0, -1, -1, -1] and ds[1]["passage_2"] == "" and stats.padding == 4


def test_groups_merge_folders_and_keep_grades(folders):
    relabeled, synth = folders
    ds, _ = build_groups(
        [relabeled, synth], GroupOptions(group_size=8, max_positives=3, random_negatives=False)
    )
    a = ds[0]
    texts = [a[f"passage_{j}"] for j in range(8)]
    assert texts.count("text of p1") == 1
    grades, kinds = a["label"]
    assert kinds[:3] == [1, 1, 1] and grades[:3] == [1.0, 1.0, 1.0]  # best grade first, capped at 3
    assert "text of s1" in texts and grades[texts.index("text of s1")] == pytest.approx(1 / 3)
    ds, _ = build_groups([synth], GroupOptions(group_size=4, positive_threshold=0.3, random_negatives=False))
    assert ds[0]["label"][1] == [1, 1, 1, 0]  # s1 (grade 1/3) counts as positive from the threshold


def test_threshold_both_adds_and_removes_positives(tmp_path):
    folder = shard_folder(
        tmp_path / "graded",
        [
            row("a", "p1", "qrels", 1),  # no grade: keeps its label
            row("a", "q2", "qrels", 1, grade=1 / 3),  # a graded qrels positive below the threshold
            row("a", "m1", label=1, rank=1, grade=0.5, level=1),  # relabeled positive below the threshold
            row("a", "m2", label=0, rank=2, grade=0.9, level=3),  # negative above it
            row("a", "m3", label=0, rank=3, grade=0.2, level=1),
            row(
                "a", "s1", "synthetic", 1, grade=2 / 3, level=2
            ),  # exactly at the threshold (stored as float32)
        ],
    )

    def texts(group):
        return [group[f"passage_{j}"].removeprefix("text of ") for j in range(8)]

    ds, stats = build_groups([folder], GroupOptions(group_size=8, random_negatives=False))
    assert texts(ds[0])[:6] == ["p1", "s1", "m1", "q2", "m2", "m3"]  # the labels as written, best grade first
    assert (
        ds[0]["label"][1] == [1, 1, 1, 1, 0, 0, -1, -1]
        and stats.threshold_positives == stats.threshold_negatives == 0
    )
    ds, stats = build_groups(
        [folder], GroupOptions(group_size=8, positive_threshold=2 / 3, random_negatives=False)
    )
    # positives by grade (p1 counts as 1.0), then negatives: qrels first, mined by rank
    assert texts(ds[0])[:6] == ["p1", "m2", "s1", "q2", "m1", "m3"]
    grades, kinds = ds[0]["label"]
    assert kinds == [1, 1, 1, 0, 0, 0, -1, -1] and grades[:6] == pytest.approx(
        [1.0, 0.9, 2 / 3, 1 / 3, 0.5, 0.2]
    )
    assert (stats.threshold_positives, stats.threshold_negatives, stats.positives) == (1, 2, 3)


def test_groups_refuse_data_without_positives(tmp_path):
    folder = shard_folder(tmp_path / "x", [row("c", "n4", label=0, rank=1)])
    with pytest.raises(MprError, match="has a positive"):
        build_groups([folder], GroupOptions())


@pytest.fixture(scope="module")
def mined_slice(tmp_path_factory, cache_dir):
    from pipeline.stages import mine
    from pipeline.stages.mine import MineConfig

    data = scifact_slice(tmp_path_factory.mktemp("train-data") / "scifact", n_queries=48, n_docs=300)
    out = tmp_path_factory.mktemp("train-mined") / "mined"
    mine.run(
        MineConfig(
            data=data,
            out=out,
            cache_dir=cache_dir,
            max_seq_length=SEQ,
            depth=20,
            num_negatives=6,
            progress=False,
        ),
        log=lambda _: None,
    )
    return out


def mean_loss(model, dataset, loss_name):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from train.losses import build_loss

    loss = build_loss(loss_name, model)
    collate = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    columns = ["query"] + [c for c in dataset.column_names if c.startswith("passage_")]
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            batch = collate([dataset[i] for i in range(start, min(start + 16, len(dataset)))])
            features = [
                {k[len(c) + 1 :]: v for k, v in batch.items() if k.startswith(c + "_")} for c in columns
            ]
            total += loss(features, batch["label"]).item()
    return total


def test_short_training_run_lowers_the_loss_and_saves_a_model(mined_slice, tmp_path):
    from sentence_transformers import SentenceTransformer

    from pipeline.retrieval.encode import load_encoder
    from train.trainer import TrainConfig, train

    groups, _ = build_groups([mined_slice], GroupOptions(group_size=4, seed=0))
    before = mean_loss(
        load_encoder("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=64), groups, "lsepair"
    )
    out = tmp_path / "model"
    summary = train(
        TrainConfig(
            data=[mined_slice],
            out=out,
            loss="lsepair",
            group_size=4,
            batch_size=8,
            epochs=2,
            learning_rate=1e-4,
            max_seq_length=64,
            logging_steps=2,
            progress=False,
            seed=0,
        ),
        log=lambda _: None,
    )
    assert summary["steps"] == 12 and summary["groups"] == 48
    model = SentenceTransformer(str(out))
    model.max_seq_length = 64
    after = mean_loss(model, groups, "lsepair")
    assert after < before * 0.9, (before, after)
    record = json.loads((out / "mpr" / "train.json").read_text())
    assert record["config"]["loss"] == "lsepair" and record["data"][0]["stage"] == "mine"
    assert (out / "mpr" / "manifests" / "0-mined.json").exists()
    card = (out / "README.md").read_text()
    assert "Trained with mpr" in card and "lsepair" in card and str(mined_slice) in card
    widget = yaml.safe_load(card.split("---")[1])[
        "widget"
    ]  # the card's metadata: its example is the first group
    assert widget == [
        {"source_sentence": groups[0]["query"], "sentences": [groups[0][f"passage_{j}"] for j in range(4)]}
    ]


def test_refuses_to_overwrite_a_model(mined_slice, tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("")
    result = CliRunner().invoke(app, ["train", "--data", str(mined_slice), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--resume" in result.output
    assert (tmp_path / "m" / "x").exists()  # untouched


def test_torchrun_two_gloo_processes(mined_slice, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "mpr",
        "train",
        "--data",
        str(mined_slice),
        "--out",
        str(out),
        "--loss",
        "jointlh",
        "--group-size",
        "3",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--max-seq-length",
        "32",
        "--device",
        "cpu",
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "mpr" / "train.json").read_text())
    assert record["summary"]["steps"] == 2
    assert (out / "model.safetensors").exists()


class StopAt:
    """A TrainerCallback that kills the run (an exception out of the training loop) after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):  # every other TrainerCallback event: nothing
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after step {self.step}")


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("loss", ["rand1", "bixse"])
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(mined_slice, tmp_path, loss):
    """rand1 draws a positive per query and step, bixse learns its scale and bias: both states travel with
    the checkpoint, so the resumed run ends where the uninterrupted one does."""
    from train.trainer import TrainConfig, train

    def config(out, **kw):
        return TrainConfig(
            data=[mined_slice],
            out=out,
            loss=loss,
            group_size=4,
            batch_size=8,
            max_steps=5,
            save_steps=2,
            learning_rate=1e-4,
            max_seq_length=32,
            progress=False,
            seed=3,
            attention_dropout=0.1,
            mini_batch_size=16,
            **kw,
        )

    straight = tmp_path / "straight"
    train(config(straight), log=lambda _: None)
    assert not straight.with_name("straight.checkpoints").exists()  # removed after success

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(config(out), log=lambda _: None, callbacks=[StopAt(3)])
    assert not out.exists()  # nothing a reader could mistake for a model
    assert (tmp_path / "killed.checkpoints" / "checkpoint-2" / "mpr_loss_state.pt").exists()
    with pytest.raises(MprError, match="--resume"):
        train(config(out), log=lambda _: None)
    lines = []
    summary = train(config(out, resume=True, keep_checkpoints=True), log=lines.append)
    assert any("resuming from" in line and "checkpoint-2" in line for line in lines)
    assert summary["steps"] == 5 and (tmp_path / "killed.checkpoints").exists()
    expected, got = weights(straight), weights(out)
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    again = train(config(out, resume=True), log=lines.append)  # finished: nothing to do
    assert again["already_trained"] is True


def test_loss_learning_rate_moves_the_loss_parameters(mined_slice, tmp_path):
    """bixse's scale and bias barely move at the model's fine-tuning rate; at a rate of their own they do."""
    from train.trainer import TrainConfig, train

    def run(name, **kw):
        summary = train(
            TrainConfig(
                data=[mined_slice],
                out=tmp_path / name,
                loss="bixse",
                group_size=4,
                batch_size=8,
                max_steps=3,
                warmup_ratio=0,
                learning_rate=1e-4,
                max_seq_length=32,
                progress=False,
                seed=3,
                **kw,
            ),
            log=lambda _: None,
        )
        return abs(summary["bixse_bias"] - summary["bixse_start_bias"]), abs(summary["bixse_scale"] - 10.0)

    slow, fast = run("shared"), run("own", loss_learning_rate=0.05)
    assert slow[0] < 0.01 and slow[1] < 0.01, slow  # Adam moves a parameter by about its rate per step: 3e-4
    assert fast[0] > 0.03 and fast[1] > 0.03, (
        fast
    )  # ... and at 0.05 by about 0.15 (t = exp(log t) moves more)


def test_memory_plan_is_logged_and_recorded(mined_slice, tmp_path):
    from train.trainer import TrainConfig, train

    lines = []
    out = tmp_path / "planned"
    train(
        TrainConfig(
            data=[mined_slice],
            out=out,
            loss="infonce",
            group_size=4,
            batch_size=8,
            max_steps=1,
            max_seq_length=32,
            progress=False,
            memory_budget="20GB",
            loss_learning_rate=1e-3,
        ),
        log=lines.append,
    )
    assert any(
        "infonce has no parameters of its own" in line and "--loss-learning-rate is not used" in line
        for line in lines
    )
    plan_line = next(line for line in lines if line.startswith("train: memory:"))
    record = json.loads((out / "mpr" / "train.json").read_text())
    plan = record["memory_plan"]
    assert plan["budget_bytes"] == 20 * 2**30 and plan["texts_per_batch"] == 8 * 5 and plan["text_bytes"] > 0
    assert "20.00 GB" in plan_line and "whole batch of 40 texts in one pass" in plan_line
    assert all(
        isinstance(v, (int, float)) for e in record["log_history"] for k, v in e.items() if k != "epoch"
    )


@pytest.mark.parametrize("texts", [3, 12])
def test_planner_fits_the_budget_it_is_given(encoder_path, texts):
    """The planner's chunk is what the budget holds, from the activation bytes it measured on the model."""
    from sentence_transformers import SentenceTransformer

    from train.memory import (
        BACKWARD_FACTOR,
        RESERVE_BYTES,
        _optimizer_bytes,
        current_rss_bytes,
        per_text_bytes,
        plan_embedding,
    )

    model = SentenceTransformer(encoder_path, device="cpu")
    model.max_seq_length = 64
    per_text = per_text_bytes(model, 64)
    budget = (
        current_rss_bytes()
        + _optimizer_bytes(model)
        + RESERVE_BYTES
        + BACKWARD_FACTOR * per_text * (texts + 0.5)
    )
    plan = plan_embedding(model, texts_per_batch=40, budget=int(budget))
    assert plan.chunk_plan is not None and not plan.gradient_checkpointing
    assert abs(plan.texts_per_chunk - texts) <= 1
    assert (
        plan.chunk_plan.texts_at(64) == plan.texts_per_chunk
        and plan.chunk_plan.texts_at(16) > plan.texts_per_chunk
    )
    whole = plan_embedding(model, texts_per_batch=40, budget=64 * 2**30)
    assert whole.chunk_plan is None and "one pass" in whole.describe()


def test_planning_leaves_the_model_free_and_measures_the_same_twice(encoder_path):
    """The planner's measurement keeps no reference to the model: before, its saved-tensor hook made
    autograd's graph hold its own outputs, and every model that `mpr study` trained stayed in memory (0.3 GB
    a cell)."""
    import gc
    import weakref

    from sentence_transformers import SentenceTransformer

    from train.memory import per_text_bytes, plan_embedding

    model = SentenceTransformer(encoder_path, device="cpu")
    model.max_seq_length = 32
    first = per_text_bytes(model, 32)
    plan_embedding(model, texts_per_batch=8, budget=64 * 2**30)
    assert per_text_bytes(model, 32) == first > 0
    alive = weakref.ref(next(model.parameters()))
    del model
    gc.collect()
    assert alive() is None


def test_a_budget_too_small_for_one_text_is_one_line(mined_slice, tmp_path):
    from typer.testing import CliRunner

    from mpr.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(mined_slice),
            "--out",
            str(tmp_path / "m"),
            "--memory-budget",
            "10MB",
            "--max-steps",
            "1",
            "-q",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--memory-budget" in result.output and "too small" in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.checkpoints").exists()


def test_train_options_are_the_config_fields():
    """Every TrainConfig field is a `mpr train` option with the field's default: one definition."""
    import typer

    from mpr.cli import app
    from train.config import TrainConfig

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params}
    for name, field in TrainConfig.model_fields.items():
        if name == "progress":
            assert "quiet" in params
            continue
        assert name in params, name
        if field.is_required():
            assert params[name].required, name
        else:
            default = params[name].default
            expected = field.default
            if isinstance(expected, list):
                expected = tuple(expected)
            assert default == expected or (default in ((), None) and expected in ((), None)), (
                name,
                default,
                expected,
            )
            assert params[name].help == field.description, name


def test_without_progress_the_logged_values_are_lines(mined_slice, tmp_path, capsys):
    """progress=False used to print the library's raw dicts ({'loss': '1.1', ...}) to stdout."""
    from train.trainer import TrainConfig, train

    lines: list[str] = []
    train(
        TrainConfig(
            data=[mined_slice],
            out=tmp_path / "m",
            loss="infonce",
            group_size=4,
            batch_size=8,
            max_steps=2,
            logging_steps=1,
            max_seq_length=32,
            progress=False,
        ),
        log=lines.append,
    )
    printed = capsys.readouterr()
    assert "{'loss'" not in printed.out
    assert "Computing widget examples" not in printed.err  # sentence-transformers' model-card bar
    steps = [line for line in lines if line.startswith("train: step ")]
    assert [line.split(":")[1] for line in steps[:2]] == [" step 1/2", " step 2/2"]
    record = json.loads((tmp_path / "m" / "mpr" / "train.json").read_text())
    first_loss = record["log_history"][0]["loss"]
    assert f"loss {first_loss:.4g}," in steps[0]
