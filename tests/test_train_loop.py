"""The loop: no recompilation, exact resume after an interruption or a SIGKILL, SIGTERM saves,
a non-finite loss stops with exit 3 and leaves the last good checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import cli
from lstm_jax.train import tasks as tasks_mod
from lstm_jax.train.checkpoint import Checkpointer
from lstm_jax.train.config import ConfigError, load_config
from lstm_jax.train.loop import get_trainer, train_and_evaluate
from lstm_jax.train.progress import read_metrics

REPO = Path(__file__).resolve().parents[1]
TEXT = "".join(f"{i} little pigs went to market, {i * 3 % 7} came home.\n" for i in range(300))

TINY = ["model.hidden_size=8", "train.batch_size=4", "train.progress=false", "task.eval_size=8",
        "task.seq_len=6"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """One text file for the module: configs naming the same file share compiled functions."""
    path = tmp_path_factory.mktemp("charlm") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def charlm_overrides(path: Path) -> list[str]:
    # Dropout and a schedule, so the resume tests also pin the dropout keys and the lr.
    return [*TINY, "task.name=charlm", f"data.path={path}", "model.embed_dim=4",
            "model.embed_dropout=0.1", "model.output_dropout=0.1",
            "optim.schedule=warmup_cosine", "optim.warmup_steps=2", "optim.clip_norm=1.0",
            "optim.name=adamw", "optim.weight_decay=0.01"]


def final_params(workdir):
    cfg = load_config(workdir / "config.yaml")
    trainer = get_trainer(cfg)
    with Checkpointer(workdir / "checkpoints") as ck:
        state, meta = ck.restore(ck.latest_step(), trainer.abstract_state())
    return state, meta


def comparable(records):
    """metrics.jsonl events without the wall-clock fields."""
    drop = {"time", "steps_per_sec", "chars_per_sec"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def assert_same_run(a: Path, b: Path):
    sa, ma = final_params(a)
    sb, mb = final_params(b)
    assert ma["step"] == mb["step"]
    leaves_a, leaves_b = jax.tree.leaves(sa), jax.tree.leaves(sb)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # exact, bit for bit
    assert comparable(read_metrics(a / "metrics.jsonl")) == comparable(
        read_metrics(b / "metrics.jsonl"))


RESUME_CADENCE = ["train.steps=7", "train.log_every=2", "train.eval_every=3",
                  "train.checkpoint_every=4"]


def test_no_recompilation_after_the_first_step(text_file):
    # The charlm config of the resume test below, so that test reuses these compiled functions.
    trainer = get_trainer(load_config(None, charlm_overrides(text_file) + RESUME_CADENCE))
    state = trainer.init_state()
    for step in range(4):
        state, metrics = trainer.train_step(state, trainer.make_batch(np.int32(step)))
        state, _ = trainer.pop_train_metrics(state)
    assert trainer.train_step._cache_size() == 1
    assert trainer.make_batch._cache_size() == 1
    assert int(state.step) == 4 and bool(metrics["finite"])
    # The old state's buffers were donated to the new one.
    old = state
    state, _ = trainer.train_step(state, trainer.make_batch(np.int32(4)))
    assert jax.tree.leaves(old.params)[0].is_deleted()


@pytest.mark.parametrize("task", ["adding", "charlm"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, task, text_file):
    ov = [*TINY, *RESUME_CADENCE]
    if task == "charlm":
        ov = charlm_overrides(text_file) + ov
    cfg = load_config(None, ov)
    ref = train_and_evaluate(cfg, tmp_path / "ref", quiet=True)
    assert ref.status == "done" and ref.step == 7
    # Stopped after step 5: between checkpoints (4) and log events (6), one step past an eval.
    run = train_and_evaluate(cfg, tmp_path / "stop", stop_at=5, quiet=True)
    assert run.status == "interrupted" and run.step == 5
    with Checkpointer(tmp_path / "stop" / "checkpoints") as ck:
        assert ck.all_steps() == [4, 5]
    resumed = train_and_evaluate(cfg, tmp_path / "stop", quiet=True)
    assert resumed.status == "done" and resumed.metrics == ref.metrics
    assert get_trainer(cfg).train_step._cache_size() == 1  # restored state: no new compile
    assert_same_run(tmp_path / "ref", tmp_path / "stop")
    if task == "charlm":
        _, meta = final_params(tmp_path / "stop")
        assert meta["data_position"]["window"] == 7 % get_trainer(cfg).task.windows


def _spawn(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lstm_jax.cli", "train", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(predicate, proc, timeout=180.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): "
                                 f"{proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for training to make progress")
        time.sleep(0.05)


def _checkpoint_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_mid_training_then_resume_is_exact(tmp_path):
    ov = [*TINY, "train.log_every=1", "train.eval_every=5", "train.checkpoint_every=3",
          "train.keep_checkpoints=2"]
    work = tmp_path / "killed"
    proc = _spawn([*ov, "train.steps=100000", f"--workdir={work}"], tmp_path)
    _wait_for(lambda: any(s >= 6 for s in _checkpoint_steps(work)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    with Checkpointer(work / "checkpoints") as ck:
        k = ck.latest_step()
    assert k is not None and k >= 6 and k % 3 == 0
    # The log may run past the checkpoint; the resumed run drops those events and redoes them.
    total = k + 4
    resumed = train_and_evaluate(load_config(work / "config.yaml", [f"train.steps={total}"]),
                                 work, quiet=True)
    assert resumed.step == total
    ref = train_and_evaluate(load_config(None, [*ov, f"train.steps={total}"]), tmp_path / "ref",
                             quiet=True)
    assert resumed.metrics == ref.metrics
    assert_same_run(tmp_path / "ref", work)


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    work = tmp_path / "run"
    proc = _spawn([*TINY, "train.steps=100000", "train.log_every=1", "train.checkpoint_every=1000",
                   f"--workdir={work}"], tmp_path)
    _wait_for(lambda: len(read_metrics(work / "metrics.jsonl")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in out
    steps = _checkpoint_steps(work)
    assert len(steps) == 1 and steps[0] >= 3 and steps[0] < 1000


def test_non_finite_loss_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                    capsys):
    real = tasks_mod.AddingTask.train_batch

    def poisoned(self, step, batch_size):
        batch = real(self, step, batch_size)
        batch["x"] = jnp.where(step >= 4, jnp.nan, batch["x"])  # steps 1-4 fine, step 5 NaN
        return batch

    monkeypatch.setattr(tasks_mod.AddingTask, "train_batch", poisoned)
    work = tmp_path / "run"
    # seed=7: a config no other test uses, so no cached Trainer holds the poisoned data (or
    # keeps it for later tests).
    code = cli.main(["train", *TINY, "seed=7", "train.steps=10", "train.checkpoint_every=2",
                     f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite loss (nan) at step 5" in err and "last good checkpoint is step 4" in err
    assert "Traceback" not in err
    assert _checkpoint_steps(work) == [2, 4]
    state, _ = final_params(work)
    assert int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_time_limit_stops_with_a_checkpoint_and_an_eval(tmp_path):
    cfg = load_config(None, [*TINY, "train.steps=1000000", "train.time_limit=0.0001"])
    result = train_and_evaluate(cfg, tmp_path / "run", quiet=True)
    assert result.status == "time_limit" and 0 < result.step < 1000000
    assert "mse" in result.metrics
    assert _checkpoint_steps(tmp_path / "run") == [result.step]
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert events[-1]["split"] == "eval" and events[-1]["chance"] == {"mse": pytest.approx(1 / 6)}
    json.dumps(events)


def test_raising_steps_keeps_the_cosine_when_decay_steps_spells_it_out(tmp_path):
    # decay_steps=0 means "the cosine spans train.steps"; to run on past the end of a finished
    # cosine, a resumed run may set decay_steps to the old train.steps (the same schedule).
    cosine = ["optim.schedule=warmup_cosine", "optim.warmup_steps=1", "optim.lr=0.01",
              "train.log_every=1"]
    first = load_config(None, [*TINY, *cosine, "train.steps=4"])
    train_and_evaluate(first, tmp_path / "run", quiet=True)
    more = load_config(None, [*TINY, *cosine, "train.steps=6", "optim.decay_steps=4"])
    assert train_and_evaluate(more, tmp_path / "run", quiet=True).status == "done"
    lrs = {e["step"]: e["lr"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl")
           if e["split"] == "train"}
    # Step s logs the rate of update s, i.e. schedule(s - 1); warmup_cosine_decay_schedule(0,
    # 0.01, warmup 1, decay 4) is a cosine from count 1 to 4 (3 counts), then its end value 0.
    expected = {s: 0.01 * 0.5 * (1 + np.cos(np.pi * min(s - 2, 3) / 3)) for s in range(2, 7)}
    assert [round(lrs[s], 7) for s in range(2, 7)] == [round(expected[s], 7) for s in range(2, 7)]
    with pytest.raises(ConfigError, match="optim.decay_steps: this run dir was started with 4"):
        train_and_evaluate(load_config(None, [*TINY, *cosine, "train.steps=8",
                                              "optim.decay_steps=5"]), tmp_path / "run")
