"""Config-driven training of LSTMs: ``lstm-jax train`` as a library.

    from lstm_jax.train import load_config, train_and_evaluate
    cfg = load_config("configs/adding.yaml", ["train.steps=500"])
    result = train_and_evaluate(cfg, "runs/adding-demo")
    result.metrics  # {'mse': ...}

Layout: :mod:`.config` (the schema), :mod:`.tasks` (data, losses, metrics), :mod:`.model`
(embedding + core LSTM + readout), :mod:`.loop` (optimizer, jitted step, evaluation, resume),
:mod:`.checkpoint` (orbax), :mod:`.progress` (progress bar, metrics.jsonl), :mod:`.plotting`,
:mod:`.sampling`.
"""

from lstm_jax.train.checkpoint import Checkpointer as Checkpointer
from lstm_jax.train.config import Config as Config
from lstm_jax.train.config import ConfigError as ConfigError
from lstm_jax.train.config import load_config as load_config
from lstm_jax.train.loop import NonFiniteLossError as NonFiniteLossError
from lstm_jax.train.loop import Trainer as Trainer
from lstm_jax.train.loop import TrainResult as TrainResult
from lstm_jax.train.loop import TrainState as TrainState
from lstm_jax.train.loop import evaluate_run as evaluate_run
from lstm_jax.train.loop import make_optimizer as make_optimizer
from lstm_jax.train.loop import read_run_config as read_run_config
from lstm_jax.train.loop import train_and_evaluate as train_and_evaluate
from lstm_jax.train.plotting import plot_run as plot_run
from lstm_jax.train.sampling import sample_run as sample_run
from lstm_jax.train.tasks import make_task as make_task

__all__ = [
    "Checkpointer",
    "Config",
    "ConfigError",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "Trainer",
    "evaluate_run",
    "load_config",
    "make_optimizer",
    "make_task",
    "plot_run",
    "read_run_config",
    "sample_run",
    "train_and_evaluate",
]
