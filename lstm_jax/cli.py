"""The ``lstm-jax`` command: parse the command line, load the config, call the library.

    lstm-jax train [CONFIG.yaml] [key=value ...] [--workdir DIR]
    lstm-jax eval RUN_DIR
    lstm-jax sample RUN_DIR --prompt "ROMEO:" --length 500 --temperature 0.8 [--seed N]
    lstm-jax plot RUN_DIR
    lstm-jax bench ...

Exit status: 0 done; 2 bad usage or config (one message, no traceback); 3 non-finite loss;
128 + signal number when stopped by SIGINT/SIGTERM (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_USAGE, EXIT_NONFINITE = 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lstm-jax", description="Train and use LSTMs in JAX.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train from a config (default: the adding problem)",
                       description="Train from a YAML config and key=value overrides, e.g. "
                                   "lstm-jax train configs/charlm.yaml model.hidden_size=256. "
                                   "Running it again on a run dir resumes that run.")
    t.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional config file, then dotted overrides")
    t.add_argument("--workdir", help="run dir (default: runs/<task>-<date>-<time>)")

    e = sub.add_parser("eval", help="evaluate the newest checkpoint of a run")
    e.add_argument("run_dir")

    s = sub.add_parser("sample", help="text from a character model")
    s.add_argument("run_dir")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--length", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)

    pl = sub.add_parser("plot", help="PNG of a run's curves, written into the run dir")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="where to write the PNG (default RUN_DIR/curves.png)")

    sub.add_parser("bench", help="LSTM speed benchmarks (arguments go to lstm_jax.bench)",
                   add_help=False)
    return p


def _default_workdir(task: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{task}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{task}-{stamp}-{n}"
    return path


def _keep_freed_memory(cfg) -> bool:
    """On CPU, a step that saves more activations than glibc's mmap threshold trains faster when
    freed memory stays with the process (``lstm_jax._host_memory``: charlm ~10%). Called
    before JAX starts its thread pools, which the setting must precede."""
    from lstm_jax import _host_memory
    from lstm_jax.train.config import step_activation_bytes

    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    on_cpu = platforms == "cpu" or (not platforms and not _host_memory.accelerator_plugin_installed())
    if _host_memory.keep_freed_memory_for(step_activation_bytes(cfg), platform_is_cpu=on_cpu):
        return _host_memory.steady_malloc()
    return False


def _train(args) -> int:
    from lstm_jax.train.config import ConfigError, load_config, read_yaml
    from lstm_jax.train.loop import build_trainer, check_workdir, train_and_evaluate

    config_path, overrides = None, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: give one config file, then "
                              f"key=value overrides")
    base = None
    if args.workdir and config_path is None and (Path(args.workdir) / "config.yaml").exists():
        base = read_yaml(Path(args.workdir) / "config.yaml")  # resuming: the run's own config
    cfg = load_config(config_path, overrides, base=base)
    _keep_freed_memory(cfg)
    if not args.workdir and (cfg.distributed.coordinator_address or cfg.distributed.initialize):
        raise ConfigError("--workdir: a multi-process run needs one run dir that every process "
                          "names, on a filesystem they share")
    from lstm_jax.train import distributed

    distributed.initialize(cfg.distributed)  # first, so that only process 0 speaks
    workdir = Path(args.workdir) if args.workdir else _default_workdir(cfg.task.name)
    check_workdir(workdir)
    build_trainer(cfg)  # values only the core or optax can judge: rejected before the run dir
    if distributed.is_lead():
        print(f"run dir: {workdir}", flush=True)
    result = train_and_evaluate(cfg, workdir)
    if result.status == "interrupted" and result.signal:
        return 128 + result.signal
    return 0


def _eval(args) -> int:
    from lstm_jax.train.loop import evaluate_run

    _check_run_dir(args.run_dir)
    step, metrics, chance = evaluate_run(args.run_dir)
    parts = [f"{k} {v:.4f}" + (f" (chance {chance[k]:.4g})" if k in chance else "")
             for k, v in metrics.items()]
    print(f"step {step}: {', '.join(parts)}")
    return 0


def _sample(args) -> int:
    from lstm_jax.train.sampling import sample_run

    _check_run_dir(args.run_dir)
    print(sample_run(args.run_dir, args.prompt, args.length, temperature=args.temperature,
                     seed=args.seed))
    return 0


def _plot(args) -> int:
    from lstm_jax.train.plotting import plot_run

    _check_run_dir(args.run_dir)
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _check_run_dir(run_dir: str) -> None:
    from lstm_jax.train.config import ConfigError

    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run dir (no config.yaml)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from lstm_jax import bench  # another engineer's module; imported only when asked for

        return bench.main(argv[1:]) or 0
    parser = _parser()
    # parse_known_args, so that train's overrides may also follow --workdir: argparse alone
    # stops collecting positionals at the first option.
    args, extra = parser.parse_known_args(argv)  # bad usage: argparse prints it and exits 2
    if args.command == "train":
        args.items += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    from lstm_jax.train.config import ConfigError
    from lstm_jax.train.loop import NonFiniteLossError

    run = {"train": _train, "eval": _eval, "sample": _sample, "plot": _plot}[args.command]
    try:
        return run(args)
    except ConfigError as e:
        print(f"lstm-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f"lstm-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print("lstm-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
