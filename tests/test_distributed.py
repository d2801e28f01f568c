"""Data parallelism and multi-host training: the same numbers on 8 devices, on 1, and in 2
processes joined by jax.distributed; checkpoints that move between mesh sizes; config errors.

A JAX process's device count is fixed when JAX starts, so each device count runs in a process of
its own (tests/distributed_worker.py with ``XLA_FLAGS=--xla_force_host_platform_device_count``).
All of them start at once in one module fixture and the tests read their run dirs:

- ``a8`` (8 devices) and ``a1`` (1 device): the same charlm config, 30 steps, every step logged;
  each stops at step 15 on the way and copies its run dir (``r8``, ``r1``) before going on.
- then each resumes the other's copy to step 30: ``r8`` on 1 device, ``r1`` on 8.
- ``d2``: two processes with 2 CPU devices each, one JAX runtime over loopback (gloo); stopped at
  step 15 and resumed to 30 in the same processes.
- the command line with a batch of 12 on 8 devices.

Float32 sums in another order are the only difference allowed: 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lstm_jax.train.checkpoint import Checkpointer
from lstm_jax.train.config import ConfigError, DistributedConfig, MeshConfig, load_config
from lstm_jax.train.distributed import DataParallel
from lstm_jax.train.loop import Trainer
from lstm_jax.train.progress import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
TEXT = "".join(f"{i} little pigs went to market, {i * 3 % 7} came home.\n" for i in range(300))
RTOL = 1e-4
STEPS, STOP = 30, 15


def overrides(text: Path) -> list[str]:
    # charlm: the carried state is split along the batch; dropout: the random masks must be the
    # same numbers however the batch is split.
    return ["task.name=charlm", f"data.path={text}", "task.seq_len=8", "train.batch_size=8",
            "model.hidden_size=16", "model.embed_dim=8", "model.embed_dropout=0.1",
            "model.output_dropout=0.1", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=10", "train.checkpoint_every=15", "train.keep_checkpoints=5",
            "train.progress=false"]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _start(plan: list[dict], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(plan)], cwd=REPO,
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_mesh_size(tmp: Path, ov: list[str], me: str, other: str, devices: int) -> list[dict]:
    """Train ``me`` with a copy at step STOP, then resume the ``other`` size's copy."""
    return [
        {"op": "train", "workdir": str(tmp / f"a{me}"), "overrides": ov, "stop_at": STOP},
        {"op": "copy", "src": str(tmp / f"a{me}"), "dst": str(tmp / f"r{me}")},
        {"op": "train", "workdir": str(tmp / f"a{me}"), "overrides": ov},
        {"op": "wait", "path": str(tmp / f"r{other}")},
        {"op": "train", "workdir": str(tmp / f"r{other}"), "overrides": ov},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> (returncode, stdout, stderr) of each process, and "root": the run dirs' root."""
    tmp = tmp_path_factory.mktemp("distributed")
    text = tmp / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    ov = overrides(text)
    port = _free_port()
    procs = {
        "p8": _start(_one_mesh_size(tmp, ov, "8", "1", 8), 8),
        "p1": _start(_one_mesh_size(tmp, ov, "1", "8", 1), 1),
    }
    for i in range(2):
        dist = [f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2", f"distributed.process_id={i}"]
        run = {"op": "train", "workdir": str(tmp / "d2"), "overrides": ov + dist, "quiet": False}
        procs[f"d{i}"] = _start([{**run, "stop_at": STOP}, run], 2)
    procs["bad"] = subprocess.Popen(
        [sys.executable, "-m", "lstm_jax.cli", "train", *ov, "train.batch_size=12",
         f"--workdir={tmp / 'bad'}"], cwd=REPO, env=_env(8), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    out: dict = {"root": tmp}
    deadline = time.monotonic() + 240
    for name, p in procs.items():
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            se += "\n[timed out]"
        out[name] = (p.returncode, so, se)
    return out


def _ok(runs: dict, *names: str) -> None:
    for name in names:
        code, so, se = runs[name]
        assert code == 0, f"{name} exited {code}:\n{so[-3000:]}\n{se[-6000:]}"


def _train_events(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")
            if r["split"] == "train"}


def _eval_events(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "eval"}


def max_rel_diff(a: Path, b: Path, steps=range(1, STEPS + 1)) -> float:
    """The largest relative difference of the logged loss, grad norm and eval metrics."""
    ta, tb = _train_events(a), _train_events(b)
    assert all(s in ta and s in tb for s in steps), (sorted(ta), sorted(tb))
    worst = 0.0
    for s in steps:
        for k in ("loss", "grad_norm", "bpc"):
            worst = max(worst, abs(ta[s][k] - tb[s][k]) / abs(tb[s][k]))
    ea, eb = _eval_events(a), _eval_events(b)
    for s in ea.keys() & eb.keys():
        if s >= steps[0]:
            worst = max(worst, abs(ea[s]["loss"] - eb[s]["loss"]) / abs(eb[s]["loss"]))
    assert {s for s in ea if s >= steps[0]} == {s for s in eb if s >= steps[0]}
    return worst


def _final(workdir: Path):
    """The newest checkpoint's state and meta, restored here (one device)."""
    cfg = load_config(workdir / "config.yaml")
    trainer = Trainer(cfg)
    with Checkpointer(workdir / "checkpoints") as ck:
        return ck.restore(ck.latest_step(), trainer.abstract_state())


def _meta(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def test_8_devices_and_1_device_give_the_same_trajectory(runs):
    _ok(runs, "p8", "p1")
    root = runs["root"]
    diff = max_rel_diff(root / "a8", root / "a1")
    print(f"8 vs 1 device: max relative difference over {STEPS} steps {diff:.2e}")
    assert diff < RTOL
    assert _meta(root / "a8", STEPS)["devices"] == 8 and _meta(root / "a1", STEPS)["devices"] == 1
    # Not the same numbers by accident of a dead run: the loss moved.
    t = _train_events(root / "a1")
    assert t[STEPS]["loss"] < t[1]["loss"] - 0.1


@pytest.mark.parametrize("written, resumed", [("8", "1"), ("1", "8")])
def test_a_checkpoint_moves_between_mesh_sizes(runs, written, resumed):
    _ok(runs, "p8", "p1")
    root = runs["root"]
    run = root / f"r{written}"  # written on `written` devices up to STOP, resumed on `resumed`
    assert _meta(run, STOP)["devices"] == int(written)
    assert _meta(run, STEPS)["devices"] == int(resumed)
    after = range(STOP + 1, STEPS + 1)
    for ref in ("a1", "a8"):
        diff = max_rel_diff(run, root / ref, after)
        print(f"written on {written}, resumed on {resumed} vs {ref}: {diff:.2e}")
        assert diff < RTOL
    state, _ = _final(run)
    ref_state, _ = _final(root / f"a{resumed}")
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=1e-5)


def test_two_processes_over_loopback_train_to_the_same_numbers(runs):
    _ok(runs, "d0", "d1", "p1")
    root = runs["root"]
    diff = max_rel_diff(root / "d2", root / "a1")
    print(f"2 processes x 2 devices vs 1 device: {diff:.2e}")
    assert diff < RTOL
    meta = _meta(root / "d2", STEPS)
    assert (meta["devices"], meta["processes"]) == (4, 2)
    # The launch's coordinator is not part of the run: a resume must not try to join it.
    assert load_config(root / "d2" / "config.yaml").distributed == DistributedConfig()
    lead, other = runs["d0"][1], runs["d1"][1]
    assert "data parallel: 4 cpu device(s) in 2 processes" in lead
    assert f"resuming from step {STOP}" in lead  # orbax restored it in both processes
    assert "eval step" not in other and "task charlm" not in other  # only process 0 speaks
    results = [json.loads(line[len("RESULTS "):]) for name in ("d0", "d1")
               for line in runs[name][1].splitlines() if line.startswith("RESULTS ")]
    assert results[0] == results[1]  # every process ends with the same metrics
    assert [r["step"] for r in results[0]] == [STOP, STEPS]


def test_a_batch_the_devices_do_not_divide_exits_2_with_a_message(runs):
    code, _, se = runs["bad"]
    assert code == 2, se
    assert "train.batch_size: 12 rows cannot be split evenly over the 8 devices" in se
    assert "train.batch_size=16" in se and "mesh.data=6" in se  # 6 devices split 12 rows
    assert "Traceback" not in se


def test_mesh_errors_in_process():
    """One device here: asking for more is a config error; any batch splits over one."""
    with pytest.raises(ConfigError, match=r"mesh.data: 2 devices asked for, but only 1"):
        DataParallel(MeshConfig(data=2), 8)
    dp = DataParallel(MeshConfig(data=0), 7)
    assert dp.size == 1 and dp.rows.mesh.axis_names == ("data",)
    # Over several devices the core runs its scan, which XLA splits; a custom kernel cannot be.
    model = load_config(None, ["model.lstm_kwargs.backend=cudnn"]).model
    assert dp.model_config(model) is model
    dp.size = 8  # the rule for 8 devices, without 8 devices
    assert dp.model_config(load_config().model).lstm_kwargs == {"backend": "scan"}
    with pytest.raises(ConfigError, match="'cudnn' cannot be split over the 8-device data mesh"):
        dp.model_config(model)


@pytest.mark.parametrize("ov, message", [
    (["distributed.process_id=1"], "distributed.process_id: set distributed.coordinator_address"),
    (["distributed.coordinator_address=h:1", "distributed.num_processes=2",
      "distributed.process_id=2"], "distributed.process_id: must be < distributed.num_processes"),
    (["mesh.data=-1"], "mesh.data: must be >= 0"),
])
def test_distributed_config_errors(ov, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, ov)
