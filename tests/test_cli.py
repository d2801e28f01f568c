"""The ``lstm-jax`` command end to end: train, eval, sample, plot; exit statuses; bench dispatch."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from lstm_jax import cli
from lstm_jax.train.progress import read_metrics

REPO = Path(__file__).resolve().parents[1]
TEXT = "".join(f"ROMEO: {i} roses, {i * 5 % 11} thorns.\nJULIET: ay.\n" for i in range(200))


def test_train_eval_sample_plot_on_a_tiny_charlm(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    work = tmp_path / "run"
    args = ["train", f"data.path={text}", "task.name=charlm", "task.seq_len=8",
            "model.hidden_size=16", "model.embed_dim=8", "train.batch_size=4", "train.steps=2",
            "train.log_every=1", "train.eval_every=1", f"--workdir={work}"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert f"run dir: {work}" in out.out and "done: step 2" in out.out
    assert "chance" in out.out and "step 2/2" in out.err  # progress bar on stderr
    assert {p.name for p in work.iterdir()} >= {"config.yaml", "metrics.jsonl", "task.json",
                                                "checkpoints"}
    saved = yaml.safe_load((work / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == 16 and saved["data"]["path"] == str(text)
    events = read_metrics(work / "metrics.jsonl")
    assert [(e["step"], e["split"]) for e in events] == [(1, "train"), (1, "eval"),
                                                         (2, "train"), (2, "eval")]
    assert {"loss", "bpc", "time", "chars_per_sec"} <= set(events[0])

    # Again on the same run dir with no config: resumes from the run's own config, steps raised.
    assert cli.main(["train", "train.steps=3", f"--workdir={work}"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out

    assert cli.main(["eval", str(work)]) == 0
    assert "step 3: loss" in capsys.readouterr().out

    assert cli.main(["sample", str(work), "--prompt", "ROMEO:", "--length", "20",
                     "--temperature", "0.8", "--seed", "1"]) == 0
    sample = capsys.readouterr().out.rstrip("\n")
    assert sample.startswith("ROMEO:") and len(sample) == 26
    assert set(sample) <= set(TEXT)
    assert cli.main(["sample", str(work), "--prompt", "ROMEO:", "--length", "20", "--seed",
                     "1"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == sample  # same seed, same text
    assert cli.main(["sample", str(work), "--prompt", "Z~"]) == 2
    assert "never occur in the training text" in capsys.readouterr().err

    assert cli.main(["plot", str(work)]) == 0
    png = work / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["train", "model.hiden_size=4"], "did you mean 'model.hidden_size'"),
    (["train", "missing.yaml"], "cannot read config file 'missing.yaml'"),
    (["train", "optim.lr=-1"], "optim.lr: must be > 0.0, got -1.0"),
    (["train", "a.yaml", "b.yaml"], "unexpected argument 'b.yaml'"),
    (["eval", "/nonexistent/run"], "not a run dir"),
])
def test_usage_errors_exit_2_with_one_message(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


TINY = ["train.steps=2", "model.hidden_size=8", "task.seq_len=5", "task.eval_size=8",
        "train.batch_size=4", "train.progress=false"]


@pytest.mark.parametrize("override, message", [
    ("model.init=bogus", "model.init: 'bogus' is not one of default, pytorch"),
    ("model.lstm_kwargs.cell_clip=-1", "rejected this config: cell_clip must be a positive"),
    ("model.lstm_kwargs.backend=bogus", "rejected this config: backend must be one of"),
    ("optim.kwargs.b1=abc", "model/optim: the core library rejected this config"),
    ("model.lstm_kwargs.bidirectional=true",
     "model.lstm_kwargs.bidirectional: the trainer sizes the model from model.bidirectional"),
])
def test_values_only_the_core_can_judge_exit_2_before_a_run_dir(tmp_path, monkeypatch, capsys,
                                                               override, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_overrides_after_workdir_and_a_finished_run_is_not_logged_again(tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(["train", f"--workdir={work}", *TINY, "train.log_every=1"]) == 0
    assert yaml.safe_load((work / "config.yaml").read_text())["model"]["hidden_size"] == 8
    events = read_metrics(work / "metrics.jsonl")
    capsys.readouterr()
    assert cli.main(["train", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "already at step 2" in out and "not logged again" in out
    assert read_metrics(work / "metrics.jsonl") == events


def test_files_in_the_run_dir_that_are_not_ours_are_kept(tmp_path, capsys):
    work = tmp_path / "exp"
    work.mkdir()
    mine = work / "config.yaml"
    mine.write_text("# my notes\ntrain:\n  steps: 2\n", encoding="utf-8")
    for argv in (["train", str(mine), f"--workdir={work}"], ["train", f"--workdir={work}"]):
        assert cli.main(argv) == 2
        assert "holds config.yaml not written by lstm-jax" in capsys.readouterr().err
    assert mine.read_text(encoding="utf-8") == "# my notes\ntrain:\n  steps: 2\n"
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    assert cli.main(["train", f"--workdir={tmp_path / 'afile'}"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_malformed_yaml_and_bad_bench_counts_are_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: 8\n", encoding="utf-8")
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config file '{bad}' is not valid YAML at line 2" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--repeats", "0"])
    assert stop.value.code == 2 and "--repeats: must be >= 1" in capsys.readouterr().err


def test_resuming_with_a_different_model_is_refused(tmp_path, capsys):
    work = tmp_path / "run"
    (work / "checkpoints" / "5").mkdir(parents=True)  # looks like a run with a checkpoint
    from lstm_jax.train.config import dump_config, load_config

    dump_config(load_config(None, ["model.hidden_size=8"]), work / "config.yaml")
    assert cli.main(["train", str(REPO / "configs" / "adding.yaml"), "model.hidden_size=9",
                     f"--workdir={work}"]) == 2
    assert "model.hidden_size: this run dir was started with 8" in capsys.readouterr().err


def test_console_script_exit_status_and_scripts_train(tmp_path):
    """The real processes: bad config -> 2, one line on stderr; scripts/train.py is the same."""
    for cmd in ([sys.executable, "-m", "lstm_jax.cli", "train", "train.stpes=3"],
                [sys.executable, "scripts/train.py", "train.stpes=3"]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 2, proc.stderr
        assert "unknown key 'train.stpes' (did you mean 'train.steps'?)" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_bench_is_handed_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("lstm_jax.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lstm_jax.bench", fake)
    import lstm_jax

    monkeypatch.setattr(lstm_jax, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--out", "x"]) == 0
    assert seen == [["--quick", "--out", "x"]]
