"""The config schema: defaults, YAML, typed dotted overrides, and the errors that stop a run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from lstm_jax.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from lstm_jax.train.loop import check_resume_compatible, make_optimizer
from lstm_jax.train.model import split_core_kwargs

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def test_defaults_are_the_adding_problem():
    cfg = load_config()
    assert cfg.task.name == "adding" and cfg.task.seq_len == 100
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_typed_against_the_schema():
    cfg = load_config(None, ["model.hidden_size=256", "optim.lr=3e-3", "train.progress=false",
                             "train.steps=1e4", "model.lstm_kwargs.remat=true",
                             "optim.kwargs.b1=0.8"])
    assert cfg.model.hidden_size == 256 and isinstance(cfg.model.hidden_size, int)
    assert cfg.optim.lr == pytest.approx(3e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.progress is False and cfg.train.steps == 10000
    assert cfg.model.lstm_kwargs == {"remat": True} and cfg.optim.kwargs == {"b1": 0.8}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nmodel:\n  hidden_size: 16\noptim:\n  lr: 1e-2\n")
    cfg = load_config(path, ["model.hidden_size=8"])
    assert (cfg.seed, cfg.model.hidden_size, cfg.optim.lr) == (3, 8, 0.01)


@pytest.mark.parametrize("overrides, message", [
    (["model.hiden_size=3"], "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    (["modle.hidden_size=3"], "(did you mean 'model'?)"),
    (["model.hidden_size=big"], "model.hidden_size: expected an integer, got 'big'"),
    (["model.hidden_size=1.5"], "model.hidden_size: expected an integer"),
    (["model.hidden_size=0"], "model.hidden_size: must be >= 1, got 0"),
    (["data.val_fraction=1.0"], "data.val_fraction: must be < 1.0"),
    (["train.progress=yes please"], "train.progress: expected true or false"),
    (["optim.lr=nan"], "optim.lr: must be finite"),
    (["task.name=addng"], ("task.name: 'addng' is not one of adding, copy, charlm, classify "
                          "(did you mean 'adding'?)")),
    (["model"], "expected KEY=VALUE"),
    (["model=3"], "'model' is a section"),
    (["task.name=charlm"], "data.path: task.name=charlm needs a data file"),
    (["data.path=/nonexistent/x.txt"], "data.path: no file '/nonexistent/x.txt'"),
    (["model.proj_size=200"], "model.proj_size: must be < model.hidden_size"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_unknown_key_in_yaml_and_unreadable_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes' \(did you mean 'steps'\?\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(scalar)


def test_model_fields_route_to_the_core_by_signature():
    cfg = load_config(None, ["model.num_layers=2", "model.dropout=0.1", "model.unroll=2",
                             "model.lstm_kwargs.remat=true",
                             "model.lstm_kwargs.compute_dtype=bfloat16", "model.peephole=true",
                             "model.zoneout_h=0.1", "model.lstm_kwargs.chrono_t_max=50"])
    init_kw, call_kw = split_core_kwargs(cfg.model)
    assert init_kw["peephole"] is True and init_kw["chrono_t_max"] == 50
    assert call_kw["zoneout_h"] == 0.1 and "peephole" not in call_kw
    assert init_kw["num_layers"] == 2 and "dropout" not in init_kw
    assert call_kw["dropout"] == 0.1 and call_kw["unroll"] == 2 and call_kw["remat"] is True
    assert str(call_kw["compute_dtype"]) == "bfloat16"
    with pytest.raises(ConfigError, match=r"model.lstm_kwargs.remmat: .*did you mean 'remat'"):
        split_core_kwargs(load_config(None, ["model.lstm_kwargs.remmat=true"]).model)
    with pytest.raises(ConfigError, match="model.lstm_kwargs.x: set by the trainer"):
        split_core_kwargs(load_config(None, ["model.lstm_kwargs.x=1"]).model)


def test_optimizer_by_name():
    cfg = load_config(None, ["optim.name=sgd", "optim.kwargs.momentum=0.9", "optim.clip_norm=1"])
    make_optimizer(cfg.optim, 10)
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        make_optimizer(load_config(None, ["optim.name=adamww"]).optim, 10)
    with pytest.raises(ConfigError, match="optim.kwargs.bb1: not an argument of optax.adam"):
        make_optimizer(load_config(None, ["optim.kwargs.bb1=0.8"]).optim, 10)


def test_schedule_warmup_cosine():
    cfg = load_config(None, ["optim.schedule=warmup_cosine", "optim.warmup_steps=10",
                             "train.steps=110", "optim.lr=1.0", "optim.final_lr_fraction=0.1"])
    _, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.55) and float(schedule(110)) == pytest.approx(0.1)
    # A longer cosine than the run: training ends part-way down it.
    cfg = load_config(None, ["optim.schedule=warmup_cosine", "optim.warmup_steps=10",
                             "train.steps=60", "optim.decay_steps=110", "optim.lr=1.0"])
    _, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    assert float(schedule(60)) == pytest.approx(0.5)


def test_resume_allows_only_cadence_changes(tmp_path):
    cfg = load_config()
    dump_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    check_resume_compatible(saved, load_config(None, ["train.steps=5000", "train.eval_every=7"]))
    with pytest.raises(ConfigError, match="model.hidden_size: this run dir was started with 128"):
        check_resume_compatible(saved, load_config(None, ["model.hidden_size=64"]))


def test_apply_overrides_leaves_input_alone():
    data = {"model": {"hidden_size": 4}}
    out = apply_overrides(data, ["model.hidden_size=8"])
    assert data == {"model": {"hidden_size": 4}} and out["model"]["hidden_size"] == 8


@pytest.mark.parametrize("name", ["adding", "copy", "charlm", "classify"])
def test_shipped_configs_load_and_say_how_to_run(name, tmp_path, monkeypatch):
    path = REPO / "configs" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "lstm-jax train configs/" in text.split("\n\n")[0]
    overrides = []
    if name == "charlm" and not CORPUS.exists():
        pytest.skip("the shared corpus is not on this machine")
    if name == "classify":
        from lstm_jax.train.make_data import main as make_data

        make_data([str(tmp_path / "m.npz"), "--train", "10", "--test", "5"])
        overrides = [f"data.path={tmp_path / 'm.npz'}"]
    monkeypatch.chdir(REPO)
    cfg = load_config(path, overrides)
    assert cfg.task.name == name and isinstance(cfg, Config)


def test_step_activation_bytes_counts_gates_cell_state_and_outputs():
    from lstm_jax.train.config import step_activation_bytes

    # Per layer and direction B * T * (4H gates + H cell + H_out outputs) float32 values.
    cfg = load_config(None, ["model.hidden_size=512", "model.num_layers=2",
                             "model.bidirectional=true", "model.proj_size=128",
                             "train.batch_size=8", "task.seq_len=50"])
    assert step_activation_bytes(cfg) == 8 * 50 * (4 * 512 + 512 + 128) * 4 * 2 * 2
    copy = load_config(None, ["task.name=copy", "task.delay=30", "task.copy_length=5"])
    assert step_activation_bytes(copy) == 32 * (30 + 2 * 5) * (6 * 128) * 4
    remat = load_config(None, ["model.lstm_kwargs.remat=true"])  # ~2 sqrt(T) of T = 100
    assert step_activation_bytes(remat) == 32 * 20 * (6 * 128) * 4
    copy.task.name = "classify"  # T comes from the data file
    assert step_activation_bytes(copy) is None


def test_freed_memory_is_kept_for_large_cpu_steps_or_when_asked(monkeypatch):
    from lstm_jax._host_memory import MMAP_THRESHOLD_MAX, keep_freed_memory_for

    monkeypatch.delenv("LSTM_JAX_KEEP_FREED_MEMORY", raising=False)
    big, small = MMAP_THRESHOLD_MAX + 1, MMAP_THRESHOLD_MAX
    assert keep_freed_memory_for(big, platform_is_cpu=True)
    assert not keep_freed_memory_for(small, platform_is_cpu=True)
    assert not keep_freed_memory_for(big, platform_is_cpu=False)
    assert not keep_freed_memory_for(None, platform_is_cpu=True)
    monkeypatch.setenv("LSTM_JAX_KEEP_FREED_MEMORY", "0")
    assert not keep_freed_memory_for(big, platform_is_cpu=True)
    monkeypatch.setenv("LSTM_JAX_KEEP_FREED_MEMORY", "1")
    assert keep_freed_memory_for(small, platform_is_cpu=False)
    monkeypatch.setenv("LSTM_JAX_KEEP_FREED_MEMORY", "auto")  # not a yes or no: unset
    assert keep_freed_memory_for(big, platform_is_cpu=True)
    assert not keep_freed_memory_for(small, platform_is_cpu=True)


def test_an_installed_pjrt_plugin_counts_as_an_accelerator(monkeypatch):
    import importlib.metadata

    from lstm_jax import _host_memory

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: real(group="no-such-group"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setitem(sys.modules, "jax_plugins", None)  # import fails: none installed
    assert not _host_memory.accelerator_plugin_installed()
    fake = importlib.metadata.EntryPoint("xla_cuda12", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [fake] if group == "jax_plugins" else [])
    assert _host_memory.accelerator_plugin_installed()


def test_train_sets_the_allocator_before_jax_starts(monkeypatch):
    from lstm_jax import cli
    from lstm_jax.train import distributed

    calls = []
    monkeypatch.setattr(cli, "_keep_freed_memory", lambda cfg: calls.append("allocator"))

    def initialize(cfg):  # the first thing that may start JAX's backends
        calls.append("jax")
        raise ConfigError("stop here")

    monkeypatch.setattr(distributed, "initialize", initialize)
    assert cli.main(["train", "train.steps=1"]) == 2
    assert calls == ["allocator", "jax"]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc",
                    reason="mallopt's settings are glibc's")
def test_train_command_keeps_freed_memory_only_above_the_threshold():
    # In a child: the allocator setting is process-wide. 64 x 100 x 3072 floats (75 MiB) of
    # activations are above glibc's 32 MiB mmap limit, the default task's 9.4 MiB below.
    import os
    import subprocess
    import sys

    child = ("from lstm_jax.cli import _keep_freed_memory as keep\n"
             "from lstm_jax.train.config import load_config as load\n"
             "print(keep(load(None, ['train.batch_size=64', 'model.hidden_size=512'])),"
             " keep(load(None)))")
    env = {k: v for k, v in os.environ.items() if k != "LSTM_JAX_KEEP_FREED_MEMORY"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         check=True, env=env, cwd=REPO)
    assert out.stdout.split() == ["True", "False"]
